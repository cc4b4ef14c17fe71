"""Rendering: a scene to an anti-aliased RGB image at any resolution."""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw

from estable.training.shapes.scene import Background, Scene, _polygon_area_centroid
from estable.training.shapes.vocab import (
    BACKGROUND_COLOURS,
    COLOURS,
    GRADIENT_SPAN,
    NOISE_AMPLITUDE,
    STRIPE_AMPLITUDE,
    SUPERSAMPLE,
)

MAX_RENDER_SIZE = 2048  # pixels per side: the generation limit (estable.params.MAX_SIDE); beyond, memory runs out


def _background_pixels(bg: Background, size: int) -> np.ndarray:
    """Background as uint8 (size, size, 3); textures are defined in side fractions, so any size looks alike."""
    base = np.asarray(BACKGROUND_COLOURS[bg.colour], dtype=np.int16)
    if bg.kind == "plain":
        return np.broadcast_to(base.astype(np.uint8), (size, size, 3)).copy()
    u = (np.arange(size, dtype=np.float32) + 0.5) / size  # pixel centres
    th = math.radians(bg.angle)
    proj = u[None, :] * math.cos(th) + u[:, None] * math.sin(th)  # (S, S) position along the direction
    if bg.kind == "gradient":
        corners = [0.0, math.cos(th), math.sin(th), math.cos(th) + math.sin(th)]
        lo, hi = min(corners), max(corners)
        offset = ((proj - lo) / (hi - lo) - 0.5) * GRADIENT_SPAN  # brightness ramp centred on the named colour
    elif bg.texture == "stripes":
        offset = STRIPE_AMPLITUDE * np.tanh(2.0 * np.sin(2 * np.pi * proj / bg.period))
    else:
        # Smooth value noise: Gaussian values on a coarse grid (cells of ``period``), bicubic upsampling.
        cells = max(2, round(1.0 / bg.period)) + 1
        grid = np.random.default_rng(bg.texture_seed).standard_normal((cells, cells)).astype(np.float32)
        noise = np.asarray(Image.fromarray(grid, mode="F").resize((size, size), Image.BICUBIC))
        offset = NOISE_AMPLITUDE * noise
    # One brightness offset for all three channels: quantise it once, then add in integers (fast).
    return np.clip(base + np.rint(offset).astype(np.int16)[..., None], 0, 255).astype(np.uint8)


# PIL's polygon filler also paints the boundary pixels, which dilates a filled shape by about 0.3 pixel of the
# canvas it draws on (measured: +3–7 % area for 4–8 px shapes at 4× supersampling). Insetting the outline by
# that much before filling makes the anti-aliased coverage sum to the true area within about 1 %.
_FILL_INSET = 0.3


def _inset(p: np.ndarray, d: float) -> np.ndarray:
    """Move each edge of a simple polygon (N, 2) inward by d (vertices along the bisector, mitred)."""
    area = _polygon_area_centroid(p)[0]

    def inward(e: np.ndarray) -> np.ndarray:  # unit normals (N, 2) of edges e, pointing inside
        n = np.stack([-e[:, 1], e[:, 0]], axis=1) / np.linalg.norm(e, axis=1, keepdims=True)
        return n if area > 0 else -n

    n1, n2 = inward(p - np.roll(p, 1, axis=0)), inward(np.roll(p, -1, axis=0) - p)  # edges before/after vertex
    m = n1 + n2
    m /= np.linalg.norm(m, axis=1, keepdims=True)
    return p + m * (d / np.sum(m * n1, axis=1, keepdims=True))


def _paint(img: np.ndarray, poly_px: np.ndarray, colour: np.ndarray, ss: int) -> None:
    """Alpha-composite a flat polygon into img uint8 (S, S, 3) with coverage from ss× supersampling."""
    size = img.shape[0]
    x0, y0 = np.floor(poly_px.min(axis=0)).astype(int)
    x1, y1 = np.ceil(poly_px.max(axis=0)).astype(int)
    x0, y0, x1, y1 = max(x0, 0), max(y0, 0), min(x1, size), min(y1, size)
    if x1 <= x0 or y1 <= y0:
        return
    mask = Image.new("L", ((x1 - x0) * ss, (y1 - y0) * ss), 0)
    # No half-pixel shift: measured on PIL's polygon filler, unshifted vertices give unbiased centroids.
    local = _inset((poly_px - [x0, y0]) * ss, _FILL_INSET)
    ImageDraw.Draw(mask).polygon(local.ravel().tolist(), fill=255)
    alpha = np.asarray(mask.reduce(ss), dtype=np.float32)[..., None] * (1.0 / 255.0)  # box filter = coverage
    region = img[y0:y1, x0:x1].astype(np.float32)  # (h, w, 3)
    region += alpha * (colour - region)
    img[y0:y1, x0:x1] = np.rint(region).astype(np.uint8)  # only the object's box leaves uint8


def render(scene: Scene, size: int = 256, *, supersample: int = SUPERSAMPLE) -> Image.Image:
    """Render a scene to an RGB image of ``size``×``size`` (objects drawn in order, later ones on top)."""
    if not isinstance(size, int) or not 8 <= size <= MAX_RENDER_SIZE:
        raise ValueError(f"size must be a whole number of pixels from 8 to {MAX_RENDER_SIZE}, got {size!r}")
    img = _background_pixels(scene.background, size)
    for o in scene.objects:
        _paint(img, o.polygon() * size, np.asarray(COLOURS[o.colour], dtype=np.float32), supersample)
    return Image.fromarray(img, mode="RGB")
