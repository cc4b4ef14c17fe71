"""What every route reaches through ``request.app.state.estable``: settings, catalog, store, worker, metrics.

Also the helpers both APIs share: submitting a job (queue full / draining → 503 with Retry-After), waiting for a
job while watching for the client to go away, and the job object of the contract (live from the worker, or from
the store once finished).
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from fastapi import HTTPException, Request

from .catalog import ModelCatalog
from .settings import ServerSettings
from .store import JobStore
from .worker import Draining, Job, QueueFull, Worker

if TYPE_CHECKING:
    from .metrics import Metrics

__all__ = ["ServerState", "get_state", "iso", "job_view", "stored_job_view"]

log = logging.getLogger("estable.server")


@dataclass
class ServerState:
    settings: ServerSettings
    catalog: ModelCatalog
    store: JobStore
    worker: Worker
    metrics: Metrics | None = None
    provenance: Any = None  # estable.provenance.policy.ProvenancePolicy (the worker stamps with the same one)
    networks: Any = None  # .extras.Networks
    options: dict[str, Any] = field(default_factory=dict)  # A1111 options set by clients (kept, not acted on)
    started: float = field(default_factory=time.time)

    def admit(self, prompt: str) -> None:
        """Refuse a prompt the blocklists block (400, logged) and ``<lora:…>`` tags that name no LoRA (422)."""
        from ..provenance.filters import PromptRefused

        if self.provenance is not None:
            try:
                self.provenance.check_prompt(prompt)
            except PromptRefused as exc:
                log.warning(json.dumps({"event": "prompt_refused", "detail": str(exc)}))
                raise
        if self.networks is not None:
            self.networks.check_prompt(prompt)

    def check_job(self, params: Any, mode: str, image: Any = None, model: str | None = None,
                  names: dict[str, str] | None = None) -> None:
        """What the library would refuse once the job ran, refused now (422 naming the request's field): the size
        the job draws within the limits (the model's native size where the request gives none), prompt weights
        in range, a strength that leaves a step to run, a clip skip the text encoder has. What needs the model is
        checked once it is loaded (the worker checks the size again before it runs the job)."""
        from ..errors import EstableError
        from ..prompts import check_weights
        from .inputs import FieldError, check_job_size

        names = names or {}
        pipe, entry = self.worker.pipe, self.worker.entry
        current = pipe is not None and (model is None or (entry is not None and entry.name == model))
        check_job_size(params, pipe.native_size if current else None, self.settings.limits,
                       image if mode != "txt2img" else None, names)
        for key in ("prompt", "negative_prompt"):
            try:
                check_weights(getattr(params, key))
            except EstableError as exc:
                raise FieldError(names.get(key, key), str(exc)) from None
        try:
            params.check_runs_a_step(mode)
        except EstableError as exc:
            key = "hires_strength" if str(exc).startswith("hires") else "strength"
            raise FieldError(names.get(key, key), str(exc)) from None
        layers = pipe.config.text.layers if current else None
        if layers is not None and params.clip_skip is not None and params.clip_skip > layers:
            raise FieldError(names.get("clip_skip", "clip_skip"), f"is {params.clip_skip}; this model's text "
                             f"encoder has {layers} layers")

    def submit(self, job: Job) -> Job:
        try:
            return self.worker.submit(job)
        except QueueFull as exc:
            raise HTTPException(503, "the queue is full; try again later",
                                headers={"Retry-After": str(exc.retry_after)}) from None
        except Draining:
            raise HTTPException(503, "the server is shutting down", headers={"Retry-After": "30"}) from None

    async def wait(self, request: Request, job: Job) -> bool:
        """Wait for ``job`` to finish; if the client disconnects first, cancel it and return False."""
        loop = asyncio.get_running_loop()
        finished = loop.create_future()

        def wake() -> None:  # called from the worker's thread
            loop.call_soon_threadsafe(lambda: finished.done() or finished.set_result(None))

        job.on_done(wake)
        while not finished.done():
            try:
                await asyncio.wait_for(asyncio.shield(finished), 0.25)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    self.worker.cancel(job.id)
                    return False
        return True


def get_state(request: Request) -> ServerState:
    return request.app.state.estable


def iso(t: float | None) -> str | None:
    return datetime.fromtimestamp(t, timezone.utc).isoformat() if t is not None else None


def job_view(job: Job, *, preview: bool = True) -> dict[str, Any]:
    """The contract's job object for a job the worker holds (queued or running) or has just finished."""
    return {
        "id": job.id,
        "state": job.state,
        "mode": job.mode,
        "model": job.model_name or job.model,
        "params": job.params.to_dict(),
        "progress": job.progress,
        "step": job.step,
        "steps": job.steps,
        "preview": base64.b64encode(job.preview).decode() if preview and job.preview else None,
        "images": list(job.images),
        "error": job.error,
        "created": iso(job.created),
        "finished": iso(job.finished),
    }


def stored_job_view(row: dict[str, Any]) -> dict[str, Any]:
    """The contract's job object from a job store row."""
    steps = row["steps"] or 0
    progress = 1.0 if row["state"] == "done" else (min(1.0, row["step"] / steps) if steps else 0.0)
    return {
        "id": row["id"],
        "state": row["state"],
        "mode": row["mode"],
        "model": row["model"],
        "params": row["params"],
        "progress": progress,
        "step": row["step"],
        "steps": steps,
        "preview": None,
        "images": row["images"],
        "error": row["error"],
        "created": iso(row["created"]),
        "finished": iso(row["finished"]),
    }
