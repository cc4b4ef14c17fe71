"""Issue 12, INT8: size, image quality and speed of the weight-only int8 copy of a model against the model.

The model (default: the built-in one) is written as an fp32 Estable file and as an int8 one (as `estable convert
SRC DST --to estable --quantize int8` does); both generate the same prompts and seeds (DPM++ 2M Karras, CFG 5,
25 steps, native size) with activations in ``--dtype``. Reported: the file sizes and their ratio, the PSNR of
each int8 image against its fp32 image (8-bit pixels, peak 255) and the mean |Δ|, and the median time of one
image for fp32 weights, int8 weights (dequantised per layer at each forward) and, on the CPU, int8 with dynamic
activation quantisation of the Linear layers (torch._int_mm).

    PYTHONPATH=src python benchmarks/int8_quality.py --out DIR [--model SRC] [--device cpu|cuda] [--threads 2]
        [--seeds 1 2 3 4] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from estable.checkpoints.quantize import quantize_model_int8
from estable.checkpoints.store import load_model, save_model
from estable.nn.int8 import set_dynamic
from estable.params import GenerationParams
from estable.pipeline import default_model_path, load_pipeline

PROMPTS = ["a red circle above a blue square", "two green triangles", "a yellow star left of a purple circle"]


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def images(pipe, seeds: list[int], steps: int) -> list[np.ndarray]:
    out = []
    for prompt in PROMPTS:
        for seed in seeds:
            params = GenerationParams(prompt=prompt, negative_prompt="", sampler="dpmpp_2m_karras", steps=steps,
                                      cfg_scale=5.0, seed=seed)
            out.append(np.asarray(pipe.txt2img(params)[0].convert("RGB")))
    return out


def timed(pipe, steps: int, repeats: int, sync) -> float:
    params = GenerationParams(prompt=PROMPTS[0], negative_prompt="", sampler="dpmpp_2m_karras", steps=steps,
                              cfg_scale=5.0, seed=1)
    pipe.txt2img(params)  # warm-up
    times = []
    for _ in range(repeats):
        sync()
        t = time.perf_counter()
        pipe.txt2img(params)
        sync()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--model", default="default")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="fp32", help="activations' dtype (default fp32)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3, 4])
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    if args.device == "cpu":
        torch.set_num_threads(args.threads)

    def sync() -> None:
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()

    args.out.mkdir(parents=True, exist_ok=True)
    src = default_model_path() if args.model == "default" else Path(args.model)
    with tempfile.TemporaryDirectory() as tmp:
        f32 = save_model(load_model(src), Path(tmp) / "fp32.safetensors", to="estable", dtype="fp32")
        model = load_model(src)
        layers = quantize_model_int8(model)
        i8 = save_model(model, Path(tmp) / "int8.safetensors", to="estable")
        sizes = {"fp32": f32.stat().st_size, "int8": i8.stat().st_size}
        full = load_pipeline(f32, device=args.device, dtype=args.dtype, cuda_graphs=False)
        quant = load_pipeline(i8, device=args.device, dtype=args.dtype, cuda_graphs=False)
        ref, got = images(full, args.seeds, args.steps), images(quant, args.seeds, args.steps)
        psnrs = [psnr(a, b) for a, b in zip(ref, got, strict=True)]
        mean_abs = [float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean()) for a, b in zip(ref, got,
                                                                                                   strict=True)]
        other_seed = [psnr(ref[i], ref[i + 1]) for i in range(0, len(ref) - 1, 2)]
        speed = {"fp32": timed(full, args.steps, args.repeats, sync),
                 "int8": timed(quant, args.steps, args.repeats, sync)}
        if args.device == "cpu":
            set_dynamic(quant.unet)
            set_dynamic(quant.text_encoder)
            set_dynamic(quant.vae)
            speed["int8_dynamic"] = timed(quant, args.steps, args.repeats, sync)
            dyn = images(quant, args.seeds[:1], args.steps)
            dyn_psnr = [psnr(a, b) for a, b in zip(ref[:: len(args.seeds)], dyn, strict=True)]
        else:
            dyn_psnr = []
    result = {
        "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else f"cpu ({args.threads} threads)",
        "torch": torch.__version__, "dtype": args.dtype, "steps": args.steps, "seeds": args.seeds,
        "prompts": PROMPTS, "int8_layers": layers, "bytes": sizes, "size_ratio": sizes["int8"] / sizes["fp32"],
        "psnr_db": {"mean": statistics.mean(psnrs), "min": min(psnrs), "all": [round(p, 2) for p in psnrs]},
        "mean_abs_levels": statistics.mean(mean_abs),
        "psnr_between_two_seeds_fp32": statistics.mean(other_seed),
        "psnr_int8_dynamic_db": [round(p, 2) for p in dyn_psnr],
        "seconds_per_image": {k: round(v, 3) for k, v in speed.items()},
    }
    (args.out / "int8_quality.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
