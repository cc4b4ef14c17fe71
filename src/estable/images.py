"""Images in and out: loading with clear errors, and the pixel ↔ tensor conventions of Stable Diffusion.

Pixels enter the VAE as floats in [-1, 1] (x = 2·p/255 − 1) and leave it the same way; the conversion back
rounds (x/2 + 1/2)·255 to the nearest integer, as diffusers' image processor does, so that the same latents give
the same PNG bytes in both.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from .errors import EstableError
from .params import MAX_SIDE


def load_image(path: str | Path, *, mode: str = "RGB") -> Image.Image:
    """Open an image file, refusing missing, unreadable or oversized files with a one-line reason."""
    p = Path(path)
    if not p.is_file():
        raise EstableError(f"image not found: {p}")
    try:
        with Image.open(p) as im:
            if max(im.size) > MAX_SIDE:
                raise EstableError(f"image {p} is {im.width}x{im.height}; the largest side allowed is {MAX_SIDE}")
            return im.convert(mode)
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as exc:
        raise EstableError(f"cannot read image {p}: {exc}") from None


def check_size(image: Image.Image, width: int, height: int, what: str = "image") -> None:
    if image.size != (width, height):
        raise EstableError(f"the {what} is {image.width}x{image.height} but the generation size is {width}x{height}")


def to_tensor(image: Image.Image) -> torch.Tensor:
    """PIL RGB → (1, 3, H, W) float32 in [-1, 1]."""
    arr = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0  # (H, W, 3) in [0, 1]
    return torch.from_numpy(arr).permute(2, 0, 1).unsqueeze(0) * 2.0 - 1.0


def mask_to_tensor(mask: Image.Image) -> torch.Tensor:
    """PIL mask → (1, 1, H, W) float32 in {0, 1}: white (≥ 50 %) = repaint, black = keep."""
    arr = np.asarray(mask.convert("L"), dtype=np.float32) / 255.0
    return (torch.from_numpy(arr) >= 0.5).float()[None, None]


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """(B, 3, H, W) in [-1, 1] → list of PIL images (values clamped, rounded to the nearest level)."""
    x = (images.detach().float().cpu() / 2 + 0.5).clamp(0, 1)
    arr = (x.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
    return [Image.fromarray(a) for a in arr]
