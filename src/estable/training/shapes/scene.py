"""The scene model: shape geometry, prompt specs (what a caption says) and scenes (the ground truth of an image)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cache
from typing import Any

import numpy as np

from estable.training.shapes.vocab import (
    BACKGROUND_COLOURS,
    BACKGROUND_KINDS,
    COLOURS,
    COUNT_SIZES,
    COUNT_WORDS,
    INVERSE_RELATION,
    PROMPT_KINDS,
    RELATION_MARGIN,
    RELATIONS,
    SHAPES,
    SIZES,
)

# ---------------------------------------------------------------------------------------------------------
# Geometry
# ---------------------------------------------------------------------------------------------------------


def _polygon_area_centroid(p: np.ndarray) -> tuple[float, tuple[float, float]]:
    """Signed area and area centroid of a simple polygon (shoelace formula)."""
    x, y = p[:, 0], p[:, 1]
    xn, yn = np.roll(x, -1), np.roll(y, -1)
    cross = x * yn - xn * y
    area = 0.5 * cross.sum()
    cx = ((x + xn) * cross).sum() / (6.0 * area)
    cy = ((y + yn) * cross).sum() / (6.0 * area)
    return float(area), (float(cx), float(cy))


def polygon_area(p: np.ndarray) -> float:
    """Unsigned area of a polygon (N, 2)."""
    return abs(_polygon_area_centroid(p)[0])


def _regular(n: int, phase_deg: float, radii: tuple[float, ...] = (1.0,)) -> np.ndarray:
    k = np.arange(n * len(radii))
    ang = np.deg2rad(phase_deg) + k * (2 * np.pi / (n * len(radii)))
    r = np.array(radii * n)
    return np.stack([r * np.cos(ang), r * np.sin(ang)], axis=1)


@cache
def unit_polygon(shape: str) -> np.ndarray:
    """Vertices (N, 2) of a shape, y down, area centroid at the origin, fitting exactly in [-1, 1]²."""
    if shape == "circle":
        p = _regular(96, 0.0)
    elif shape == "square":
        p = np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], dtype=np.float64)
    elif shape == "triangle":
        p = _regular(3, -90.0)  # apex up
    elif shape == "star":
        p = _regular(5, -90.0, (1.0, 0.42))  # five points, inner radius 0.42
    elif shape == "hexagon":
        p = _regular(6, -90.0)  # pointy top
    elif shape == "heart":
        # The classic heart curve x = 16 sin³t, y = 13 cos t − 5 cos 2t − 2 cos 3t − cos 4t (y flipped: image
        # y points down).
        t = np.linspace(0, 2 * np.pi, 96, endpoint=False)
        y = 13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t)
        p = np.stack([16 * np.sin(t) ** 3, -y], axis=1)
    elif shape == "diamond":
        p = np.array([[0, -1], [0.62, 0], [0, 1], [-0.62, 0]], dtype=np.float64)
    elif shape == "cross":
        a = 0.34  # half-width of an arm
        arm = [[-a, -1], [a, -1], [a, -a], [1, -a], [1, a], [a, a]]  # top arm and half the right one
        p = np.array(arm + [[-x, -y] for x, y in arm], dtype=np.float64)  # the rest by point symmetry
    else:
        raise ValueError(f"unknown shape {shape!r}; choose one of {', '.join(SHAPES)}")
    p = np.asarray(p, dtype=np.float64)
    _, (cx, cy) = _polygon_area_centroid(p)
    p = p - [cx, cy]
    p = p / np.abs(p).max()
    p.setflags(write=False)
    return p


def _object_polygon(shape: str, center: tuple[float, float], radius: float, rotation: float) -> np.ndarray:
    th = math.radians(rotation)
    c, s = math.cos(th), math.sin(th)
    rot = np.array([[c, -s], [s, c]])
    return unit_polygon(shape) @ rot.T * radius + np.asarray(center)  # (N, 2)


def _extent(shape: str, radius: float, rotation: float) -> tuple[float, float]:
    """Half width and half height of the axis-aligned box around the rotated shape (about its centroid)."""
    p = _object_polygon(shape, (0.0, 0.0), radius, rotation)
    return float(np.abs(p[:, 0]).max()), float(np.abs(p[:, 1]).max())


def relation_holds(
    a: tuple[float, float], b: tuple[float, float], relation: str, margin: float = RELATION_MARGIN,
    axis_ratio: float = 1.0,
) -> bool:
    """Whether "A <relation> B" is true of centres a and b (x right, y down).

    The offset along the relation's axis must be at least ``margin`` and must dominate the other axis (be at least
    ``axis_ratio`` times it; 1, the judge's rule: a pair satisfies at most one relation).
    """
    dx, dy = b[0] - a[0], b[1] - a[1]  # B relative to A
    if relation == "left of":
        return dx >= margin and abs(dx) >= axis_ratio * abs(dy)
    if relation == "right of":
        return -dx >= margin and abs(dx) >= axis_ratio * abs(dy)
    if relation == "above":
        return dy >= margin and abs(dy) >= axis_ratio * abs(dx)
    if relation == "below":
        return -dy >= margin and abs(dy) >= axis_ratio * abs(dx)
    raise ValueError(f"unknown relation {relation!r}; choose one of {', '.join(RELATIONS)}")


# ---------------------------------------------------------------------------------------------------------
# Prompt specs and scenes
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ObjectSpec:
    """One object of a prompt; ``size`` None means the prompt does not say."""

    shape: str
    colour: str
    size: str | None = None

    def __post_init__(self) -> None:
        if self.shape not in SHAPES:
            raise ValueError(f"unknown shape {self.shape!r}; choose one of {', '.join(SHAPES)}")
        if self.colour not in COLOURS:
            raise ValueError(f"unknown colour {self.colour!r}; choose one of {', '.join(COLOURS)}")
        if self.size is not None and self.size not in SIZES:
            raise ValueError(f"unknown size {self.size!r}; choose one of {', '.join(SIZES)} or None")


@dataclass(frozen=True)
class BackgroundSpec:
    kind: str
    colour: str

    def __post_init__(self) -> None:
        if self.kind not in BACKGROUND_KINDS:
            raise ValueError(f"unknown background kind {self.kind!r}; choose one of {', '.join(BACKGROUND_KINDS)}")
        if self.colour not in BACKGROUND_COLOURS:
            raise ValueError(
                f"unknown background colour {self.colour!r}; choose one of {', '.join(BACKGROUND_COLOURS)}"
            )


@dataclass(frozen=True)
class PromptSpec:
    """A structured prompt: what a caption says, without the layout.

    ``objects`` holds one entry for "single" and "count" (repeated ``count`` times), two for "pair" and
    "colour_binding"; for a pair, ``relation`` reads "objects[0] <relation> objects[1]". ``background`` None
    means the prompt does not mention it.
    """

    kind: str
    objects: tuple[ObjectSpec, ...]
    count: int = 1
    relation: str | None = None
    background: BackgroundSpec | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "objects", tuple(self.objects))
        k, objs = self.kind, self.objects
        if k not in PROMPT_KINDS:
            raise ValueError(f"unknown prompt kind {k!r}; choose one of {', '.join(PROMPT_KINDS)}")
        want = 1 if k in ("single", "count") else 2
        if len(objs) != want:
            raise ValueError(f"a {k!r} prompt takes {want} object spec(s), got {len(objs)}")
        if k == "count":
            if self.count not in COUNT_WORDS:
                raise ValueError(f"a count prompt needs count in 2..4, got {self.count}")
            size = objs[0].size
            if size is not None and size not in COUNT_SIZES[self.count]:
                raise ValueError(f"{self.count} {size} objects do not fit; use {' or '.join(COUNT_SIZES[self.count])}")
        elif self.count != 1:
            raise ValueError(f"count must be 1 for a {k!r} prompt (use kind='count' for several objects)")
        if k == "pair":
            if self.relation not in RELATIONS:
                raise ValueError(f"a pair prompt needs a relation in {', '.join(RELATIONS)}, got {self.relation!r}")
            if (objs[0].colour, objs[0].shape) == (objs[1].colour, objs[1].shape):
                raise ValueError("the two objects of a pair must differ in colour or shape")
        elif self.relation is not None:
            raise ValueError(f"only pair prompts carry a relation, not {k!r}")
        if k == "colour_binding" and (objs[0].colour == objs[1].colour or objs[0].shape == objs[1].shape):
            raise ValueError("the two objects of a colour_binding prompt must differ in colour AND shape")
        if self.background is not None and self.background.colour in {o.colour for o in objs}:
            raise ValueError(f"the background colour {self.background.colour!r} equals an object's colour")

    def combinations(self) -> set[tuple[str, str]]:
        """The (colour, shape) combinations the prompt names."""
        return {(o.colour, o.shape) for o in self.objects}


@dataclass(frozen=True)
class SceneObject:
    shape: str
    colour: str
    size: str
    center: tuple[float, float]  # area centroid (x, y), fractions of the side, y down
    radius: float  # half-extent of the unrotated shape, fraction of the side
    rotation: float = 0.0  # degrees, clockwise on screen
    size_mentioned: bool = False

    def polygon(self) -> np.ndarray:
        """Vertices (N, 2) in fractions of the side."""
        return _object_polygon(self.shape, self.center, self.radius, self.rotation)

    @property
    def bbox(self) -> tuple[float, float, float, float]:
        """(x0, y0, x1, y1) in fractions of the side."""
        p = self.polygon()
        x0, y0 = p.min(axis=0)
        x1, y1 = p.max(axis=0)
        return float(x0), float(y0), float(x1), float(y1)

    @property
    def area(self) -> float:
        """Area as a fraction of the image."""
        return polygon_area(self.polygon())


@dataclass(frozen=True)
class Background:
    kind: str  # plain | gradient | textured
    colour: str
    mentioned: bool = False
    angle: float = 0.0  # direction of the gradient or of the stripes' normal, degrees
    texture: str = "noise"  # textured only: noise | stripes
    period: float = 0.1  # stripes: period as a fraction of the side; noise: cell size
    texture_seed: int = 0


@dataclass(frozen=True)
class Scene:
    """Ground truth of one image. ``relation`` reads "objects[0] <relation> objects[1]" (pairs only).

    ``phrasing`` picks the caption's paraphrase: bit 0 reads a pair/binding from the second object, bit 1 says
    "against" instead of "on" for the background.
    """

    kind: str
    objects: tuple[SceneObject, ...]
    background: Background
    relation: str | None = None
    phrasing: int = 0

    @property
    def count(self) -> int:
        return len(self.objects)

    @property
    def relations(self) -> list[tuple[int, str, int]]:
        """Relations the caption states, as (subject index, relation, object index) into ``objects``."""
        return [] if self.relation is None else [(0, self.relation, 1)]

    @property
    def spec(self) -> PromptSpec:
        """The prompt spec as the caption reads it (object order and relation follow ``phrasing``)."""
        specs = [ObjectSpec(o.shape, o.colour, o.size if o.size_mentioned else None) for o in self.objects]
        bg = self.background
        bgs = BackgroundSpec(bg.kind, bg.colour) if bg.mentioned else None
        if self.kind in ("single", "count"):
            return PromptSpec(self.kind, (specs[0],), count=self.count if self.kind == "count" else 1, background=bgs)
        rel = self.relation
        if self.phrasing & 1:
            specs.reverse()
            rel = None if rel is None else INVERSE_RELATION[rel]
        return PromptSpec(self.kind, tuple(specs), relation=rel, background=bgs)

    @property
    def caption(self) -> str:
        from estable.training.shapes.captions import caption_for  # captions.py imports this module

        return caption_for(self)

    def combinations(self) -> set[tuple[str, str]]:
        return {(o.colour, o.shape) for o in self.objects}

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready ground truth (``from_dict`` restores it exactly, so it re-renders identically)."""
        return {
            "kind": self.kind,
            "count": self.count,
            "relation": self.relation,
            "phrasing": self.phrasing,
            "objects": [
                {
                    "shape": o.shape,
                    "colour": o.colour,
                    "size": o.size,
                    "center": list(o.center),
                    "bbox": list(o.bbox),
                    "radius": o.radius,
                    "rotation": o.rotation,
                    "size_mentioned": o.size_mentioned,
                }
                for o in self.objects
            ],
            "background": {
                "kind": self.background.kind,
                "colour": self.background.colour,
                "mentioned": self.background.mentioned,
                "angle": self.background.angle,
                "texture": self.background.texture,
                "period": self.background.period,
                "texture_seed": self.background.texture_seed,
            },
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Scene:
        objs = tuple(
            SceneObject(
                shape=o["shape"],
                colour=o["colour"],
                size=o["size"],
                center=(float(o["center"][0]), float(o["center"][1])),
                radius=float(o["radius"]),
                rotation=float(o["rotation"]),
                size_mentioned=bool(o["size_mentioned"]),
            )
            for o in d["objects"]
        )
        return cls(
            kind=d["kind"],
            objects=objs,
            background=Background(**d["background"]),
            relation=d.get("relation"),
            phrasing=int(d.get("phrasing", 0)),
        )
