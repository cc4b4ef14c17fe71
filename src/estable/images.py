"""Images in and out: loading with clear errors, and the pixel ↔ tensor conventions of Stable Diffusion.

Pixels enter the VAE as floats in [-1, 1] (x = 2·p/255 − 1) and leave it the same way; the conversion back
rounds (x/2 + 1/2)·255 to the nearest integer, as diffusers' image processor does, so that the same latents give
the same PNG bytes in both.
"""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path
from typing import IO

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import EstableError
from .params import MAX_SIDE

_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N")


def load_image(path: str | Path, *, mode: str = "RGB") -> Image.Image:
    """Open an image file, refusing missing, unreadable or oversized files with a one-line reason.

    The EXIF orientation is applied (a phone's portrait JPEG comes out upright) and 16-bit or float pixels are
    scaled to 8 bits by their value range (:func:`to_8bit`). ``mode="mask"`` gives an inpainting mask
    (:func:`as_mask`: the alpha channel when only it carries the mask); any other mode is a Pillow mode."""
    p = Path(path)
    if not p.is_file():
        raise EstableError(f"{p} is a folder, not an image" if p.is_dir() else f"image not found: {p}")
    return decode_image(p, mode=mode, name=str(p))


def decode_image(source: str | os.PathLike | bytes | IO[bytes], *, mode: str = "RGB",
                 name: str = "the image") -> Image.Image:
    """:func:`load_image` for a path, the bytes of an image file or an open binary file (the server's uploads)."""
    if isinstance(source, (bytes, bytearray)):
        source = io.BytesIO(source)
    try:
        with warnings.catch_warnings():  # Pillow only warns between 89 and 179 Mpx: an error, on one line
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(source) as im:  # the header only: the size is checked before any pixel is decoded
                if max(im.size) > MAX_SIDE:
                    raise EstableError(f"image {name} is {im.width}x{im.height}; the largest side allowed is "
                                       f"{MAX_SIDE}")
                im = ImageOps.exif_transpose(im)  # a copy, upright
                return as_mask(im) if mode == "mask" else to_8bit(im).convert(mode)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError,
            Image.DecompressionBombWarning) as exc:
        raise EstableError(f"cannot read image {name}: {exc}") from None


def to_8bit(image: Image.Image) -> Image.Image:
    """``image`` with 8-bit channels. Pillow's own convert() clips 16-bit grey (``I;16``) and 32-bit (``I``,
    ``F``) pixels to 0..255, which turns a 16-bit PNG almost white; here values are scaled by their range:
    16-bit by 255/65535, ``I`` by the 16-bit range when its values fit in 16 bits (that is how Pillow opens
    some 16-bit files) and by its maximum beyond, ``F`` by 255 when its values lie in [0, 1]."""
    if image.mode in _SIXTEEN_BIT:
        arr = np.asarray(image, dtype=np.float64) * (255.0 / 65535.0)
    elif image.mode == "I":
        arr = np.asarray(image, dtype=np.float64)
        top = float(arr.max()) if arr.size else 0.0
        arr = np.clip(arr, 0, None)
        if top > 65535:
            arr = arr * (255.0 / top)
        elif top > 255:
            arr = arr * (255.0 / 65535.0)
    elif image.mode == "F":
        arr = np.asarray(image, dtype=np.float64)
        top = float(np.nanmax(arr)) if arr.size else 0.0
        arr = np.nan_to_num(arr)
        if float(arr.min()) >= 0.0 and top <= 1.0:
            arr = arr * 255.0
        elif top > 255:
            arr = arr * (255.0 / top)
    else:
        return image
    return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), mode="L")


def as_mask(image: Image.Image) -> Image.Image:
    """An inpainting mask as an 8-bit grey image (white = repaint). A mask drawn only in its alpha channel (strokes
    on a transparent layer, colour channels all one value) is read from its alpha: opaque = repaint."""
    image = to_8bit(image)
    has_alpha = image.mode in ("RGBA", "LA", "PA", "La", "RGBa") or (
        image.mode == "P" and "transparency" in image.info)
    if has_alpha:
        rgba = image.convert("RGBA")
        grey = rgba.convert("L")
        alpha = rgba.getchannel("A")
        lo, hi = grey.getextrema()
        a_lo, a_hi = alpha.getextrema()
        if lo == hi and a_lo != a_hi:
            return alpha
        return grey
    return image.convert("L")


def as_rgb(image: Image.Image) -> Image.Image:
    """``image`` as 8-bit RGB (16-bit and float pixels scaled by their range, :func:`to_8bit`)."""
    return to_8bit(image).convert("RGB")


def check_mask_has_area(mask: Image.Image) -> None:
    """EstableError for a mask with nothing to repaint (no pixel ≥ 50 % white): the run would only return a
    degraded copy of the image."""
    if not bool(mask_to_tensor(mask).any()):
        raise EstableError("the mask is all black: nothing to repaint (white, ≥ 50 %, marks the area to repaint; "
                           "a mask drawn on a transparent layer is read from its alpha channel)")


def resize_note(size: tuple[int, int], target: tuple[int, int], factor: int = 8) -> str:
    """The note a run adds when it resizes its input image."""
    (w, h), (tw, th) = size, target
    why = (f"{w}x{h} is not a multiple of {factor}" if (w % factor or h % factor) and (tw, th) == (
        max(factor, w // factor * factor), max(factor, h // factor * factor)) else "the generation size differs")
    return (f"the input image is {w}x{h} and was resized (stretched with Lanczos, not cropped) to {tw}x{th}: "
            f"{why} (--size sets the generation size)")


def check_size(image: Image.Image, width: int, height: int, what: str = "image") -> None:
    if image.size != (width, height):
        raise EstableError(f"the {what} is {image.width}x{image.height} but the generation size is {width}x{height}")


def to_tensor(image: Image.Image) -> torch.Tensor:
    """PIL RGB → (1, 3, H, W) float32 in [-1, 1]."""
    arr = np.asarray(as_rgb(image), dtype=np.float32) / 255.0  # (H, W, 3) in [0, 1]
    return torch.from_numpy(arr).permute(2, 0, 1).unsqueeze(0) * 2.0 - 1.0


def mask_to_tensor(mask: Image.Image) -> torch.Tensor:
    """PIL mask → (1, 1, H, W) float32 in {0, 1}: white (≥ 50 %) = repaint, black = keep (:func:`as_mask`)."""
    arr = np.asarray(as_mask(mask), dtype=np.float32) / 255.0
    return (torch.from_numpy(arr) >= 0.5).float()[None, None]


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """(B, 3, H, W) in [-1, 1] → list of PIL images (values clamped, rounded to the nearest level)."""
    # On the images' device: a GPU sends a quarter of the bytes, and does the arithmetic faster than the CPU
    x = (images.detach().float() / 2 + 0.5).clamp(0, 1)
    arr = (x * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()  # (B, H, W, 3)
    return [Image.fromarray(a) for a in arr]
