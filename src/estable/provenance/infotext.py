"""Generation metadata in PNG files: A1111's ``parameters`` infotext and Estable's own JSON record.

The A1111 web UI writes, in a PNG text chunk named ``parameters``, a text of this shape:

    <prompt, possibly several lines>
    Negative prompt: <negative prompt, possibly several lines>      (only if not empty)
    Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 1234, Size: 512x768, ...

The last line holds ``Key: value`` pairs separated by ", "; a value that contains ``,`` ``:`` or a
newline is written as a JSON string. Many tools (A1111's "PNG Info", civitai, image browsers) read
it, so we write it in exactly that form. Next to it, an ``estable`` chunk holds a JSON record with every
parameter, the model's SHA-256 and the Estable version, which is what Estable itself reads back.

Limits inherited from the format: leading and trailing whitespace of each prompt line is lost, and a
prompt line that starts with "Negative prompt:" is read as the start of the negative prompt.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import warnings
from pathlib import Path
from typing import Any

from PIL import Image, PngImagePlugin, UnidentifiedImageError

from estable.errors import EstableError

__all__ = [
    "ESTABLE_KEY",
    "PARAMETERS_KEY",
    "format_infotext",
    "model_hash",
    "parse_infotext",
    "read_png_metadata",
    "to_a1111_fields",
    "write_png",
]

PARAMETERS_KEY = "parameters"
ESTABLE_KEY = "estable"

# A "Key: value" pair of the parameters line (the same grammar A1111's reader uses): a key of word
# characters, spaces, '-' and '/'; a value that is either a JSON string or runs up to the next comma.
_PAIR = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
_KEY = re.compile(r"\w[\w \-/]*\w")
# Where _PAIR fails to match, it fails alike at every later position of the same leading space and key run (the key
# must end where the run ends, at a ':'); _pairs skips the run instead of trying each position, as findall would, which
# scans to the run's end each time: n² steps for a line of n letters (40,000: seconds).
_SKIP = re.compile(r"\s*(?:\w[\w \-/]*)?")
_SIZE = re.compile(r"^(\d+)x(\d+)$")
_NEGATIVE = "Negative prompt:"


def model_hash(sha256_hex: str) -> str:
    """A1111's "Model hash": the first 10 hex digits of the checkpoint file's SHA-256."""
    if not re.fullmatch(r"[0-9a-fA-F]{64}", sha256_hex):
        raise ValueError(f"expected a 64-digit hex SHA-256, got {sha256_hex!r}")
    return sha256_hex[:10].lower()


def _quote(value: str) -> str:
    # A1111 JSON-quotes values containing ',', ':' or a newline. We also quote values a reader would
    # otherwise change: empty, surrounded by whitespace, or already looking like a JSON string.
    if (
        any(c in value for c in ",:\n\r")
        or value == ""
        or value != value.strip()
        or (value.startswith('"') and value.endswith('"'))
    ):
        return json.dumps(value, ensure_ascii=False)
    return value


def _unquote(value: str) -> str:
    if len(value) >= 2 and value[0] == '"' and value[-1] == '"':
        try:
            out = json.loads(value)
        except json.JSONDecodeError:
            return value
        return out if isinstance(out, str) else value
    return value


def _value_text(key: str, value: Any) -> str:
    if key == "Size" and isinstance(value, (tuple, list)) and len(value) == 2:
        return f"{int(value[0])}x{int(value[1])}"
    return str(value)


def format_infotext(prompt: str, negative_prompt: str, params: dict[str, Any]) -> str:
    """The A1111 ``parameters`` text for one image.

    ``params`` maps A1111's labels to values, in the order they should appear, e.g.
    ``{"Steps": 20, "Sampler": "DPM++ 2M", "Schedule type": "Karras", "CFG scale": 7, "Seed": 1234,
    "Size": "512x768", "Model hash": "6ce0161689", "Model": "name", "Version": "estable 0.1.0"}``.
    Values are written with ``str()`` (``Size`` may also be a (width, height) pair); ``None`` values are
    left out; a value equal to its key is written alone, as A1111 writes flags. At least three
    ``Key: value`` pairs are required: readers recognise the parameters line by them.
    """
    parts = []
    for key, value in params.items():
        if value is None:
            continue
        if not isinstance(key, str) or not _KEY.fullmatch(key):
            raise ValueError(
                f"infotext key {key!r} is not readable back: use letters, digits, '_', spaces, '-' and '/' "
                "(at least 2 characters, no leading or trailing space)"
            )
        text = _value_text(key, value)
        parts.append(key if text == key else f"{key}: {_quote(text)}")
    line = ", ".join(parts)
    if len(_pairs(line)) < 3:
        raise ValueError(
            f"infotext needs at least 3 'Key: value' parameters to be recognised by readers, got: {line!r}"
        )
    negative = f"\n{_NEGATIVE} {negative_prompt}" if negative_prompt else ""
    return f"{prompt}{negative}\n{line}".strip()


def _pairs(line: str) -> list[tuple[str, str]]:
    """``_PAIR.findall(line)`` in time linear in the line's length."""
    found: list[tuple[str, str]] = []
    pos = 0
    while pos < len(line):
        m = _PAIR.match(line, pos)
        if m:
            found.append((m.group(1), m.group(2)))
            pos = m.end()
        else:
            pos = max(_SKIP.match(line, pos).end(), pos + 1)
    return found


def parse_infotext(text: str) -> dict[str, Any]:
    """Read an A1111 ``parameters`` text (the inverse of :func:`format_infotext`).

    Returns ``{"prompt": str, "negative_prompt": str, "params": {label: value}, "width": int | None,
    "height": int | None}``: ``params`` keeps every pair of the last line in order, values as strings with
    JSON quoting removed; ``width``/``height`` come from ``Size: WxH``. As in A1111's reader, the last line
    is the parameters line only if it holds at least 3 pairs (otherwise it is part of the prompt), lines are
    stripped, and lines from the first one starting with "Negative prompt:" on form the negative prompt.
    """
    *lines, last = text.strip().split("\n")
    if len(_pairs(last)) < 3:
        lines.append(last)
        last = ""

    prompt_lines: list[str] = []
    negative_lines: list[str] = []
    in_negative = False
    for line in lines:
        line = line.strip()
        if line.startswith(_NEGATIVE):
            in_negative = True
            line = line[len(_NEGATIVE) :].strip()
        (negative_lines if in_negative else prompt_lines).append(line)

    params: dict[str, str] = {}
    for key, value in _pairs(last):
        params[key] = _unquote(value)

    width = height = None
    size = _SIZE.match(params.get("Size", ""))
    if size:
        width, height = int(size.group(1)), int(size.group(2))
    return {
        "prompt": "\n".join(prompt_lines),
        "negative_prompt": "\n".join(negative_lines),
        "params": params,
        "width": width,
        "height": height,
    }


def to_a1111_fields(parsed: dict[str, Any]) -> dict[str, str]:
    """The flat dictionary A1111's ``parse_generation_parameters`` returns (without its UI defaults):
    ``Prompt``, ``Negative prompt``, every label, and any ``WxH`` value split into ``<label>-1``/``-2``."""
    out = {"Prompt": parsed["prompt"], "Negative prompt": parsed["negative_prompt"]}
    for key, value in parsed["params"].items():
        m = _SIZE.match(value)
        if m:
            out[f"{key}-1"], out[f"{key}-2"] = m.group(1), m.group(2)
        else:
            out[key] = value
    return out


# ------------------------------------------------------------------------------------------------------ PNG


def write_png(path: str | os.PathLike, image: Image.Image, *, parameters: str, record: dict[str, Any]) -> Path:
    """Save ``image`` as a PNG with a ``parameters`` text chunk and an ``estable`` JSON chunk.

    ``parameters`` goes into a tEXt chunk (iTXt, UTF-8, when it is not Latin-1), ``record`` into a
    compressed iTXt chunk as JSON. The file is written next to its destination and renamed into place,
    so a reader never sees half a file. Returns the path.
    """
    path = Path(path)
    try:
        payload = json.dumps(record, ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise ValueError(f"the metadata record must be JSON-serialisable: {e}") from e
    info = PngImagePlugin.PngInfo()
    info.add_text(PARAMETERS_KEY, parameters)  # Pillow falls back to iTXt for non-Latin-1 text
    info.add_itxt(ESTABLE_KEY, payload, zip=True)

    directory = path.parent if str(path.parent) else Path(".")
    if not directory.is_dir():
        raise EstableError(f"cannot write {path}: folder {directory} does not exist")
    # A fresh name beside the destination (same file system, so the rename is atomic); open() rather than
    # mkstemp() so that the file gets the usual permissions (mkstemp makes it private to the owner).
    # The destination's name is cut short in it, so that a name near the file system's limit still fits.
    tmp = directory / f".{path.name[:32]}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    try:
        with open(tmp, "xb") as f:
            image.save(f, format="PNG", pnginfo=info)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def read_png_metadata(path: str | os.PathLike) -> tuple[str | None, dict[str, Any] | None]:
    """Read ``(parameters text, estable record)`` from a PNG; either is ``None`` when absent.

    Raises :class:`EstableError` for a missing file, a file that is not a PNG, or a corrupt record.
    """
    path = Path(path)
    if not path.is_file():
        raise EstableError(f"{path} is a folder, not a PNG" if path.is_dir() else f"no such file: {path}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                if im.format != "PNG":
                    raise EstableError(f"{path} is not a PNG image (it is {im.format}); generation metadata "
                                       "is only stored in PNG files")
                text = dict(im.text)  # type: ignore[attr-defined]  # tEXt, zTXt and iTXt chunks
    except (UnidentifiedImageError, SyntaxError, OSError, ValueError,  # ValueError: oversized text chunk
            Image.DecompressionBombError, Image.DecompressionBombWarning) as e:  # a header claiming ~1e8+ pixels
        raise EstableError(f"{path} is not a readable PNG image: {e}") from e

    parameters = text.get(PARAMETERS_KEY)
    record = None
    raw = text.get(ESTABLE_KEY)
    if raw is not None:
        try:
            record = json.loads(raw)
        except json.JSONDecodeError as e:
            raise EstableError(f"{path}: the '{ESTABLE_KEY}' metadata chunk is not valid JSON ({e})") from e
        if not isinstance(record, dict):
            raise EstableError(f"{path}: the '{ESTABLE_KEY}' metadata chunk is not a JSON object")
    return (str(parameters) if parameters is not None else None), record
