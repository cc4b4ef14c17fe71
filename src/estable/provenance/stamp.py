"""The provenance hook of a generation: marks in, records completed, signature on.

    settings = WatermarkSettings(dwtdct=True, key=None, tree_ring=False)
    prepare(pipe, settings, "txt2img")       # before generating: the Tree-Ring key goes into the initial noise
    result = pipe.txt2img(params)
    result = stamp(result, pipe, settings)   # after: pixel watermark, hash, device class, watermark settings, signature

The CLI and the server both call these two functions, so an image gets the same marks and the same record
whichever door it left by.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

from estable.errors import EstableError

from .records import device_class, pixel_sha256, sign_record
from .watermark import METHOD, WatermarkSettings, mark_image, message_bytes

if TYPE_CHECKING:
    from estable.pipeline import GenerationResult, Pipeline

__all__ = ["prepare", "settings_from_record", "stamp"]


def prepare(pipe: Pipeline, settings: WatermarkSettings, mode: str) -> None:
    """Set (or clear) the pipeline's initial-noise hook for ``settings`` before a generation in ``mode``."""
    if settings.tree_ring and mode != "txt2img":
        raise EstableError("--tree-ring marks text-to-image generations only (img2img and inpainting start from "
                           "an image, not from the noise the key is written into)")
    if settings.tree_ring:
        from .treering import inject

        pipe.noise_hook = inject
    else:
        pipe.noise_hook = None


def stamp(result: GenerationResult, pipe: Pipeline, settings: WatermarkSettings, *, signing_key: Any = None,
          message: bytes | None = None) -> GenerationResult:
    """``result`` with the pixel watermark written (when on) and each record completed with ``watermark``,
    ``device`` and ``pixels``, then signed when ``signing_key`` (an Ed25519 private key) is given.

    ``message`` overrides the 8 watermark bytes (to re-make an image from its record, which holds the bytes but
    not the key)."""
    wm = settings.record()
    msg = message if message is not None else message_bytes(settings.key)
    images, records = [], []
    device = device_class(pipe.device, pipe.dtype)
    for image, record in zip(result.images, result.records):
        entry = {**wm}
        if settings.dwtdct:
            image, note = mark_image(image, message=msg)
            entry["dwtdct"] = {**wm["dwtdct"], "message": msg.hex(), "applied": note is None}
            if note:
                entry["dwtdct"]["note"] = note
        rec = {**record, "watermark": entry, "device": device,
               "pixels": {"sha256": pixel_sha256(image), "format": "RGB8"}}
        if signing_key is not None:
            rec = sign_record(rec, signing_key)
        images.append(image)
        records.append(rec)
    return dataclasses.replace(result, images=images, records=records)


def settings_from_record(record: dict[str, Any]) -> tuple[WatermarkSettings, bytes | None]:
    """The watermark settings an image was made with, and its watermark bytes, from its Estable record.
    Records older than the watermark (no ``watermark`` entry) mean no marks."""
    wm = record.get("watermark")
    if not isinstance(wm, dict):
        return WatermarkSettings(dwtdct=False, tree_ring=False), None
    dwt = wm.get("dwtdct")
    tree = wm.get("tree_ring")
    message = None
    if isinstance(dwt, dict) and dwt.get("enabled"):
        if dwt.get("method") != METHOD:
            raise EstableError(f"the record names an unknown watermark method {dwt.get('method')!r}")
        try:
            message = bytes.fromhex(str(dwt.get("message")))
        except ValueError:
            raise EstableError("the record's watermark message is not hex") from None
    on = bool(isinstance(dwt, dict) and dwt.get("enabled"))
    return WatermarkSettings(dwtdct=on, tree_ring=bool(isinstance(tree, dict) and tree.get("enabled"))), message
