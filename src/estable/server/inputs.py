"""What a request may carry, checked before a job is made: images (base64, header checked before decoding), bounds
on size, steps, batch and prompt length, and the sampler. Both APIs (A1111's and Estable's) build their
:class:`~estable.params.GenerationParams` here, so they accept and refuse exactly the same things.

Errors carry the HTTP status they map to: :class:`FieldError` (422, the message names the field; an unknown
sampler here too — A1111's routes answer one with their own 400 "Sampler not found" before this) and
:class:`BadRequest` (400: an image that is not one, a URL, an unknown model).
"""

from __future__ import annotations

import base64
import binascii
import io
import re
import typing
import warnings
from typing import Any

from PIL import Image, UnidentifiedImageError
from pydantic import BaseModel, ConfigDict, model_validator

from ..errors import EstableError
from ..params import GenerationParams
from .settings import Limits

__all__ = ["BadRequest", "FieldError", "RequestModel", "build_params", "check_image_side", "check_job_size",
           "check_json", "decode_image", "fit_mask"]

_DATA_URL = re.compile(r"^data:[\w/+.-]*;base64,", re.IGNORECASE)
_URL = re.compile(r"^\s*[a-z][a-z0-9+.-]*://", re.IGNORECASE)
IMAGE_FORMATS = ("PNG", "JPEG", "MPO", "WEBP")  # MPO: a JPEG with more frames after it (phone cameras); the first
MAX_JSON_DEPTH = 64  # arrays and objects in a request body, one in another (the response echoing it fails past ~250)


class BadRequest(EstableError):
    status = 400


class FieldError(EstableError):
    status = 422

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field


def check_json(data: Any, field: str = "") -> None:
    """Every text of a parsed JSON body (keys too) can be written as UTF-8, and its arrays and objects are at most
    ``MAX_JSON_DEPTH`` deep; else a FieldError naming where. Python's JSON reader turns ``"\\ud800"`` into a lone
    surrogate, which no response, PNG or job record can hold: A1111's echo of the request, the job list and
    ``GET /sdapi/v1/options`` would answer 500 on it (the last two on every call after)."""
    stack = [(data, field, 0)]
    while stack:
        value, where, depth = stack.pop()
        if isinstance(value, str):
            _check_text(value, where or "body")
        elif isinstance(value, (dict, list)):
            if depth >= MAX_JSON_DEPTH:
                raise FieldError(where.split(".", 1)[0] or "body", f"is nested more than {MAX_JSON_DEPTH} levels deep")
            for key, item in value.items() if isinstance(value, dict) else enumerate(value):
                if isinstance(key, str):
                    _check_text(key, where or "body", "a key")
                stack.append((item, f"{where}.{key}" if where else str(key), depth + 1))


def _check_text(text: str, field: str, what: str = "") -> None:
    if text.isascii():
        return
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise FieldError(field, f"{what + ' ' if what else ''}is not valid text: a lone surrogate "
                         f"U+{ord(text[exc.start]):04X} at character {exc.start + 1} (half of a UTF-16 pair)") from None


class RequestModel(BaseModel):
    """The base of every request body: unknown fields ignored, text that is not UTF-8 and nesting past
    ``MAX_JSON_DEPTH`` refused (:func:`check_json`), and ``true``/``false`` refused where a number is meant (pydantic
    would read ``"steps": true`` as 1)."""

    model_config = ConfigDict(extra="ignore")

    @model_validator(mode="before")
    @classmethod
    def _check_body(cls, data: Any) -> Any:
        check_json(data)
        if isinstance(data, dict):
            for name, info in cls.model_fields.items():
                kinds = typing.get_args(info.annotation) or (info.annotation,)
                if isinstance(data.get(name), bool) and bool not in kinds and {int, float} & set(kinds):
                    raise FieldError(name, f"must be a number, not {str(data[name]).lower()}")
        return data


def decode_image(data: Any, field: str, limits: Limits, mode: str = "RGB") -> Image.Image:
    """A base64 PNG/JPEG/WebP (optionally a ``data:`` URL) as a PIL image in ``mode``.

    The pixel count is read from the image's header and checked against ``limits.max_image_pixels`` before a
    single pixel is decoded, so a small file that would expand to gigabytes (a decompression bomb) is refused
    cheaply. A URL is refused: the server never fetches anything a request points to.
    """
    if not isinstance(data, str) or not data.strip():
        raise FieldError(field, "must be a base64-encoded image")
    if _URL.match(data) and not _DATA_URL.match(data):
        raise BadRequest(f"{field}: URLs are never fetched; send the image itself, base64-encoded")
    text = _DATA_URL.sub("", data.strip(), count=1)
    try:
        raw = base64.b64decode(text, validate=False)
    except (binascii.Error, ValueError):
        raise BadRequest(f"{field} is not valid base64") from None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(raw))  # reads the header only
            if im.format not in IMAGE_FORMATS:
                raise BadRequest(f"{field} is a {im.format} image; send PNG, JPEG or WebP")
            w, h = im.size
            if w * h > limits.max_image_pixels:
                raise BadRequest(f"{field} is {w}x{h} = {w * h} pixels; at most {limits.max_image_pixels} are "
                                 "accepted")
            im.load()
            return im.convert(mode)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise BadRequest(f"{field} declares more pixels than any accepted image (a decompression bomb?)") from None
    except UnidentifiedImageError:
        raise BadRequest(f"{field} is not a PNG, JPEG or WebP image") from None
    except (OSError, SyntaxError, ValueError) as exc:  # a damaged file; PIL's message names no object or path
        raise BadRequest(f"{field} is not a readable PNG, JPEG or WebP image ({exc})") from None


def check_image_side(image: Image.Image, field: str, limits: Limits) -> None:
    """An input image whose size becomes the generation size (no width/height asked for) must fit the limits."""
    if image.width > limits.max_width or image.height > limits.max_height:
        raise FieldError(field, f"is {image.width}x{image.height}; without width and height the image's size is "
                         f"used, and the largest allowed is {limits.max_width}x{limits.max_height}")


def fit_mask(mask: Image.Image, image: Image.Image, invert: bool = False) -> Image.Image:
    """The mask at the image's size (nearest neighbour, as A1111 resizes masks), inverted if asked; a mask with
    nothing to repaint is a FieldError (422), as the CLI refuses it."""
    from ..images import check_mask_has_area

    if mask.size != image.size:
        mask = mask.resize(image.size, Image.Resampling.NEAREST)
    if invert:
        mask = mask.point(lambda v: 255 - v)
    try:
        check_mask_has_area(mask)
    except EstableError as exc:
        raise FieldError("mask", str(exc).removeprefix("the mask ")) from None
    return mask


def _int(field: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise FieldError(field, f"must be a whole number, not {value!r}")
    return value


def build_params(values: dict[str, Any], limits: Limits, names: dict[str, str] | None = None) -> GenerationParams:
    """GenerationParams from ``values`` (GenerationParams field → value; absent or None = the default), checked
    against ``limits``. ``names`` maps a GenerationParams field to the request's name for it (A1111's ``n_iter``
    for batch_count), so every message names the field the client sent. The sampler is checked too."""
    names = names or {}

    def name(key: str) -> str:
        return names.get(key, key)

    v = {k: val for k, val in values.items() if val is not None}
    for key in ("prompt", "negative_prompt"):
        if key in v:
            if not isinstance(v[key], str):
                raise FieldError(name(key), "must be text")
            if len(v[key]) > limits.max_prompt_length:
                raise FieldError(name(key), f"is {len(v[key])} characters long; at most {limits.max_prompt_length}")
    bounds = {"width": (8, limits.max_width), "height": (8, limits.max_height), "steps": (1, limits.max_steps),
              "batch_size": (1, limits.max_batch_size), "batch_count": (1, limits.max_batch_count),
              "hires_steps": (0, limits.max_steps)}
    for key, (lo, hi) in bounds.items():
        if key in v:
            v[key] = _int(name(key), v[key])
            if not lo <= v[key] <= hi:
                raise FieldError(name(key), f"must be between {lo} and {hi}, not {v[key]}")
    for key in ("seed", "clip_skip"):
        if key in v:
            v[key] = _int(name(key), v[key])
    for key in ("cfg_scale", "cfg_start", "strength", "eta"):
        if key in v and (isinstance(v[key], bool) or not isinstance(v[key], (int, float))):
            raise FieldError(name(key), f"must be a number, not {v[key]!r}")
    if "sampler" in v:
        from ..sampling.samplers import get_sampler

        try:
            v["sampler"] = get_sampler(str(v["sampler"])).name
        except ValueError as exc:
            raise FieldError(name("sampler"), str(exc)) from None
    try:
        params = GenerationParams(**v)
    except EstableError as exc:
        raise FieldError(_guess_field(str(exc), v, name), str(exc)) from None
    except TypeError as exc:
        raise FieldError("body", str(exc)) from None
    check_job_size(params, None, limits, names=names)
    return params


def check_job_size(params: GenerationParams, native: tuple[int, int] | None, limits: Limits,
                   image: Image.Image | None = None, names: dict[str, str] | None = None) -> None:
    """The size a job really draws — its width and height, else the input image's, else the model's ``native``
    size (None: not known yet, those sides are not checked), times the hires fix's scale — within the limits, and
    that size times the batch within ``limits.max_job_pixels`` (a FieldError naming the field to change)."""
    from ..params import hires_side

    names = names or {}
    scale = params.hires_scale if image is None else 1.0  # the hires fix is txt2img's
    sides = []
    for k, (key, limit) in enumerate((("width", limits.max_width), ("height", limits.max_height))):
        side = getattr(params, key)
        given = side is not None
        if side is None:
            side = image.size[k] if image is not None else native[k] if native is not None else None
        if side is None:
            return
        final = hires_side(side, scale) if scale > 1 else side
        if final > limit:
            if scale > 1:
                raise FieldError(names.get("hires_scale", "hires_scale"),
                                 f"{key} {side} × {scale:g} is {final}; at most {limit}")
            raise FieldError(names.get(key, key), f"{'is' if given else 'is not given, and the model draws'} "
                             f"{side}; at most {limit}")
        sides.append(final)
    pixels = sides[0] * sides[1] * params.batch_size
    if pixels > limits.max_job_pixels:
        raise FieldError(names.get("batch_size", "batch_size"),
                         f"{params.batch_size} image(s) of {sides[0]}x{sides[1]} are {pixels} pixels at once; at "
                         f"most {limits.max_job_pixels} (a smaller batch, or more batches)")


def _guess_field(message: str, values: dict[str, Any], name: Any) -> str:
    """The request field a GenerationParams message is about (its messages start with the field's words)."""
    low = message.lower()
    for key in ("hires_scale", "hires_strength", "hires_steps", "hires_upscaler", "negative_prompt", "prompt", "width",
                "height", "steps", "cfg_scale", "cfg_start", "batch_size", "strength", "eta", "clip_skip", "seed"):
        if low.startswith(key.replace("_", " ")) or low.startswith(key):
            return name(key)
    return "body"
