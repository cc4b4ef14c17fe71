"""The one thread that holds the Pipeline and runs jobs, one at a time, from a bounded queue.

Request handlers never touch tensors: they make a :class:`Job`, :meth:`Worker.submit` it (a full queue raises
:class:`QueueFull`, a draining server :class:`Draining`) and read its live state. The worker runs a job batch by
batch through the library's :class:`~estable.pipeline.Pipeline`; the pipeline's per-step callback is where the
job's progress and preview are updated and where a stop is obeyed: a cancel, an A1111 interrupt or skip, the
per-job timeout or a shutdown raises inside the callback, so the job stops at the next step. A CUDA out-of-memory
error fails that job with a message saying so, memory is freed, and the next job runs as usual.

Image k of a job uses seed + k (the library's rule); running batch b as its own one-batch request with seed
``seed + b·batch_size`` gives exactly the images the library's batch loop would, and lets a skip drop one batch.
"""

from __future__ import annotations

import collections
import dataclasses
import gc
import io
import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image

from ..errors import EstableError
from ..params import GenerationParams
from .catalog import ModelCatalog, ModelEntry
from .inputs import check_job_size
from .settings import ServerSettings
from .store import FINAL_STATES, JobStore, new_id

__all__ = ["OOM_ERRORS", "Draining", "Job", "QueueFull", "Worker"]

log = logging.getLogger("estable.server")

OOM_ERRORS: tuple[type[BaseException], ...] = tuple(
    {getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError), torch.cuda.OutOfMemoryError})
WARMUP_PROMPT = "warm-up"
RUNS_KEPT = 10_000


class QueueFull(Exception):
    def __init__(self, retry_after: int):
        super().__init__("the queue is full; try again later")
        self.retry_after = retry_after


class Draining(Exception):
    """The server is shutting down and takes no new work."""


class _Stop(Exception):
    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass
class Job:
    mode: str  # "txt2img" | "img2img" | "inpaint"
    params: GenerationParams  # seed resolved
    image: Image.Image | None = None
    mask: Image.Image | None = None
    model: str | None = None  # a catalog name to switch to before running; None: the current model
    cfg_given: bool = True  # False: the model's recommended guidance scale replaces params.cfg_scale
    sampler_given: bool = True  # False: the model's recommended sampler (if it names one) replaces params.sampler
    origin: str = "api"  # "api" | "a1111"
    control: list[Any] = field(default_factory=list)  # ControlSpecs (estable.control.units), images decoded
    id: str = field(default_factory=new_id)
    state: str = "queued"
    step: int = 0
    steps: int = 0
    preview: bytes | None = None
    images: list[dict[str, Any]] = field(default_factory=list)
    error: str | None = None
    created: float = field(default_factory=time.time)
    started: float | None = None
    finished: float | None = None
    model_name: str | None = None
    model_hash: str | None = None
    stop: str | None = None  # requested: "cancel" | "interrupt" | "skip" | "shutdown"
    refused: bool = False  # failed because the output check refused images
    units: list[Any] = field(default_factory=list, repr=False)  # the ControlUnits while it runs
    version: int = 0  # bumped on every visible change (SSE sends on change)
    done: threading.Event = field(default_factory=threading.Event, repr=False)
    _watchers: list[Callable[[], None]] = field(default_factory=list, repr=False)
    _watch_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def __post_init__(self) -> None:
        if not self.steps:
            per_batch = self.params.steps
            if self.mode != "txt2img":
                per_batch = max(1, min(int(self.params.steps * self.params.strength), self.params.steps))
            self.steps = per_batch * self.params.batch_count

    def on_done(self, fn: Callable[[], None]) -> None:
        """Call ``fn`` (from the worker's thread) when the job reaches a final state; at once if it has."""
        with self._watch_lock:
            if not self.done.is_set():
                self._watchers.append(fn)
                return
        fn()

    def _set_done(self) -> None:
        with self._watch_lock:
            self.done.set()
            watchers, self._watchers = self._watchers, []
        for fn in watchers:
            fn()

    @property
    def final(self) -> bool:
        return self.state in FINAL_STATES

    @property
    def progress(self) -> float:
        if self.state == "done":
            return 1.0
        return min(1.0, self.step / self.steps) if self.steps else 0.0


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


class Worker:
    def __init__(self, settings: ServerSettings, catalog: ModelCatalog, store: JobStore,
                 loader: Callable[..., Any] | None = None, on_images: Callable[[int], None] | None = None):
        self.settings = settings
        self.catalog = catalog
        self.store = store
        self._loader = loader
        self._on_images = on_images or (lambda n: None)
        from ..provenance.policy import ProvenancePolicy

        # create_app replaces both with those of the settings; the default still watermarks and records
        self.provenance: Any = ProvenancePolicy()
        self.networks: Any = None  # server.extras.Networks
        self._cond = threading.Condition()
        self._queue: collections.deque[Job] = collections.deque()
        self._control: collections.deque[tuple[Callable[[], None], threading.Event]] = collections.deque()
        self.jobs: dict[str, Job] = {}  # queued and running jobs
        self._held: set[str] = set()  # finished jobs whose images a waiting request has yet to read (spared by pruning)
        self.current: Job | None = None
        self.pipe: Any = None
        self.entry: ModelEntry | None = None
        self.ready = threading.Event()
        self.load_error: str | None = None
        self.draining = False
        self._stopping = False
        self._thread: threading.Thread | None = None
        # job id -> times run, for the most recent RUNS_KEPT jobs (the load test checks that none ran twice)
        self.runs: collections.OrderedDict[str, int] = collections.OrderedDict()
        self.durations: collections.deque[float] = collections.deque(maxlen=20)

    # -- lifecycle -----------------------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._main, name="estable-worker", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        with self._cond:
            self._stopping = True
            for job in list(self._queue):
                self._finish(job, "interrupted", "the server stopped before the job ran")
            self._queue.clear()
            if self.current is not None:
                self.current.stop = "shutdown"
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    def drain(self, grace: float) -> None:
        """Take no new jobs; let admitted ones finish for up to ``grace`` seconds, then interrupt what is left."""
        with self._cond:
            self.draining = True
        deadline = time.monotonic() + grace
        with self._cond:
            while (self._queue or self.current is not None) and self.ready.is_set():
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(min(left, 0.1))
            for job in list(self._queue):
                self._finish(job, "interrupted", "the server shut down before the job ran")
            self._queue.clear()
            if self.current is not None:
                self.current.stop = "shutdown"
            while self.current is not None:
                self._cond.wait(0.1)

    def _prune(self) -> None:
        """The oldest finished jobs beyond --keep-jobs go, with their images; held ones stay until released."""
        if self.settings.keep_jobs:
            with self._cond:
                held = set(self._held)
            self.store.prune(self.settings.keep_jobs, spare=held)

    # -- requests from the handlers ------------------------------------------------------------------------
    def hold(self, job_id: str) -> None:
        """Keep the job's images from --keep-jobs' pruning until :meth:`release` (a request that will read them)."""
        with self._cond:
            self._held.add(job_id)

    def release(self, job_id: str) -> None:
        with self._cond:
            self._held.discard(job_id)
        self._prune()

    def submit(self, job: Job) -> Job:
        with self._cond:
            if self.draining or self._stopping:
                raise Draining()
            if len(self._queue) >= self.settings.queue_size:
                raise QueueFull(self.retry_after())
            if job.model is None and self.pipe is not None:
                # shown while queued; applied again by the model that runs the job (see _run_batches)
                job.params = self.pipe.with_model_defaults(job.params, cfg=not job.cfg_given,
                                                           sampler=not job.sampler_given)
            self.store.add_job(job.id, mode=job.mode, origin=job.origin, model=job.model,
                               params=self._params_view(job), steps=job.steps, created=job.created)
            self.jobs[job.id] = job
            self._queue.append(job)
            self._cond.notify_all()
        return job

    def retry_after(self) -> int:
        """Seconds until a queue slot is likely free: the mean recent job time (at least 1)."""
        mean = sum(self.durations) / len(self.durations) if self.durations else 5.0
        return max(1, round(mean))

    @property
    def queue_depth(self) -> int:
        return len(self._queue)

    def cancel(self, job_id: str, reason: str = "cancel") -> Job | None:
        """Stop a queued or running job (a running one stops at its next step). The job, or None if not active."""
        with self._cond:
            job = self.jobs.get(job_id)
            if job is None:
                return None
            if job.state == "queued":
                self._queue.remove(job)
                self._finish(job, "cancelled" if reason == "cancel" else "interrupted", None)
            elif job.state == "running":
                job.stop = reason
            return job

    def interrupt(self) -> None:
        with self._cond:
            if self.current is not None:
                self.current.stop = "interrupt"

    def skip(self) -> None:
        with self._cond:
            if self.current is not None and self.current.stop is None:
                self.current.stop = "skip"

    def switch_model(self, name: str, timeout: float | None = None) -> None:
        """Load the catalog model ``name`` between jobs (A1111's options sd_model_checkpoint). Blocks."""
        entry = self.catalog.resolve(name)
        if self.entry is not None and entry.path == self.entry.path:
            return
        errors: list[BaseException] = []
        done = threading.Event()

        def task() -> None:
            try:
                self._load(entry)
                self.load_error = None
                self.ready.set()
            except BaseException as exc:  # reported to the caller
                errors.append(exc)

        with self._cond:
            if self.draining:
                raise Draining()
            self._control.append((task, done))
            self._cond.notify_all()
        deadline = None if timeout is None else time.monotonic() + timeout
        while not done.wait(0.25):
            if self._stopping:
                raise Draining()
            if deadline is not None and time.monotonic() > deadline:
                raise EstableError(f"loading {name} takes longer than {timeout:g} s")
        if errors:
            raise errors[0]

    # -- the thread ----------------------------------------------------------------------------------------
    def _main(self) -> None:
        try:
            self._load(self.catalog.initial)
            if self.settings.warmup:
                self._warm_up()
            self.ready.set()
            log.info(json.dumps({"event": "ready", "model": self.entry.name if self.entry else None}))
        except Exception as exc:  # a broken model: report it, fail jobs with the reason
            self.load_error = f"cannot load the model {self.catalog.initial.name}: {exc}"
            log.error(json.dumps({"event": "load_failed", "error": str(exc)}))
        while True:
            with self._cond:
                while not self._stopping and not self._control and not (self._queue and self.ready.is_set()):
                    if self.load_error and self._queue:
                        break
                    self._cond.wait(0.5)
                if self._stopping:
                    return
                if self._control:
                    task, done = self._control.popleft()
                    job = None
                else:
                    job = self._queue.popleft()
                    self.current = job
                    job.state = "running"
                    job.started = time.time()
                    job.version += 1
            if job is None:
                try:
                    task()
                finally:
                    done.set()
                continue
            try:
                self._run(job)
            except Exception:  # e.g. the store could not be written: the worker must live on
                log.exception(json.dumps({"event": "worker_error", "job": job.id}))
                if not job.done.is_set():
                    job.state, job.error = "failed", "internal error while finishing the job"
                    with self._cond:
                        self.jobs.pop(job.id, None)
                        self.current = None
                    job._set_done()
            finally:
                with self._cond:
                    self.current = None
                    self._cond.notify_all()

    def _load(self, entry: ModelEntry) -> None:
        if self._loader is None:
            from ..pipeline import load_pipeline

            self._loader = load_pipeline
        previous = self.entry
        self.pipe = None  # free the old model's memory before the new one is read
        self._free_memory()
        s = self.settings
        try:
            self.pipe = self._loader(str(entry.path), device=s.device, dtype=s.dtype, cuda_graphs=s.cuda_graphs)
        except Exception:
            self.entry = None
            if previous is not None and previous.path != entry.path:
                log.error(json.dumps({"event": "switch_failed", "model": entry.name}))
                self._load(previous)  # keep serving with the model we had
            raise
        self.entry = entry
        sha = getattr(self.pipe, "model_sha256", None)
        self.catalog.remember(entry, sha)

    def _warm_up(self) -> None:
        f = self.pipe.factor
        side = max(8 * f, 64)
        params = GenerationParams(prompt=WARMUP_PROMPT, steps=1, width=side, height=side, seed=0)
        self.pipe.txt2img(params)

    @staticmethod
    def _free_memory() -> None:
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    # -- running one job -----------------------------------------------------------------------------------
    def generate(self, job: Job, params: GenerationParams, callback: Callable[..., None]) -> Any:
        """One batch of ``job`` on the pipeline (a seam for tests that simulate failures)."""
        extra = {"control": job.units} if job.units else {}
        if job.mode == "txt2img":
            return self.pipe.txt2img(params, callback=callback, **extra)
        if job.mode == "img2img":
            return self.pipe.img2img(job.image, params, callback=callback, **extra)
        return self.pipe.inpaint(job.image, job.mask, params, callback=callback, **extra)

    def _run(self, job: Job) -> None:
        self.runs[job.id] = self.runs.get(job.id, 0) + 1
        while len(self.runs) > RUNS_KEPT:
            self.runs.popitem(last=False)
        t0 = time.monotonic()
        self.store.update_job(job.id, state="running")
        try:
            if self.load_error:
                raise EstableError(self.load_error)
            if job.model is not None:
                entry = self.catalog.resolve(job.model)
                if self.entry is None or entry.path != self.entry.path:
                    self._load(entry)
            self._run_batches(job)
        except _Stop as stop:
            self._stopped(job, stop.reason)
        except OOM_ERRORS:
            p = job.params
            if self.pipe is not None:
                self.pipe.reset_graphs()  # recorded CUDA graphs hold memory pools of their own
            self._free_memory()
            self._finish(job, "failed", f"out of GPU memory generating {p.batch_size} image(s) at "
                                        f"{p.width or 'native'}x{p.height or 'native'} size; lower the size or the "
                                        "batch size")
        except EstableError as exc:
            self._finish(job, "failed", self._public(str(exc)))
        except Exception as exc:  # a bug: the job fails, the worker lives on
            log.exception(json.dumps({"event": "job_error", "job": job.id}))
            self._finish(job, "failed", f"internal error: {type(exc).__name__}: {exc}")
        else:
            if job.state == "running":
                self._finish(job, "done", None)
        finally:
            self.durations.append(time.monotonic() - t0)

    def _public(self, message: str) -> str:
        """``message`` with the model's path on this machine replaced by the name clients know it by."""
        sources = {str(self.entry.path)} if self.entry is not None else set()
        if self.pipe is not None and getattr(self.pipe.model, "source", None) is not None:
            sources.add(str(self.pipe.model.source))
        for source in sorted(sources, key=len, reverse=True):
            message = message.replace(source, f"the model {self.entry.name if self.entry else 'file'}")
        return message

    def _stopped(self, job: Job, reason: str) -> None:
        if reason == "cancel":
            self._finish(job, "cancelled", None)
        elif reason == "timeout":
            self._finish(job, "failed", f"the job took longer than the server's timeout of "
                                        f"{self.settings.job_timeout:g} s")
        else:
            self._finish(job, "interrupted", None if reason == "interrupt" else "the server shut down")

    def _run_batches(self, job: Job) -> None:
        p = job.params
        p = job.params = self.pipe.with_model_defaults(p, cfg=not job.cfg_given, sampler=not job.sampler_given)
        check_job_size(p, self.pipe.native_size, self.settings.limits, job.image if job.mode != "txt2img" else None)
        job.model_name = self.pipe.model_name
        job.model_hash = self.pipe.model_hash
        policy = self.provenance.for_mode(job.mode)  # the CLI's filter, marks, record and signature
        policy.prepare(self.pipe, job.mode)
        if self.networks is not None:
            self.networks.attach(self.pipe)
            job.units = self.networks.units(job.control, self.pipe) if job.control else []
        refused: list[str] = []
        deadline = time.monotonic() + self.settings.job_timeout
        interval = self.settings.preview_interval
        last_preview = time.monotonic()
        per_batch = job.steps // max(1, p.batch_count)
        for b in range(p.batch_count):
            bp = dataclasses.replace(p, seed=p.seed + b * p.batch_size, batch_count=1)

            def callback(step: int, total: int, latents: torch.Tensor, denoised: torch.Tensor, b: int = b) -> None:
                nonlocal last_preview, per_batch
                if total != per_batch:
                    per_batch = total
                    job.steps = total * p.batch_count
                job.step = b * total + step + 1
                job.version += 1
                if job.stop is not None:
                    raise _Stop(job.stop)
                if time.monotonic() > deadline:
                    raise _Stop("timeout")
                if interval > 0 and time.monotonic() - last_preview >= interval and step + 1 < total:
                    job.preview = png_bytes(self._preview(denoised))
                    last_preview = time.monotonic()

            try:
                result = self.generate(job, bp, callback)
            except _Stop as stop:
                if stop.reason != "skip":
                    raise
                job.stop = None
                continue
            if b == 0 and result.records:
                resolved = result.records[0]["params"]
                job.params = dataclasses.replace(p, width=resolved.get("width"), height=resolved.get("height"),
                                                 clip_skip=resolved.get("clip_skip"))
            offsets = {seed: k for k, seed in enumerate(result.seeds)}
            result, lost = policy.stamp(result, self.pipe)  # refused images leave the result: never written
            refused += [f"batch {b}, {line}" for line in lost]
            for img, seed, text, record in zip(result.images, result.seeds, result.infotexts, result.records):
                job.images.append(self.store.add_image(job.id, b * p.batch_size + offsets[seed], seed, img, text,
                                                       record))
            self._on_images(len(result.images))
            job.version += 1
            if job.stop == "skip":  # asked for after the last step of this batch
                job.stop = None
        job.units = []
        if refused:
            job.refused = True
            raise EstableError(policy.refusal_message(refused))

    def _preview(self, denoised: torch.Tensor) -> Image.Image:
        """The first image of the predicted clean latents, decoded by the VAE (the sampler's x0 guess)."""
        from ..images import to_pil

        pipe = self.pipe
        vae_dtype = next(pipe.vae.parameters()).dtype
        with torch.inference_mode():
            z = denoised[:1].float() / pipe.config.vae.scaling_factor
            image = pipe.vae.decode(z.to(pipe.device, vae_dtype)).float()
        return to_pil(image)[0]

    def _params_view(self, job: Job) -> dict[str, Any]:
        return job.params.to_dict()

    def _finish(self, job: Job, state: str, error: str | None) -> None:
        job.state = state
        job.error = error
        job.finished = time.time()
        job.preview = None
        job.units = []
        job.version += 1
        if state == "done":
            job.step = job.steps
        try:
            self.store.update_job(job.id, state=state, error=error, finished=job.finished, step=job.step,
                                  steps=job.steps, params=self._params_view(job), model=job.model_name or job.model)
            self._prune()  # before anyone waiting on this job is woken
        finally:
            with self._cond:
                self.jobs.pop(job.id, None)
                if self.current is job:  # over before anyone waiting on it wakes: /progress then reads idle
                    self.current = None
                self._cond.notify_all()
            job._set_done()
