"""Estable's own API (``/v1/*``): asynchronous jobs, their history and images, server-sent progress events, the models,
samplers and the page's configuration. The shapes are those of ``SERVER_CONTRACT.md`` (the web page speaks them).
"""

from __future__ import annotations

import asyncio
import json
import re
from typing import Any, Literal

from fastapi import APIRouter, HTTPException, Query, Request
from fastapi.responses import FileResponse, StreamingResponse

from ..params import GenerationParams
from ..sampling.samplers import list_samplers
from .catalog import ModelNameError
from .extras import ControlRequest, v1_control
from .inputs import FieldError, RequestModel, build_params, check_image_side, decode_image, fit_mask
from .state import get_state, job_view, stored_job_view
from .store import FINAL_STATES
from .worker import Job

__all__ = ["router"]

router = APIRouter(prefix="/v1", tags=["Estable"])
_IMAGE_ID = re.compile(r"^[0-9a-f]{32}$")


class JobRequest(RequestModel):
    """A generation request; fields left out take the model's defaults."""


    mode: Literal["txt2img", "img2img", "inpaint"] = "txt2img"
    prompt: str = ""
    negative_prompt: str = ""
    sampler: str | None = None
    steps: int | None = None
    cfg_scale: float | None = None
    cfg_start: float | None = None  # guidance from this fraction of the noise schedule on, as `generate --cfg-start`
    seed: int = -1
    width: int | None = None
    height: int | None = None
    batch_size: int | None = None
    batch_count: int | None = None
    strength: float | None = None
    clip_skip: int | None = None
    eta: float | None = None
    hires_scale: float | None = None  # the two-pass hires fix of txt2img (> 1: on), as `generate --hires-scale`
    hires_strength: float | None = None
    hires_upscaler: Literal["latent", "pixel"] | None = None
    hires_steps: int | None = None
    complete_prompt: bool | None = None  # false: the prompt as written, without the model file's completion
    init_image: str | None = None
    mask: str | None = None
    model: str | None = None
    control: list[ControlRequest] | None = None  # ControlNet units: {type, image, model, scale, start, end, guess_mode}


def make_job(request: Request, req: JobRequest) -> Job:
    state = get_state(request)
    limits = state.settings.limits
    image = mask = None
    if req.mode != "txt2img":
        if not req.init_image:
            raise FieldError("init_image", f"{req.mode} needs an init_image (base64 PNG or JPEG)")
        image = decode_image(req.init_image, "init_image", limits)
        if req.width is None or req.height is None:
            check_image_side(image, "init_image", limits)
    if req.mode == "inpaint":
        if not req.mask:
            raise FieldError("mask", "inpaint needs a mask (base64 PNG; white = repaint)")
        mask = fit_mask(decode_image(req.mask, "mask", limits, mode="L"), image)  # type: ignore[arg-type]
    values = req.model_dump(include={"prompt", "negative_prompt", "sampler", "steps", "cfg_scale", "cfg_start", "seed",
                                     "width", "height", "batch_size", "batch_count", "strength", "clip_skip", "eta",
                                     "hires_scale", "hires_strength", "hires_upscaler", "hires_steps",
                                     "complete_prompt"})
    params = build_params(values, limits)
    state.admit(params.prompt)  # the prompt filter, the <lora:…> tags
    control = v1_control(state.networks, req.control, image, limits)
    model = None
    if req.model is not None:
        try:
            model = state.catalog.resolve(req.model).name
        except ModelNameError as exc:
            raise HTTPException(400, str(exc)) from None
    state.check_job(params, req.mode, image, model)
    return Job(mode=req.mode, params=params.resolved(), image=image, mask=mask, model=model,
               cfg_given=req.cfg_scale is not None, sampler_given=req.sampler is not None, origin="api",
               control=control)


@router.post("/jobs", status_code=202, summary="Queue a generation; returns the job at once")
async def create_job(request: Request, req: JobRequest) -> dict[str, Any]:
    job = get_state(request).submit(await asyncio.to_thread(make_job, request, req))  # decoding off the loop
    return job_view(job)


@router.get("/jobs", summary="The job history, newest first")
async def list_jobs(request: Request, limit: int = Query(20, ge=1, le=200),
                    offset: int = Query(0, ge=0, le=2**31)) -> dict[str, Any]:
    state = get_state(request)
    rows, total = await asyncio.to_thread(state.store.list_jobs, limit, offset)
    jobs = []
    for row in rows:
        live = state.worker.jobs.get(row["id"])
        jobs.append(job_view(live, preview=False) if live is not None else stored_job_view(row))
    return {"jobs": jobs, "total": total}


def _find(request: Request, job_id: str) -> dict[str, Any]:
    state = get_state(request)
    live = state.worker.jobs.get(job_id)
    if live is not None:
        return job_view(live)
    row = state.store.get_job(job_id)
    if row is None:
        raise HTTPException(404, f"no job {job_id}")
    return stored_job_view(row)


@router.get("/jobs/{job_id}", summary="One job: state, progress, preview, images")
async def get_job(request: Request, job_id: str) -> dict[str, Any]:
    return _find(request, job_id)


@router.get("/jobs/{job_id}/events", summary="Server-sent events: the job object on every change, until it ends")
async def job_events(request: Request, job_id: str) -> StreamingResponse:
    state = get_state(request)
    first = _find(request, job_id)  # 404 before the stream starts
    live = state.worker.jobs.get(job_id)

    async def stream():
        if live is None:
            yield f"data: {json.dumps(first)}\n\n"
            return
        last = -1
        while True:
            # read before the view is made: a job that ends in between is sent as ended (its view shows it) and
            # closes the stream; reading `final` after the view could close it on a view that still says running
            version, final = live.version, live.final
            if version != last or final:
                last = version
                view = job_view(live)
                yield f"data: {json.dumps(view)}\n\n"
                if view["state"] in FINAL_STATES:
                    return
            if await request.is_disconnected():
                return
            await asyncio.sleep(0.1)

    return StreamingResponse(stream(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


@router.delete("/jobs/{job_id}", summary="Cancel a queued or running job; delete a finished one and its files")
async def delete_job(request: Request, job_id: str) -> dict[str, Any]:
    state = get_state(request)
    live = state.worker.cancel(job_id)
    if live is not None:
        for _ in range(100):  # a running job stops at its next step
            if live.final:
                break
            await asyncio.sleep(0.05)
        return {"id": job_id, "deleted": False, "state": live.state}
    row = state.store.get_job(job_id)
    if row is None:
        raise HTTPException(404, f"no job {job_id}")
    deleted = await asyncio.to_thread(state.store.delete_job, job_id)
    return {"id": job_id, "deleted": deleted, "state": row["state"]}


@router.get("/images/{image_id}.png", summary="One image (PNG with its parameters)", response_class=FileResponse)
async def get_image(request: Request, image_id: str) -> FileResponse:
    path = get_state(request).store.image_path(image_id) if _IMAGE_ID.match(image_id) else None
    if path is None:
        raise HTTPException(404, f"no image {image_id}")
    return FileResponse(path, media_type="image/png")


@router.get("/models", summary="The models the server can use")
async def models(request: Request) -> dict[str, Any]:
    state = get_state(request)
    current = state.worker.entry
    out = []
    for e in state.catalog.entries():
        sha = state.catalog.known_sha256(e)
        out.append({"name": e.name, "hash": sha[:10] if sha else None,
                    "current": current is not None and e.path == current.path})
    return {"models": out}


@router.get("/samplers", summary="Samplers: our names and A1111's labels")
async def samplers() -> dict[str, Any]:
    return {"samplers": [{"name": s.name, "label": s.label} for s in list_samplers()]}


@router.get("/config", summary="Defaults and limits for a client (the web page)")
async def config(request: Request) -> dict[str, Any]:
    state = get_state(request)
    d = GenerationParams()
    pipe = state.worker.pipe
    width = height = completion = None
    if pipe is not None:
        width, height = pipe.native_size
        d = pipe.with_model_defaults(d)  # the guidance scale and sampler the model's file recommends
        completion = pipe.config.prompt_completion  # the txt2img prompt rewrite its file names (complete_prompt)
    return {"defaults": {"steps": d.steps, "cfg_scale": d.cfg_scale, "width": width, "height": height,
                         "sampler": d.sampler, "prompt_completion": completion},
            "limits": state.settings.limits.as_config(), "auth": state.settings.auth_required}
