"""Output files: checked before the work starts, named without clobbering, written one image at a time.

The rules every command that writes images follows (``generate``/``img2img``/``inpaint`` today, the server's
"save to disk" later):

* An existing file is never replaced unless the caller says so (``overwrite=True``, the CLI's ``--overwrite``),
  and an input image is never written over, overwrite or not.
* A folder output keeps numbering new files after the highest ``NNNNN-`` number already there, so it never
  needs ``--overwrite``.
* Everything that can be checked without the images is checked before the model is loaded: the parent folder
  exists and accepts a new file (tried by creating and removing one: permission bits say nothing for root or on
  read-only mounts), the target is not a folder, not an input, not an existing file.
* :meth:`OutputPlan.save` writes the images it is given at once (each atomically, :func:`write_png`), so a run of
  many batches keeps every batch that finished before an interruption; :attr:`OutputPlan.written` lists them.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from .errors import EstableError

__all__ = ["OutputPlan", "check_name_lengths", "check_new_file", "check_writable_folder", "next_index", "same_file"]

NAME_MAX = 255  # bytes in one file or folder name (ext4, XFS, btrfs, APFS, NTFS in characters)
# Image formats that are not written: ``--out a.jpg`` would otherwise be taken for a folder name.
_OTHER_IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".jpe", ".jfif", ".webp", ".gif", ".bmp", ".tif", ".tiff",
                                   ".avif", ".heic", ".jxl", ".jp2", ".tga", ".ppm"})


def same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """True when ``a`` and ``b`` name the same file (through links, ``..`` or another spelling)."""
    pa, pb = Path(a), Path(b)
    try:
        if pa.exists() and pb.exists():
            return os.path.samefile(pa, pb)
    except OSError:
        pass
    return pa.resolve() == pb.resolve()


def _nearest_existing(folder: Path) -> Path:
    p = folder if str(folder) else Path(".")
    while not p.exists():
        if p.parent == p:
            break
        p = p.parent
    return p


def check_name_lengths(path: str | os.PathLike) -> None:
    """EstableError when a part of ``path`` is longer than a file system allows for one name (``NAME_MAX`` bytes),
    which the operating system would refuse only when the file is written."""
    for part in Path(path).parts:
        size = len(os.fsencode(part))
        if size > NAME_MAX:
            raise EstableError(f"the name {part[:24]}…{part[-8:]} is {size} bytes long; a file or folder name can "
                               f"have at most {NAME_MAX}")


def check_writable_folder(folder: str | os.PathLike, *, create: bool = False) -> None:
    """EstableError unless a new file can be created in ``folder`` (or, for a folder still to be made, in its
    nearest existing ancestor, which must be a folder). Tried for real: a probe file is created and removed."""
    folder = Path(folder) if str(folder) else Path(".")
    check_name_lengths(folder)
    base = _nearest_existing(folder)
    if not base.is_dir():
        raise EstableError(f"cannot write into {folder}: {base} is a file, not a folder")
    if base != folder and not create:
        raise EstableError(f"cannot write into {folder}: the folder does not exist")
    probe = base / f".estable-probe.{os.getpid()}.{secrets.token_hex(4)}"
    try:
        with open(probe, "xb"):
            pass
    except OSError as exc:
        raise EstableError(f"cannot write into {base}: {exc.strerror or exc}") from None
    probe.unlink(missing_ok=True)


def check_new_file(path: str | os.PathLike, *, overwrite: bool = False,
                   inputs: Iterable[str | os.PathLike | None] = ()) -> None:
    """EstableError unless ``path`` may be written: not an input, not a folder, not an existing file (unless
    ``overwrite``), in a folder that exists and accepts new files."""
    path = Path(path)
    check_name_lengths(path)
    for given in inputs:
        if given is not None and same_file(path, given):
            raise EstableError(f"--out {path} is the input image {given}; choose another output name "
                               "(an input is never written over)")
    if path.is_dir():
        raise EstableError(f"--out {path} is a folder, not a file name")
    if path.exists() and not overwrite:
        raise EstableError(f"{path} already exists; pass --overwrite to replace it, or choose another name")
    check_writable_folder(path.parent)


def next_index(folder: Path) -> int:
    """1 + the highest ``NNNNN-`` number of the PNG files in ``folder`` (0 for a folder without any)."""
    best = -1
    if folder.is_dir():
        for p in folder.glob("*.png"):
            head = p.name.split("-", 1)[0]
            if head.isdigit():
                best = max(best, int(head))
    return best + 1


class OutputPlan:
    """Where the ``count`` images of one run go, checked at construction (before any work).

    ``out`` ending in ``.png``: one image is that file, several are ``name-0.png``, ``name-1.png``, … (every one
    of them checked). Another image suffix (``.jpg``, ``.webp``, …) is refused: only PNG is written. Anything
    else is a folder (created at the first save) where files are numbered
    ``NNNNN-SEED.png`` after the highest number there. ``inputs`` are files that must never be written over.
    """

    def __init__(self, out: str | os.PathLike, count: int, *, overwrite: bool = False,
                 inputs: Sequence[str | os.PathLike | None] = (), start: int | None = None) -> None:
        self.start = start  # a folder's first number (default: after the highest one there)
        self.out = Path(out)
        self.count = int(count)
        self.overwrite = overwrite
        self.inputs = [i for i in inputs if i is not None]
        self.written: list[Path] = []
        self.is_file = self.out.suffix.lower() == ".png"
        if self.is_file:
            for path in self.file_names():
                check_new_file(path, overwrite=overwrite, inputs=self.inputs)
        else:
            check_name_lengths(self.out)
            if self.out.suffix.lower() in _OTHER_IMAGE_SUFFIXES and not self.out.is_dir():
                raise EstableError(f"--out {self.out}: only PNG files are written (they carry the generation "
                                   f"parameters); give a .png name such as {self.out.with_suffix('.png')}, "
                                   "or a folder")
            if self.out.exists() and not self.out.is_dir():
                raise EstableError(f"--out {self.out} is an existing file that is not a .png; give a folder or a "
                                   ".png name")
            check_writable_folder(self.out, create=True)

    def file_names(self) -> list[Path]:
        """The file names of a ``.png`` output, in image order."""
        if self.count == 1:
            return [self.out]
        return [self.out.with_name(f"{self.out.stem}-{k}{self.out.suffix}") for k in range(self.count)]

    def save(self, result: Any) -> list[Path]:
        """Write the next images of the run, ``result`` being a :class:`~estable.results.GenerationResult` (or one
        batch of it): PNGs with infotext and record, each written atomically. Returns their paths."""
        from .provenance.infotext import write_png

        images, infotexts, records, seeds = result.images, result.infotexts, result.records, result.seeds
        k0 = len(self.written)
        if k0 + len(images) > self.count:
            raise ValueError(f"OutputPlan for {self.count} images was given {k0 + len(images)}")
        if self.is_file:
            paths = self.file_names()[k0:k0 + len(images)]
        else:
            try:
                self.out.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise EstableError(f"cannot create the output folder {self.out}: {exc.strerror or exc}") from None
            n = next_index(self.out) if self.start is None else self.start + k0
            paths = [self.out / f"{n + k:05d}-{seed}.png" for k, seed in enumerate(seeds)]
        for path, image, text, record in zip(paths, images, infotexts, records):
            if path.exists() and not self.overwrite:  # appeared since the check (another run writing there)
                raise EstableError(f"{path} appeared while this run was working; not replacing it")
            write_png(path, image, parameters=text, record=record)
            self.written.append(path)
        return paths
