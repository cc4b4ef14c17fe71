"""Issue 5's speed target on the CPU: 25 steps of DPM++ 2M (Karras) with guidance at 256×256.

Reports the median of N generations inside one process (model loaded once, one warm-up run first) and the median
of N whole `estable generate` commands (start-up, model loading and PNG writing included).

    PYTHONPATH=src python benchmarks/cpu_generate.py --model MODEL [--threads 2] [--repeats 5]
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
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--cfg", type=float, default=7.0)
    ap.add_argument("--size", type=int, default=256)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    pipe = load_pipeline(args.model, device="cpu", dtype="fp32")
    params = GenerationParams(prompt=PROMPT, sampler="dpmpp_2m_karras", steps=args.steps, cfg_scale=args.cfg,
                              seed=1, width=args.size, height=args.size)
    pipe.txt2img(params)  # warm-up
    inside = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        pipe.txt2img(params)
        inside.append(time.perf_counter() - t0)

    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    whole = []
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "estable.cli", "generate", PROMPT, "--model", args.model, "--steps",
               str(args.steps), "--cfg", str(args.cfg), "--size", f"{args.size}x{args.size}", "--seed", "1",
               "--sampler", "dpmpp_2m_karras", "--device", "cpu", "--dtype", "fp32"]
        for i in range(args.repeats):
            t0 = time.perf_counter()
            subprocess.run([*cmd, "--out", str(Path(tmp) / f"{i}.png")], check=True, env=env,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            whole.append(time.perf_counter() - t0)
    print(json.dumps({
        "model": str(args.model), "threads": args.threads, "torch": torch.__version__, "steps": args.steps,
        "size": args.size, "cfg": args.cfg,
        "generation_s_median": statistics.median(inside), "generation_s_all": inside,
        "command_s_median": statistics.median(whole), "command_s_all": whole,
    }, indent=1))


if __name__ == "__main__":
    main()
