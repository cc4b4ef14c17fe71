"""Is the spot a normalisation "droplet"? The largest activation inside the VAE, layer by layer, and where it sits.

    PYTHONPATH=src python benchmarks/vae_activations.py [MODEL] [--images 16]        # 2-core CPU, ~10 s
    PYTHONPATH=src python benchmarks/vae_activations.py TUNED --reference default   # spikes located by the shipped VAE

StyleGAN2 (Karras et al. 2020, sec. 2) traced its droplet artefacts to normalisation: a network can make one
activation very large to set a feature map's mean and variance as it likes. If the VAE does the same, the input of
its GroupNorms holds one position whose norm over channels is many times the median, at the place where the latent
spike and the drawn spot are. For held-out renders (world seed 3, 256²), encoded (posterior mean) and decoded, this
prints per GroupNorm of the encoder and the decoder: the median over images of (largest / median norm over channels
per position) and in how many images that largest position lies within one latent pixel (8 image pixels) of the
image's latent spike (the largest latent norm; only images whose spike is ≥ 6 × the median are counted).
``--reference`` takes the spikes from another model's encoder (for a VAE trained not to make them).
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

from estable.images import to_tensor
from estable.pipeline import load_pipeline
from estable.training.shapes.render import render
from estable.training.shapes.world import ShapesWorld


def peaks(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per image: largest / median norm over channels, and the (row, column) of the largest, as fractions of the
    map's height and width (the centre of that position)."""
    n = x.float().norm(dim=1).flatten(1)  # (B, H·W)
    ratio = n.amax(1) / n.median(1).values.clamp_min(1e-8)
    idx = n.argmax(1)
    h, w = x.shape[-2:]
    return ratio, (idx // w + 0.5) / h, (idx % w + 0.5) / w


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", nargs="?", default="default")
    ap.add_argument("--images", type=int, default=16)
    ap.add_argument("--reference", help="locate the latent spikes with this model's encoder instead")
    args = ap.parse_args()
    vae = load_pipeline(args.model, device="cpu").vae
    world = ShapesWorld("heldout", 3)
    x = torch.cat([to_tensor(render(world.scene(i), 256)) for i in range(args.images)])
    seen: list[tuple[str, torch.Tensor]] = []
    hooks = [m.register_forward_hook(lambda mod, inp, out, name=name: seen.append((name, inp[0].detach())))
             for name, m in vae.named_modules() if isinstance(m, nn.GroupNorm)]
    with torch.no_grad():
        z = vae.encode(x).mean
        vae.decode(z)
    for h in hooks:
        h.remove()
    if args.reference:
        with torch.no_grad():
            z = load_pipeline(args.reference, device="cpu").vae.encode(x).mean
    spike_ratio, sy, sx = peaks(z)
    marked = spike_ratio >= 6
    side = z.shape[-1]
    print(f"{int(marked.sum())} of {len(x)} images with a latent spike ≥ 6 × the median")
    print("GroupNorm input | size | largest / median norm (median over images) | largest at the spike")
    for name, act in seen:
        ratio, ry, rx = peaks(act)
        close = ((ry - sy).abs() <= 1 / side) & ((rx - sx).abs() <= 1 / side) & marked
        print(f"{name} | {act.shape[-1]}² | {float(ratio.median()):.1f} | {int(close.sum())} of {int(marked.sum())}")


if __name__ == "__main__":
    main()
