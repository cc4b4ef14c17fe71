"""Making an image again from its Estable record (``--from-png``): which model, and is it still the same one.

A record's ``model`` object names the file the image was made with (``source``) and its SHA-256. Both come from a
file anyone can edit, so they are type-checked here; and because a path can hold another model today than when
the image was made, :func:`check_same_model` compares the hashes before reproducing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import EstableError

__all__ = ["check_same_model", "record_model", "record_model_source"]


def record_model(record: dict[str, Any]) -> dict[str, Any]:
    """The record's ``model`` object ({} when absent), type-checked."""
    model = record.get("model")
    if model is None:
        return {}
    if not isinstance(model, dict):
        raise EstableError(f"the Estable record's 'model' must be an object, not {model!r}")
    for key in ("source", "sha256", "name"):
        value = model.get(key)
        if value is not None and not isinstance(value, str):
            raise EstableError(f"the Estable record's model.{key} must be text, not {value!r}")
    return model


def record_model_source(record: dict[str, Any]) -> str | None:
    """The model file or folder the record names, or None when it names none. EstableError when it names one that
    is not there."""
    src = record_model(record).get("source")
    if not src:
        return None
    if not Path(src).exists():
        raise EstableError(f"the PNG was made with the model {src}, which is not there; pass --model")
    return src


def check_same_model(record: dict[str, Any], sha256: str | None, *, allow_change: bool = False) -> str | None:
    """Compare the record's model hash with ``sha256``, the hash of the model now loaded from the same path.

    Different hashes: an EstableError, or with ``allow_change`` a warning text (returned). None when they match
    or either hash is unknown."""
    recorded = record_model(record).get("sha256")
    if not recorded or not sha256 or recorded.lower() == sha256.lower():
        return None
    src = record_model(record).get("source", "the recorded path")
    text = (f"the model at {src} has changed since the image was made (SHA-256 {sha256[:10]}, the image records "
            f"{recorded[:10]}), so the result will differ")
    if not allow_change:
        raise EstableError(f"{text}; pass --allow-model-change to go on with the model as it is now")
    return text
