"""Control images made without downloaded weights: Canny edges, scribbles, line drawings and, for the shapes world,
colour segmentation. Each takes a PIL image and returns the RGB control image a ControlNet of that kind expects
(white strokes on black for edges/scribbles/lines, flat palette colours for segmentation).

Canny (Canny 1986, "A Computational Approach to Edge Detection") follows the steps OpenCV's ``cv2.Canny`` takes, so
thresholds mean the same thing as in the ControlNet annotators that call it (low 100, high 200 by default):

1. optional Gaussian smoothing (σ; 0 = none, as ``cv2.Canny`` itself does not smooth);
2. 3×3 Sobel derivatives with replicated borders; on a colour image each pixel takes the channel with the
   largest gradient; magnitude |gx| + |gy| (OpenCV's default L1 norm, in 0..8·255);
3. non-maximum suppression across the gradient direction, quantised to 0°, 45°, 90°, 135°;
4. hysteresis: pixels above ``high`` are edges, pixels above ``low`` are edges when 8-connected to one.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image

from ..errors import EstableError

__all__ = ["CONTROL_TYPES", "canny", "colour_segmentation", "lines", "make_control_image", "scribble"]

#: type → what it makes; ``none`` uses the image as it is (an edge map or drawing made elsewhere).
CONTROL_TYPES: dict[str, str] = {
    "canny": "Canny edges, white on black",
    "scribble": "thick soft edges (smoothed Canny, thickened), white on black",
    "lines": "a drawing's dark strokes on light paper, as white strokes on black",
    "seg": "shapes-world colour segmentation: every pixel set to the nearest palette colour",
    "none": "the image as it is",
}


#: The largest stroke width (pixels) and Gaussian σ the makers accept: beyond them the work (a disc of
#: thickness² shifts, a kernel of 6σ taps) grows without making a more useful control image.
MAX_THICKNESS = 64
MAX_SIGMA = 50.0


def _check_thickness(thickness: int) -> None:
    whole = isinstance(thickness, (int, np.integer)) and not isinstance(thickness, bool)
    if not whole or not 1 <= thickness <= MAX_THICKNESS:
        raise EstableError(f"stroke thickness must be a whole number of pixels from 1 to {MAX_THICKNESS}, "
                           f"not {thickness!r}")


def _check_sigma(sigma: float) -> None:
    if isinstance(sigma, bool) or not isinstance(sigma, (int, float, np.number)) or not math.isfinite(sigma) \
            or not 0 <= sigma <= MAX_SIGMA:
        raise EstableError(f"Gaussian sigma must be a number from 0 to {MAX_SIGMA:g}, not {sigma!r}")


def _gaussian(a: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur of (H, W) or (H, W, C) float32, radius ⌈3σ⌉, reflected borders."""
    if sigma <= 0:
        return a
    r = max(1, math.ceil(3 * sigma))
    x = np.arange(-r, r + 1, dtype=np.float64)
    k = np.exp(-(x**2) / (2 * sigma**2))
    k = (k / k.sum()).astype(np.float32)
    h, w = a.shape[:2]
    rest = [(0, 0)] * (a.ndim - 2)
    p = np.pad(a, [(r, r), (0, 0), *rest], mode="reflect")
    a = k[0] * p[0:h]
    for i in range(1, 2 * r + 1):
        a += k[i] * p[i : i + h]  # rows
    p = np.pad(a, [(0, 0), (r, r), *rest], mode="reflect")
    a = k[0] * p[:, 0:w]
    for i in range(1, 2 * r + 1):
        a += k[i] * p[:, i : i + w]  # columns
    return a


def _sobel(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """3×3 Sobel derivatives (x right, y down) of (H, W[, C]) with replicated borders."""
    pad = [(1, 1), (1, 1)] + [(0, 0)] * (a.ndim - 2)
    p = np.pad(a, pad, mode="edge")
    gx = (p[:-2, 2:] + 2 * p[1:-1, 2:] + p[2:, 2:]) - (p[:-2, :-2] + 2 * p[1:-1, :-2] + p[2:, :-2])
    gy = (p[2:, :-2] + 2 * p[2:, 1:-1] + p[2:, 2:]) - (p[:-2, :-2] + 2 * p[:-2, 1:-1] + p[:-2, 2:])
    return gx, gy


def canny_mask(image: Image.Image, low: float = 100, high: float = 200, sigma: float = 0.0) -> np.ndarray:
    """Boolean (H, W) Canny edge map (see the module docstring for the steps and the threshold scale)."""
    if not (math.isfinite(low) and math.isfinite(high) and 0 <= low <= high):
        raise EstableError(f"Canny thresholds must be numbers with 0 ≤ low ≤ high, got low={low}, high={high}")
    _check_sigma(sigma)
    a = _gaussian(np.asarray(image.convert("RGB"), dtype=np.float32), sigma)  # (H, W, 3)
    gx, gy = _sobel(a)
    mag = np.abs(gx) + np.abs(gy)  # (H, W, 3), L1
    best = mag.argmax(axis=2)[..., None]  # the channel with the strongest gradient
    mag = np.take_along_axis(mag, best, 2)[..., 0]
    gx = np.take_along_axis(gx, best, 2)[..., 0]
    gy = np.take_along_axis(gy, best, 2)[..., 0]

    # Non-maximum suppression: compare with the two neighbours along the quantised gradient direction.
    m = np.pad(mag, 1)  # zeros outside the image
    c = m[1:-1, 1:-1]
    ax, ay = np.abs(gx), np.abs(gy)
    t22, t67 = math.tan(math.radians(22.5)), math.tan(math.radians(67.5))
    horizontal = ay <= ax * t22  # gradient along x: the edge runs vertically
    vertical = ay > ax * t67
    same = (gx * gy) >= 0  # gradient towards down-right / up-left
    keep = np.where(
        horizontal, (c > m[1:-1, :-2]) & (c >= m[1:-1, 2:]),
        np.where(vertical, (c > m[:-2, 1:-1]) & (c >= m[2:, 1:-1]),
                 np.where(same, (c > m[:-2, :-2]) & (c > m[2:, 2:]), (c > m[:-2, 2:]) & (c > m[2:, :-2]))))
    candidate = keep & (mag > low)
    strong = candidate & (mag > high)
    return _hysteresis(strong, candidate)


def _hysteresis(strong: np.ndarray, candidate: np.ndarray) -> np.ndarray:
    """Candidates 8-connected (through candidates) to a strong pixel, found by a flood fill from the strong ones."""
    h, w = strong.shape
    edges = strong.copy()
    stack = list(zip(*np.nonzero(strong)))
    while stack:
        y, x = stack.pop()
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                yy, xx = y + dy, x + dx
                if 0 <= yy < h and 0 <= xx < w and candidate[yy, xx] and not edges[yy, xx]:
                    edges[yy, xx] = True
                    stack.append((yy, xx))
    return edges


def _dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    """Binary dilation by a disc of ``radius`` pixels."""
    if radius <= 0:
        return mask
    p = np.pad(mask, radius)
    out = np.zeros_like(mask)
    h, w = mask.shape
    for dy in range(-radius, radius + 1):
        for dx in range(-radius, radius + 1):
            if dy * dy + dx * dx <= radius * radius:
                out |= p[radius + dy : radius + dy + h, radius + dx : radius + dx + w]
    return out


def _white_on_black(mask: np.ndarray) -> Image.Image:
    return Image.fromarray(np.repeat((mask.astype(np.uint8) * 255)[..., None], 3, axis=2))


def canny(image: Image.Image, low: float = 100, high: float = 200, sigma: float = 0.0) -> Image.Image:
    """Canny edges as an RGB image, white (255) on black."""
    return _white_on_black(canny_mask(image, low, high, sigma))


def scribble(image: Image.Image, thickness: int = 3, sigma: float = 2.0, low: float = 40,
             high: float = 80) -> Image.Image:
    """A scribble-like map: edges of the smoothed image (only the main contours survive), thickened to strokes
    about ``thickness`` pixels wide, white on black (what scribble ControlNets are trained on)."""
    _check_thickness(thickness)
    return _white_on_black(_dilate(canny_mask(image, low, high, sigma), max(0, (thickness - 1) // 2)))


def lines(image: Image.Image, thickness: int = 1, threshold: int = 128) -> Image.Image:
    """A drawing (dark strokes on light paper) as white strokes on black; ``thickness`` > 1 thickens them."""
    _check_thickness(thickness)
    dark = np.asarray(image.convert("L")) < threshold
    return _white_on_black(_dilate(dark, max(0, (thickness - 1) // 2)))


def shapes_palette() -> dict[str, tuple[int, int, int]]:
    """The shapes world's colours and its grey background."""
    from ..training.shapes import BACKGROUND_COLOURS

    return dict(BACKGROUND_COLOURS)


def colour_segmentation(image: Image.Image, palette: dict[str, tuple[int, int, int]] | None = None,
                        clean: int = 3) -> Image.Image:
    """Every pixel set to the nearest palette colour (Euclidean in RGB), then a ``clean``×``clean`` majority
    filter on the labels removes the anti-aliased fringes between regions (0 or 1: none)."""
    from PIL import ImageFilter

    pal = np.array(list((palette or shapes_palette()).values()), dtype=np.float32)  # (K, 3)
    if len(pal) > 255:
        raise EstableError("colour segmentation takes at most 255 palette colours")
    a = np.asarray(image.convert("RGB"), dtype=np.float32)  # (H, W, 3)
    d = ((a[:, :, None, :] - pal[None, None]) ** 2).sum(-1)  # (H, W, K)
    labels = d.argmin(-1).astype(np.uint8)
    if clean > 1:
        labels = np.asarray(Image.fromarray(labels).filter(ImageFilter.ModeFilter(clean)))
    return Image.fromarray(pal[labels].astype(np.uint8))


def make_control_image(kind: str, image: Image.Image, **options: float) -> Image.Image:
    """The control image of ``kind`` (one of :data:`CONTROL_TYPES`) made from ``image``; ``options`` go to the
    maker (canny: low, high, sigma; scribble: thickness, sigma, low, high; lines: thickness, threshold)."""
    makers = {"canny": canny, "scribble": scribble, "lines": lines, "seg": colour_segmentation}
    if kind == "none":
        return image.convert("RGB")
    if kind not in makers:
        raise EstableError(f"unknown control type {kind!r}; choose one of {', '.join(CONTROL_TYPES)}")
    try:
        return makers[kind](image, **options)  # type: ignore[operator]
    except TypeError as exc:
        raise EstableError(f"control type {kind}: {exc}") from None
