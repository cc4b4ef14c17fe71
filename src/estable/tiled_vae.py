"""Tiled VAE decode and encode with blended overlaps: large images in bounded memory.

The autoencoder's activations grow with the image (the decoder's last levels hold block_channels[0] channels at
full resolution); decoding a 2048² image in one piece needs gigabytes. Here the input is cut into overlapping
tiles, each tile goes through the network alone, and the outputs are put back with weights that ramp linearly
across each overlap (a partition of unity after normalisation by the summed weights), so no seam is visible:

    out(p) = Σ_k w_k(p) · tile_k(p) / Σ_k w_k(p),   w_k = ramp_y ⊗ ramp_x,  ramp rising over the overlap
             with the previous tile and falling over the overlap with the next (1 elsewhere, > 0 everywhere)

A tile sees only its own neighbourhood: the decoder's GroupNorm statistics and mid-block self-attention are
computed per tile, which is where tiled and untiled outputs differ (measured in tests/test_tiled_vae.py). Peak
memory is that of one tile plus the output canvas.

The encoder is tiled the same way in pixel space; the posterior moments (mean and log-variance) are blended in
latent space, so that sampling stays one draw per latent element from the image's generator.
"""

from __future__ import annotations

import torch

from .models.vae import AutoencoderKL, DiagonalGaussian

#: Default tile and overlap, in latent cells (× the VAE's factor in pixels: 512 px tiles, 128 px overlap).
DEFAULT_TILE = 64
DEFAULT_OVERLAP = 16


def tile_starts(size: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of tiles of ``tile`` cells covering ``size`` cells with at least ``overlap`` shared cells;
    the last tile ends flush with the edge. One tile when it fits."""
    if tile <= overlap or overlap < 0:
        raise ValueError(f"tile ({tile}) must be larger than overlap ({overlap}) ≥ 0")
    if size <= tile:
        return [0]
    stride = tile - overlap
    starts = list(range(0, size - tile, stride))
    starts.append(size - tile)
    return starts


def _ramp(length: int, rise: int, fall: int, device: torch.device) -> torch.Tensor:
    """(length,) weights: (i + ½)/rise over the first ``rise`` cells, mirrored over the last ``fall``, else 1."""
    w = torch.ones(length, device=device, dtype=torch.float32)
    if rise:
        w[:rise] = (torch.arange(rise, device=device, dtype=torch.float32) + 0.5) / rise
    if fall:
        w[length - fall:] = torch.minimum(
            w[length - fall:], (torch.arange(fall, device=device, dtype=torch.float32).flip(0) + 0.5) / fall)
    return w


def _tiled(fn, x: torch.Tensor, tile: int, overlap: int, scale_out: float, out_channels: int) -> torch.Tensor:
    """Apply ``fn`` (B, C, t, t) → (B, out_channels, t·s, t·s) tile by tile over x (B, C, H, W), blending
    overlaps; s = scale_out (8 for decoding latents, 1/8 for encoding pixels). Float32 output."""
    b, _, h, w = x.shape
    ys, xs = tile_starts(h, tile, overlap), tile_starts(w, tile, overlap)
    out_h, out_w = round(h * scale_out), round(w * scale_out)
    canvas = torch.zeros(b, out_channels, out_h, out_w, device=x.device, dtype=torch.float32)
    weight = torch.zeros(1, 1, out_h, out_w, device=x.device, dtype=torch.float32)
    ov = round(overlap * scale_out)
    for i, y0 in enumerate(ys):
        for j, x0 in enumerate(xs):
            part = fn(x[:, :, y0:y0 + tile, x0:x0 + tile]).float()  # (B, out_channels, th, tw)
            th, tw = part.shape[-2:]
            oy, ox = round(y0 * scale_out), round(x0 * scale_out)
            wy = _ramp(th, ov if i > 0 else 0, ov if i < len(ys) - 1 else 0, x.device)
            wx = _ramp(tw, ov if j > 0 else 0, ov if j < len(xs) - 1 else 0, x.device)
            wt = wy[:, None] * wx[None, :]  # (th, tw)
            canvas[:, :, oy:oy + th, ox:ox + tw] += part * wt
            weight[:, :, oy:oy + th, ox:ox + tw] += wt
            del part
    return canvas / weight


def tiled_decode(vae: AutoencoderKL, z: torch.Tensor, *, tile: int = DEFAULT_TILE,
                 overlap: int = DEFAULT_OVERLAP) -> torch.Tensor:
    """``vae.decode(z)`` for unscaled latents z (B, C, h, w), tile × tile latents at a time. Float32 images."""
    f = vae.config.downsample_factor
    return _tiled(vae.decode, z, tile, overlap, float(f), vae.config.out_channels)


def tiled_encode(vae: AutoencoderKL, x: torch.Tensor, *, tile: int = DEFAULT_TILE,
                 overlap: int = DEFAULT_OVERLAP) -> DiagonalGaussian:
    """``vae.encode(x)`` for images x (B, 3, H, W), tiles of ``tile`` latents (× the factor in pixels)."""
    f = vae.config.downsample_factor

    def moments(part: torch.Tensor) -> torch.Tensor:
        post = vae.encode(part)
        return torch.cat([post.mean, post.logvar], dim=1)  # (B, 2·C, t, t)

    m = _tiled(moments, x, tile * f, overlap * f, 1.0 / f, 2 * vae.config.latent_channels)
    return DiagonalGaussian(m.to(x.dtype))
