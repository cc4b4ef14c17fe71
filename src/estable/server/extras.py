"""Models from the wild in the server: LoRAs (``--lora-dir``, A1111's ``<lora:name:w>`` prompt tags), textual
inversion (``--embeddings-dir``, names in prompts) and ControlNet (``--controlnet-dir``, the units of A1111's
ControlNet extension or Estable's ``control`` list), with the discovery routes clients call.

Thin wiring over the library: tags are resolved by :func:`estable.extra_networks.resolve_prompt_loras` (the pipeline
applies them), embeddings by :class:`estable.embeddings.EmbeddingLibrary`, ControlNet units are
:class:`estable.control.units.ControlSpec` turned into units by :func:`~estable.control.units.load_control_units`,
exactly as ``estable generate`` does. Every name a request gives is looked up in its folder and nowhere else.

A1111's ControlNet extension (sd-webui-controlnet) sends ``"alwayson_scripts": {"controlnet": {"args": [unit, …]}}``
with each unit ``{"enabled", "image" | "input_image" (base64, or {"image", "mask"}), "module", "model", "weight",
"guidance_start", "guidance_end", "control_mode", "threshold_a", "threshold_b", …}``. Mapped: ``module`` → how the
control image is made (``none``, ``canny`` with threshold_a/threshold_b as its low/high thresholds, ``scribble``,
``invert`` = Estable's ``lines``, and Estable's ``lines``/``seg``); ``model`` → a ControlNet of the folder by name
(a trailing `` [hash]`` is ignored); ``weight``, ``guidance_start``/``guidance_end``; ``control_mode`` 0 "Balanced"
or 2 "ControlNet is more important" (run as guess mode). Ignored: ``resize_mode`` (the control image is resized to
the generation size), ``processor_res``, ``pixel_perfect``, ``low_vram``, a unit's mask. Without an image an
img2img unit uses the init image, as the extension does. Anything else Estable cannot do is a 422 naming the field.
``POST /controlnet/detect`` makes the control images themselves (the extension's preprocessor preview), with the
same modules and thresholds.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import math
import threading
import weakref
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request
from PIL import Image

from ..errors import EstableError
from .inputs import FieldError, RequestModel, decode_image
from .settings import Limits, ServerSettings
from .worker import png_bytes

log = logging.getLogger("estable.server")

__all__ = ["ControlRequest", "DetectRequest", "Networks", "a1111_control", "detect", "router", "v1_control"]

router = APIRouter(tags=["Extras"])

# A1111 ControlNet extension module → Estable's control-image type (estable.control.preprocess.CONTROL_TYPES)
MODULES = {"none": "none", "canny": "canny", "scribble": "scribble", "invert": "lines", "lines": "lines", "seg": "seg",
           "invert (from white bg & black line)": "lines"}
CONTROL_MODES = {0: False, 2: True, "balanced": False, "controlnet is more important": True}
MAX_UNITS = 4
MAX_DETECT_IMAGES = 8
MAX_PROMPT_LORAS = 16  # distinct <lora:…> names in one prompt (each is looked up in the folder)


class Networks:
    """The server's LoRA, embedding and ControlNet folders; the worker attaches them to its pipeline per job."""

    def __init__(self, settings: ServerSettings) -> None:
        self.lora_dir = Path(settings.lora_dir) if settings.lora_dir is not None else None
        self.embeddings_dir = Path(settings.embeddings_dir) if settings.embeddings_dir is not None else None
        self.controlnet_dir = Path(settings.controlnet_dir) if settings.controlnet_dir is not None else None
        self.allow_pickle = settings.allow_pickle
        self.builtin_controlnet = settings.model == "default"  # the built-in model's ControlNet, listed as "default"
        self._lock = threading.Lock()
        self.embeddings = self._library()
        self._controlnets: dict[str, Path] = {}
        self.refresh_controlnets()
        self._cache: Any = None
        self._cache_pipe: Any = None

    # -- the pipeline ----------------------------------------------------------------------------------------
    def attach(self, pipe: Any) -> None:
        """Give ``pipe`` the LoRA folder and the embeddings (the worker calls this before every job)."""
        pipe.lora_dir = self.lora_dir
        pipe.embeddings = self.embeddings

    def units(self, specs: list[Any], pipe: Any) -> list[Any]:
        """The ControlNet units of ``specs`` for ``pipe``; loaded ControlNets are kept while the pipeline stays."""
        from ..control.units import ControlNetCache, load_control_units

        if self._cache is None or self._cache_pipe is None or self._cache_pipe() is not pipe:
            self._cache, self._cache_pipe = ControlNetCache(), weakref.ref(pipe)
        return load_control_units(specs, pipe, allow_pickle=self.allow_pickle, cache=self._cache)

    # -- LoRA ------------------------------------------------------------------------------------------------
    def check_prompt(self, prompt: str, field: str = "prompt") -> None:
        """Every ``<lora:…>`` tag of ``prompt`` names a LoRA of the folder (else a 422 naming the field)."""
        from ..extra_networks import parse_prompt_networks, resolve_prompt_loras

        try:
            names = {tag.name for tag in parse_prompt_networks(prompt)[1]}
            if len(names) > MAX_PROMPT_LORAS:
                raise FieldError(field, f"names {len(names)} LoRAs; at most {MAX_PROMPT_LORAS}")
            resolve_prompt_loras(prompt, self.lora_dir)
        except FieldError:
            raise
        except EstableError as exc:
            message = str(exc).replace("(--lora-dir DIR)", "(estable serve --lora-dir DIR)")
            if self.lora_dir is not None:  # the client needs the name, not where the server keeps its files
                message = message.replace(str(self.lora_dir.expanduser()), "the LoRA folder")
            raise FieldError(field, message) from None

    def loras(self) -> list[dict[str, Any]]:
        """A1111's ``/sdapi/v1/loras``: ``[{"name", "alias", "path", "metadata"}]``."""
        from ..checkpoints.io import read_safetensors_header
        from ..extra_networks import list_loras, lora_alias

        if self.lora_dir is None:
            return []
        out = []
        for p in list_loras(self.lora_dir):
            try:
                metadata: dict[str, Any] = dict(read_safetensors_header(p)[1])
            except EstableError:
                continue  # not a readable safetensors file: not a LoRA a tag could use
            out.append({"name": p.stem, "alias": lora_alias(p) or p.stem, "path": str(p), "metadata": metadata})
        return out

    # -- textual inversion -----------------------------------------------------------------------------------
    def _library(self) -> Any:
        if self.embeddings_dir is None:
            return None
        from ..embeddings import EmbeddingLibrary

        library = EmbeddingLibrary(self.embeddings_dir, allow_pickle=self.allow_pickle)
        for note in library.shadowed_notes():
            log.warning(note)
        return library

    def refresh_embeddings(self) -> None:
        self.embeddings = self._library()

    def embeddings_view(self, width: int | None) -> dict[str, Any]:
        """A1111's ``/sdapi/v1/embeddings``: those that fit the loaded text encoder (``width``) under ``loaded``,
        the others under ``skipped``. Files that cannot be read (e.g. ``.pt`` without --allow-pickle) are left out."""
        out: dict[str, Any] = {"loaded": {}, "skipped": {}}
        library = self.embeddings
        if library is None:
            return out
        with self._lock:
            found, _ = library.load_all()
        for e in found:
            entry = {"step": e.step, "sd_checkpoint": e.checkpoint, "sd_checkpoint_name": e.checkpoint_name,
                     "shape": e.width, "vectors": int(e.vectors.shape[0])}
            out["loaded" if width is None or e.width == width else "skipped"][e.name] = entry
        return out

    # -- ControlNet ------------------------------------------------------------------------------------------
    def refresh_controlnets(self) -> list[str]:
        from ..checkpoints.controlnet_format import is_controlnet
        from ..control.units import BUILTIN_CONTROLNET

        found: dict[str, Path] = {"default": BUILTIN_CONTROLNET} if self.builtin_controlnet else {}
        if self.controlnet_dir is not None and self.controlnet_dir.is_dir():
            for p in sorted(self.controlnet_dir.rglob("*")):
                if p.name.startswith(".") or not is_controlnet(p):
                    continue
                found.setdefault(p.name if p.is_dir() else p.stem, p)
        with self._lock:
            self._controlnets = found
        return sorted(found)

    def controlnet_names(self) -> list[str]:
        with self._lock:
            return sorted(self._controlnets)

    def controlnet(self, name: Any, field: str) -> Path:
        """The ControlNet file called ``name`` (A1111's ``"name [hash]"`` too); a 422 naming ``field`` otherwise."""
        if self.controlnet_dir is None and not self.builtin_controlnet:
            raise FieldError(field, "this server has no ControlNets (start it with --controlnet-dir DIR)")
        if not isinstance(name, str) or not name.strip() or name.strip().lower() == "none":
            raise FieldError(field, "names no ControlNet model")
        text = name.strip()
        if text.endswith("]") and " [" in text:
            text = text[: text.rindex(" [")]
        with self._lock:
            nets = dict(self._controlnets)
        if text not in nets:
            lower = {k.lower(): v for k, v in nets.items()}
            if text.lower() in lower:
                return lower[text.lower()]
            names = ", ".join(sorted(nets)) or "none"
            raise FieldError(field, f"unknown ControlNet model {name!r}; available: {names}")
        return nets[text]


# ------------------------------------------------------------------------------------------- request parsing


class ControlRequest(RequestModel):
    """One ControlNet unit of ``POST /v1/jobs``'s ``control`` list."""


    type: str = "none"
    image: str | None = None
    model: str = ""
    scale: float = 1.0
    start: float = 0.0
    end: float = 1.0
    guess_mode: bool = False


def _spec(networks: Networks, field: str, kind: str, image: Image.Image, model: Any, scale: Any, start: Any,
          end: Any, guess_mode: bool, options: dict[str, float]) -> Any:
    from ..control.units import ControlSpec

    for name, value in (("weight" if field.startswith("alwayson") else "scale", scale), ("start", start),
                        ("end", end)):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise FieldError(f"{field}.{name}", f"must be a number, not {value!r}")
    if not 0.0 <= float(scale) <= 10.0:
        raise FieldError(field, f"the weight must be between 0 and 10, not {scale}")
    if not 0.0 <= float(start) < float(end) <= 1.0:
        raise FieldError(field, f"start and end must satisfy 0 ≤ start < end ≤ 1, not {start}, {end}")
    path = networks.controlnet(model, f"{field}.model")
    return ControlSpec(kind, image, float(scale), path, float(start), float(end), bool(guess_mode), options)


def v1_control(networks: Networks, units: list[ControlRequest] | None, init_image: Image.Image | None,
               limits: Limits) -> list[Any]:
    """The ControlSpecs of ``POST /v1/jobs``'s ``control`` list."""
    from ..control.preprocess import CONTROL_TYPES

    units = units or []
    if len(units) > MAX_UNITS:
        raise FieldError("control", f"at most {MAX_UNITS} ControlNet units, not {len(units)}")
    out = []
    for k, u in enumerate(units):
        field = f"control.{k}"
        if u.type not in CONTROL_TYPES:
            raise FieldError(f"{field}.type", f"unknown control type {u.type!r}; one of {', '.join(CONTROL_TYPES)}")
        image = decode_image(u.image, f"{field}.image", limits) if u.image else init_image
        if image is None:
            raise FieldError(f"{field}.image", "a ControlNet unit needs an image (base64 PNG or JPEG)")
        out.append(_spec(networks, field, u.type, image, u.model, u.scale, u.start, u.end, u.guess_mode, {}))
    return out


def a1111_control(networks: Networks, scripts: dict[str, Any], init_image: Image.Image | None,
                  limits: Limits) -> list[Any]:
    """The ControlSpecs of A1111's ``alwayson_scripts.controlnet.args`` (the sd-webui-controlnet extension)."""
    entry = next((v for k, v in (scripts or {}).items() if str(k).lower() == "controlnet"), None)
    if entry is None:
        return []
    base = "alwayson_scripts.controlnet.args"
    args = entry.get("args") if isinstance(entry, dict) else None
    if not isinstance(args, list):
        raise FieldError(base, "must be a list of ControlNet units")
    out = []
    for k, unit in enumerate(args):
        field = f"{base}.{k}"
        if not isinstance(unit, dict):
            raise FieldError(field, "must be an object (a ControlNet unit)")
        if not unit.get("enabled", True):
            continue
        module = str(unit.get("module") or "none").strip().lower()
        if module not in MODULES:
            raise FieldError(f"{field}.module", f"module {unit.get('module')!r} is not supported; Estable makes "
                             "none, canny, scribble, invert (= lines), lines, seg")
        kind = MODULES[module]
        mode = unit.get("control_mode", 0)
        mode = mode.strip().lower() if isinstance(mode, str) else mode
        if isinstance(mode, bool) or not isinstance(mode, (int, float, str)) or mode not in CONTROL_MODES:
            raise FieldError(f"{field}.control_mode", f"{unit.get('control_mode')!r} is not supported; Estable runs "
                             "0 (Balanced) and 2 (ControlNet is more important, as guess mode)")
        raw = unit.get("image", unit.get("input_image"))
        if isinstance(raw, dict):
            raw = raw.get("image")
        image = decode_image(raw, f"{field}.image", limits) if raw else init_image
        if image is None:
            raise FieldError(f"{field}.image", "a ControlNet unit needs an image (base64) in txt2img")
        options = _canny_options(unit.get("threshold_a"), unit.get("threshold_b"), field) if kind == "canny" else {}
        end = unit.get("guidance_end", unit.get("guidance", 1.0))
        out.append(_spec(networks, field, kind, image, unit.get("model"), unit.get("weight", 1.0),
                         unit.get("guidance_start", 0.0), end, CONTROL_MODES[mode], options))
    if len(out) > MAX_UNITS:
        raise FieldError(base, f"at most {MAX_UNITS} enabled ControlNet units, not {len(out)}")
    return out


def _canny_options(low: Any, high: Any, field: str) -> dict[str, float]:
    """Canny's thresholds from A1111's threshold_a / threshold_b (absent, not a number or ≤ 0: the default); a
    value that is not finite, or low above high, is a 422."""
    options: dict[str, float] = {}
    for value, opt in ((low, "low"), (high, "high")):
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0:
            if not math.isfinite(value):
                raise FieldError(field, f"the Canny threshold {value} is not a finite number")
            options[opt] = float(value)
    if options.get("low", 100.0) > options.get("high", 200.0):
        raise FieldError(field, f"the Canny thresholds must have low ≤ high, not {options.get('low', 100.0):g} > "
                         f"{options.get('high', 200.0):g}")
    return options


class DetectRequest(RequestModel):
    """``POST /controlnet/detect`` of the ControlNet extension: control images made from input images."""


    controlnet_module: str = "none"
    controlnet_input_images: list[str] = []
    controlnet_processor_res: int = 512
    controlnet_threshold_a: float | None = None
    controlnet_threshold_b: float | None = None


def detect(req: DetectRequest, limits: Limits) -> list[Image.Image]:
    """The control images of ``req`` (the extension's preprocessor preview): each input image resized so that its
    shorter side is ``controlnet_processor_res`` (as the extension does), then made into ``controlnet_module``'s
    control image; for canny, threshold_a and threshold_b are the low and high thresholds."""
    from ..control.preprocess import make_control_image

    module = req.controlnet_module.strip().lower()
    if module not in MODULES:
        raise FieldError("controlnet_module", f"module {req.controlnet_module!r} is not supported; Estable makes "
                         "none, canny, scribble, invert (= lines), lines, seg")
    if not req.controlnet_input_images:
        raise FieldError("controlnet_input_images", "give at least one base64-encoded image")
    if len(req.controlnet_input_images) > MAX_DETECT_IMAGES:
        raise FieldError("controlnet_input_images", f"at most {MAX_DETECT_IMAGES} images, not "
                         f"{len(req.controlnet_input_images)}")
    res, longest = req.controlnet_processor_res, max(limits.max_width, limits.max_height)
    if not 64 <= res <= longest:
        raise FieldError("controlnet_processor_res", f"must be between 64 and {longest}, not {res}")
    options: dict[str, float] = {}
    if MODULES[module] == "canny":
        options = _canny_options(req.controlnet_threshold_a, req.controlnet_threshold_b, "controlnet_threshold_a")
    out = []
    for k, data in enumerate(req.controlnet_input_images):
        image = decode_image(data, f"controlnet_input_images.{k}", limits)
        scale = res / min(image.size)
        size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
        if size[0] * size[1] > limits.max_image_pixels:
            raise FieldError(f"controlnet_input_images.{k}", f"at processor_res {res} it would be {size[0]}x{size[1]}, "
                             f"over the {limits.max_image_pixels} pixels allowed")
        if size != image.size:
            image = image.resize(size, Image.Resampling.LANCZOS)
        out.append(make_control_image(MODULES[module], image, **options))
    return out


# ------------------------------------------------------------------------------------------------- routes


def _networks(request: Request) -> Networks:
    return request.app.state.estable.networks


@router.get("/sdapi/v1/loras", summary="The LoRAs of --lora-dir, usable as <lora:name:weight> (A1111)")
async def loras(request: Request) -> list[dict[str, Any]]:
    return await asyncio.to_thread(_networks(request).loras)


@router.post("/sdapi/v1/refresh-loras", summary="Scan the LoRA folder again (it is read at every request anyway)")
async def refresh_loras(request: Request) -> None:
    await asyncio.to_thread(_networks(request).loras)


@router.get("/sdapi/v1/embeddings", summary="Textual-inversion embeddings of --embeddings-dir (A1111)")
async def embeddings(request: Request) -> dict[str, Any]:
    pipe = request.app.state.estable.worker.pipe
    width = pipe.config.text.width if pipe is not None else None
    return await asyncio.to_thread(_networks(request).embeddings_view, width)


@router.post("/sdapi/v1/refresh-embeddings", summary="Read the embeddings folder again")
async def refresh_embeddings(request: Request) -> None:
    await asyncio.to_thread(_networks(request).refresh_embeddings)


@router.get("/controlnet/version", tags=["ControlNet"], summary="The ControlNet extension API version spoken")
async def controlnet_version() -> dict[str, int]:
    return {"version": 2}


@router.get("/controlnet/model_list", tags=["ControlNet"], summary="ControlNets of --controlnet-dir (extension API)")
async def model_list(request: Request, update: bool = True) -> dict[str, list[str]]:
    networks = _networks(request)
    if update:
        return {"model_list": await asyncio.to_thread(networks.refresh_controlnets)}
    return {"model_list": networks.controlnet_names()}


_DETECTING = threading.Semaphore(1)  # one detect request at a time: each can take seconds of CPU and a GB


def _detect_encoded(req: DetectRequest, limits: Limits) -> list[str]:
    with _DETECTING:
        return [base64.b64encode(png_bytes(im)).decode() for im in detect(req, limits)]


@router.post("/controlnet/detect", tags=["ControlNet"], summary="Make control images from images (extension API)")
async def detect_route(request: Request, req: DetectRequest) -> dict[str, Any]:
    images = await asyncio.to_thread(_detect_encoded, req, request.app.state.estable.settings.limits)
    return {"images": images, "info": "Success"}


@router.get("/controlnet/module_list", tags=["ControlNet"], summary="Control-image makers (extension API)")
async def module_list(alias_names: bool = False) -> dict[str, Any]:
    del alias_names
    names = [m for m in MODULES if " " not in m]
    return {"module_list": names, "module_detail": {m: {"model_free": False, "sliders": []} for m in names}}
