"""A model with and without a LoRA, side by side: top row the model alone, bottom row with the LoRA at --scale.

    PYTHONPATH=src python benchmarks/lora_compare.py --model runs/model.safetensors --lora style_lora.safetensors \\
        --out benchmarks/style_lora.png

Same prompt, seeds 1..--columns and settings in both rows (CPU, fp32); prints the mean absolute pixel difference.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from PIL import Image

from estable.checkpoints.lora_format import apply_lora, load_lora
from estable.params import GenerationParams
from estable.pipeline import load_pipeline


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="default")
    ap.add_argument("--lora", required=True)
    ap.add_argument("--scale", type=float, default=1.0)
    ap.add_argument("--prompt", default="a red circle above a blue square")
    ap.add_argument("--columns", type=int, default=2)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--cfg", type=float, default=5.0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    params = GenerationParams(prompt=args.prompt, sampler="dpmpp_2m_karras", steps=args.steps, cfg_scale=args.cfg,
                              seed=1, batch_size=args.columns)
    pipe = load_pipeline(args.model, device="cpu", dtype="fp32")
    base = pipe.txt2img(params).images
    apply_lora(pipe.unet, pipe.text_encoder, load_lora(args.lora), scale=args.scale)
    styled = pipe.txt2img(params).images
    w, h = base[0].size
    grid = Image.new("RGB", (w * args.columns, h * 2))
    for i, im in enumerate(base + styled):
        grid.paste(im, ((i % args.columns) * w, (i // args.columns) * h))
    grid.save(args.out)
    diff = np.mean([np.abs(np.asarray(a, dtype=float) - np.asarray(b, dtype=float)).mean()
                    for a, b in zip(base, styled)])
    print(f"wrote {args.out}; mean absolute difference {diff:.2f} levels of 255")


if __name__ == "__main__":
    main()
