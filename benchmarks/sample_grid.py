"""A grid of samples for RESULTS.md / the model card: one row per prompt, one column per seed.

    PYTHONPATH=src python benchmarks/sample_grid.py --model default --out benchmarks/default_samples.png

Every image is drawn at the model's native size and shown at --cell pixels; seeds 1..--columns, 25 steps of
DPM++ 2M Karras, the model's recommended guidance scale unless --cfg is given. No cherry-picking: the seeds are
fixed, the prompts are the first ones below.
"""

from __future__ import annotations

import argparse

import torch
from PIL import Image

from estable.params import GenerationParams
from estable.pipeline import load_pipeline

PROMPTS = ["a red circle above a blue square", "two green triangles on a yellow background", "a small purple star",
           "a white hexagon to the left of a black cross", "a large blue square", "three orange hearts",
           "a red square and a blue circle", "a yellow star on a textured purple background"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="default")
    ap.add_argument("--out", required=True)
    ap.add_argument("--cfg", type=float, default=None)
    ap.add_argument("--rows", type=int, default=len(PROMPTS))
    ap.add_argument("--columns", type=int, default=4)
    ap.add_argument("--cell", type=int, default=96)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    pipe = load_pipeline(args.model, device="cpu", dtype="fp32")
    cfg = args.cfg if args.cfg is not None else (pipe.config.default_cfg or GenerationParams().cfg_scale)
    params = GenerationParams(steps=25, cfg_scale=cfg, sampler="dpmpp_2m_karras")
    prompts = PROMPTS[: args.rows]
    seeds = list(range(1, args.columns + 1))
    c = args.cell
    grid = Image.new("RGB", (c * len(seeds), c * len(prompts)), "white")
    for r, prompt in enumerate(prompts):
        for k, image in enumerate(pipe.txt2img_each([prompt] * len(seeds), seeds, params, batch=len(seeds))):
            grid.paste(image.resize((c, c), Image.LANCZOS), (k * c, r * c))
    grid.save(args.out, optimize=True)
    print(f"wrote {args.out}: {len(prompts)} prompts × seeds {seeds}, CFG {cfg:g}")
    for r, prompt in enumerate(prompts):
        print(f"  row {r + 1}: {prompt}")


if __name__ == "__main__":
    main()
