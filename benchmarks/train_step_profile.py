"""Where a U-Net training run's step goes: is the GPU busy, or waiting for the host?

    PYTHONPATH=src python benchmarks/train_step_profile.py recipes/default/unet_wide.json --run-dir runs/prof \
        [--warm 100] [--steps 50] [--out DIR] [KEY=VALUE ...]

The trainer of ``estable train unet`` on CONFIG (its data, cache and loop as they run; overrides as the command takes
them) trains ``--warm`` steps, then ``--steps`` more under torch.profiler. Reported per step: the wall time, the time
the GPU spent in kernels (CUDA only; summed over kernels, so concurrent ones count twice) and its share of the wall,
the time the main process waited for the next batch, and the host operators with the most time of their own. A GPU
busy for most of the step is bound by its kernels (then fewer FLOPs or bytes pay); one idle for much of it waits for
the host (then CUDA graphs or compile, or fewer host operations, pay). The profiled segment ends with the checkpoint
the trainer saves at its stop; its time is in the wall. Writes ``DIR/train_profile.json`` with ``--out``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from estable.training.config import load_config
from estable.training.runs import latest_checkpoint
from estable.training.unet_trainer import UNetTrainer

WAIT_KEYS = ("DataLoader", "__next__")  # the main process waiting for (or collating) the next batch


def summarise(events, steps: int, wall_s: float, cuda: bool, top: int = 12) -> dict:
    """Per-step figures from ``prof.key_averages()`` (times in ms)."""
    device_us = sum(e.self_device_time_total for e in events) if cuda else 0.0
    waits = [e for e in events if all(k in e.key for k in WAIT_KEYS)]
    host = sorted((e for e in events if e.self_cpu_time_total > 0), key=lambda e: -e.self_cpu_time_total)
    wall_ms = 1000 * wall_s / steps
    return {
        "steps": steps,
        "wall_ms_per_step": wall_ms,
        "gpu_kernels_ms_per_step": device_us / 1000 / steps if cuda else None,
        "gpu_busy_share": device_us / 1000 / steps / wall_ms if cuda else None,
        "batch_wait_ms_per_step": sum(e.cpu_time_total for e in waits) / 1000 / steps,
        "host_ops": [{"op": e.key, "self_cpu_ms_per_step": e.self_cpu_time_total / 1000 / steps, "calls": e.count}
                     for e in host[:top]],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("config")
    ap.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    ap.add_argument("--run-dir", type=Path, required=True, help="the run folder (a run there is continued)")
    ap.add_argument("--warm", type=int, default=100, help="steps before the profile (compile, cache, warm-up)")
    ap.add_argument("--steps", type=int, default=50, help="profiled steps")
    ap.add_argument("--out", type=Path, help="folder for train_profile.json")
    args = ap.parse_intermixed_args()
    if args.warm < 1 or args.steps < 1:
        raise SystemExit("train_step_profile.py: --warm and --steps must be positive")
    cfg = load_config("unet", args.config, [*args.overrides, "val_every=0", "sample_every=0", "save_every=0",
                                            "max_minutes=null"])
    resume = latest_checkpoint(args.run_dir / "checkpoints") is not None
    trainer = UNetTrainer(cfg, args.run_dir, resume=resume, progress=False)
    start = trainer.step + args.warm
    if start + args.steps > cfg.max_steps:
        raise SystemExit(f"train_step_profile.py: the run is at step {trainer.step}; max_steps {cfg.max_steps} "
                         f"leaves no room for {args.warm} + {args.steps} more")
    trainer.train(until=start)
    cuda = trainer.device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        t0 = time.perf_counter()
        trainer.train(until=start + args.steps)
        if cuda:
            torch.cuda.synchronize()
        wall = time.perf_counter() - t0
    report = {"config": args.config, "overrides": args.overrides, "device": str(trainer.device),
              "gpu": torch.cuda.get_device_name() if cuda else None, "torch": torch.__version__,
              "batch_size": cfg.batch_size, "data_workers": cfg.data.num_workers,
              **summarise(prof.key_averages(), args.steps, wall, cuda)}
    busy = "" if not cuda else (f", GPU kernels {report['gpu_kernels_ms_per_step']:.1f} ms "
                                f"({report['gpu_busy_share']:.0%})")
    print(f"{report['wall_ms_per_step']:.1f} ms a step{busy}, waiting for batches "
          f"{report['batch_wait_ms_per_step']:.1f} ms")
    for row in report["host_ops"]:
        print(f"  {row['self_cpu_ms_per_step']:8.2f} ms  {row['calls']:6d}  {row['op']}")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "train_profile.json").write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
