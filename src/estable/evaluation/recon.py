"""VAE reconstruction quality: PSNR and SSIM of decode(mean of q(z|x)) against x.

Both are computed on the 8-bit images a user would see: the reconstruction is clamped and rounded to [0, 255]
(``estable.images.to_pil``) before it is compared with the 8-bit original.

    PSNR = 10 · log10(255² / MSE)   dB, MSE over all pixels and channels of one image (inf for identical images)
    SSIM  Wang et al. 2004, mean over the valid Gaussian windows (11 px, σ = 1.5) and channels:
          ``estable.training.objectives.ssim`` (the loss the VAE trainer logs), on [0, 255] with L = 255

Image sets: held-out shapes-world renders (``ShapesWorld("heldout", seed)``) and, optionally, the photographs
scikit-image ships with its package (``skimage.data``): natural images, far from the shapes world, that show
what the autoencoder does out of its domain. scikit-image is not a dependency of Estable.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from ..errors import EstableError

__all__ = ["PHOTOS", "evaluate_reconstruction", "format_reconstruction", "heldout_renders", "psnr",
           "reconstruct", "require_skimage_data", "skimage_photos"]

# Colour photographs bundled inside the scikit-image package (no download needed).
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "hubble_deep_field")
RENDER_SEED = 41  # world seed of the held-out renders (not a seed any training run uses by default)


def psnr(x: torch.Tensor, y: torch.Tensor, data_range: float = 255.0) -> torch.Tensor:
    """Peak signal-to-noise ratio per image in dB: (B, C, H, W) × 2 → (B,), float64 (inf where x == y)."""
    if x.shape != y.shape or x.ndim != 4:
        raise ValueError(f"psnr needs two (B, C, H, W) tensors of one shape, got {tuple(x.shape)}, {tuple(y.shape)}")
    mse = (x.double() - y.double()).pow(2).mean(dim=(1, 2, 3))  # (B,)
    return 10.0 * torch.log10(data_range**2 / mse)  # mse = 0 → inf, as skimage's peak_signal_noise_ratio


def _to_uint8_tensor(images: Sequence[Image.Image]) -> torch.Tensor:
    arr = np.stack([np.asarray(im.convert("RGB"), dtype=np.uint8) for im in images])  # (B, H, W, 3)
    return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()  # (B, 3, H, W) uint8


@torch.no_grad()
def reconstruct(vae: torch.nn.Module, images: Sequence[Image.Image], device: str | torch.device = "cpu") -> list[
        Image.Image]:
    """decode(μ(x)) for each image (all of one size, a multiple of the VAE's factor), as 8-bit PIL images."""
    from ..images import to_pil

    dtype = next(vae.parameters()).dtype
    x = _to_uint8_tensor(images).float().div(127.5).sub(1.0)  # (B, 3, H, W) in [-1, 1]
    mean = vae.encode(x.to(device, dtype)).mean  # (B, 4, H/f, W/f): the posterior mean, no sampling
    decoded = vae.decode(mean).float()  # (B, 3, H, W) roughly in [-1, 1]
    if not bool(torch.isfinite(decoded).all()):
        raise EstableError(f"the VAE decode in {str(dtype).removeprefix('torch.')} gave NaN/inf; use --dtype fp32")
    return to_pil(decoded)


def heldout_renders(count: int, size: int, seed: int = RENDER_SEED) -> list[tuple[str, Image.Image]]:
    """(name, image) for ``count`` held-out shapes-world renders at ``size``."""
    from ..training.shapes import ShapesWorld

    world = ShapesWorld("heldout", seed)
    return [(f"render {i}", world.sample(i, size)[0]) for i in range(count)]


def require_skimage_data() -> Any:
    """``skimage.data``, or an EstableError saying how to install scikit-image (not an Estable dependency)."""
    try:
        from skimage import data as skdata
    except ImportError:
        raise EstableError("--photos needs scikit-image, which Estable does not depend on: "
                           "pip install scikit-image") from None
    return skdata


def skimage_photos(size: int, names: Sequence[str] = PHOTOS) -> list[tuple[str, Image.Image]]:
    """scikit-image's bundled colour photographs, centre-cropped to a square and resized to ``size``."""
    from ..training.data import preprocess

    skdata = require_skimage_data()

    out = []
    for name in names:
        loader: Callable[[], np.ndarray] | None = getattr(skdata, name, None)
        if loader is None:
            raise EstableError(f"scikit-image has no photograph {name!r}")
        arr = np.asarray(loader())
        if arr.dtype != np.uint8:  # some loaders give floats in [0, 1]
            arr = (np.clip(arr, 0, 1) * 255).round().astype(np.uint8)
        image = Image.fromarray(arr).convert("RGB")
        # Shorter side resized to ``size`` (Lanczos) and a centred square crop: the training preprocessing.
        pixels = preprocess(image, size)  # (3, S, S) in [-1, 1]
        out.append((name, Image.fromarray(((pixels.permute(1, 2, 0) + 1) * 127.5).round().byte().numpy())))
    return out


def evaluate_reconstruction(vae: torch.nn.Module, named: Sequence[tuple[str, Image.Image]], *,
                            device: str | torch.device = "cpu", batch_size: int = 8,
                            progress: bool = False) -> dict[str, Any]:
    """Per-image PSNR (dB) and SSIM of the VAE's reconstructions, and their means."""
    from ..training.objectives import ssim

    if not named:
        raise ValueError("no images to reconstruct")
    rows: list[dict[str, Any]] = []
    for start in tqdm(range(0, len(named), batch_size), disable=not progress, desc="reconstruct", unit="batch"):
        chunk = named[start : start + batch_size]
        originals = [im for _, im in chunk]
        recons = reconstruct(vae, originals, device)
        x, y = _to_uint8_tensor(originals).double(), _to_uint8_tensor(recons).double()  # (B, 3, H, W) in [0, 255]
        p = psnr(x, y)
        s = ssim(x, y, data_range=255.0)  # (B,)
        rows += [{"name": n, "psnr": float(pv), "ssim": float(sv)} for (n, _), pv, sv in zip(chunk, p, s)]
    finite = [r["psnr"] for r in rows if math.isfinite(r["psnr"])]
    return {
        "images": len(rows),
        "size": named[0][1].width,
        "psnr_mean": sum(finite) / len(finite) if finite else math.inf,
        "ssim_mean": sum(r["ssim"] for r in rows) / len(rows),
        "per_image": rows,
    }


def format_reconstruction(title: str, report: dict[str, Any], *, max_rows: int = 20) -> str:
    rows = report["per_image"]
    lines = [f"{title}: {report['images']} images at {report['size']} px",
             f"  {'image':<24}{'PSNR (dB)':>12}{'SSIM':>10}"]
    for r in rows[:max_rows]:
        lines.append(f"  {r['name']:<24}{r['psnr']:>12.2f}{r['ssim']:>10.4f}")
    if len(rows) > max_rows:
        lines.append(f"  … {len(rows) - max_rows} more (the JSON report has all)")
    lines.append(f"  {'mean':<24}{report['psnr_mean']:>12.2f}{report['ssim_mean']:>10.4f}")
    return "\n".join(lines)
