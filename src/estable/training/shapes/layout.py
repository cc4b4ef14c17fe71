"""Layout: sampling sizes, positions, rotations and a background that make a prompt spec true."""

from __future__ import annotations

from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from estable.training.shapes.captions import caption_for
from estable.training.shapes.scene import (
    Background,
    BackgroundSpec,
    PromptSpec,
    Scene,
    SceneObject,
    _extent,
    relation_holds,
)
from estable.training.shapes.vocab import (
    COUNT_SIZES,
    DEFAULT_BACKGROUND,
    EDGE_MARGIN,
    MAX_OVERLAP,
    SAME_COLOUR_GAP,
    SIZE_RADIUS,
    SIZES,
    TEXTURES,
    UNNAMED_BACKGROUND_KINDS,
)

_RASTER = 96  # resolution of the coarse masks used to measure overlaps


def _coarse_mask(poly: np.ndarray) -> np.ndarray:
    m = Image.new("1", (_RASTER, _RASTER), 0)
    ImageDraw.Draw(m).polygon((poly * _RASTER).ravel().tolist(), fill=1)
    return np.asarray(m, dtype=bool)


def overlap_fraction(a: SceneObject, b: SceneObject) -> float:
    """Overlap area of two objects divided by the smaller one's area (measured on a 96² raster)."""
    ax0, ay0, ax1, ay1 = a.bbox
    bx0, by0, bx1, by1 = b.bbox
    if ax1 <= bx0 or bx1 <= ax0 or ay1 <= by0 or by1 <= ay0:
        return 0.0
    ma, mb = _coarse_mask(a.polygon()), _coarse_mask(b.polygon())
    smaller = max(1, min(int(ma.sum()), int(mb.sum())))
    return float((ma & mb).sum()) / smaller


def _boxes_apart(a: SceneObject, b: SceneObject, gap: float) -> bool:
    ax0, ay0, ax1, ay1 = a.bbox
    bx0, by0, bx1, by1 = b.bbox
    return ax1 + gap <= bx0 or bx1 + gap <= ax0 or ay1 + gap <= by0 or by1 + gap <= ay0


def _as_rng(rng: np.random.Generator | int | None) -> np.random.Generator:
    return rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)


def _pick(rng: np.random.Generator, items: list[Any] | tuple[Any, ...]) -> Any:
    return items[int(rng.integers(len(items)))]


def _sample_background(rng: np.random.Generator, spec: BackgroundSpec | None) -> Background:
    if spec is None:
        kind, colour = _pick(rng, UNNAMED_BACKGROUND_KINDS), DEFAULT_BACKGROUND
    else:
        kind, colour = spec.kind, spec.colour
    texture = _pick(rng, TEXTURES)
    period = float(rng.uniform(0.08, 0.16)) if texture == "stripes" else float(rng.uniform(0.1, 0.2))
    return Background(
        kind=kind,
        colour=colour,
        mentioned=spec is not None,
        angle=float(rng.uniform(0.0, 360.0)),
        texture=texture if kind == "textured" else "noise",
        period=period if kind == "textured" else 0.1,
        texture_seed=int(rng.integers(2**31)),
    )


def scene_from_prompt(
    spec: PromptSpec,
    rng: np.random.Generator | int | None = None,
    *,
    max_overlap: float = MAX_OVERLAP,
    max_attempts: int = 200,
    axis_ratio: float = 1.0,
    touch: bool = False,
) -> Scene:
    """Sample a layout that makes ``spec`` true: sizes, positions, rotations, background (``phrasing`` 0).

    Rejection sampling: objects are placed one by one at uniform positions that keep them inside the image,
    keep same-coloured objects apart, bound the overlap of the others and satisfy the relation (its axis at least
    ``axis_ratio`` times the other: above 1, pairs further from the diagonal than the relation needs). With
    ``touch``, a second object of another colour than the first is placed against it (their centres 0.55–0.95 of
    their radii's sum apart, in any direction the relation allows) and must overlap it, by at most ``max_overlap``.
    """
    rng = _as_rng(rng)
    if spec.kind == "count":
        size = spec.objects[0].size or _pick(rng, COUNT_SIZES[spec.count])
        specs = [spec.objects[0]] * spec.count
        sizes = [size] * spec.count
    else:
        specs = list(spec.objects)
        sizes = [o.size or _pick(rng, SIZES) for o in specs]
    for _ in range(max_attempts):
        placed: list[SceneObject] = []
        for o, size in zip(specs, sizes):
            lo, hi = SIZE_RADIUS[size]
            radius = float(rng.uniform(lo, hi))
            rotation = 0.0 if o.shape == "circle" else float(rng.uniform(-15.0, 15.0))
            ex, ey = _extent(o.shape, radius, rotation)
            against = placed[0] if touch and len(placed) == 1 and placed[0].colour != o.colour else None
            for _try in range(30):
                if against is None:
                    center = (
                        float(rng.uniform(ex + EDGE_MARGIN, 1 - ex - EDGE_MARGIN)),
                        float(rng.uniform(ey + EDGE_MARGIN, 1 - ey - EDGE_MARGIN)),
                    )
                else:
                    distance = (against.radius + radius) * float(rng.uniform(0.55, 0.95))
                    angle = float(rng.uniform(0.0, 2 * np.pi))
                    ax, ay = against.center
                    center = (ax + distance * float(np.cos(angle)), ay + distance * float(np.sin(angle)))
                    if not (ex + EDGE_MARGIN <= center[0] <= 1 - ex - EDGE_MARGIN
                            and ey + EDGE_MARGIN <= center[1] <= 1 - ey - EDGE_MARGIN):
                        continue
                cand = SceneObject(o.shape, o.colour, size, center, radius, rotation, o.size is not None)
                if spec.relation is not None and placed and not relation_holds(
                        placed[0].center, center, spec.relation, axis_ratio=axis_ratio):
                    continue
                if against is not None and overlap_fraction(against, cand) == 0:
                    continue
                if all(
                    _boxes_apart(p, cand, SAME_COLOUR_GAP)
                    if p.colour == cand.colour
                    else overlap_fraction(p, cand) <= max_overlap
                    for p in placed
                ):
                    placed.append(cand)
                    break
            else:
                break  # this object found no place: start the layout again
        if len(placed) == len(specs):
            return Scene(spec.kind, tuple(placed), _sample_background(rng, spec.background), spec.relation)
    raise ValueError(f"could not lay out {caption_for(spec)!r} in {max_attempts} attempts; use smaller sizes")
