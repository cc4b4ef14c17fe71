"""Issue 12, large images: peak memory and time of whole vs tiled VAE decodes, and of the hires fix.

Peak memory is the rise of the process's resident memory during the call (``estable.memory.peak_growth``:
the kernel's high-water mark, reset before each call; Linux). On a GPU the figure is
``torch.cuda.max_memory_allocated`` above the memory held before the call instead.

    PYTHONPATH=src python benchmarks/large_images.py --out DIR [--device cpu|cuda] [--threads 2]
        [--sizes 512 1024 1536]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from estable.memory import peak_growth
from estable.params import GenerationParams
from estable.pipeline import load_pipeline
from estable.tiled_vae import tiled_decode


def measure(fn, device: str) -> tuple[float, int]:
    """(seconds, peak memory rise in bytes) of fn()."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        return time.perf_counter() - t, torch.cuda.max_memory_allocated() - base
    t = time.perf_counter()
    _, peak = peak_growth(fn)
    return time.perf_counter() - t, peak


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--model", default="default")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--sizes", type=int, nargs="+", default=[512, 1024, 1536])
    args = ap.parse_args()
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    pipe = load_pipeline(args.model, device=args.device, dtype="fp32", cuda_graphs=False)
    f = pipe.factor
    rows = []
    with torch.inference_mode():
        for size in args.sizes:
            z = torch.randn(1, 4, size // f, size // f, generator=torch.Generator().manual_seed(0)).to(args.device)
            for mode in ("whole", "tiled"):
                run = (lambda z=z: pipe.vae.decode(z)) if mode == "whole" else (lambda z=z: tiled_decode(pipe.vae, z))
                seconds, peak = measure(run, args.device)
                rows.append({"what": f"VAE decode {size}²", "mode": mode, "seconds": round(seconds, 2),
                             "peak_mb": round(peak / 1e6, 1)})
                print(rows[-1], flush=True)
    base = dict(prompt="a red circle above a blue square", negative_prompt="", steps=25, seed=1, cfg_scale=5.0,
                sampler="dpmpp_2m_karras")
    cases = [("txt2img 256²", {}), ("txt2img 512² direct", {"width": 512, "height": 512}),
             ("hires 256² → 512², latent", {"hires_scale": 2.0, "hires_strength": 0.5}),
             ("hires 256² → 512², latent, tiled VAE", {"hires_scale": 2.0, "hires_strength": 0.5, "tile_vae": True}),
             ("hires 256² → 512², pixel", {"hires_scale": 2.0, "hires_strength": 0.5, "hires_upscaler": "pixel"}),
             ("hires 256² → 1024², latent, tiled VAE", {"hires_scale": 4.0, "hires_strength": 0.5, "tile_vae": True})]
    for name, kw in cases:
        params = GenerationParams(**{**base, **kw})
        seconds, peak = measure(lambda params=params: pipe.txt2img(params), args.device)
        rows.append({"what": name, "mode": "", "seconds": round(seconds, 2), "peak_mb": round(peak / 1e6, 1)})
        print(rows[-1], flush=True)
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"cpu ({args.threads} threads)"
    (args.out / "large_images.json").write_text(json.dumps({"device": device, "torch": torch.__version__,
                                                            "rows": rows}, indent=2) + "\n")
    lines = ["| run | decode | seconds | peak memory rise (MB) |", "|---|---|---|---|"]
    lines += [f"| {r['what']} | {r['mode']} | {r['seconds']} | {r['peak_mb']} |" for r in rows]
    (args.out / "large_images.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
