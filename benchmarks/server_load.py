"""Load on a real `estable serve`: N synchronous A1111 txt2img calls at concurrency C; latency percentiles,
throughput, and a check that every job ran exactly once (the job store holds N done jobs, no failures).

    PYTHONPATH=src python benchmarks/server_load.py --out DIR [--model SRC] [--requests 200] [--concurrency 16]
        [--steps 20] [--size 512] [--device cuda] [--queue 32]

Starts the server as a subprocess on a free loopback port with a fresh --data-dir under DIR, waits for
/health/ready, fires the requests, reads /metrics, sends SIGTERM and checks the exit status (0). Writes
DIR/server_load.json. On a CPU, try --model default --size 64 --steps 1 --requests 20.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--model", default="default")
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--queue", type=int, default=32)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    data = args.out / f"data-{int(time.time())}"
    port = free_port()
    cmd = [sys.executable, "-m", "estable.cli", "serve", "--port", str(port), "--model", args.model, "--data-dir",
           str(data), "--device", args.device, "--queue", str(args.queue), "--max-size", str(max(args.size, 64))]
    log = open(args.out / "server_stderr.log", "w")  # noqa: SIM115  (open for the server's whole life)
    proc = subprocess.Popen(cmd, stderr=log, env=os.environ.copy())
    base = f"http://127.0.0.1:{port}"
    try:
        t0 = time.monotonic()
        with httpx.Client(base_url=base, timeout=10) as c:
            while True:
                try:
                    if c.get("/health/ready").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if proc.poll() is not None or time.monotonic() - t0 > 600:
                    raise SystemExit(f"the server did not get ready (see {args.out / 'server_stderr.log'})")
                time.sleep(0.2)
        ready_s = time.monotonic() - t0
        local = threading.local()

        def call(k: int) -> tuple[int, int, float, list[int]]:
            if not hasattr(local, "c"):
                local.c = httpx.Client(base_url=base, timeout=3600)
            t = time.perf_counter()
            r = local.c.post("/sdapi/v1/txt2img", json={"prompt": f"a red circle, request {k}", "seed": k,
                                                         "steps": args.steps, "width": args.size,
                                                         "height": args.size})
            seeds = json.loads(r.json()["info"])["all_seeds"] if r.status_code == 200 else []
            return k, r.status_code, time.perf_counter() - t, seeds

        t1 = time.perf_counter()
        with ThreadPoolExecutor(args.concurrency) as pool:
            results = list(pool.map(call, range(args.requests)))
        wall = time.perf_counter() - t1
        with httpx.Client(base_url=base, timeout=30) as c:
            metrics = c.get("/metrics").text
            jobs = c.get("/v1/jobs", params={"limit": 1}).json()["total"]
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(120)
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()
    lat = np.array([r[2] for r in results])
    statuses: dict[str, int] = {}
    for _, s, _, _ in results:
        statuses[str(s)] = statuses.get(str(s), 0) + 1
    own_seed = all(seeds == [k] for k, s, _, seeds in results if s == 200)
    images = next((float(line.split()[-1]) for line in metrics.splitlines()
                   if line.startswith("estable_images_generated_total")), None)
    out = {"requests": args.requests, "concurrency": args.concurrency, "steps": args.steps, "size": args.size,
           "model": args.model, "device": args.device, "ready_s": round(ready_s, 2), "wall_s": round(wall, 2),
           "throughput_rps": round(args.requests / wall, 3), "p50_s": round(float(np.percentile(lat, 50)), 4),
           "p90_s": round(float(np.percentile(lat, 90)), 4), "p99_s": round(float(np.percentile(lat, 99)), 4),
           "statuses": statuses, "each_answer_has_its_own_seed": own_seed, "jobs_in_store": jobs,
           "images_generated": images, "exit_status_after_sigterm": code}
    (args.out / "server_load.json").write_text(json.dumps(out, indent=2))
    print(json.dumps(out, indent=2))
    return 0 if statuses.get("200") == args.requests and own_seed and code == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
