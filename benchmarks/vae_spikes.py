"""Where the stray coloured spots at shape rims come from: the autoencoder's one-pixel latent spikes.

    PYTHONPATH=src python benchmarks/vae_spikes.py [MODEL] --out benchmarks/vae_spike_crops.png   # 2-core CPU, 1 min
    PYTHONPATH=src python benchmarks/vae_spikes.py TUNED --reference default --out crops.png       # 2-core CPU, 2 min

Held-out renders (world seed 3) are encoded (posterior mean) and decoded by the model's VAE. Per image: the largest
latent norm (over the 4 channels) against the median one — the encoder puts a spike at one latent pixel near an
object's lower-right edge; the largest |render − reconstruction| within 20 px of that pixel and elsewhere; and how
much the decoded image changes when only that pixel's latent is scaled by 0.65 (the decoder's dependence on it).
``--out`` saves 40-px crops around the spike: renders on top, reconstructions below, 3× enlarged. ``--prompt`` also
reports the same norms for the U-Net's latents (the last step's denoised latents) of that prompt at seeds 1–8.
Always: the PSNR of the first ``--psnr-images`` renders' reconstructions. MODEL and ``--reference`` may also be an
``estable train vae`` run or checkpoint folder (an autoencoder alone; no ``--prompt``).

``--reference`` (another model, e.g. ``default``: the shipped one) compares a fine-tuned VAE with it: the "near"
region and the crops are then around the reference's largest latent (where its spot is; the crops get a middle row,
the reference's reconstructions), and it adds the reference's PSNR, the mean error within the 3 × 3 latent
neighbourhood of the reference's spikes (norm ≥ 5 × median) and elsewhere for both, and how far the latents moved:
the mean |μ − μ_reference| of the posterior means. ``--clamp K`` (repeatable) asks whether a decoder needs the
spikes: the reference's latents (the model's own without one) with every pixel's norm capped at K × its image's
median, decoded by the reference's decoder and the model's, with the same PSNR and errors near the spikes.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from stray_pixels import is_vae_run, load_vae  # benchmarks/stray_pixels.py, beside this script

from estable.images import to_pil, to_tensor
from estable.pipeline import load_pipeline
from estable.training.shapes.render import render
from estable.training.shapes.world import ShapesWorld

CROP = 40


def spikes(z: torch.Tensor, ratio: float = 5.0) -> torch.Tensor:
    """(B, 1, h, w) bool: latent pixels whose norm is ``ratio`` times the image's median norm."""
    n = z.norm(dim=1, keepdim=True)
    return n > ratio * n.flatten(1).median(1).values.view(-1, 1, 1, 1)


def near(mask: torch.Tensor, factor: int) -> torch.Tensor:
    """The pixels of the 3 × 3 latent neighbourhood of each marked latent pixel, (B, 1, H, W) float."""
    return F.interpolate(F.max_pool2d(mask.float(), 3, stride=1, padding=1), scale_factor=factor, mode="nearest")


def psnr(x_hat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """PSNR in dB per image, (B,), of reconstructions (clamped to [-1, 1]) against images in [-1, 1]."""
    mse = ((x_hat.clamp(-1, 1) - x) / 2).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(1 / mse)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", nargs="?", default="src/estable/assets/default_model.safetensors")
    ap.add_argument("--reference", help="a model to compare the VAE with ('default': the shipped one)")
    ap.add_argument("--images", type=int, default=16)
    ap.add_argument("--psnr-images", type=int, default=32)
    ap.add_argument("--crops", type=int, default=8)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--prompt", help="also the peak / median latent norm of generated images of this prompt")
    ap.add_argument("--clamp", type=float, action="append", metavar="K",
                    help="also decode the latents with each pixel's norm capped at K × the image's median")
    args = ap.parse_args()
    if args.prompt and is_vae_run(args.model):
        ap.error(f"--prompt needs a whole model; {args.model} is an autoencoder alone")
    pipe = load_pipeline(args.model, device="cpu") if args.prompt else None
    vae = pipe.vae if pipe is not None else autoencoder(args.model)
    ref = autoencoder(args.reference) if args.reference else None
    world = ShapesWorld("heldout", 3)
    renders = [render(world.scene(i), 256) for i in range(max(args.images, args.psnr_images))]
    x = torch.cat([to_tensor(im) for im in renders])
    with torch.no_grad():
        z = vae.encode(x).mean  # (N, 4, 32, 32)
        decoded = vae.decode(z)
        norms = z.norm(dim=1)  # (N, 32, 32)
        z_ref = ref.encode(x).mean if ref is not None else z
        at = z_ref.norm(dim=1)  # the spike of the reference (the model's own without one)
        peaks = [divmod(int(n.argmax()), n.shape[-1]) for n in at[: args.images]]
        own = [divmod(int(n.argmax()), n.shape[-1]) for n in norms[: args.images]]
        weaker = z[: args.images].clone()
        for k, (r, c) in enumerate(own):
            weaker[k, :, r, c] *= 0.65
        changed = ((vae.decode(weaker) - decoded[: args.images]).abs().flatten(1).amax(1) * 127.5).tolist()
        decoded_ref = ref.decode(z_ref) if ref is not None else None
    recon = to_pil(decoded[: args.images])
    recon_ref = to_pil(decoded_ref[: args.images]) if decoded_ref is not None else None
    rows = 2 if ref is None else 3
    grid = Image.new("RGB", (args.crops * 3 * CROP, rows * 3 * CROP))
    print("image | peak / median latent norm" + (" (reference's)" if ref is not None else "") +
          " | max |render − reconstruction| near the" + (" reference's" if ref is not None else "") +
          " peak / elsewhere | max change when the peak pixel is scaled by 0.65 (levels, before 8-bit clamping)")
    for k, (r, c) in enumerate(peaks):
        cy, cx = 8 * r + 4, 8 * c + 4
        x0, y0 = min(max(0, cx - CROP // 2), 256 - CROP), min(max(0, cy - CROP // 2), 256 - CROP)
        err = np.abs(np.asarray(renders[k], dtype=int) - np.asarray(recon[k], dtype=int)).max(axis=2)
        near_max = int(err[y0:y0 + CROP, x0:x0 + CROP].max())
        err[y0:y0 + CROP, x0:x0 + CROP] = 0
        ratio = f"{float(norms[k].max()):.1f} / {float(norms[k].median()):.2f}"
        if ref is not None:
            ratio += f" ({float(at[k].max()):.1f} / {float(at[k].median()):.2f})"
        print(f"{k} | {ratio} | {near_max} / {int(err.max())} | {changed[k]:.0f}")
        if k < args.crops:
            box = (x0, y0, x0 + CROP, y0 + CROP)
            rows_k = [renders[k]] + ([recon_ref[k]] if recon_ref is not None else []) + [recon[k]]
            for row, im in enumerate(rows_k):
                grid.paste(im.crop(box).resize((3 * CROP, 3 * CROP), Image.NEAREST), (k * 3 * CROP, row * 3 * CROP))
    n = args.psnr_images
    ratios = (norms.flatten(1).amax(1) / norms.flatten(1).median(1).values)[:n]
    print(f"peak / median latent norm over {n} renders: median {float(ratios.median()):.1f}, max "
          f"{float(ratios.max()):.1f}, above 6 in {int((ratios > 6).sum())}")
    print(f"PSNR over {n} held-out renders: {float(psnr(decoded[:n], x[:n]).mean()):.2f} dB")
    if ref is not None:
        compare(x[:n], z[:n], decoded[:n], z_ref[:n], decoded_ref[:n])
    for k in args.clamp or []:
        decoders = ([("reference", ref)] if ref is not None else []) + [("model", vae)]
        capped(x[:n], z_ref[:n], k, decoders)
    if args.out:
        grid.save(args.out)
        print(f"wrote {args.out}")
    if args.prompt:
        generated_norms(pipe, args.prompt)


def autoencoder(src: str):
    """The VAE of a model, or of an ``estable train vae`` run or checkpoint folder, in fp32 on the CPU."""
    return load_vae(src, "cpu") if is_vae_run(src) else load_pipeline(src, device="cpu").vae


def compare(x: torch.Tensor, z: torch.Tensor, decoded: torch.Tensor, z_ref: torch.Tensor,
            decoded_ref: torch.Tensor) -> None:
    """The reference's PSNR, the mean errors near the reference's spikes and elsewhere, and how far μ moved."""
    mask = spikes(z_ref)
    m = near(mask, x.shape[-1] // z.shape[-1]).bool().expand(-1, 3, -1, -1)
    print(f"reference: PSNR {float(psnr(decoded_ref, x).mean()):.2f} dB")
    for name, x_hat in (("reference", decoded_ref), ("model", decoded)):
        e = (x_hat.clamp(-1, 1) - x).abs() * 127.5
        print(f"{name}: mean error near the reference's spikes {float(e[m].mean()):.1f} levels, elsewhere "
              f"{float(e[~m].mean()):.2f}")
    d = (z - z_ref).abs()
    spike = mask.expand_as(d)
    print(f"mean |μ − μ_reference| {float(d.mean()):.3f} (mean |μ_reference| {float(z_ref.abs().mean()):.3f}); "
          f"at the reference's spikes {float(d[spike].mean()):.3f}, elsewhere {float(d[~spike].mean()):.3f}")


def cap_norms(z: torch.Tensor, k: float) -> torch.Tensor:
    """``z`` with each latent pixel's norm capped at ``k`` × its image's median norm (directions kept)."""
    n = z.norm(dim=1, keepdim=True)
    cap = k * n.flatten(1).median(1).values.view(-1, 1, 1, 1)
    return z * torch.clamp(cap / n.clamp_min(1e-8), max=1.0)


@torch.no_grad()
def capped(x: torch.Tensor, z: torch.Tensor, k: float, decoders) -> None:
    """PSNR and the mean errors near ``z``'s spikes / elsewhere when its norms are capped at ``k`` × the median."""
    m = near(spikes(z), x.shape[-1] // z.shape[-1]).bool().expand(-1, 3, -1, -1)
    for name, vae in decoders:
        x_hat = vae.decode(cap_norms(z, k))
        e = (x_hat.clamp(-1, 1) - x).abs() * 127.5
        print(f"latents capped at {k:g} × median, {name}'s decoder: PSNR {float(psnr(x_hat, x).mean()):.2f} dB, mean "
              f"error near the spikes {float(e[m].mean()):.1f} levels, elsewhere {float(e[~m].mean()):.2f}")


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
