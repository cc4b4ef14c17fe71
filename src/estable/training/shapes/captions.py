"""Captions: writing a scene's or a prompt spec's caption, reading a caption back into a ``PromptSpec``, two
contrast captions (the same words with a pair's two objects in the other order, and one object as a look-alike
shape), and a caption completed with the background it leaves unnamed."""

from __future__ import annotations

import re
import zlib
from dataclasses import replace

import numpy as np

from estable.training.shapes.scene import BackgroundSpec, ObjectSpec, PromptSpec, Scene
from estable.training.shapes.vocab import (
    BACKGROUND_COLOURS,
    COLOURS,
    COUNT_WORDS,
    DEFAULT_BACKGROUND,
    PLURALS,
    RELATION_PHRASES,
    SHAPES,
    SIZES,
    UNNAMED_BACKGROUND_KINDS,
)

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


def _normalised(text: str) -> str:
    """A caption as the grammar reads it: lower case, single spaces, no final full stop."""
    return " ".join(text.lower().strip().rstrip(".").split())


def parse_caption(text: str) -> PromptSpec:
    """Read a caption of this module's grammar back into a ``PromptSpec`` (``ValueError`` if it is not one)."""
    t = _normalised(text)
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


def swap_pair_roles(text: str) -> str | None:
    """The same words with a pair caption's two objects exchanged ("a red circle above a blue square on a white
    background" → "a blue square above a red circle on a white background"): a caption of the mirrored scene,
    which a bag-of-words reading cannot tell from the original. None for a caption that is not a pair of this
    grammar, or whose two objects are described alike (swapping them would change nothing)."""
    try:
        spec = parse_caption(text)
    except ValueError:
        return None
    if spec.kind != "pair" or spec.objects[0] == spec.objects[1]:
        return None
    t = _normalised(text)
    m = _BG_RE.match(t)
    body, tail = (m.group(1), t[len(m.group(1)):]) if m else (t, "")
    rel = next(_REL_RE.finditer(body))
    return f"{body[rel.end():]}{rel.group(0)}{body[:rel.start()]}{tail}"


# The shapes the built-in model confuses when unguided, as benchmarks/pair_failures.py counted them (RESULTS.md,
# "what the unguided model gets wrong on pairs": a hexagon drawn as a circle and back, a star as a hexagon, diamond
# or cross, ...): the replacements ``swap_shape`` draws from.
LOOKALIKES = {"circle": ("hexagon",), "hexagon": ("circle",), "star": ("hexagon", "diamond", "cross"),
              "cross": ("star",), "heart": ("hexagon",), "diamond": ("hexagon", "star"),
              "square": ("hexagon", "cross"), "triangle": ("diamond",)}


def swap_shape(text: str) -> str | None:
    """The caption with one of its objects drawn as a look-alike shape (``LOOKALIKES``) and every other word kept
    ("a red circle above a blue square" → "a red hexagon above a blue square"): a caption of a scene that differs
    in one outline. Which object and which look-alike follow from the text alone (its CRC-32), so a caption always
    gets the same contrast. None for a caption that is not of this grammar, or whose contrast would not be one."""
    try:
        spec = parse_caption(text)
    except ValueError:
        return None
    key = zlib.crc32(text.encode("utf-8"))
    k = key % len(spec.objects)
    shape = spec.objects[k].shape
    new = LOOKALIKES[shape][(key >> 8) % len(LOOKALIKES[shape])]
    words = _normalised(text).split()
    old_word, new_word = (PLURALS[shape], PLURALS[new]) if spec.kind == "count" else (shape, new)
    places = [i for i, w in enumerate(words) if w == old_word]
    nth = sum(o.shape == shape for o in spec.objects[:k])  # objects appear in the caption in the spec's order
    words[places[nth]] = new_word
    out = " ".join(words)
    objects = tuple(replace(o, shape=new) if i == k else o for i, o in enumerate(spec.objects))
    try:
        return out if parse_caption(out) == replace(spec, objects=objects) else None
    except ValueError:  # e.g. a colour-binding prompt whose other object already has that shape
        return None


def name_grey_background(text: str, seed: int) -> str:
    """The caption with the background it leaves unnamed named as the world draws one: grey, and plain, gradient or
    textured at the unnamed odds (2 : 1 : 1), chosen by ``seed`` ("a red circle" → "a red circle on a textured grey
    background"). For a model trained on such captions (``ShapesWorld(grey_named_p=…)``), which guidance would
    otherwise push towards the likeliest background, plain. A caption that names a background, or is not of this
    grammar, comes back as it is."""
    try:
        spec = parse_caption(text)
    except ValueError:
        return text
    if spec.background is not None:
        return text
    kind = UNNAMED_BACKGROUND_KINDS[int(np.random.default_rng([seed, 0x6E7]).integers(len(UNNAMED_BACKGROUND_KINDS)))]
    return f"{_normalised(text)} {_background_phrase(BackgroundSpec(kind, DEFAULT_BACKGROUND), 'on')}"
