"""The shapes world: a seeded procedural renderer of captioned scenes for training and judging Estable.

Every scene holds 1–4 flat-coloured shapes on a background; its caption describes the WHOLE scene (no object
exists that the caption does not name; only the background may go unmentioned). Scenes, captions and pixels are
pure functions of ``(seed, split, index)``, and a scene renders at any resolution (anti-aliased by 4×
supersampling each object's coverage mask and box-filtering it down).

Vocabulary
----------
colours      red, green, blue, yellow, purple, orange, white, black           (``COLOURS``: name → RGB)
background   the colours above, plus grey (the colour of every unmentioned background)
shapes       circle, square, triangle, star, hexagon, heart, diamond, cross   (plural: ``PLURALS``)
sizes        small, medium, large    (half-extent as a fraction of the image side: ``SIZE_RADIUS``)
relations    left of, right of, above, below      (phrases: "to the left of", "to the right of", "above", "below")
counts       two, three, four
backgrounds  plain, gradient, textured  (textured = low-contrast value noise or stripes)

Grammar (``caption_for`` writes it, ``parse_caption`` reads it back into a ``PromptSpec``)
-----------------------------------------------------------------------------------------
    caption  := body [" " bg]
    body     := single | count | pair | binding
    single   := ART obj                                  "a small purple star"
    count    := NUMBER [size " "] colour " " PLURAL      "three orange hearts"
    pair     := ART obj " " REL " " ART obj              "a red circle above a blue square"
    binding  := ART obj " and " ART obj                  "a red square and a blue circle"
    obj      := [size " "] colour " " shape
    bg       := ("on" | "against") " " ART " " bgdesc " background"
    bgdesc   := colour | colour " gradient" | "textured " colour
    ART      := "a" | "an" (before a vowel)
Paraphrases: a pair may be read from either end with the inverse relation ("a blue square below a red circle"),
a binding in either order, and the background with "on" or "against" (``Scene.phrasing`` picks one).

Prompt kinds (``PROMPT_KINDS``; the GenEval-style evaluator scores each separately)
------------------------------------------------------------------------------------
single          one object, optionally with a size and/or background
count           2–4 identical objects (same colour, shape and size class)
pair            two objects that differ in colour or shape, with one relation
colour_binding  two objects of different colours AND different shapes, no relation

Ground truth and its guarantees
-------------------------------
* Coordinates are fractions of the image side, x to the right and y DOWN; an object's ``center`` is the area
  centroid of its polygon, so it is what a pixel centroid measures.
* "A above B" holds when B's centre is at least ``RELATION_MARGIN`` lower than A's AND the vertical offset is
  the larger one (likewise for left/right), so exactly one relation describes a pair.
* Objects of different colours may overlap by at most ``MAX_OVERLAP`` of the smaller one's area; objects of the
  same colour never touch (so each stays one countable blob). Every object lies wholly inside the image.
* Held-out split: a seeded hash of each colour×shape pair picks ``HELDOUT_FRACTION`` of the combinations
  (independent of the sampling seed); "train" never draws them, and every "heldout" prompt contains one.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

# ---------------------------------------------------------------------------------------------------------
# Vocabulary
# ---------------------------------------------------------------------------------------------------------

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 220),
    "yellow": (245, 215, 30),
    "purple": (130, 50, 180),
    "orange": (245, 130, 20),
    "white": (250, 250, 250),
    "black": (15, 15, 15),
}
DEFAULT_BACKGROUND = "grey"  # every background the caption does not mention is this colour
BACKGROUND_COLOURS: dict[str, tuple[int, int, int]] = {**COLOURS, DEFAULT_BACKGROUND: (140, 140, 140)}
SHAPES = ("circle", "square", "triangle", "star", "hexagon", "heart", "diamond", "cross")
PLURALS = {s: ("crosses" if s == "cross" else s + "s") for s in SHAPES}
SIZES = ("small", "medium", "large")
SIZE_RADIUS: dict[str, tuple[float, float]] = {"small": (0.07, 0.09), "medium": (0.115, 0.135), "large": (0.17, 0.2)}
# Sizes a count scene may use: four (or three) large objects that must not touch do not fit reliably.
COUNT_SIZES: dict[int, tuple[str, ...]] = {2: SIZES, 3: ("small", "medium"), 4: ("small", "medium")}
RELATIONS = ("left of", "right of", "above", "below")
RELATION_PHRASES = {"left of": "to the left of", "right of": "to the right of", "above": "above", "below": "below"}
INVERSE_RELATION = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
COUNT_WORDS = {2: "two", 3: "three", 4: "four"}
BACKGROUND_KINDS = ("plain", "gradient", "textured")
TEXTURES = ("noise", "stripes")
PROMPT_KINDS = ("single", "count", "pair", "colour_binding")
SPLITS = ("train", "heldout")

RELATION_MARGIN = 0.1  # minimal centre offset (fraction of the side) along the relation's axis
MAX_OVERLAP = 0.2  # largest overlap of two differently coloured objects, as a fraction of the smaller area
SAME_COLOUR_GAP = 0.02  # bounding boxes of same-coloured objects stay this far apart
EDGE_MARGIN = 0.02  # objects keep this distance from the image border
HELDOUT_FRACTION = 0.15
SUPERSAMPLE = 4
GRADIENT_SPAN = 60.0  # grey levels from one end of a gradient to the other
NOISE_AMPLITUDE = 10.0  # standard deviation (grey levels) of the value-noise texture
STRIPE_AMPLITUDE = 10.0  # half the peak-to-peak of the stripe texture

# Default mix of prompt kinds and mention probabilities for sampled scenes.
KIND_WEIGHTS = {"single": 0.3, "count": 0.2, "pair": 0.3, "colour_binding": 0.2}
BACKGROUND_MENTION_P = 0.4
SIZE_MENTION_P = {"single": 0.5, "count": 0.3, "pair": 0.25, "colour_binding": 0.25}


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
    a: tuple[float, float], b: tuple[float, float], relation: str, margin: float = RELATION_MARGIN
) -> bool:
    """Whether "A <relation> B" is true of centres a and b (x right, y down).

    The offset along the relation's axis must be at least ``margin`` and must dominate the other axis, so a
    pair satisfies at most one relation.
    """
    dx, dy = b[0] - a[0], b[1] - a[1]  # B relative to A
    if relation == "left of":
        return dx >= margin and abs(dx) >= abs(dy)
    if relation == "right of":
        return -dx >= margin and abs(dx) >= abs(dy)
    if relation == "above":
        return dy >= margin and abs(dy) >= abs(dx)
    if relation == "below":
        return -dy >= margin and abs(dy) >= abs(dx)
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


# ---------------------------------------------------------------------------------------------------------
# Captions: writing and parsing
# ---------------------------------------------------------------------------------------------------------

_BG_PREPOSITIONS = ("on", "against")


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _noun_phrase(o: ObjectSpec) -> str:
    words = ([o.size] if o.size else []) + [o.colour, o.shape]
    return f"{_article(words[0])} {' '.join(words)}"


def _background_phrase(bg: BackgroundSpec, preposition: str) -> str:
    desc = {"plain": bg.colour, "gradient": f"{bg.colour} gradient", "textured": f"textured {bg.colour}"}[bg.kind]
    return f"{preposition} {_article(desc)} {desc} background"


def caption_for(scene_or_spec: Scene | PromptSpec) -> str:
    """The caption of a scene (with its paraphrase) or the canonical caption of a prompt spec."""
    if isinstance(scene_or_spec, Scene):
        spec, preposition = scene_or_spec.spec, _BG_PREPOSITIONS[(scene_or_spec.phrasing >> 1) & 1]
    else:
        spec, preposition = scene_or_spec, _BG_PREPOSITIONS[0]
    objs = spec.objects
    if spec.kind == "single":
        text = _noun_phrase(objs[0])
    elif spec.kind == "count":
        o = objs[0]
        words = [COUNT_WORDS[spec.count]] + ([o.size] if o.size else []) + [o.colour, PLURALS[o.shape]]
        text = " ".join(words)
    elif spec.kind == "pair":
        assert spec.relation is not None  # PromptSpec validates this
        text = f"{_noun_phrase(objs[0])} {RELATION_PHRASES[spec.relation]} {_noun_phrase(objs[1])}"
    else:
        text = f"{_noun_phrase(objs[0])} and {_noun_phrase(objs[1])}"
    if spec.background is not None:
        text += " " + _background_phrase(spec.background, preposition)
    return text


_SIZE_RE = "|".join(SIZES)
_COLOUR_RE = "|".join(COLOURS)
_BG_COLOUR_RE = "|".join(BACKGROUND_COLOURS)
_OBJ_RE = re.compile(rf"an? (?:({_SIZE_RE}) )?({_COLOUR_RE}) ({'|'.join(SHAPES)})")
_COUNT_RE = re.compile(
    rf"({'|'.join(COUNT_WORDS.values())}) (?:({_SIZE_RE}) )?({_COLOUR_RE}) ({'|'.join(PLURALS.values())})"
)
_BG_RE = re.compile(rf"^(.*) (?:on|against) an? (textured )?({_BG_COLOUR_RE})( gradient)? background$")
_REL_RE = re.compile("|".join(re.escape(f" {p} ") for p in RELATION_PHRASES.values()))


def parse_caption(text: str) -> PromptSpec:
    """Read a caption of this module's grammar back into a ``PromptSpec`` (``ValueError`` if it is not one)."""
    t = " ".join(text.lower().strip().rstrip(".").split())
    background = None
    m = _BG_RE.match(t)
    if m:
        t, textured, colour, gradient = m.group(1), m.group(2), m.group(3), m.group(4)
        if textured and gradient:
            raise ValueError(f"not a shapes-world caption (textured gradient): {text!r}")
        kind = "textured" if textured else "gradient" if gradient else "plain"
        background = BackgroundSpec(kind, colour)

    def obj(s: str) -> ObjectSpec:
        mo = _OBJ_RE.fullmatch(s)
        if not mo or _article(s.split()[1]) != s.split()[0]:
            raise ValueError(f"not a shapes-world caption (cannot read object {s!r}): {text!r}")
        return ObjectSpec(mo.group(3), mo.group(2), mo.group(1))

    mc = _COUNT_RE.fullmatch(t)
    if mc:
        n = {w: k for k, w in COUNT_WORDS.items()}[mc.group(1)]
        shape = {p: s for s, p in PLURALS.items()}[mc.group(4)]
        return PromptSpec("count", (ObjectSpec(shape, mc.group(3), mc.group(2)),), count=n, background=background)
    rels = list(_REL_RE.finditer(t))
    if len(rels) == 1:
        phrase = rels[0].group(0).strip()
        relation = {p: r for r, p in RELATION_PHRASES.items()}[phrase]
        a, b = t[: rels[0].start()], t[rels[0].end() :]
        return PromptSpec("pair", (obj(a), obj(b)), relation=relation, background=background)
    if " and " in t:
        a, b = t.split(" and ", 1)
        return PromptSpec("colour_binding", (obj(a), obj(b)), background=background)
    return PromptSpec("single", (obj(t),), background=background)


# ---------------------------------------------------------------------------------------------------------
# Layout: sampling a scene for a prompt spec
# ---------------------------------------------------------------------------------------------------------

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
        kind, colour = _pick(rng, ("plain", "plain", "gradient", "textured")), DEFAULT_BACKGROUND
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
) -> Scene:
    """Sample a layout that makes ``spec`` true: sizes, positions, rotations, background (``phrasing`` 0).

    Rejection sampling: objects are placed one by one at uniform positions that keep them inside the image,
    keep same-coloured objects apart, bound the overlap of the others and satisfy the relation.
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
            for _try in range(30):
                center = (
                    float(rng.uniform(ex + EDGE_MARGIN, 1 - ex - EDGE_MARGIN)),
                    float(rng.uniform(ey + EDGE_MARGIN, 1 - ey - EDGE_MARGIN)),
                )
                cand = SceneObject(o.shape, o.colour, size, center, radius, rotation, o.size is not None)
                if spec.relation is not None and placed and not relation_holds(placed[0].center, center, spec.relation):
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


# ---------------------------------------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------------------------
# The world: splits, deterministic sampling, folders
# ---------------------------------------------------------------------------------------------------------


def _hash_int(*parts: object) -> int:
    digest = hashlib.blake2b("|".join(str(p) for p in parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def reserved_combinations(heldout_seed: int = 0, fraction: float = HELDOUT_FRACTION) -> frozenset[tuple[str, str]]:
    """The colour×shape combinations kept out of "train": the lowest seeded hashes, at most 2 per colour/shape.

    The cap keeps every colour and every shape common in training, only some pairings are unseen.
    """
    if not 0.0 <= fraction <= 0.5:
        raise ValueError(f"heldout fraction must be in [0, 0.5], got {fraction}")
    combos = sorted(((c, s) for c in COLOURS for s in SHAPES), key=lambda cs: _hash_int("heldout", heldout_seed, *cs))
    want = round(fraction * len(combos))
    chosen: list[tuple[str, str]] = []
    for c, s in combos:
        if len(chosen) == want:
            break
        if sum(c == x for x, _ in chosen) < 2 and sum(s == y for _, y in chosen) < 2:
            chosen.append((c, s))
    return frozenset(chosen)


class ShapesWorld:
    """Deterministic captioned scenes: ``sample(index)`` is a pure function of (seed, split, index).

    ``split="train"`` never draws a reserved colour×shape combination; ``split="heldout"`` puts one in every
    prompt. The reserved set depends on ``heldout_seed`` only, so worlds with different seeds agree on it.
    """

    def __init__(
        self,
        split: str = "train",
        seed: int = 0,
        *,
        size: int = 256,
        heldout_seed: int = 0,
        heldout_fraction: float = HELDOUT_FRACTION,
        kind_weights: dict[str, float] | None = None,
        background_mention_p: float = BACKGROUND_MENTION_P,
    ) -> None:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {', '.join(SPLITS)}, not {split!r}")
        weights = dict(KIND_WEIGHTS if kind_weights is None else kind_weights)
        unknown = set(weights) - set(PROMPT_KINDS)
        if unknown or not weights or min(weights.values()) < 0 or sum(weights.values()) <= 0:
            raise ValueError(f"kind_weights must map some of {', '.join(PROMPT_KINDS)} to non-negative weights")
        self.split, self.seed, self.size = split, int(seed), int(size)
        self.reserved = reserved_combinations(heldout_seed, heldout_fraction)
        if split == "heldout" and not self.reserved:
            raise ValueError("the heldout split needs heldout_fraction > 0")
        all_combos = [(c, s) for c in COLOURS for s in SHAPES]
        self._allowed = [cs for cs in all_combos if cs not in self.reserved]
        self._all = all_combos
        self._reserved = sorted(self.reserved)
        self._kinds = [k for k in PROMPT_KINDS if weights.get(k, 0) > 0]
        w = np.array([weights[k] for k in self._kinds], dtype=np.float64)
        self._kind_p = w / w.sum()
        self.background_mention_p = float(background_mention_p)

    def rng(self, index: int) -> np.random.Generator:
        return np.random.default_rng(_hash_int("estable-shapes", self.seed, self.split, int(index)))

    def _sample_spec(self, rng: np.random.Generator) -> PromptSpec:
        kind = self._kinds[int(rng.choice(len(self._kinds), p=self._kind_p))]
        n_named = 1 if kind in ("single", "count") else 2
        forced = int(rng.integers(n_named)) if self.split == "heldout" else -1
        combos: list[tuple[str, str]] = []
        for i in range(n_named):
            pool = self._reserved if i == forced else (self._all if self.split == "heldout" else self._allowed)
            if i == 1 and kind == "pair":
                pool = [cs for cs in pool if cs != combos[0]]
            elif i == 1 and kind == "colour_binding":
                pool = [cs for cs in pool if cs[0] != combos[0][0] and cs[1] != combos[0][1]]
            combos.append(_pick(rng, pool))
        count = int(rng.integers(2, 5)) if kind == "count" else 1
        sizes = COUNT_SIZES[count] if kind == "count" else SIZES
        objects = tuple(
            ObjectSpec(s, c, _pick(rng, sizes) if rng.random() < SIZE_MENTION_P[kind] else None) for c, s in combos
        )
        if kind == "count":
            objects = objects[:1]
        relation = _pick(rng, RELATIONS) if kind == "pair" else None
        background = None
        if rng.random() < self.background_mention_p:
            free = [c for c in COLOURS if c not in {cs[0] for cs in combos}]
            background = BackgroundSpec(_pick(rng, BACKGROUND_KINDS), _pick(rng, free))
        return PromptSpec(kind, objects, count=count, relation=relation, background=background)

    def scene(self, index: int) -> Scene:
        """The scene at ``index`` (no rendering)."""
        rng = self.rng(index)
        spec = self._sample_spec(rng)
        scene = scene_from_prompt(spec, rng)
        phrasing = int(rng.integers(4))
        return Scene(scene.kind, scene.objects, scene.background, scene.relation, phrasing)

    def sample(self, index: int, size: int | None = None) -> tuple[Image.Image, str, Scene]:
        """(image, caption, scene) at ``index``; ``size`` defaults to the world's."""
        scene = self.scene(index)
        return render(scene, self.size if size is None else size), caption_for(scene), scene

    def iterate(self, start: int = 0, size: int | None = None) -> Iterator[tuple[Image.Image, str, Scene]]:
        """Endless stream of samples from ``start`` on."""
        index = start
        while True:
            yield self.sample(index, size)
            index += 1

    def __iter__(self) -> Iterator[tuple[Image.Image, str, Scene]]:
        return self.iterate()

    def vocabulary(self) -> dict[str, Any]:
        """What the grammar can say (documentation for users and the evaluator)."""
        return {
            "colours": list(COLOURS),
            "background_colours": list(BACKGROUND_COLOURS),
            "shapes": list(SHAPES),
            "sizes": list(SIZES),
            "relations": list(RELATIONS),
            "counts": list(COUNT_WORDS),
            "background_kinds": list(BACKGROUND_KINDS),
            "prompt_kinds": list(PROMPT_KINDS),
            "reserved_combinations": [list(cs) for cs in self._reserved],
        }


MAX_RENDER_SIZE = 2048  # pixels per side: the generation limit (estable.params.MAX_SIDE); beyond, memory runs out
MAX_FOLDER_COUNT = 100_000_000  # file names have 8 digits


def write_folder(
    out_dir: str | Path,
    count: int,
    size: int = 256,
    split: str = "train",
    seed: int = 0,
    progress: bool = True,
    *,
    start: int | None = None,
    compress_level: int = 1,
    existing: str = "refuse",
) -> Path:
    """Write ``count`` samples as ``00000000.png``… plus ``metadata.jsonl`` (image-folder layout).

    Each metadata line is ``{"file_name", "text", "attributes"}`` where attributes is ``Scene.to_dict()`` plus
    the split, seed and index. A ``shapes_world.json`` records the vocabulary and reserved combinations.
    Returns the path of ``metadata.jsonl``.

    A folder that already holds images or a metadata.jsonl is refused (``existing="refuse"``), emptied of them
    (``"overwrite"``), or extended (``"append"``: the next scene indices of the same world, new file names,
    new metadata lines after the old). Every PNG is written under a temporary name and renamed into place, and
    its metadata line is written (and flushed) only after that, so an interrupted run leaves complete images
    that all have their line. The disk's free space is checked first against the first image's size.
    """
    import shutil

    if not isinstance(count, int) or isinstance(count, bool) or not 0 <= count <= MAX_FOLDER_COUNT:
        raise ValueError(f"count must be a whole number from 0 to {MAX_FOLDER_COUNT:,}, got {count!r}")
    if not isinstance(size, int) or not 8 <= size <= MAX_RENDER_SIZE:
        raise ValueError(f"size must be a whole number of pixels from 8 to {MAX_RENDER_SIZE}, got {size!r}")
    if existing not in ("refuse", "overwrite", "append"):
        raise ValueError(f"existing must be refuse, overwrite or append, not {existing!r}")
    world = ShapesWorld(split, seed, size=size)
    out = Path(out_dir)
    meta = out / "metadata.jsonl"
    info_file = out / "shapes_world.json"
    old_images = sorted(out.glob("*.png")) if out.is_dir() else []
    old_lines: list[str] = []
    old: dict[str, Any] = {}
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out} is a file, not a folder")
    first = 0 if start is None else start
    if old_images or meta.exists():
        if existing == "refuse":
            raise ValueError(f"{out} already holds {len(old_images)} image(s) and "
                             f"{'a' if meta.exists() else 'no'} metadata.jsonl; pass --overwrite to replace them "
                             "or --append to add new ones after them")
        if existing == "append":
            old = json.loads(info_file.read_text()) if info_file.is_file() else {}
            mismatch = [k for k, v in (("split", split), ("seed", seed), ("size", size)) if old.get(k) != v]
            if mismatch:
                raise ValueError(f"cannot append to {out}: its shapes_world.json has another "
                                 f"{', '.join(mismatch)} (or none); use the same settings or another folder")
            old_lines = meta.read_text(encoding="utf-8").splitlines(keepends=True) if meta.exists() else []
            taken = [int(f.stem) for f in old_images if f.stem.isdigit()]
            first = max(taken, default=int(old.get("start", 0)) - 1) + 1
            if start is not None and start < first:
                raise ValueError(f"cannot append at index {start}: {out} already uses indices up to {first - 1}")
            first = first if start is None else start
    if first + count > MAX_FOLDER_COUNT:
        raise ValueError(f"indices would pass {MAX_FOLDER_COUNT:,} (8-digit file names)")
    out.mkdir(parents=True, exist_ok=True)
    if count:
        probe_image = world.sample(first)[0]
        buf = io.BytesIO()
        probe_image.save(buf, format="PNG", compress_level=compress_level)
        need = int(len(buf.getvalue()) * 1.5 * count) + 2**20
        free = shutil.disk_usage(out).free
        if need > free:
            raise ValueError(f"{count:,} images of {size}x{size} need about {need / 2**30:.1f} GiB (from the first "
                             f"image's size), but {out} has {free / 2**30:.1f} GiB free")
    if existing == "overwrite":  # only now that every check has passed
        for f in old_images:
            f.unlink()
    base = int(old.get("start", first)) if old_lines else first  # the first index of the whole folder
    info = {"split": split, "seed": seed, "size": size, "start": base, "count": len(old_lines) + count,
            **world.vocabulary()}
    _atomic_text(info_file, json.dumps(info, indent=2) + "\n")
    with open(meta, "w", encoding="utf-8") as f:
        f.writelines(old_lines)
        f.flush()
        for index in tqdm(range(first, first + count), disable=not progress, desc=f"shapes {split}", unit="img"):
            image, caption, scene = world.sample(index)
            name = f"{index:08d}.png"
            tmp = out / f".{name}.tmp"
            try:
                image.save(tmp, format="PNG", compress_level=compress_level)
                os.replace(tmp, out / name)
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise
            attributes = {**scene.to_dict(), "split": split, "seed": seed, "index": index}
            f.write(json.dumps({"file_name": name, "text": caption, "attributes": attributes}) + "\n")
            f.flush()
    return meta


def _atomic_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


__all__ = [
    "BACKGROUND_COLOURS",
    "BACKGROUND_KINDS",
    "COLOURS",
    "PROMPT_KINDS",
    "RELATIONS",
    "SHAPES",
    "SIZES",
    "Background",
    "BackgroundSpec",
    "ObjectSpec",
    "PromptSpec",
    "Scene",
    "SceneObject",
    "ShapesWorld",
    "caption_for",
    "overlap_fraction",
    "parse_caption",
    "reserved_combinations",
    "relation_holds",
    "render",
    "scene_from_prompt",
    "unit_polygon",
    "write_folder",
    "MAX_FOLDER_COUNT",
    "MAX_RENDER_SIZE",
]
