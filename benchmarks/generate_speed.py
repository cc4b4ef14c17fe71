"""Issue 5's speed targets: 25 steps of DPM++ 2M (Karras) with guidance at 256×256, on the CPU or a GPU.

Reports the median of N generations inside one process (model loaded once, one warm-up run first; per image,
with ``--batch`` images per call) and the median of N whole `estable generate` commands (start-up, model loading
and PNG writing included). On a GPU both ways of running the U-Net are measured side by side: eager and replayed
CUDA graphs (the default).

    PYTHONPATH=src python benchmarks/generate_speed.py --model MODEL [--device cpu] [--threads 2] [--repeats 5]
    PYTHONPATH=src python benchmarks/generate_speed.py --model MODEL --device cuda --batch 1 --batch 16
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from estable.params import GenerationParams
from estable.pipeline import load_pipeline

PROMPT = "a red circle above a blue square"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="default")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default=None, help="default: fp32 on the CPU, fp16 on a GPU")
    ap.add_argument("--threads", type=int, default=2, help="CPU threads (default 2)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--batch", type=int, action="append", help="images per call (repeatable; default 1)")
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--cfg", type=float, default=7.0)
    ap.add_argument("--size", type=int, default=256)
    args = ap.parse_args()
    dtype = args.dtype or ("fp32" if args.device == "cpu" else "fp16")
    if args.device == "cpu":
        torch.set_num_threads(args.threads)

    def sync() -> None:
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()

    per_batch: dict[str, dict[str, object]] = {}
    modes = {"eager": False, "cuda_graphs": True} if args.device.startswith("cuda") else {"eager": False}
    for mode, graphs in modes.items():
        pipe = load_pipeline(args.model, device=args.device, dtype=dtype, cuda_graphs=graphs)
        for batch in args.batch or [1]:
            params = GenerationParams(prompt=PROMPT, sampler="dpmpp_2m_karras", steps=args.steps,
                                      cfg_scale=args.cfg, seed=1, width=args.size, height=args.size, batch_size=batch)
            pipe.txt2img(params)  # warm-up (and, with graphs, the recording)
            times = []
            for _ in range(args.repeats):
                sync()
                t0 = time.perf_counter()
                pipe.txt2img(params)
                sync()
                times.append(time.perf_counter() - t0)
            per_batch[f"{mode} batch {batch}"] = {"call_s_median": statistics.median(times), "call_s_all": times,
                                                  "per_image_s_median": statistics.median(times) / batch}

    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    whole = []
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "estable.cli", "generate", PROMPT, "--model", args.model, "--steps",
               str(args.steps), "--cfg", str(args.cfg), "--size", f"{args.size}x{args.size}", "--seed", "1",
               "--sampler", "dpmpp_2m_karras", "--device", args.device, "--dtype", dtype]
        for i in range(args.repeats):
            t0 = time.perf_counter()
            subprocess.run([*cmd, "--out", str(Path(tmp) / f"{i}.png")], check=True, env=env,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            whole.append(time.perf_counter() - t0)
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    print(json.dumps({
        "model": str(args.model), "device": device_name, "dtype": dtype, "threads": args.threads,
        "torch": torch.__version__, "steps": args.steps, "size": args.size, "cfg": args.cfg,
        "generation": per_batch, "command_s_median": statistics.median(whole), "command_s_all": whole,
    }, indent=1))


if __name__ == "__main__":
    main()
