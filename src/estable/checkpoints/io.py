"""Safe tensor-file IO: validated safetensors reading, opt-in pickle loading, atomic writes, hashes.

Every failure a user can cause (a truncated download, a corrupt header, a pickle checkpoint) becomes a
:class:`~estable.errors.CheckpointError` whose message names the file and what is wrong with it.

The safetensors layout (https://github.com/huggingface/safetensors, "Format"):

    [8 bytes: N, unsigned little-endian]  [N bytes: JSON header]  [tensor data]

The header maps each tensor name to ``{"dtype", "shape", "data_offsets": [begin, end]}``, offsets counted
from the start of the data block; an optional ``"__metadata__"`` entry maps strings to strings. The tensors
tile the data block exactly: sorted by offset, each begins where the previous one ends and the last one
ends at the end of the file. We check all of that before handing the file to the safetensors library, so
that a damaged file is explained rather than reported as a raw Rust/OSError traceback.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import secrets
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import torch

from ..errors import CheckpointError

SAFETENSORS_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")

# Bytes per element of each safetensors dtype name.
_DTYPE_BYTES: dict[str, int] = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "I64": 8,
    "U64": 8,
    "F64": 8,
    "C64": 8,
}

# safetensors itself refuses headers above 100 MB; a larger length field means the file is not safetensors.
_MAX_HEADER_BYTES = 100_000_000
# Real files hold thousands of tensors (an SD 1.5 checkpoint about 1,100; an SDXL LoRA about 7,000); a header of a
# million (empty) entries passes every other check and then keeps the loader busy for tens of seconds.
_MAX_TENSORS = 200_000

_PICKLE_RISK = (
    "pickle checkpoints can run arbitrary code when loaded. Convert it to .safetensors, or, if you trust "
    "its source, opt in with allow_pickle=True (--allow-pickle, where a command has it); even then only tensors "
    "are loaded "
    "(torch.load with weights_only=True)"
)


@dataclass(frozen=True)
class TensorInfo:
    """One entry of a safetensors header (read without touching the tensor data)."""

    dtype: str  # safetensors dtype name, e.g. "F16"
    shape: tuple[int, ...]
    begin: int  # byte offsets into the data block
    end: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


def human_bytes(n: int) -> str:
    """Decimal units, as file managers and download pages show them: 1_600_000_000 -> '1.6 GB'."""
    if n < 1000:
        return f"{n} bytes"
    value = float(n)
    for unit in ("kB", "MB", "GB", "TB"):
        value /= 1000.0
        if value < 999.95 or unit == "TB":
            return f"{value:.3g} {unit}" if value < 100 else f"{value:.0f} {unit}"
    raise AssertionError("unreachable")


def _size_pair(a: int, b: int) -> tuple[str, str]:
    """Two sizes in human units; exact byte counts when the rounded forms would look equal."""
    ha, hb = human_bytes(a), human_bytes(b)
    if ha == hb:
        return f"{a:,} bytes", f"{b:,} bytes"
    return ha, hb


def _check_file(path: Path) -> int:
    """Return the file size, or raise CheckpointError for a missing path or a folder."""
    if not path.exists():
        raise CheckpointError(f"{path}: no such file")
    if path.is_dir():
        raise CheckpointError(f"{path} is a folder; expected a checkpoint file")
    try:
        return path.stat().st_size
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read it ({exc.strerror or exc})") from exc


def json_error(exc: Exception) -> str:
    """Why ``json.loads`` failed, in words for a file's reader: besides syntax errors, a hostile file can nest
    too deeply (RecursionError) or hold a number longer than Python converts (ValueError)."""
    if isinstance(exc, RecursionError):
        return "it is nested too deeply"
    if isinstance(exc, (json.JSONDecodeError, UnicodeDecodeError)):
        return str(exc)
    return "it holds a number with too many digits" if "digits" in str(exc) else str(exc)


def read_json_object(path: Path) -> dict:
    """The JSON object in ``path`` (a config.json, a shard index); any way the file can be wrong is a one-line
    CheckpointError naming it: missing, not a regular file (a folder, a link to /dev/zero or a pipe, whose reading
    would never end), not JSON, hostile JSON (json_error), or JSON that is not an object."""
    if path.exists() and not path.is_file():
        raise CheckpointError(f"{path} is not a regular file")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such file") from None
    except (OSError, ValueError, RecursionError) as exc:  # ValueError: bad UTF-8 or JSON, a 5000-digit number
        raise CheckpointError(f"{path} is not a readable JSON file ({json_error(exc)})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} should hold a JSON object")
    return data


def read_safetensors_header(path: str | os.PathLike[str]) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Read and validate a safetensors header; return ``(tensors, metadata)`` without reading any data.

    Raises CheckpointError naming the file when the file is truncated, not a safetensors file, or its
    header is inconsistent (unknown dtype, offsets that overlap, leave holes or run past the end, a byte
    range that does not match dtype x shape).
    """
    path = Path(path)
    size = _check_file(path)
    name = path.name
    if size < 8:
        raise CheckpointError(
            f"{name} is truncated: {size} bytes, too short to hold even the 8-byte header length "
            f"of a safetensors file ({path})"
        )
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if n > _MAX_HEADER_BYTES:
                raise CheckpointError(
                    f"{name} is not a safetensors file (or is corrupt): its first 8 bytes give a header "
                    f"length of {n:,} bytes, more than any real header ({path})"
                )
            if 8 + n > size:
                raise CheckpointError(
                    f"{name} is truncated: the header is {n:,} bytes long but the file ends after "
                    f"{size - 8:,} of them ({path})"
                )
            raw = f.read(n)
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read it ({exc.strerror or exc})") from exc
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise CheckpointError(
            f"{name} is not a safetensors file (or its header is corrupt): the header is not valid JSON "
            f"({json_error(exc)}) ({path})"
        ) from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{name} has a corrupt header: expected a JSON object ({path})")

    if len(header) > _MAX_TENSORS:
        raise CheckpointError(f"{name} lists {len(header):,} tensors, more than any model or LoRA file holds ({path})")
    metadata_raw = header.pop("__metadata__", None) or {}
    if not isinstance(metadata_raw, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata_raw.items()
    ):
        raise CheckpointError(f"{name} has corrupt metadata: __metadata__ must map strings to strings ({path})")

    data_size = size - 8 - n
    infos: dict[str, TensorInfo] = {}
    for key, entry in header.items():
        infos[key] = _parse_entry(name, path, key, entry)

    # The tensors must tile the data block exactly.
    ordered = sorted(infos.items(), key=lambda kv: (kv[1].begin, kv[1].end))
    declared_end = max((info.end for info in infos.values()), default=0)
    if declared_end > data_size:
        worst = max(infos.items(), key=lambda kv: kv[1].end)[0]
        said, has = _size_pair(declared_end, data_size)
        raise CheckpointError(
            f"{name} is truncated: the header says {said} of tensor data, the file has {has} "
            f"(tensor {worst!r} ends past the end of the file) ({path})"
        )
    position = 0
    previous = None
    for key, info in ordered:
        if info.begin < position:
            raise CheckpointError(
                f"{name} has a corrupt header: tensors {previous!r} and {key!r} overlap "
                f"(bytes {info.begin:,}..{position:,} of the data block) ({path})"
            )
        if info.begin > position:
            raise CheckpointError(
                f"{name} has a corrupt header: a gap of {info.begin - position:,} bytes before tensor {key!r} "
                f"({path})"
            )
        position = info.end
        previous = key
    if position < data_size:
        raise CheckpointError(
            f"{name} is corrupt: {data_size - position:,} bytes after the last tensor that the header does "
            f"not describe ({path})"
        )
    return infos, dict(metadata_raw)


def _parse_entry(name: str, path: Path, key: str, entry: object) -> TensorInfo:
    bad = f"{name} has a corrupt header: entry {key!r}"
    if not isinstance(entry, dict):
        raise CheckpointError(f"{bad} is not an object ({path})")
    dtype = entry.get("dtype")
    shape = entry.get("shape")
    offsets = entry.get("data_offsets")
    if dtype not in _DTYPE_BYTES:
        raise CheckpointError(f"{bad} has an unknown or unsupported dtype {dtype!r} ({path})")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                              for d in shape):
        raise CheckpointError(f"{bad} has an invalid shape {shape!r} ({path})")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(isinstance(o, int) and not isinstance(o, bool) and o >= 0 for o in offsets)
        or offsets[1] < offsets[0]
    ):
        raise CheckpointError(f"{bad} has invalid data_offsets {offsets!r} ({path})")
    info = TensorInfo(dtype=dtype, shape=tuple(shape), begin=offsets[0], end=offsets[1])
    expected = info.numel * _DTYPE_BYTES[dtype]
    if info.nbytes != expected:
        raise CheckpointError(
            f"{bad} spans {info.nbytes:,} bytes but dtype {dtype} x shape {list(shape)} needs {expected:,} "
            f"({path})"
        )
    return info


def read_safetensors(
    path: str | os.PathLike[str], *, device: str | torch.device = "cpu"
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Load every tensor of a safetensors file after validating its header; return ``(tensors, metadata)``.

    The data is read through ``safetensors.safe_open`` (memory-mapped); the header is checked first so that a
    truncated or corrupt file raises a CheckpointError that says what is wrong.
    """
    from safetensors import safe_open

    path = Path(path)
    infos, metadata = read_safetensors_header(path)
    tensors: dict[str, torch.Tensor] = {}
    try:
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            for key in infos:
                tensors[key] = f.get_tensor(key)
    except Exception as exc:  # the header passed our checks; anything else is still the file's fault
        raise CheckpointError(f"{path.name} could not be read by safetensors: {exc} ({path})") from exc
    return tensors, metadata


class _NoTensors(Exception):
    pass


def load_pickle_object(path: str | os.PathLike[str], *, allow_pickle: bool = False) -> object:
    """The object in a pickle file (``.ckpt``/``.pt``/``.pth``/``.bin``), through the safe loader; refused unless
    ``allow_pickle`` is True.

    With the opt-in the file goes through ``torch.load(weights_only=True)``, whose restricted unpickler only
    rebuilds tensors and plain containers (dicts, lists, strings, numbers): a pickle that tries to call anything
    else is rejected before it runs.
    """
    path = Path(path)
    _check_file(path)
    if not allow_pickle:
        raise CheckpointError(f"refusing to load {path.name}: {_PICKLE_RISK} ({path})")
    try:
        with warnings.catch_warnings():  # torch warns about the pickle protocol before refusing the file
            warnings.simplefilter("ignore", UserWarning)
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(
            f"{path.name} could not be loaded safely: it is damaged or holds objects other than tensors "
            f"(code, classes), which the safe loader refuses to run ({_unpickler_reason(exc)}) ({path})"
        ) from None


def _unpickler_reason(exc: Exception) -> str:
    """The reason in torch's refusal, without its advice to load the file unsafely (which Estable never does)."""
    text = str(exc)
    marker = "WeightsUnpickler error:"
    if marker in text:
        reason = text.split(marker, 1)[1].split("Check the documentation", 1)[0]
        return " ".join(reason.split())[:200] or type(exc).__name__
    if "weights_only" in text:  # torch's advice with no reason in it
        return type(exc).__name__
    lines = text.strip().splitlines()
    return lines[0][:200] if lines else type(exc).__name__


def read_pickle(path: str | os.PathLike[str], *, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """Load a ``.ckpt``/``.pt``/``.pth``/``.bin`` state dict; refused unless ``allow_pickle`` is True.

    The file is read by :func:`load_pickle_object`. A top-level ``"state_dict"`` entry (Lightning checkpoints,
    SD's .ckpt files) is unwrapped; non-tensor entries (step counters and the like) are dropped.
    """
    path = Path(path)
    obj = load_pickle_object(path, allow_pickle=allow_pickle)
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path.name} holds a {type(obj).__name__}, not a state dict of tensors ({path})")
    tensors = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointError(f"{path.name} contains no tensors ({path})")
    return tensors


def load_tensors(
    path: str | os.PathLike[str], *, allow_pickle: bool = False
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Load a tensor file by its suffix: safetensors always, pickle formats only with ``allow_pickle``."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in PICKLE_SUFFIXES:
        return read_pickle(path, allow_pickle=allow_pickle), {}
    if suffix in SAFETENSORS_SUFFIXES:
        return read_safetensors(path)
    _check_file(path)
    raise CheckpointError(
        f"{path.name}: unknown checkpoint type {suffix or '(no suffix)'!r}; expected .safetensors "
        f"(or, with --allow-pickle, one of {', '.join(PICKLE_SUFFIXES)}) ({path})"
    )


# ---------------------------------------------------------------- writing


def fsync_path(path: str | os.PathLike[str]) -> None:
    """fsync a file or a folder (making a rename inside it durable, POSIX); a no-op where folders cannot be
    opened (Windows)."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path in the destination's folder; on success fsync it and rename it over ``path``.

    On any exception the temporary file is removed and an existing file at ``path`` is left untouched.
    """
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    # A fresh name (the destination's cut short, so that a long name still fits), created with open(): its mode is
    # the usual one (the umask's), which the finished file gets too (safetensors' writer makes files owner-only).
    tmp = folder / f".{path.name[:32]}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with open(tmp, "xb"):
            pass
        mode = tmp.stat().st_mode & 0o777
    except OSError as exc:
        raise CheckpointError(f"cannot write {path}: {exc.strerror or exc}") from exc
    try:
        yield tmp
        os.chmod(tmp, mode)
        with open(tmp, "rb+") as f:
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    fsync_path(folder)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temporary file, fsync, rename)."""
    try:
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            f.write(data)
    except OSError as exc:
        raise CheckpointError(f"cannot write {path}: {exc.strerror or exc}") from exc


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def _save_file(tensors: dict[str, torch.Tensor], filename: str, metadata: dict[str, str] | None) -> None:
    """The one place that calls the safetensors writer (tests replace it to simulate a crash)."""
    from safetensors.torch import save_file

    save_file(tensors, filename, metadata=metadata)


def _standalone(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Contiguous CPU tensors that share no storage (safetensors refuses shared or strided views)."""
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for key, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"write_safetensors: value for {key!r} is a {type(t).__name__}, not a tensor")
        if t.device.type == "meta":
            raise ValueError(f"write_safetensors: tensor {key!r} is on the meta device (it has no data)")
        t = t.detach().to("cpu").contiguous()
        storage = t.untyped_storage()
        if t.numel() and (storage.data_ptr() in seen or storage.nbytes() != t.nbytes):
            t = t.clone()  # shared with another entry, or a view into a bigger buffer
        if t.numel():
            seen.add(t.untyped_storage().data_ptr())
        out[key] = t
    return out


def write_safetensors(
    path: str | os.PathLike[str],
    tensors: Mapping[str, torch.Tensor],
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Write ``tensors`` (and string ``metadata``) to a safetensors file atomically.

    The data goes to a temporary file in the destination folder, which is flushed, fsynced and renamed
    over ``path``; an interrupted write leaves any previous file intact and no temporary file behind.
    """
    meta = {str(k): str(v) for k, v in (metadata or {}).items()}
    ready = _standalone(tensors)
    try:
        with atomic_path(path) as tmp:
            _save_file(ready, str(tmp), meta or None)
    except OSError as exc:
        raise CheckpointError(f"cannot write {path}: {exc.strerror or exc}") from exc


# ---------------------------------------------------------------- hashes


def _stream_sha256(f: IO[bytes], chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    while block := f.read(chunk):
        h.update(block)
    return h.hexdigest()


def sha256_file(path: str | os.PathLike[str]) -> str:
    """SHA-256 of a file's bytes, read in 1 MiB chunks (constant memory on multi-GB files)."""
    path = Path(path)
    _check_file(path)
    try:
        with open(path, "rb") as f:
            return _stream_sha256(f)
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read it ({exc.strerror or exc})") from exc


# Files at least this large get their SHA-256 remembered across processes (hashing 2 GB took 1.6 s of a fresh
# process's first image on the H200 machine; RESULTS.md); smaller ones are quicker to hash than to look up safely.
HASH_CACHE_MIN_BYTES = 256 << 20
_HASH_CACHE_ENTRIES = 256


def hash_cache_path() -> Path | None:
    """``$ESTABLE_HASH_CACHE`` (empty: no cache), else ``~/.cache/estable/sha256.json``."""
    value = os.environ.get("ESTABLE_HASH_CACHE")
    if value is not None:
        return Path(value).expanduser() if value else None
    return Path.home() / ".cache" / "estable" / "sha256.json"


def _file_stamp(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev]


def _read_hash_cache(cache: Path) -> dict[str, dict]:
    try:
        entries = json.loads(cache.read_text())
    except (OSError, ValueError):  # none yet, unreadable or damaged: start again
        return {}
    return {k: v for k, v in entries.items() if isinstance(v, dict)} if isinstance(entries, dict) else {}


def cached_sha256(path: str | os.PathLike[str]) -> str:
    """:func:`sha256_file`, remembered for large files in :func:`hash_cache_path` by absolute path and the file's
    size, modification and change times, inode and device (as A1111 keeps its model hashes): a multi-GB checkpoint is
    read once, not at every start. A file written again gets new times, so its hash is computed again. The cache is
    a convenience: when it cannot be read or written the hash is computed as usual."""
    path = Path(path)
    size = _check_file(path)
    cache = hash_cache_path()
    if cache is None or size < HASH_CACHE_MIN_BYTES:
        return sha256_file(path)
    key, stamp = str(path.resolve()), _file_stamp(path)
    entries = _read_hash_cache(cache)
    hit = entries.get(key, {})
    digest = hit.get("sha256")
    if hit.get("stamp") == stamp and isinstance(digest, str) and len(digest) == 64 and \
            all(c in "0123456789abcdef" for c in digest):
        return digest
    digest = sha256_file(path)
    if _file_stamp(path) != stamp:  # written while it was read: do not remember either version
        return digest
    entries.pop(key, None)
    entries[key] = {"stamp": stamp, "sha256": digest}
    keep = dict(list(entries.items())[-_HASH_CACHE_ENTRIES:])  # the most recently hashed
    with contextlib.suppress(OSError, CheckpointError), atomic_path(cache) as tmp:  # a read-only home: still right
        tmp.write_text(json.dumps(keep))
    return digest


def short_hash(path: str | os.PathLike[str]) -> str:
    """The A1111 "Model hash": the first 10 hex digits of the file's SHA-256."""
    return sha256_file(path)[:10]
