"""Compositional accuracy, GenEval-style (Ghosh et al. 2023, "GenEval: An Object-Focused Framework for
Evaluating Text-to-Image Alignment"), on the shapes world.

Prompts come from the shapes world's HELD-OUT split: every prompt names at least one colour×shape combination
that the training split never shows (``reserved_combinations``), so the score measures composition, not recall.
The generator makes ``images_per_prompt`` images per prompt; the judge reads each image; each image is scored on
the categories its prompt has:

    object_present   every named object's shape is detected (pairs: two distinct detections; count prompts:
                     at least the named number of that shape)
    colour_binding   every named object is detected with its shape AND colour (distinct detections)
    count            count prompts: exactly N detections of the named shape (GenEval counts the class)
    position         pair prompts: some assignment of the two objects to detections with the right shapes and
                     colours satisfies the relation (``relation_holds`` on detected centres, the world's margin)
    size             prompts that state a size: the matched detection has it
    background       prompts that state a background, when the judge reads backgrounds: kind and colour right
    whole_prompt     ONE assignment satisfies shape, colour, stated size and relation together, plus the exact
                     count and the background — everything the prompt says

Scores are fractions of images, reported overall and per prompt kind. The targets of the project are read off
``by_kind``: ``single`` (one-object prompts) and ``pair`` (two objects with a relation).

Prompt mix (``DEFAULT_MIX``): 30 % single, 20 % count, 30 % pair, 20 % colour_binding — the shapes world's own
kind weights, realised exactly (largest-remainder rounding), then shuffled deterministically.

Paraphrases (``make_prompts(..., paraphrase=True)``): the relation phrases are replaced by synonyms the caption
grammar never uses ("on top of", "beneath", "on the left of", "on the right of"), so the score shows whether a
model generalises beyond the phrasing it was trained on; the scoring is unchanged.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from PIL import Image
from tqdm import tqdm

from ..training.shapes import (
    COUNT_WORDS,
    KIND_WEIGHTS,
    PROMPT_KINDS,
    RELATION_MARGIN,
    PromptSpec,
    ShapesWorld,
    caption_for,
    relation_holds,
    render,
    reserved_combinations,
    scene_from_prompt,
)
from .judge import Detection

DEFAULT_MIX: dict[str, float] = dict(KIND_WEIGHTS)
PROMPT_SEED = 2024  # the held-out world seed prompts are drawn from (fixed: every model sees the same prompts)
CATEGORIES = ("object_present", "colour_binding", "count", "position", "size", "background", "whole_prompt")

Generator = Callable[[list[str], list[int]], list[Image.Image]]


class Detector(Protocol):
    def detect(self, images: Sequence[Image.Image]) -> list[list[Detection]]: ...


@dataclass(frozen=True)
class EvalPrompt:
    """A prompt of the benchmark: its structure and its caption (the text the generator gets)."""

    spec: PromptSpec
    caption: str
    index: int  # position in the benchmark (seeds derive from it)

    @property
    def kind(self) -> str:
        return self.spec.kind


def _quotas(n: int, mix: dict[str, float]) -> dict[str, int]:
    total = sum(mix.values())
    raw = {k: n * w / total for k, w in mix.items()}
    q = {k: int(v) for k, v in raw.items()}
    for k in sorted(raw, key=lambda k: -(raw[k] - q[k]))[: n - sum(q.values())]:
        q[k] += 1
    return q


# Relation phrases of the caption grammar → synonyms no training caption contains (the paraphrase test). A model can
# be taught these as synonyms (``estable train synonyms``); the "unseen" set is never taught by any Estable recipe,
# and says what a word outside everything the model read does.
PARAPHRASES = {" above ": " on top of ", " below ": " beneath ", " to the left of ": " on the left of ",
               " to the right of ": " on the right of "}
UNSEEN_PARAPHRASES = {" above ": " over ", " below ": " under ", " to the left of ": " left of ",
                      " to the right of ": " right of "}
PARAPHRASE_SETS = {"synonyms": PARAPHRASES, "unseen": UNSEEN_PARAPHRASES}


def relation_phrase(caption: str) -> str | None:
    """The relation phrase a pair prompt says it with (the grammar's or a paraphrase's), e.g. "beneath"."""
    for phrase in (*PARAPHRASES, *PARAPHRASES.values(), *UNSEEN_PARAPHRASES.values()):
        if phrase in caption:
            return phrase.strip()
    return None


def count_word(caption: str) -> str | None:
    """The number a count prompt asks for, as its caption says it ("three"), or None."""
    first = caption.split(" ", 1)[0]
    return first if first in COUNT_WORDS.values() else None


def paraphrase(caption: str, which: str = "synonyms") -> str:
    """``caption`` with its relation phrase replaced by a held-out synonym of the set ``which`` (PARAPHRASE_SETS;
    unchanged when it has none)."""
    if which not in PARAPHRASE_SETS:
        raise ValueError(f"the paraphrase set must be one of {', '.join(PARAPHRASE_SETS)}, not {which!r}")
    for phrase, synonym in PARAPHRASE_SETS[which].items():
        if phrase in caption:
            return caption.replace(phrase, synonym, 1)
    return caption


def make_prompts(n: int = 500, seed: int = PROMPT_SEED, mix: dict[str, float] | None = None, *,
                 paraphrased: bool | str = False) -> list[EvalPrompt]:
    """``n`` distinct held-out prompts with the given kind mix (deterministic in ``seed``).

    Specs are those of ``ShapesWorld("heldout", seed)`` scenes — each names a reserved colour×shape combination —
    one kind at a time until every kind's quota is filled; duplicates are skipped. The canonical caption
    (``caption_for(spec)``) is the prompt text, or its :func:`paraphrase` with ``paraphrased`` (True: the
    "synonyms" set; or a set's name).
    """
    mix = dict(DEFAULT_MIX if mix is None else mix)
    if n < 1:
        raise ValueError(f"the number of prompts must be positive, got {n}")
    if not mix or set(mix) - set(PROMPT_KINDS) or min(mix.values()) < 0 or sum(mix.values()) <= 0:
        raise ValueError(f"mix must map some of {', '.join(PROMPT_KINDS)} to non-negative weights")
    quotas = _quotas(n, mix)
    by_kind: dict[str, list[PromptSpec]] = {}
    seen: set[str] = set()
    for kind, want in quotas.items():
        world = ShapesWorld("heldout", seed, kind_weights={kind: 1.0})
        specs: list[PromptSpec] = []
        index = 0
        while len(specs) < want:
            if index > 200 * want + 1000:
                raise ValueError(f"cannot find {want} distinct held-out {kind!r} prompts; ask for fewer")
            spec = world.scene(index).spec  # the world's own prompt sampler, read back from its scene
            index += 1
            caption = caption_for(spec)
            if caption not in seen:
                seen.add(caption)
                specs.append(spec)
        by_kind[kind] = specs
    # Interleave kinds deterministically: kind order by round-robin over each kind's list.
    ordered: list[PromptSpec] = []
    iters = {k: iter(v) for k, v in by_kind.items()}
    while iters:
        for k in list(iters):
            spec = next(iters[k], None)
            if spec is None:
                del iters[k]
            else:
                ordered.append(spec)
    which = "synonyms" if paraphrased is True else paraphrased
    say = (lambda c: paraphrase(c, which)) if which else (lambda c: c)  # paraphrase() refuses an unknown set
    return [EvalPrompt(spec, say(caption_for(spec)), i) for i, spec in enumerate(ordered)]


# ---------------------------------------------------------------------------------------------------------
# Scoring one image
# ---------------------------------------------------------------------------------------------------------


def _assignments(n_wanted: int, n_found: int) -> Iterator[tuple[int, ...]]:
    return itertools.permutations(range(n_found), n_wanted)


def score_image(
    prompt: PromptSpec,
    detections: Sequence[Detection],
    background: tuple[str, str] | None = None,
    *,
    relation_margin: float = RELATION_MARGIN,
    max_detections: int = 8,
) -> dict[str, bool]:
    """Per-category verdicts for one image (categories that do not apply to the prompt are absent).

    Prompt objects are matched to detections by exhaustive search over one-to-one assignments (at most
    ``max_detections`` highest-scoring detections are considered, so the search stays small).
    """
    dets = sorted(detections, key=lambda d: -d.score)[:max_detections]
    wanted = list(prompt.objects) * (prompt.count if prompt.kind == "count" else 1)
    n = len(wanted)

    def exists(ok: Callable[[tuple[int, ...]], bool]) -> bool:
        return any(ok(a) for a in _assignments(n, len(dets)))

    def shapes_ok(a: tuple[int, ...]) -> bool:
        return all(dets[j].shape == o.shape for o, j in zip(wanted, a))

    def colours_ok(a: tuple[int, ...]) -> bool:
        return shapes_ok(a) and all(dets[j].colour == o.colour for o, j in zip(wanted, a))

    def sizes_ok(a: tuple[int, ...]) -> bool:
        return colours_ok(a) and all(o.size is None or dets[j].size == o.size for o, j in zip(wanted, a))

    def relation_ok(a: tuple[int, ...]) -> bool:
        assert prompt.relation is not None
        return relation_holds(dets[a[0]].center, dets[a[1]].center, prompt.relation, relation_margin)

    out: dict[str, bool] = {
        "object_present": exists(shapes_ok),
        "colour_binding": exists(colours_ok),
    }
    whole_extra = True
    if prompt.kind == "count":
        out["count"] = sum(d.shape == prompt.objects[0].shape for d in dets) == prompt.count
        whole_extra = out["count"]
    if prompt.kind == "pair":
        out["position"] = exists(lambda a: colours_ok(a) and relation_ok(a))
    if any(o.size is not None for o in prompt.objects):
        out["size"] = exists(sizes_ok)
    if prompt.background is not None and background is not None:
        out["background"] = background == (prompt.background.kind, prompt.background.colour)
        whole_extra = whole_extra and out["background"]
    if prompt.kind == "pair":
        whole = exists(lambda a: sizes_ok(a) and relation_ok(a))
    else:
        whole = exists(sizes_ok)
    out["whole_prompt"] = whole and whole_extra
    return out


# ---------------------------------------------------------------------------------------------------------
# The benchmark
# ---------------------------------------------------------------------------------------------------------


def image_seed(prompt_index: int, k: int, seed: int, images_per_prompt: int) -> int:
    """Seed of image ``k`` of prompt ``prompt_index``: consecutive per prompt, so a pipeline can batch them."""
    return seed + prompt_index * images_per_prompt + k


def evaluate(
    generate: Generator,
    judge: Detector,
    prompts: Sequence[EvalPrompt] | None = None,
    images_per_prompt: int = 4,
    seed: int = 0,
    *,
    prompts_per_call: int = 8,
    relation_margin: float = RELATION_MARGIN,
    progress: bool = False,
) -> dict[str, Any]:
    """Generate ``images_per_prompt`` images per prompt, judge them, and return the report.

    ``generate(prompts, seeds) -> images`` gets a flat list (each prompt repeated ``images_per_prompt`` times,
    consecutive seeds) for ``prompts_per_call`` prompts at a time. The judge needs ``detect(images)``; if it
    also has ``classify_background(images)``, stated backgrounds are scored too.
    """
    if images_per_prompt < 1:
        raise ValueError(f"images_per_prompt must be positive, got {images_per_prompt}")
    prompts = list(make_prompts() if prompts is None else prompts)
    if not prompts:
        raise ValueError("no prompts to evaluate")
    read_bg = getattr(judge, "classify_background", None)
    per_prompt: list[dict[str, Any]] = []
    chunks = range(0, len(prompts), prompts_per_call)
    for start in tqdm(chunks, disable=not progress, desc="compositional", unit="chunk"):
        chunk = prompts[start : start + prompts_per_call]
        texts = [p.caption for p in chunk for _ in range(images_per_prompt)]
        seeds = [image_seed(p.index, k, seed, images_per_prompt) for p in chunk for k in range(images_per_prompt)]
        images = generate(texts, seeds)
        if len(images) != len(texts):
            raise ValueError(f"the generator returned {len(images)} images for {len(texts)} prompts")
        dets = judge.detect(images)
        bgs = read_bg(images) if read_bg is not None else [None] * len(images)
        for i, p in enumerate(chunk):
            sl = slice(i * images_per_prompt, (i + 1) * images_per_prompt)
            verdicts = [
                score_image(p.spec, d, b, relation_margin=relation_margin) for d, b in zip(dets[sl], bgs[sl])
            ]
            per_prompt.append({"index": p.index, "kind": p.kind, "prompt": p.caption, "images": verdicts})
    return summarise(per_prompt, images_per_prompt=images_per_prompt, seed=seed, relation_margin=relation_margin)


def summarise(per_prompt: list[dict[str, Any]], **info: Any) -> dict[str, Any]:
    """Aggregate per-image verdicts into per-category accuracies, overall and per prompt kind."""

    def acc(rows: list[dict[str, bool]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for cat in CATEGORIES:
            vals = [r[cat] for r in rows if cat in r]
            out[cat] = sum(vals) / len(vals) if vals else None
        out["images"] = len(rows)
        return out

    all_rows = [v for p in per_prompt for v in p["images"]]
    by_kind = {
        k: acc([v for p in per_prompt if p["kind"] == k for v in p["images"]])
        for k in PROMPT_KINDS
        if any(p["kind"] == k for p in per_prompt)
    }

    def grouped(kind: str, word: Callable[[str], str | None]) -> dict[str, list[dict[str, bool]]]:
        """The images of one kind of prompt, by what ``word`` reads off each caption."""
        groups: dict[str, list[dict[str, bool]]] = {}
        for p in per_prompt:
            key = word(p["prompt"]) if p["kind"] == kind else None
            if key is not None:
                groups.setdefault(key, []).extend(p["images"])
        return groups

    # Pair prompts by the phrase they say the relation with (a paraphrase can fail for one phrase only), and count
    # prompts by the number they ask for (the misses are seldom spread evenly over two, three and four).
    phrases = grouped("pair", relation_phrase)
    numbers = grouped("count", count_word)
    return {
        "prompts": len(per_prompt),
        "overall": acc(all_rows),
        "by_kind": by_kind,
        "by_relation": {phrase: acc(rows) for phrase, rows in sorted(phrases.items())},
        "by_count": {word: acc(numbers[word]) for word in COUNT_WORDS.values() if word in numbers},
        "per_prompt": per_prompt,
        **info,
    }


def format_report(report: dict[str, Any]) -> str:
    """The report as a text table: categories down, overall and prompt kinds across."""
    cols = ["overall", *report["by_kind"]]
    table = {"overall": report["overall"], **report["by_kind"]}
    width = 15
    lines = [
        f"compositional accuracy: {report['prompts']} held-out prompts, "
        f"{report['overall']['images']} images",
        f"{'category':<16}" + "".join(f"{c:>{width}}" for c in cols),
    ]
    for cat in CATEGORIES:
        cells = []
        for c in cols:
            v = table[c].get(cat)
            cells.append(f"{'-':>{width}}" if v is None else f"{100 * v:>{width - 2}.1f} %")
        lines.append(f"{cat:<16}" + "".join(cells))
    lines.append(f"{'images':<16}" + "".join(f"{table[c]['images']:>{width}}" for c in cols))
    for key, cat, label in (("by_relation", "position", "pair position by relation"),
                            ("by_count", "count", "count by number asked")):
        groups = {name: r for name, r in (report.get(key) or {}).items() if r[cat] is not None}
        if groups:
            lines.append(f"{label}: " + ", ".join(
                f"{name} {100 * r[cat]:.1f} % ({r['images']})" for name, r in groups.items()))
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------
# Reference generators (real renders): the ceiling a perfect model reaches under this judge
# ---------------------------------------------------------------------------------------------------------


def render_generator(size: int = 256) -> Generator:
    """A "perfect generator": a fresh real render of a layout that satisfies each prompt (seeded).

    Each image carries its ground truth in ``image.info["scene"]`` (for oracle judges in tests).
    """
    from ..training.shapes import parse_caption

    def generate(prompts: list[str], seeds: list[int]) -> list[Image.Image]:
        images = []
        for p, s in zip(prompts, seeds):
            scene = scene_from_prompt(parse_caption(p), s)
            image = render(scene, size)
            image.info["scene"] = scene
            images.append(image)
        return images

    return generate


def held_out_combinations() -> frozenset[tuple[str, str]]:
    """The colour×shape combinations the training split never shows (every benchmark prompt names one)."""
    return reserved_combinations()


__all__ = [
    "CATEGORIES",
    "DEFAULT_MIX",
    "Detector",
    "EvalPrompt",
    "Generator",
    "evaluate",
    "format_report",
    "held_out_combinations",
    "image_seed",
    "make_prompts",
    "render_generator",
    "score_image",
    "summarise",
]
