"""How much a model's U-Net output depends on a caption's object shapes and on its roles, by noise level.

    PYTHONPATH=src python benchmarks/contrast_gap.py [MODEL] [--count 48] [--t 50,200,400,600,800,900,950,990]

Renders ``--count`` held-out pair scenes, encodes them (posterior means), noises them at each timestep with one fixed
draw, and compares the U-Net's training loss under the true caption (mse) with its loss under two contrast captions
of the role-contrast term (``role_contrast.kind``): one object as a look-alike shape (``swap_shape``) and the two
objects exchanged (``swap_pair_roles``). Prints the median over scenes of (mse_contrast − mse) / mse per timestep:
near 0 where the output does not depend on that part of the caption, and the term's margin (0.2 by default) is what
the term asks for.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from estable.pipeline import load_pipeline
from estable.sampling.schedules import alphas_cumprod
from estable.training.objectives import noisy_latents_and_target
from estable.training.shapes import ShapesWorld, caption_for, render
from estable.training.shapes.captions import swap_pair_roles, swap_shape


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", nargs="?", default="default")
    ap.add_argument("--count", type=int, default=48)
    ap.add_argument("--t", default="50,200,400,600,800,900,950,990", help="timesteps, comma-separated")
    ap.add_argument("--seed", type=int, default=41, help="the held-out world's seed")
    args = ap.parse_args()
    model = load_pipeline(args.model, device="cpu", dtype="fp32").model
    tokenizer = model.require_tokenizer()
    world = ShapesWorld("heldout", args.seed, kind_weights={"pair": 1.0})
    scenes = [world.scene(i) for i in range(args.count)]
    captions = [caption_for(s) for s in scenes]
    size = model.config.unet.sample_size * 8
    pixels = torch.stack([torch.from_numpy(np.asarray(render(s, size), dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)
                          for s in scenes])  # (N, 3, H, W) in [-1, 1]
    objective = "v" if model.config.schedule.prediction_type == "v_prediction" else "eps"

    def context(texts: list[str]) -> torch.Tensor:
        return model.text_encoder.encode(tokenizer(texts), clip_skip=model.config.clip_skip)

    with torch.no_grad():
        z0 = model.vae.encode(pixels).mean * model.config.vae.scaling_factor
        noise = torch.randn(z0.shape, generator=torch.Generator().manual_seed(0))
        contexts = {"true": context(captions), "shape": context([swap_shape(c) or c for c in captions]),
                    "roles": context([swap_pair_roles(c) or c for c in captions])}
        table = alphas_cumprod(model.config.schedule)
        print("   t   shape gap   role gap   (median over scenes of (mse_contrast − mse) / mse)")
        for t in (int(x) for x in args.t.split(",")):
            steps = torch.full((len(scenes),), t)
            z_t, target = noisy_latents_and_target(z0, noise, table[steps], objective)
            mse = {k: (model.unet(z_t, steps, c) - target).pow(2).mean(dim=(1, 2, 3)) for k, c in contexts.items()}
            gap = {k: ((mse[k] - mse["true"]) / mse["true"]).median().item() for k in ("shape", "roles")}
            print(f"{t:4d}   {gap['shape']:9.3f}   {gap['roles']:8.3f}", flush=True)


if __name__ == "__main__":
    main()
