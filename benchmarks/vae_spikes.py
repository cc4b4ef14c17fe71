"""Where the stray coloured spots at shape rims come from: the autoencoder's one-pixel latent spikes.

    PYTHONPATH=src python benchmarks/vae_spikes.py [MODEL] --out benchmarks/vae_spike_crops.png   # 2-core CPU, 1 min

Held-out renders (world seed 3) are encoded (posterior mean) and decoded by the model's VAE. Per image: the largest
latent norm (over the 4 channels) against the median one — the encoder puts a spike at one latent pixel near an
object's lower-right edge; the largest |render − reconstruction| within 20 px of that pixel and elsewhere; and how
much the decoded image changes when only that pixel's latent is scaled by 0.65 (the decoder's dependence on it).
``--out`` saves 40-px crops around the spike: renders on top, reconstructions below, 3× enlarged. ``--prompt`` also
reports the same norms for the U-Net's latents (the last step's denoised latents) of that prompt at seeds 1–8.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from estable.images import to_pil, to_tensor
from estable.pipeline import load_pipeline
from estable.training.shapes.render import render
from estable.training.shapes.world import ShapesWorld

CROP = 40


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", nargs="?", default="src/estable/assets/default_model.safetensors")
    ap.add_argument("--images", type=int, default=16)
    ap.add_argument("--crops", type=int, default=8)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--prompt", help="also the peak / median latent norm of generated images of this prompt")
    args = ap.parse_args()
    pipe = load_pipeline(args.model, device="cpu")
    world = ShapesWorld("heldout", 3)
    renders = [render(world.scene(i), 256) for i in range(args.images)]
    with torch.no_grad():
        z = pipe.vae.encode(torch.cat([to_tensor(im) for im in renders])).mean  # (N, 4, 32, 32)
        decoded = pipe.vae.decode(z)
        norms = z.norm(dim=1)  # (N, 32, 32)
        peaks = [divmod(int(n.argmax()), n.shape[-1]) for n in norms]
        weaker = z.clone()
        for k, (r, c) in enumerate(peaks):
            weaker[k, :, r, c] *= 0.65
        changed = ((pipe.vae.decode(weaker) - decoded).abs().flatten(1).amax(1) * 127.5).tolist()  # 8-bit levels
    recon = to_pil(decoded)
    grid = Image.new("RGB", (args.crops * 3 * CROP, 2 * 3 * CROP))
    print("image | peak / median latent norm | max |render − reconstruction| near the peak / elsewhere | "
          "max change when the peak pixel is scaled by 0.65 (levels, before 8-bit clamping)")
    for k, (r, c) in enumerate(peaks):
        cy, cx = 8 * r + 4, 8 * c + 4
        x0, y0 = min(max(0, cx - CROP // 2), 256 - CROP), min(max(0, cy - CROP // 2), 256 - CROP)
        err = np.abs(np.asarray(renders[k], dtype=int) - np.asarray(recon[k], dtype=int)).max(axis=2)
        near = int(err[y0:y0 + CROP, x0:x0 + CROP].max())
        err[y0:y0 + CROP, x0:x0 + CROP] = 0
        print(f"{k} | {float(norms[k].max()):.1f} / {float(norms[k].median()):.2f} | {near} / {int(err.max())} | "
              f"{changed[k]:.0f}")
        if k < args.crops:
            box = (x0, y0, x0 + CROP, y0 + CROP)
            grid.paste(renders[k].crop(box).resize((3 * CROP, 3 * CROP), Image.NEAREST), (k * 3 * CROP, 0))
            grid.paste(recon[k].crop(box).resize((3 * CROP, 3 * CROP), Image.NEAREST), (k * 3 * CROP, 3 * CROP))
    if args.out:
        grid.save(args.out)
        print(f"wrote {args.out}")
    if args.prompt:
        generated_norms(pipe, args.prompt)


def generated_norms(pipe, prompt: str) -> None:
    """Peak / median latent norm of the U-Net's final latents (unscaled, as the encoder's), seeds 1–8, the model's
    recommended sampler and CFG."""
    from estable import GenerationParams

    last: list[torch.Tensor] = []

    def keep(i: int, n: int, x: torch.Tensor, denoised: torch.Tensor) -> None:
        if i == n - 1:
            last.append(denoised.detach().float() / pipe.config.vae.scaling_factor)

    for seed in range(1, 9):
        params = pipe.with_model_defaults(GenerationParams(prompt=prompt, seed=seed))
        pipe.txt2img(params, callback=keep)
    norms = torch.cat(last).norm(dim=1)  # (8, h, w)
    print(f"generated, {prompt!r}, seeds 1-8: peak / median latent norm " + ", ".join(
        f"{float(n.max()):.1f} / {float(n.median()):.2f}" for n in norms))


if __name__ == "__main__":
    main()
