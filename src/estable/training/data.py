"""Image–caption datasets for training: an image folder, WebDataset-style tar shards, the shapes world.

Every dataset yields ``{"pixel_values": float32 (3, S, S) in [-1, 1], "text": str}``; the default collate
turns a batch into ``pixel_values`` (B, 3, S, S) and a list of B captions.

Preprocessing (``preprocess``): honour the EXIF orientation, convert to RGB, resize so the SHORTER side is S
(Lanczos), crop S×S (centre, or random with ``center_crop=False``), optionally mirror. Random choices use
torch's global generator, which DataLoader seeds per worker.

Note on flips: mirroring swaps left and right, so it makes every "to the left of" caption false (the shapes world
has many). ``random_flip`` is therefore off by default; turn it on only for data without left/right language.

Broken data never stops training: an unreadable, corrupt or missing image is skipped, counted in ``.skipped``
and logged (once per dataset per process). With DataLoader workers each worker counts its own skips; call
``ImageCaptionFolder.verify()`` in the main process for a complete count before training.
"""

from __future__ import annotations

import glob
import io
import json
import logging
import math
import random
import re
import tarfile
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch
import torch.utils.data
from PIL import Image, ImageOps
from tqdm import tqdm

from estable.errors import EstableError
from estable.images import as_rgb
from estable.training.shapes import ShapesWorld

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "webp")
# What Pillow raises on truncated, corrupt or hostile files (zlib.error for broken PNG streams).
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, zlib.error, Image.DecompressionBombError)


# ---------------------------------------------------------------------------------------------------------
# Preprocessing
# ---------------------------------------------------------------------------------------------------------


def to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL image → float32 (3, H, W) in [-1, 1]."""
    arr = np.asarray(image.convert("RGB"), dtype=np.uint8)  # (H, W, 3)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(127.5).sub_(1.0)  # (3, H, W)


def preprocess(image: Image.Image, size: int, *, center_crop: bool = True, flip: bool = False) -> torch.Tensor:
    """Resize the shorter side to ``size`` (Lanczos), crop ``size``×``size``, optionally mirror; → (3, S, S)."""
    image = ImageOps.exif_transpose(image)
    if image.mode != "RGB":
        image = as_rgb(image)  # 16-bit and float pixels scaled by their range, not clipped
    w, h = image.size
    scale = size / min(w, h)
    new = (max(size, round(w * scale)), max(size, round(h * scale)))
    if new != (w, h):
        # reducing_gap: a fast box pre-shrink for big downscales, then Lanczos on the last factor ≤ 3.
        image = image.resize(new, Image.LANCZOS, reducing_gap=3.0)
    w, h = image.size
    if center_crop:
        left, top = (w - size) // 2, (h - size) // 2
    else:
        left = int(torch.randint(0, w - size + 1, ()).item())
        top = int(torch.randint(0, h - size + 1, ()).item())
    image = image.crop((left, top, left + size, top + size))
    if flip:
        image = ImageOps.mirror(image)
    return to_tensor(image)


def _decode(data: bytes | Path) -> Image.Image:
    """Open and fully decode an image (errors surface here, not later)."""
    image = Image.open(io.BytesIO(data) if isinstance(data, bytes) else data)
    image.load()
    return image


def _check_size(size: int) -> int:
    if not isinstance(size, int) or size < 1:
        raise ValueError(f"size must be a positive integer, got {size!r}")
    return size


def _want_flip(random_flip: bool) -> bool:
    return random_flip and bool(torch.rand(()) < 0.5)


# ---------------------------------------------------------------------------------------------------------
# Image folder with metadata.jsonl
# ---------------------------------------------------------------------------------------------------------


def read_metadata(root: str | Path, caption_column: str = "text") -> tuple[list[dict[str, Any]], int]:
    """Records of ``root/metadata.jsonl`` whose image exists, and how many lines were unusable.

    A record needs ``file_name`` (relative to root; sub-folders allowed) and a string (or list of strings)
    under ``caption_column``.
    """
    root = Path(root)
    meta = root / "metadata.jsonl"
    if not meta.is_file():
        raise EstableError(
            f"{root}: no metadata.jsonl; an image folder needs one JSON line per image, "
            f'e.g. {{"file_name": "0001.png", "{caption_column}": "a red circle"}}'
        )
    records: list[dict[str, Any]] = []
    bad = 0
    with open(meta, encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                bad += 1
                continue
            cap = rec.get(caption_column) if isinstance(rec, dict) else None
            name = rec.get("file_name") if isinstance(rec, dict) else None
            ok_cap = isinstance(cap, str) or (isinstance(cap, list) and cap and all(isinstance(c, str) for c in cap))
            if not isinstance(name, str) or not ok_cap or not (root / name).is_file():
                bad += 1
                continue
            records.append(rec)
    return records, bad


class ImageCaptionFolder(torch.utils.data.Dataset):
    """A folder of images described by ``metadata.jsonl`` (the "imagefolder" layout of HF datasets).

    Missing files and malformed lines are dropped (and counted) when the index is built; corrupt images are
    found when loaded: the item is counted in ``skipped`` and the next readable item is returned instead.
    A caption that is a list gives one caption at random per load.
    """

    def __init__(
        self,
        root: str | Path,
        size: int,
        *,
        center_crop: bool = True,
        random_flip: bool = False,
        caption_column: str = "text",
    ) -> None:
        self.root = Path(root)
        self.size = _check_size(size)
        self.center_crop, self.random_flip, self.caption_column = center_crop, random_flip, caption_column
        records, self._skipped_at_index = read_metadata(self.root, caption_column)
        if not records:
            raise EstableError(
                f"{self.root}/metadata.jsonl lists no usable images ({self._skipped_at_index} line(s) skipped: "
                f"missing file, no 'file_name' or no {caption_column!r} caption)"
            )
        self.entries: list[tuple[str, str | list[str]]] = [(r["file_name"], r[caption_column]) for r in records]
        self._bad: set[int] = set()
        self._warned = False
        if self._skipped_at_index:
            logger.warning("%s: skipped %d unusable metadata line(s)", self.root, self._skipped_at_index)

    @property
    def skipped(self) -> int:
        """Entries skipped so far: unusable metadata lines, missing files and corrupt images met in this process."""
        return self._skipped_at_index + len(self._bad)

    def __len__(self) -> int:
        return len(self.entries)

    def _caption(self, caption: str | list[str]) -> str:
        if isinstance(caption, str):
            return caption
        return caption[int(torch.randint(0, len(caption), ()).item())]

    def _mark_bad(self, i: int, err: Exception) -> None:
        self._bad.add(i)
        if not self._warned:
            self._warned = True
            logger.warning(
                "%s: skipping unreadable image %s (%s); further ones are only counted",
                self.root,
                self.entries[i][0],
                err,
            )

    def __getitem__(self, index: int) -> dict[str, Any]:
        n = len(self.entries)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for {n} items")
        for k in range(n):
            i = (index + k) % n
            if i in self._bad:
                continue
            name, caption = self.entries[i]
            try:
                image = _decode(self.root / name)
                pixels = preprocess(image, self.size, center_crop=self.center_crop, flip=_want_flip(self.random_flip))
            except _DECODE_ERRORS as err:
                self._mark_bad(i, err)
                continue
            return {"pixel_values": pixels, "text": self._caption(caption)}
        raise EstableError(f"{self.root}: none of the {n} images listed in metadata.jsonl can be read")

    def verify(self, progress: bool = False) -> int:
        """Decode every image once (in this process) and return the total skip count."""
        for i in tqdm(range(len(self.entries)), disable=not progress, desc="verify", unit="img"):
            if i in self._bad:
                continue
            try:
                _decode(self.root / self.entries[i][0])
            except _DECODE_ERRORS as err:
                self._mark_bad(i, err)
        return self.skipped


# ---------------------------------------------------------------------------------------------------------
# WebDataset-style tar shards
# ---------------------------------------------------------------------------------------------------------

_BRACE = re.compile(r"\{(\d+)\.\.(\d+)\}")


def expand_shards(urls_or_paths: str | Path | Sequence[str | Path]) -> list[str]:
    """Shard list from a glob, a brace range (``shard-{000..009}.tar``), a URL, or a list of any of those."""
    items = [urls_or_paths] if isinstance(urls_or_paths, (str, Path)) else list(urls_or_paths)
    out: list[str] = []
    for item in items:
        s = str(item)
        m = _BRACE.search(s)
        if m:
            lo, hi, width = int(m.group(1)), int(m.group(2)), len(m.group(1))
            out += expand_shards([s[: m.start()] + f"{k:0{width}d}" + s[m.end() :] for k in range(lo, hi + 1)])
        elif "://" in s:
            out.append(s)
        elif glob.has_magic(s):
            out += sorted(glob.glob(s))
        else:
            out.append(s)
    return out


def _split_key(name: str) -> tuple[str, str]:
    """WebDataset convention: the key is the path up to the first dot of the base name; the rest is the ext."""
    slash = name.rfind("/")
    dot = name.find(".", slash + 1)
    if dot < 0:
        return name, ""
    return name[:dot], name[dot + 1 :].lower()


def _open_stream(shard: str) -> IO[bytes]:
    if "://" in shard:
        import urllib.request

        return urllib.request.urlopen(shard)
    return open(shard, "rb")


def _resolve_world(rank: int | None, world_size: int | None) -> tuple[int, int]:
    if rank is None or world_size is None:
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized():
            rank = dist.get_rank() if rank is None else rank
            world_size = dist.get_world_size() if world_size is None else world_size
        else:
            rank, world_size = rank or 0, world_size or 1
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside 0..{world_size - 1}")
    return rank, world_size


class TarShards(torch.utils.data.IterableDataset):
    """Samples from WebDataset-style tar shards: members ``KEY.png|jpg|jpeg|webp`` and ``KEY.txt``.

    Members of one sample must be adjacent in the tar (as WebDataset writes them). The stream is split
    between distributed ranks (``rank``/``world_size``, or torch.distributed when initialised) and
    DataLoader workers: whole shards per consumer when there are at least as many shards as consumers,
    otherwise every consumer reads every shard and keeps every n-th sample. Either way the consumers see
    disjoint samples that together cover the data once per epoch (ranks may get a few samples more or less).

    ``shuffle`` shuffles the shard order per epoch (same order on every rank: call ``set_epoch``) and
    samples through a buffer of ``shuffle_buffer``. Corrupt images, samples without image or caption and
    unreadable shards are skipped and counted in ``skipped`` (per process).
    """

    def __init__(
        self,
        urls_or_paths: str | Path | Sequence[str | Path],
        size: int,
        *,
        center_crop: bool = True,
        random_flip: bool = False,
        shuffle: bool = False,
        shuffle_buffer: int = 1000,
        seed: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
        caption_ext: str = "txt",
    ) -> None:
        self.shards = expand_shards(urls_or_paths)
        if not self.shards:
            raise EstableError(f"no tar shards match {urls_or_paths!r}")
        self.size = _check_size(size)
        self.center_crop, self.random_flip = center_crop, random_flip
        self.shuffle, self.shuffle_buffer, self.seed = shuffle, max(1, shuffle_buffer), seed
        self.rank, self.world_size = rank, world_size
        self.caption_ext = caption_ext.lower()
        self.epoch = 0
        self.skipped = 0
        self._warned = False

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _skip(self, what: str) -> None:
        self.skipped += 1
        if not self._warned:
            self._warned = True
            logger.warning("tar shards: skipping %s; further ones are only counted", what)

    def _raw_samples(self, shard: str) -> Iterator[tuple[str, dict[str, bytes]]]:
        """(key, {ext: bytes}) for each group of adjacent members with the same key."""
        key: str | None = None
        group: dict[str, bytes] = {}
        try:
            with _open_stream(shard) as stream, tarfile.open(fileobj=stream, mode="r|*") as tar:
                for member in tar:
                    if not member.isfile():
                        continue
                    k, ext = _split_key(member.name)
                    if k != key:
                        if key is not None:
                            yield key, group
                        key, group = k, {}
                    f = tar.extractfile(member)
                    group[ext] = f.read() if f is not None else b""
        except (tarfile.TarError, OSError, EOFError, zlib.error) as err:
            self._skip(f"the rest of shard {shard} ({err})")
        if key is not None:
            yield key, group

    def _decoded(self, key: str, group: dict[str, bytes]) -> dict[str, Any] | None:
        ext = next((e for e in IMAGE_EXTENSIONS if e in group), None)
        if ext is None or self.caption_ext not in group:
            self._skip(f"sample {key!r} without an image or a .{self.caption_ext} caption")
            return None
        try:
            text = group[self.caption_ext].decode("utf-8").strip()
            image = _decode(group[ext])
            pixels = preprocess(image, self.size, center_crop=self.center_crop, flip=_want_flip(self.random_flip))
        except (*_DECODE_ERRORS, UnicodeDecodeError) as err:
            self._skip(f"sample {key!r} ({err})")
            return None
        return {"pixel_values": pixels, "text": text}

    def __iter__(self) -> Iterator[dict[str, Any]]:
        rank, world_size = _resolve_world(self.rank, self.world_size)
        info = torch.utils.data.get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        consumer, consumers = rank * workers + worker, world_size * workers
        shards = list(self.shards)
        if self.shuffle:
            random.Random(f"{self.seed}|{self.epoch}").shuffle(shards)  # identical on every rank
        if len(shards) >= consumers:
            mine, stride, offset = shards[consumer::consumers], 1, 0
        else:
            mine, stride, offset = shards, consumers, consumer
        rng = random.Random(f"{self.seed}|{self.epoch}|{consumer}")
        buffer: list[dict[str, Any]] = []
        position = 0
        for shard in mine:
            for key, group in self._raw_samples(shard):
                keep = position % stride == offset
                position += 1
                if not keep:
                    continue
                sample = self._decoded(key, group)
                if sample is None:
                    continue
                if not self.shuffle:
                    yield sample
                    continue
                buffer.append(sample)
                if len(buffer) >= self.shuffle_buffer:
                    j = rng.randrange(len(buffer))
                    buffer[j], buffer[-1] = buffer[-1], buffer[j]
                    yield buffer.pop()
        rng.shuffle(buffer)
        yield from buffer


def write_tar_shards(
    folder: str | Path, out_pattern: str | Path, per_shard: int = 1000, *, caption_column: str = "text"
) -> list[Path]:
    """Convert an image folder (``metadata.jsonl``) into tar shards readable by ``TarShards``.

    ``out_pattern`` numbers the shards, printf- or format-style: ``"out/shard-%06d.tar"`` or
    ``"out/shard-{:06d}.tar"``. Image bytes are copied unchanged as ``KEY.<ext>``, the caption as ``KEY.txt``
    and the whole metadata record as ``KEY.json`` (KEY = the 8-digit position in the folder). Returns the paths.
    """
    if not isinstance(per_shard, int) or per_shard < 1:
        raise ValueError(f"per_shard must be a positive integer, got {per_shard!r}")
    pattern = str(out_pattern)
    if "%" not in pattern and "{" not in pattern:
        raise ValueError(f"out_pattern {pattern!r} needs a shard number field, e.g. 'shard-%06d.tar'")
    root = Path(folder)
    records, skipped = read_metadata(root, caption_column)
    usable = [r for r in records if Path(r["file_name"]).suffix.lower().lstrip(".") in IMAGE_EXTENSIONS]
    skipped += len(records) - len(usable)
    if not usable:
        raise EstableError(f"{root}: no usable images to write into shards")
    if skipped:
        logger.warning("%s: %d metadata line(s) not written (missing file or not an image)", root, skipped)

    def add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size, info.mode, info.mtime = len(data), 0o644, 0  # reproducible archives
        tar.addfile(info, io.BytesIO(data))

    paths: list[Path] = []
    for k in range(math.ceil(len(usable) / per_shard)):
        path = Path(pattern % k if "%" in pattern else pattern.format(k))
        path.parent.mkdir(parents=True, exist_ok=True)
        with tarfile.open(path, "w") as tar:
            for i in range(k * per_shard, min(len(usable), (k + 1) * per_shard)):
                rec = usable[i]
                key = f"{i:08d}"
                ext = Path(rec["file_name"]).suffix.lower().lstrip(".")
                caption = rec[caption_column]
                caption = caption if isinstance(caption, str) else caption[0]
                add(tar, f"{key}.{ext}", (root / rec["file_name"]).read_bytes())
                add(tar, f"{key}.txt", caption.encode("utf-8"))
                add(tar, f"{key}.json", json.dumps(rec).encode("utf-8"))
        paths.append(path)
    return paths


# ---------------------------------------------------------------------------------------------------------
# Shapes world on the fly
# ---------------------------------------------------------------------------------------------------------


class ShapesDataset(torch.utils.data.Dataset):
    """``length`` samples of a ``ShapesWorld`` rendered on demand at ``size`` (index → world.sample(index))."""

    def __init__(self, world: ShapesWorld, size: int, length: int) -> None:
        if not isinstance(length, int) or length < 1:
            raise ValueError(f"length must be a positive integer, got {length!r}")
        self.world, self.size, self.length = world, _check_size(size), length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not -self.length <= index < self.length:
            raise IndexError(f"index {index} out of range for {self.length} items")
        image, caption, _ = self.world.sample(index % self.length, self.size)
        return {"pixel_values": to_tensor(image), "text": caption}


__all__ = [
    "IMAGE_EXTENSIONS",
    "ImageCaptionFolder",
    "ShapesDataset",
    "TarShards",
    "expand_shards",
    "preprocess",
    "read_metadata",
    "to_tensor",
    "write_tar_shards",
]
