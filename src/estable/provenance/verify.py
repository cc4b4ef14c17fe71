"""Checking an image: its watermarks, its record (pixel hash, signature) and, on request, its reproduction.

:func:`check_image` runs every detector on one file and returns a report (a dict, printed by
``estable verify``); :func:`reproduce` makes the image again from its record and compares the pixels.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from estable.errors import EstableError

from .infotext import read_png_metadata
from .records import pixel_sha256, verify_signature
from .watermark import detect_dwtdct

if TYPE_CHECKING:
    from estable.pipeline import Pipeline

__all__ = ["check_image", "compare_pixels", "open_image", "reproduce"]


def open_image(path: str | Path) -> tuple[Image.Image, dict[str, Any] | None]:
    """The image (RGB) and its Estable record (None when the file has none, e.g. a JPEG)."""
    p = Path(path)
    if not p.is_file():
        raise EstableError(f"{p} is a folder, not an image" if p.is_dir() else f"no such file: {p}")
    try:
        with Image.open(p) as im:
            fmt = im.format
            image = im.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError,  # ValueError: an oversized text chunk
            Image.DecompressionBombError) as exc:
        raise EstableError(f"cannot read image {p}: {exc}") from None
    record = read_png_metadata(p)[1] if fmt == "PNG" else None
    return image, record


def check_record(image: Image.Image, record: dict[str, Any] | None) -> dict[str, Any]:
    """What the record says about these pixels: hash match and signature."""
    if record is None:
        return {"present": False}
    out: dict[str, Any] = {"present": True}
    want = (record.get("pixels") or {}).get("sha256")
    out["pixels"] = "no hash" if not want else ("match" if want == pixel_sha256(image) else "edited")
    ok, detail = verify_signature(record)
    out["signature"] = {None: "unsigned", True: "valid", False: "invalid"}[ok]
    out["signature_detail"] = detail
    return out


def check_image(path: str | Path, *, key: str | None = None,
                pipe: Callable[[], Pipeline] | None = None, steps: int = 50) -> dict[str, Any]:
    """Run the detectors on one image file. ``pipe`` (a function returning the Pipeline to invert with, called
    only when needed) enables the Tree-Ring test; None skips it. ``found`` is True when any Estable mark is found."""
    image, record = open_image(path)
    report: dict[str, Any] = {"path": str(path), "size": list(image.size)}
    dwt = detect_dwtdct(image, key=key)
    report["dwtdct"] = dwt.to_dict()
    found = dwt.found
    if pipe is not None:
        from .treering import detect

        try:
            ring = detect(pipe(), image, steps=steps)
            report["tree_ring"] = ring.to_dict()
            found = found or ring.found
        except ValueError as exc:
            report["tree_ring"] = {"found": False, "note": str(exc)}
    from .detector import DEFAULT_WEIGHTS, load_detector

    if DEFAULT_WEIGHTS.is_file():  # informative only: it does not enter ``found``
        try:
            report["residue_detector"] = {"p_generated": load_detector(DEFAULT_WEIGHTS).probability([image])[0]}
        except EstableError as exc:  # an image too small for it
            report["residue_detector"] = {"p_generated": None, "note": str(exc)}
    report["record"] = check_record(image, record)
    report["found"] = found
    return report


def compare_pixels(a: Image.Image, b: Image.Image) -> dict[str, Any]:
    """Bit-exactness and the size of the difference between two images of the same size."""
    if a.size != b.size:
        return {"bit_exact": False, "note": f"sizes differ: {a.size} vs {b.size}"}
    x = np.asarray(a.convert("RGB"), dtype=np.int16)
    y = np.asarray(b.convert("RGB"), dtype=np.int16)
    d = np.abs(x - y)
    mse = float((d.astype(np.float64) ** 2).mean())
    return {
        "bit_exact": bool(d.max() == 0),
        "max_abs_diff": int(d.max()),
        "mean_abs_diff": float(d.mean()),
        "pixels_differing": float((d.max(axis=-1) > 0).mean()),
        "psnr_db": float("inf") if mse == 0 else float(10 * np.log10(255.0**2 / mse)),
    }


def reproduce(path: str | Path, load: Callable[[dict[str, Any]], Pipeline]) -> dict[str, Any]:
    """Make the image at ``path`` again from its record with the pipeline ``load(record)`` returns, and compare.

    The report holds: the comparison with the file's pixels (``file``), with the record's hash (``record_hash``:
    does the regenerated image have the pixels the record vouches for), the record check (hash of the file,
    signature) and the model and device classes of both runs."""
    from estable.pipeline import params_from_record

    from .records import device_class
    from .stamp import prepare, settings_from_record, stamp

    image, record = open_image(path)
    if record is None:
        raise EstableError(f"{path} has no Estable record: there is nothing to reproduce it from")
    mode = record.get("mode", "txt2img")
    if mode != "txt2img":
        raise EstableError(f"{path} was made by {mode}, whose input image is not stored in the record; only "
                           "text-to-image generations can be reproduced from the record alone")
    extras = [what for what, key in (("LoRAs", "loras"), ("a separate VAE", "vae"),
                                      ("textual-inversion embeddings", "embeddings"), ("ControlNet", "control"))
              if record.get(key)]
    if extras:  # re-made without them the image would differ, or, with a forged entry, match for the wrong reason
        raise EstableError(f"{path} was made with {' and '.join(extras)} (its record says so); --reproduce re-makes "
                           "an image from its model alone and does not apply them")
    params = params_from_record(record)
    settings, message = settings_from_record(record)
    pipe = load(record)
    prepare(pipe, settings, "txt2img")
    try:
        result = pipe.txt2img(params)
    finally:
        pipe.noise_hook = None
    result = stamp(result, pipe, settings, message=message)
    again = result.images[0]
    want = (record.get("pixels") or {}).get("sha256")
    recorded_model = (record.get("model") or {}).get("sha256")
    return {
        "path": str(path),
        "file": compare_pixels(image, again),
        "record_hash": None if not want else want == pixel_sha256(again),
        "record": check_record(image, record),
        "model": {"used": pipe.model_name, "sha256_matches": None if not recorded_model or not pipe.model_sha256
                  else recorded_model == pipe.model_sha256},
        "device": {"recorded": record.get("device"), "now": device_class(pipe.device, pipe.dtype)},
    }
