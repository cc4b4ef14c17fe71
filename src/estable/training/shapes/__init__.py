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

Modules
-------
    vocab.py     the vocabulary and the numbers that shape scenes (sizes, margins, overlaps, mention rates)
    scene.py     shape geometry, the relation test, prompt specs and scenes (the ground truth)
    captions.py  the grammar: ``caption_for`` writes a caption, ``parse_caption`` reads one back
    layout.py    ``scene_from_prompt``: a layout that makes a prompt spec true (rejection sampling)
    render.py    ``render``: a scene to pixels at any resolution
    world.py     ``ShapesWorld`` (held-out splits, sampling by index) and ``write_folder``
Everything importers use is re-exported here: ``from estable.training.shapes import ShapesWorld, render, ...``.
"""

from estable.training.shapes.captions import caption_for, parse_caption
from estable.training.shapes.layout import overlap_fraction, scene_from_prompt
from estable.training.shapes.render import (
    MAX_RENDER_SIZE,
    _background_pixels,  # noqa: F401  (private; the textual-inversion trainer paints its new colour with it)
    _paint,  # noqa: F401  (likewise)
    render,
)
from estable.training.shapes.scene import (
    Background,
    BackgroundSpec,
    ObjectSpec,
    PromptSpec,
    Scene,
    SceneObject,
    polygon_area,
    relation_holds,
    unit_polygon,
)
from estable.training.shapes.vocab import (
    BACKGROUND_COLOURS,
    BACKGROUND_KINDS,
    BACKGROUND_MENTION_P,
    COLOURS,
    COUNT_SIZES,
    COUNT_WORDS,
    DEFAULT_BACKGROUND,
    EDGE_MARGIN,
    GRADIENT_SPAN,
    HELDOUT_FRACTION,
    INVERSE_RELATION,
    KIND_WEIGHTS,
    MAX_OVERLAP,
    NOISE_AMPLITUDE,
    PLURALS,
    PROMPT_KINDS,
    RELATION_MARGIN,
    RELATION_PHRASES,
    RELATIONS,
    SAME_COLOUR_GAP,
    SHAPES,
    SIZE_MENTION_P,
    SIZE_RADIUS,
    SIZES,
    SPLITS,
    STRIPE_AMPLITUDE,
    SUPERSAMPLE,
    TEXTURES,
)
from estable.training.shapes.world import MAX_FOLDER_COUNT, ShapesWorld, reserved_combinations, write_folder

__all__ = [
    "BACKGROUND_COLOURS",
    "BACKGROUND_KINDS",
    "BACKGROUND_MENTION_P",
    "COLOURS",
    "COUNT_SIZES",
    "COUNT_WORDS",
    "DEFAULT_BACKGROUND",
    "EDGE_MARGIN",
    "GRADIENT_SPAN",
    "HELDOUT_FRACTION",
    "INVERSE_RELATION",
    "KIND_WEIGHTS",
    "MAX_FOLDER_COUNT",
    "MAX_OVERLAP",
    "MAX_RENDER_SIZE",
    "NOISE_AMPLITUDE",
    "PLURALS",
    "PROMPT_KINDS",
    "RELATION_MARGIN",
    "RELATION_PHRASES",
    "RELATIONS",
    "SAME_COLOUR_GAP",
    "SHAPES",
    "SIZE_MENTION_P",
    "SIZE_RADIUS",
    "SIZES",
    "SPLITS",
    "STRIPE_AMPLITUDE",
    "SUPERSAMPLE",
    "TEXTURES",
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
    "polygon_area",
    "relation_holds",
    "render",
    "reserved_combinations",
    "scene_from_prompt",
    "unit_polygon",
    "write_folder",
]
