"""The invisible pixel watermark of the Stable Diffusion reference scripts ("dwtDct"), written in numpy.

The SD scripts mark every image with the ``invisible-watermark`` package's ``dwtDct`` method. What that method
does, and what this module does so that either side reads the other's marks (tests/test_watermark.py holds
the two side by side):

1. Colour: the image's U chroma channel, U = 0.492 (B − Y) + 128 with Y = 0.299 R + 0.587 G + 0.114 B (the
   YUV of OpenCV's ``COLOR_BGR2YUV``). Only U carries the mark; Y and V are left alone.
2. One level of the orthonormal Haar DWT of U over the largest part whose sides are multiples of 4: the
   approximation band LL, LL[i, j] = (U[2i, 2j] + U[2i, 2j+1] + U[2i+1, 2j] + U[2i+1, 2j+1]) / 2.
3. LL is cut into 4×4 blocks (8×8 pixels), taken row by row; block n carries bit n mod L of the L-bit
   message, so every bit is repeated over the image.
4. In each block the coefficient of largest magnitude (the block's first element excluded) is quantised with
   step s = 36 to a level (k + 1/4 + b/2) · s, sign kept (quantisation index modulation, Chen & Wornell 2001);
   the reference takes k = ⌊|c| / s⌋. That can drop the coefficient below another of its block, whose
   remainder the reader then sees instead (on smooth images about half the 0-bits are lost so); here k is the
   nearest level that keeps the coefficient the block's largest, which the same reader decodes. Despite the
   method's name, the released package applies no DCT to the block; we match what it does.
5. Reading: the same coefficient of each block gives bit 1 when |c| mod s > s/2; each message bit is the
   majority (mean > 127/255) over its blocks.

Changing LL by δ changes each of its four pixels' U by δ/2 (the inverse Haar transform of a change in LL
alone); with Y and V held, that is ΔB = 2.032·ΔU and ΔG = −0.395·ΔU (OpenCV's inverse YUV), ΔR = 0. The
embedding works on those deltas directly, rounds to 8 bits and runs further passes (up to 8) over blocks that
rounding or clipping pushed off their target: where a pixel of a 2×2 group saturates, the next pass moves the
others further (saturated images of the built-in model lost the mark in 1.5 % of cases with 2 passes, none
with 8). (The package itself rebuilds the image with its horizontal and
vertical detail bands swapped, which alters the image beyond the mark; that is not copied.)

What it survives (measured in benchmarks/RESULTS.md, and as the literature reports): brightness, mild noise
and moderate JPEG; not crops, rescaling or rotation, which move the 8×8 block grid.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image

__all__ = ["BLOCK", "SCALE", "bit_scores", "decode_bits", "embed_bits", "min_size_for"]

SCALE = 36.0  # the quantisation step of the reference (its default scales=[0, 36, 36]; only U is used)
BLOCK = 4  # LL block side: 4×4 coefficients = 8×8 pixels

# OpenCV's YUV coefficients (BGR2YUV / YUV2BGR)
_KR, _KG, _KB = 0.299, 0.587, 0.114
_KU = 0.492
_DB_DU, _DG_DU = 2.032, -0.395
_MARGIN = 2.0  # LL units the marked coefficient keeps above the block's others


def min_size_for(n_bits: int) -> int:
    """The number of 8×8 blocks needed to hold ``n_bits`` once."""
    return n_bits


def _u_channel(rgb: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 RGB → (H, W) float64 U of OpenCV's YUV."""
    x = rgb.astype(np.float64)
    y = _KR * x[..., 0] + _KG * x[..., 1] + _KB * x[..., 2]
    return _KU * (x[..., 2] - y) + 128.0


def _ll(u: np.ndarray) -> np.ndarray:
    """Haar approximation band of the (H4, W4) top-left part of U (sides multiples of 4): (H4/2, W4/2)."""
    h, w = u.shape[0] // 4 * 4, u.shape[1] // 4 * 4
    u = u[:h, :w]
    return (u[0::2, 0::2] + u[0::2, 1::2] + u[1::2, 0::2] + u[1::2, 1::2]) / 2.0


def _blocks(ll: np.ndarray) -> np.ndarray:
    """(h, w) band → (nby, nbx, 16) blocks of BLOCK×BLOCK in row-major order (partial blocks dropped)."""
    nby, nbx = ll.shape[0] // BLOCK, ll.shape[1] // BLOCK
    b = ll[: nby * BLOCK, : nbx * BLOCK].reshape(nby, BLOCK, nbx, BLOCK).transpose(0, 2, 1, 3)
    return b.reshape(nby, nbx, BLOCK * BLOCK)


def _positions(blocks: np.ndarray) -> np.ndarray:
    """Index (1..15) of each block's largest-magnitude element, the first element excluded (argmax: first wins)."""
    return np.argmax(np.abs(blocks[..., 1:]), axis=-1) + 1


def bit_scores(image: Image.Image | np.ndarray, n_bits: int) -> np.ndarray:
    """The fraction of blocks voting 1 for each of the ``n_bits`` message bits, (n_bits,) in [0, 1].

    NaN for bits that no block carries (an image too small to hold the message once)."""
    rgb = _as_rgb(image)
    blocks = _blocks(_ll(_u_channel(rgb)))
    pos = _positions(blocks)
    c = np.take_along_axis(blocks, pos[..., None], axis=-1)[..., 0]  # (nby, nbx)
    votes = (np.mod(np.abs(c), SCALE) > 0.5 * SCALE).astype(np.float64).ravel()
    index = np.arange(votes.size) % n_bits
    sums = np.bincount(index, weights=votes, minlength=n_bits)
    counts = np.bincount(index, minlength=n_bits).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return sums / counts


def decode_bits(image: Image.Image | np.ndarray, n_bits: int) -> np.ndarray:
    """The ``n_bits`` message bits read from ``image`` (uint8 0/1), by the reference's majority rule."""
    scores = np.nan_to_num(bit_scores(image, n_bits), nan=0.0)
    return (scores * 255 > 127).astype(np.uint8)


def embed_bits(image: Image.Image, bits: np.ndarray | list[int], *, passes: int = 8) -> Image.Image:
    """``image`` (RGB) with ``bits`` written into its U channel's Haar band; a new image of the same size.

    ``passes``: embedding rounds; after the first, only blocks that rounding or clipping left unreadable move.
    Raises ValueError when the image has fewer 8×8 blocks than there are bits."""
    bits = np.asarray(bits, dtype=np.int64).ravel()
    if bits.size == 0 or not np.isin(bits, (0, 1)).all():
        raise ValueError("the watermark message must be a non-empty sequence of 0/1 bits")
    rgb = _as_rgb(image).copy()
    nby, nbx = (rgb.shape[0] // 4 * 4) // 2 // BLOCK, (rgb.shape[1] // 4 * 4) // 2 // BLOCK
    if nby * nbx < bits.size:
        raise ValueError(
            f"a {rgb.shape[1]}x{rgb.shape[0]} image holds {nby * nbx} blocks of 8x8 pixels, fewer than the "
            f"{bits.size} bits of the watermark"
        )
    target_bits = bits[np.arange(nby * nbx) % bits.size].reshape(nby, nbx)
    pos = None
    for round_ in range(max(1, passes)):
        blocks = _blocks(_ll(_u_channel(rgb)))
        if pos is None:
            pos = _positions(blocks)  # chosen on the original image, as the reference does, then kept
        c = np.take_along_axis(blocks, pos[..., None], axis=-1)[..., 0]  # (nby, nbx)
        mag = np.abs(c)
        # the largest magnitude among the block's other candidates: the marked coefficient must stay above it,
        # or the reader would look at another one
        others = np.abs(blocks[..., 1:]).copy()
        np.put_along_axis(others, (pos - 1)[..., None], -np.inf, axis=-1)
        floor_ = others.max(axis=-1) + _MARGIN
        # the level (k + 1/4 + b/2)·s nearest to |c| that stays above floor_
        k = np.rint(mag / SCALE - 0.25 - 0.5 * target_bits)
        k = np.maximum(k, np.ceil(floor_ / SCALE - 0.25 - 0.5 * target_bits))
        target = (k + 0.25 + 0.5 * target_bits) * SCALE
        if round_ > 0:  # a later pass moves only blocks that rounding or clipping pushed off their half-step
            ok = ((np.mod(mag, SCALE) > 0.5 * SCALE) == target_bits.astype(bool)) & (mag > floor_ - _MARGIN)
            if ok.all():
                break
            target = np.where(ok, mag, target)
        delta_ll = np.where(c >= 0, 1.0, -1.0) * (target - mag)  # (nby, nbx)
        # the change of LL element (by, bx, pos) → a change of U over its 2×2 pixels of δ/2 each
        du = np.zeros((nby * BLOCK, nbx * BLOCK))
        py, px = pos // BLOCK, pos % BLOCK
        yy = np.arange(nby)[:, None] * BLOCK + py
        xx = np.arange(nbx)[None, :] * BLOCK + px
        du[yy, xx] = delta_ll / 2.0
        du = np.repeat(np.repeat(du, 2, axis=0), 2, axis=1)  # (8·nby, 8·nbx) pixels
        h, w = du.shape
        out = rgb.astype(np.float64)
        out[:h, :w, 2] += _DB_DU * du
        out[:h, :w, 1] += _DG_DU * du
        rgb = np.clip(np.rint(out), 0, 255).astype(np.uint8)
    return Image.fromarray(rgb, "RGB")


def _as_rgb(image: Image.Image | np.ndarray) -> np.ndarray:
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), dtype=np.uint8)
    arr = np.asarray(image)
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.dtype != np.uint8:
        raise ValueError(f"expected an (H, W, 3) uint8 RGB array, got {arr.shape} {arr.dtype}")
    return arr


def binomial_tail(k: int, n: int) -> float:
    """P(X ≥ k) for X ~ Binomial(n, 1/2): the chance that an unmarked image matches ≥ k of n known bits."""
    return sum(math.comb(n, i) for i in range(k, n + 1)) / 2.0**n
