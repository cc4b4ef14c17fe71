"""How far the same record's image differs across device classes (issue 13: "the measured difference across
devices"). Makes ``--count`` images from the built-in model (or ``--model``) with fixed seeds on the CPU in fp32,
then again on every other class available (cuda fp32, cuda fp16, cuda bf16), with Estable's marks on as
``estable generate`` writes them, and compares each with the CPU image.

    PYTHONPATH=src python benchmarks/reproduce_across_devices.py --count 16 --out runs/repro.json

On a machine without CUDA it compares the CPU with itself (a check that the comparison reads bit-exact).
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np
import torch

from estable.params import GenerationParams
from estable.pipeline import load_pipeline
from estable.provenance.stamp import prepare, stamp
from estable.provenance.verify import compare_pixels
from estable.provenance.watermark import WatermarkSettings

PROMPTS = ["a red circle above a blue square", "two green triangles on a yellow background", "a small purple star",
           "a white hexagon to the left of a black cross"]


def images(device: str, dtype: str, args: argparse.Namespace) -> list:
    pipe = load_pipeline(args.model, device=device, dtype=dtype)
    settings = WatermarkSettings(tree_ring=args.tree_ring)
    prepare(pipe, settings, "txt2img")
    out = []
    for i in range(args.count):
        params = GenerationParams(prompt=PROMPTS[i % len(PROMPTS)], seed=100 + i, steps=args.steps,
                                  cfg_scale=pipe.config.default_cfg or 7.0)
        out.append(stamp(pipe.txt2img(params), pipe, settings).images[0])
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--count", type=int, default=16)
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--model", default="default")
    ap.add_argument("--tree-ring", action="store_true")
    ap.add_argument("--out", required=True, help="JSON file to write")
    args = ap.parse_args(argv)
    reference = images("cpu", "fp32", args)
    classes = [("cpu", "fp32")]
    if torch.cuda.is_available():
        classes = [("cuda", "fp32"), ("cuda", "fp16"), ("cuda", "bf16")]
    report = {"count": args.count, "steps": args.steps, "model": args.model, "reference": "cpu fp32",
              "torch": torch.__version__,
              "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None, "classes": {}}
    for device, dtype in classes:
        diffs = [compare_pixels(a, b) for a, b in zip(reference, images(device, dtype, args))]
        report["classes"][f"{device} {dtype}"] = {
            "bit_exact": sum(d["bit_exact"] for d in diffs),
            "max_abs_diff": max(d["max_abs_diff"] for d in diffs),
            "mean_abs_diff": float(np.mean([d["mean_abs_diff"] for d in diffs])),
            "pixels_differing": float(np.mean([d["pixels_differing"] for d in diffs])),
            "min_psnr_db": min(d["psnr_db"] for d in diffs),
        }
        print(f"{device} {dtype}: {report['classes'][f'{device} {dtype}']}", file=sys.stderr)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
