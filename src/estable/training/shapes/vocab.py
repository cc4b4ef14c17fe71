"""The shapes world's vocabulary and the numbers that shape its scenes (see the package docstring)."""

from __future__ import annotations

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
UNNAMED_BACKGROUND_KINDS = ("plain", "plain", "gradient", "textured")  # drawn from for a background no caption names
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
