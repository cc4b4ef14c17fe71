"""The world: held-out splits, deterministic sampling by index, and image folders written from it."""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm import tqdm

from estable.training.shapes.captions import caption_for
from estable.training.shapes.layout import _pick, scene_from_prompt
from estable.training.shapes.render import MAX_RENDER_SIZE, render
from estable.training.shapes.scene import BackgroundSpec, ObjectSpec, PromptSpec, Scene
from estable.training.shapes.vocab import (
    BACKGROUND_COLOURS,
    BACKGROUND_KINDS,
    BACKGROUND_MENTION_P,
    COLOURS,
    COUNT_SIZES,
    COUNT_WORDS,
    DEFAULT_BACKGROUND,
    HELDOUT_FRACTION,
    KIND_WEIGHTS,
    PROMPT_KINDS,
    RELATIONS,
    SHAPES,
    SIZE_MENTION_P,
    SIZES,
    SPLITS,
    UNNAMED_BACKGROUND_KINDS,
)


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


def check_weights(name: str, weights: Any, keys: Sequence[str]) -> dict[str, float]:
    """``weights`` as a dict if it maps some of ``keys`` to non-negative numbers with a positive sum; else a
    ValueError naming ``name``."""
    if (not isinstance(weights, dict) or not weights or set(weights) - set(keys)
            or not all(isinstance(w, (int, float)) and not isinstance(w, bool) and w >= 0 for w in weights.values())
            or sum(weights.values()) <= 0):
        raise ValueError(f"{name} must map some of {', '.join(keys)} to non-negative weights, got {weights!r}")
    return dict(weights)


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
        named_background_kinds: dict[str, float] | None = None,
        grey_named_p: float = 0.0,
        relation_axis_ratio: float = 1.0,
        contact_p: float = 0.0,
    ) -> None:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {', '.join(SPLITS)}, not {split!r}")
        weights = check_weights("kind_weights", KIND_WEIGHTS if kind_weights is None else kind_weights, PROMPT_KINDS)
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
        # the odds of plain / gradient / textured among the backgrounds a caption names (None: one in three each)
        self._named_bg_p: np.ndarray | None = None
        if named_background_kinds is not None:
            bg = check_weights("named_background_kinds", named_background_kinds, BACKGROUND_KINDS)
            p = np.array([bg.get(k, 0.0) for k in BACKGROUND_KINDS], dtype=np.float64)
            self._named_bg_p = p / p.sum()
        # the share of the captions that would name no background which name its grey instead ("on a textured grey
        # background"): a word for the unnamed background that generation can use (captions.name_grey_background)
        if not 0.0 <= grey_named_p <= 1.0:
            raise ValueError(f"grey_named_p must be between 0 and 1, not {grey_named_p!r}")
        self.grey_named_p = float(grey_named_p)
        # pair layouts with the relation's axis at least this many times the other (1: any layout the judge reads as
        # the relation; more keeps the training scenes away from the diagonal)
        if not relation_axis_ratio >= 1.0:
            raise ValueError(f"relation_axis_ratio must be at least 1, not {relation_axis_ratio!r}")
        self.relation_axis_ratio = float(relation_axis_ratio)
        # the share of the scenes with objects of two colours laid out with the second against the first (touching
        # or overlapping a little; scene_from_prompt's touch): where the decoder draws the bands of issue 11's
        # stray pixels. 0, the default, draws nothing more: the scenes stay the same.
        if not 0.0 <= contact_p <= 1.0:
            raise ValueError(f"contact_p must be between 0 and 1, not {contact_p!r}")
        self.contact_p = float(contact_p)

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
            bg_kind = (_pick(rng, BACKGROUND_KINDS) if self._named_bg_p is None
                       else BACKGROUND_KINDS[int(rng.choice(len(BACKGROUND_KINDS), p=self._named_bg_p))])
            background = BackgroundSpec(bg_kind, _pick(rng, free))
        elif self.grey_named_p > 0 and rng.random() < self.grey_named_p:  # (no draw at 0: the scenes stay the same)
            background = BackgroundSpec(_pick(rng, UNNAMED_BACKGROUND_KINDS), DEFAULT_BACKGROUND)
        return PromptSpec(kind, objects, count=count, relation=relation, background=background)

    def scene(self, index: int) -> Scene:
        """The scene at ``index`` (no rendering)."""
        rng = self.rng(index)
        spec = self._sample_spec(rng)
        touch = (self.contact_p > 0 and len({o.colour for o in spec.objects}) > 1  # no draw otherwise
                 and rng.random() < self.contact_p)
        try:
            scene = scene_from_prompt(spec, rng, axis_ratio=self.relation_axis_ratio, touch=touch)
        except ValueError:
            if not touch:
                raise
            scene = scene_from_prompt(spec, rng, axis_ratio=self.relation_axis_ratio)  # no touching layout found
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


# ---------------------------------------------------------------------------------------------------------
# Image folders
# ---------------------------------------------------------------------------------------------------------

MAX_FOLDER_COUNT = 100_000_000  # file names have 8 digits


def _is_own_image(name: str) -> bool:
    """Whether ``name`` is one of :func:`write_folder`'s image names (``NNNNNNNN.png``, 8 digits)."""
    stem, dot, ext = name.partition(".")
    return dot == "." and ext == "png" and len(stem) == 8 and stem.isascii() and stem.isdigit()


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

    A folder that already holds images or a metadata.jsonl is refused (``existing="refuse"``), emptied of the
    files this function writes (``"overwrite"``: its numbered images and metadata only, other files stay; a
    non-empty folder without a shapes_world.json is refused), or extended (``"append"``: the next scene indices of
    the same world, new file names, new metadata lines after the old). Every PNG is written under a temporary
    name and renamed into place, and its metadata line is written (and flushed) only after that, so an
    interrupted run leaves complete images that all have their line. The disk's free space is checked first
    against the first image's size.
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
    if existing == "overwrite" and out.is_dir() and not info_file.is_file() and any(out.iterdir()):
        raise ValueError(f"{out} was not written by `estable data shapes` (it has no shapes_world.json); not "
                         "replacing anything there: choose a new or empty folder")
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
    if existing == "overwrite":  # only now that every check has passed, and only the files this function writes
        for f in old_images:
            if _is_own_image(f.name):
                f.unlink()
        for f in out.glob(".*.png.tmp"):
            if _is_own_image(f.name[1:-4]):
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

