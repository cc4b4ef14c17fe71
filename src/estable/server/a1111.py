"""The A1111 web UI's HTTP API (``/sdapi/v1/*``), so that scripts, bots and plug-ins written for it work unchanged.

Request fields and response shapes follow A1111 (``../shared/REFERENCES.md``): unknown fields are ignored,
``images`` are base64 PNGs carrying the ``parameters`` infotext, ``parameters`` echoes the request, and ``info`` is
a JSON *string* with ``seed``, ``all_seeds``, ``infotexts`` and the rest. A generation is a job like any other (it
is kept in the job store); the call waits for it, and a client that hangs up has its job cancelled.

Departures, on purpose: a field left out takes the *model's* default (its native size, its recommended guidance
scale, Estable's default sampler) rather than A1111's 512×512 / 7 / Euler; ``mask_blur``, ``inpainting_fill``,
``inpaint_full_res``, ``resize_mode`` and scripts other than ControlNet (:mod:`.extras`) are accepted and ignored;
``override_settings`` honours ``sd_model_checkpoint`` (the job runs on that model, which stays loaded) and
``CLIP_stop_at_last_layers``. Prompts pass the server's blocklists; every image is stamped as the CLI stamps it.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import time
from typing import Any

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import JSONResponse
from PIL import Image, UnidentifiedImageError
from pydantic import Field

from .. import __version__
from ..provenance.infotext import PARAMETERS_KEY, parse_infotext, to_a1111_fields
from ..results import a1111_sampler_label
from ..sampling.samplers import get_sampler, list_samplers
from .catalog import ModelNameError
from .extras import a1111_control
from .inputs import (
    BadRequest,
    FieldError,
    RequestModel,
    build_params,
    check_image_side,
    check_json,
    decode_image,
    fit_mask,
)
from .settings import Limits
from .state import ServerState, get_state
from .worker import Job

__all__ = ["router"]

router = APIRouter(prefix="/sdapi/v1", tags=["A1111"])

_KARRAS = " Karras"
SCHEDULERS = [
    {"name": "automatic", "label": "Automatic", "aliases": None, "default_rho": -1, "need_inner_model": False},
    {"name": "karras", "label": "Karras", "aliases": None, "default_rho": 7.0, "need_inner_model": False},
]


# ------------------------------------------------------------------------------------------------- schemas


class _Request(RequestModel):

    prompt: str = ""
    negative_prompt: str = ""
    styles: list[str] | None = None
    seed: int = -1
    subseed: int = -1
    subseed_strength: float = 0.0
    seed_resize_from_h: int = -1
    seed_resize_from_w: int = -1
    sampler_name: str | None = None
    sampler_index: str | None = None
    scheduler: str | None = None
    batch_size: int = 1
    n_iter: int = 1
    steps: int | None = None
    cfg_scale: float | None = None
    width: int | None = None
    height: int | None = None
    restore_faces: bool | None = None
    tiling: bool | None = None
    do_not_save_samples: bool = False
    do_not_save_grid: bool = False
    eta: float | None = None
    denoising_strength: float | None = None
    override_settings: dict[str, Any] | None = None
    override_settings_restore_afterwards: bool = True
    script_name: str | None = None
    script_args: list[Any] = Field(default_factory=list)
    send_images: bool = True
    save_images: bool = False
    alwayson_scripts: dict[str, Any] = Field(default_factory=dict)


class Txt2ImgRequest(_Request):
    enable_hr: bool = False  # the two-pass hires fix (estable.hires), with the four fields below
    hr_scale: float = 2.0
    hr_upscaler: str | None = None  # "Latent…" (latents, bilinear) or "Lanczos"/"Nearest"/"None" (pixels, Lanczos)
    hr_second_pass_steps: int = 0
    hr_resize_x: int = 0
    hr_resize_y: int = 0


class Img2ImgRequest(_Request):
    init_images: list[str] | None = None
    resize_mode: int = 0
    image_cfg_scale: float | None = None
    mask: str | None = None
    mask_blur: int | None = None
    inpainting_fill: int = 0
    inpaint_full_res: bool = True
    inpaint_full_res_padding: int = 0
    inpainting_mask_invert: int = 0
    initial_noise_multiplier: float | None = None
    include_init_images: bool = False


class PNGInfoRequest(RequestModel):
    image: str = ""


# --------------------------------------------------------------------------------------------- generation


def _sampler(req: _Request) -> str | None:
    """Our sampler name for A1111's sampler_name (or the older sampler_index) and scheduler; 400 if unknown."""
    name = req.sampler_name or req.sampler_index
    scheduler = (req.scheduler or "automatic").strip().lower()
    if scheduler not in ("automatic", "karras"):
        raise HTTPException(400, f"Scheduler not found: {req.scheduler}")
    if name is None:
        return None
    try:
        spec = get_sampler(name)
    except ValueError:
        raise HTTPException(400, "Sampler not found") from None
    if scheduler == "karras" and not spec.karras:
        try:
            spec = get_sampler(spec.label + _KARRAS)
        except ValueError:
            raise HTTPException(400, f"Scheduler 'Karras' is not available for the sampler {name}") from None
    return spec.name


def _job(state: ServerState, req: _Request, mode: str, image: Image.Image | None = None,
         mask: Image.Image | None = None) -> Job:
    over = req.override_settings or {}
    values: dict[str, Any] = {
        "prompt": req.prompt, "negative_prompt": req.negative_prompt, "sampler": _sampler(req), "steps": req.steps,
        "cfg_scale": req.cfg_scale, "seed": req.seed, "width": req.width, "height": req.height,
        "batch_size": req.batch_size, "batch_count": req.n_iter, "eta": req.eta,
        "clip_skip": over.get("CLIP_stop_at_last_layers"),
    }
    if mode != "txt2img":
        values["strength"] = req.denoising_strength if req.denoising_strength is not None else 0.75
    elif getattr(req, "enable_hr", False):
        values.update(_hires(req))
    names = {"batch_count": "n_iter", "strength": "denoising_strength", "sampler": "sampler_name",
             "hires_scale": "hr_scale", "hires_steps": "hr_second_pass_steps", "hires_strength": "denoising_strength",
             "clip_skip": "override_settings.CLIP_stop_at_last_layers"}
    params = build_params(values, state.settings.limits, names)
    state.admit(params.prompt)  # the prompt filter, the <lora:…> tags
    control = a1111_control(state.networks, req.alwayson_scripts, image, state.settings.limits)
    model = over.get("sd_model_checkpoint")
    if model is not None:
        try:
            model = state.catalog.resolve(str(model)).name
        except ModelNameError as exc:
            raise HTTPException(400, str(exc)) from None
    state.check_job(params, mode, image, model, names)
    return Job(mode=mode, params=params.resolved(), image=image, mask=mask, model=model,
               cfg_given=req.cfg_scale is not None, sampler_given=(req.sampler_name or req.sampler_index) is not None,
               origin="a1111", control=control)


def _hires(req: Txt2ImgRequest) -> dict[str, Any]:
    """The hires-fix parameters of an ``enable_hr`` request (A1111's defaults: scale 2, strength 0.7, Latent)."""
    if req.hr_resize_x or req.hr_resize_y:
        raise FieldError("hr_resize_x", "a target size for the hires fix is not supported; use hr_scale")
    name = (req.hr_upscaler or "Latent").strip().lower()
    if name.startswith("latent"):
        upscaler = "latent"
    elif name in ("lanczos", "nearest", "none"):
        upscaler = "pixel"
    else:
        raise HTTPException(400, f"Upscaler not found: {req.hr_upscaler} (Estable has Latent and Lanczos)")
    strength = req.denoising_strength if req.denoising_strength is not None else 0.7
    return {"hires_scale": req.hr_scale, "hires_strength": strength, "hires_upscaler": upscaler,
            "hires_steps": req.hr_second_pass_steps}


def _info(job: Job) -> dict[str, Any]:
    """A1111's ``info`` object (the response carries it JSON-encoded, as a string)."""
    p = job.params
    label, schedule = a1111_sampler_label(get_sampler(p.sampler))
    n = len(job.images)
    seeds = [im["seed"] for im in job.images]
    return {
        # each image's own prompt, as its infotext holds it (the model file's prompt completion may have added to it)
        "prompt": p.prompt, "all_prompts": [parse_infotext(im["infotext"])["prompt"] for im in job.images],
        "negative_prompt": p.negative_prompt, "all_negative_prompts": [p.negative_prompt] * n,
        "seed": p.seed, "all_seeds": seeds, "subseed": -1, "all_subseeds": [-1] * n, "subseed_strength": 0,
        "width": p.width, "height": p.height, "sampler_name": label, "cfg_scale": p.cfg_scale, "steps": p.steps,
        "batch_size": p.batch_size, "restore_faces": False, "face_restoration_model": None,
        "sd_model_name": job.model_name, "sd_model_hash": job.model_hash, "sd_vae_name": None, "sd_vae_hash": None,
        "seed_resize_from_w": -1, "seed_resize_from_h": -1,
        "denoising_strength": p.strength if job.mode != "txt2img" else (p.hires_strength if p.hires_scale > 1 else 0),
        "extra_generation_params": {"Schedule type": schedule} if schedule else {},
        "index_of_first_image": 0, "infotexts": [im["infotext"] for im in job.images], "styles": [],
        "job_timestamp": time.strftime("%Y%m%d%H%M%S", time.localtime(job.started or job.created)),
        "clip_skip": p.clip_skip, "is_using_inpainting_conditioning": False, "version": f"estable {__version__}",
    }


async def _generate(request: Request, req: _Request, job: Job, echo: dict[str, Any]) -> Any:
    state = get_state(request)
    state.worker.hold(job.id)  # its images stay until this request has read them, whatever --keep-jobs prunes
    try:
        return await _answer(request, req, job, echo)
    finally:
        await asyncio.to_thread(state.worker.release, job.id)


async def _answer(request: Request, req: _Request, job: Job, echo: dict[str, Any]) -> Any:
    state = get_state(request)
    state.submit(job)
    if not await state.wait(request, job):
        return JSONResponse({"detail": "the client disconnected; the job was cancelled"}, status_code=499)
    if job.state == "failed" and job.refused:  # the output check: a refusal, not a server error
        return JSONResponse({"error": "OutputRefused", "detail": job.error, "body": "", "errors": job.error},
                            status_code=400)
    if job.state == "failed":
        return JSONResponse({"error": "GenerationError", "detail": job.error, "body": "", "errors": job.error},
                            status_code=500)
    if job.state == "cancelled":
        return JSONResponse({"error": "Cancelled", "detail": "the job was cancelled", "body": "",
                             "errors": "the job was cancelled"}, status_code=409)
    images = []
    if req.send_images:
        for im in job.images:
            path = state.store.image_path(im["id"])
            if path is not None:
                images.append(base64.b64encode(path.read_bytes()).decode())
    return {"images": images, "parameters": echo, "info": json.dumps(_info(job), ensure_ascii=False)}


@router.post("/txt2img", summary="Generate images from a prompt (A1111)")
async def txt2img(request: Request, req: Txt2ImgRequest) -> Any:
    job = await asyncio.to_thread(_job, get_state(request), req, "txt2img")  # LoRA lookups off the loop
    return await _generate(request, req, job, req.model_dump())


def _img2img_job(state: ServerState, req: Img2ImgRequest) -> Job:
    limits = state.settings.limits
    image = decode_image(req.init_images[0], "init_images", limits)
    mask = None
    if req.mask:
        mask = fit_mask(decode_image(req.mask, "mask", limits, mode="L"), image, bool(req.inpainting_mask_invert))
    if req.width is None or req.height is None:
        check_image_side(image, "init_images", limits)
    return _job(state, req, "inpaint" if mask is not None else "img2img", image, mask)


@router.post("/img2img", summary="Re-draw init_images[0], or inpaint its white mask area (A1111)")
async def img2img(request: Request, req: Img2ImgRequest) -> Any:
    if not req.init_images:
        raise HTTPException(404, "Init image not found")
    job = await asyncio.to_thread(_img2img_job, get_state(request), req)  # image decoding off the loop
    echo = req.model_dump()
    if not req.include_init_images:
        echo["init_images"] = None
        echo["mask"] = None
    return await _generate(request, req, job, echo)


# ------------------------------------------------------------------------------------------------- the rest


MAX_PNG_TEXT = 1_000_000  # characters of text chunks png-info sends back (Pillow reads 64 MB of them from a tiny file)


def _png_info(image: str, limits: Limits) -> dict[str, Any]:
    decode_image(image, "image", limits)  # checks size and format
    raw = base64.b64decode(image.split("base64,", 1)[-1])
    try:
        with Image.open(io.BytesIO(raw)) as im:
            items = {k: v for k, v in getattr(im, "text", {}).items() if isinstance(v, str)}
    except (UnidentifiedImageError, OSError) as exc:
        raise BadRequest(f"image is not readable: {exc}") from None
    size = sum(len(k) + len(v) for k, v in items.items())
    if size > MAX_PNG_TEXT:
        raise BadRequest(f"image holds {size} characters of text; at most {MAX_PNG_TEXT} are read")
    info = items.pop(PARAMETERS_KEY, "")
    parameters = to_a1111_fields(parse_infotext(info)) if info else {}
    return {"info": info, "items": items, "parameters": parameters}


@router.post("/png-info", summary="Read the generation parameters of a PNG (A1111)")
async def png_info(request: Request, req: PNGInfoRequest) -> Any:
    if not req.image.strip():
        raise HTTPException(404, "Image not found")
    return await asyncio.to_thread(_png_info, req.image, get_state(request).settings.limits)  # decoding off the loop


@router.get("/samplers", summary="Samplers, by A1111 label (our names as aliases)")
async def samplers() -> list[dict[str, Any]]:
    return [{"name": s.label, "aliases": [s.name, *s.aliases], "options": {}} for s in list_samplers()]


@router.get("/schedulers", summary="Schedule types accepted with a sampler")
async def schedulers() -> list[dict[str, Any]]:
    return SCHEDULERS


def _models(state: ServerState) -> list[dict[str, Any]]:
    out = []
    for e in state.catalog.entries():
        sha = state.catalog.known_sha256(e)
        short = sha[:10] if sha else None
        out.append({"title": e.title(short), "model_name": e.name, "hash": short, "sha256": sha,
                    "filename": str(e.path), "config": None})
    return out


@router.get("/sd-models", summary="The models the server can switch to")
async def sd_models(request: Request) -> list[dict[str, Any]]:
    return _models(get_state(request))


@router.post("/refresh-checkpoints", summary="Scan the models folder again")
async def refresh_checkpoints(request: Request) -> None:
    await asyncio.to_thread(get_state(request).catalog.refresh)


@router.get("/progress", summary="Progress of the running job, with a preview image")
async def progress(request: Request, skip_current_image: bool = False) -> dict[str, Any]:
    state = get_state(request)
    job = state.worker.current
    queued = state.worker.queue_depth
    if job is None:
        return {"progress": 0.0, "eta_relative": 0.0,
                "state": {"skipped": False, "interrupted": False, "stopping_generation": False, "job": "",
                          "job_count": queued, "job_timestamp": "0", "job_no": 0, "sampling_step": 0,
                          "sampling_steps": 0},
                "current_image": None, "textinfo": None, "current_task": None}
    prog = job.progress
    elapsed = time.time() - (job.started or time.time())
    eta = elapsed / prog - elapsed if prog > 0 else 0.0
    per_batch = max(1, job.steps // max(1, job.params.batch_count))
    batch_no = (max(job.step, 1) - 1) // per_batch
    image = None
    if not skip_current_image and job.preview:
        image = base64.b64encode(job.preview).decode()
    return {
        "progress": prog, "eta_relative": eta,
        "state": {"skipped": job.stop == "skip", "interrupted": job.stop == "interrupt",
                  "stopping_generation": False, "job": f"task({job.id})", "job_count": 1 + queued,
                  "job_timestamp": time.strftime("%Y%m%d%H%M%S", time.localtime(job.started or job.created)),
                  "job_no": batch_no, "sampling_step": job.step - batch_no * per_batch,
                  "sampling_steps": per_batch},
        "current_image": image, "textinfo": None, "current_task": f"task({job.id})",
    }


@router.post("/interrupt", summary="Stop the running job at its next step (its finished images are kept)")
async def interrupt(request: Request) -> dict[str, Any]:
    get_state(request).worker.interrupt()
    return {}


@router.post("/skip", summary="Drop the running batch and go on with the job's next one")
async def skip(request: Request) -> dict[str, Any]:
    get_state(request).worker.skip()
    return {}


def _current_title(state: ServerState) -> str | None:
    entry = state.worker.entry or state.catalog.initial
    sha = state.catalog.known_sha256(entry)
    return entry.title(sha[:10] if sha else None)


@router.get("/options", summary="Server options (sd_model_checkpoint is the loaded model)")
async def get_options(request: Request) -> dict[str, Any]:
    state = get_state(request)
    entry = state.worker.entry or state.catalog.initial
    pipe = state.worker.pipe
    return {
        **state.options,
        "sd_model_checkpoint": _current_title(state),
        "sd_checkpoint_hash": state.catalog.known_sha256(entry),
        "CLIP_stop_at_last_layers": pipe.config.clip_skip if pipe is not None else 1,
        "samples_format": "png",
        "enable_pnginfo": True,
        "sd_vae": "Automatic",
        "outdir_samples": str(state.store.images_dir),
    }


@router.post("/options", summary="Set options; sd_model_checkpoint loads that model from the models folder")
async def set_options(request: Request, body: dict[str, Any]) -> None:
    state = get_state(request)
    check_json(body)  # what is kept is sent back by GET: text it could not write would make every GET a 500
    name = body.get("sd_model_checkpoint")
    if name is not None:
        try:
            await asyncio.to_thread(state.worker.switch_model, str(name))
        except ModelNameError as exc:
            raise HTTPException(400, str(exc)) from None
    for key, value in body.items():  # kept (and shown by GET) but not acted on; bounded in number and size
        if key == "sd_model_checkpoint" or len(key) > 200 or len(json.dumps(value)) > 10_000:
            continue
        if key in state.options or len(state.options) < 1000:
            state.options[key] = value


# Discovery routes A1111 clients call on connecting (webuiapi, plug-ins): Estable has none of these extras, and says
# so with A1111's empty answers rather than a 404 that would stop the client.
_EMPTY_LISTS = ("sd-vae", "hypernetworks", "face-restorers", "prompt-styles", "realesrgan-models")


def _empty_list() -> list[Any]:
    return []


for _route in _EMPTY_LISTS:
    router.add_api_route(f"/{_route}", _empty_list, methods=["GET"], summary="None in Estable (an empty list)")


@router.get("/upscalers", summary="Upscalers (only A1111's 'None')")
async def upscalers() -> list[dict[str, Any]]:
    return [{"name": "None", "model_name": None, "model_path": None, "model_url": None, "scale": 4}]


@router.get("/scripts", summary="Scripts (none)")
async def scripts() -> dict[str, Any]:
    return {"txt2img": [], "img2img": []}


@router.get("/cmd-flags", summary="Command-line flags A1111 clients look at")
async def cmd_flags(request: Request) -> dict[str, Any]:
    s = get_state(request).settings
    return {"api": True, "listen": s.host not in ("127.0.0.1", "localhost", "::1"), "port": s.port,
            "api_auth": None, "nowebui": False, "ckpt_dir": str(s.models_dir) if s.models_dir else None}


@router.get("/memory", summary="RAM and CUDA memory, in bytes")
async def memory() -> dict[str, Any]:
    import os

    import torch

    out: dict[str, Any] = {}
    try:
        page, total, free = (os.sysconf(k) for k in ("SC_PAGE_SIZE", "SC_PHYS_PAGES", "SC_AVPHYS_PAGES"))
        out["ram"] = {"free": free * page, "used": (total - free) * page, "total": total * page}
    except (ValueError, OSError, AttributeError):
        out["ram"] = {"error": "unavailable"}
    if torch.cuda.is_available():
        free_b, total_b = torch.cuda.mem_get_info()
        out["cuda"] = {"system": {"free": free_b, "used": total_b - free_b, "total": total_b},
                       "active": {"current": torch.cuda.memory_allocated()},
                       "reserved": {"current": torch.cuda.memory_reserved()}}
    else:
        out["cuda"] = {"error": "CUDA is not available"}
    return out
