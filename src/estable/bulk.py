"""Bulk generation: a file of prompts into a folder of PNGs, batched, resumable, sharded over processes.

``estable generate --prompts FILE --out DIR`` reads one request per line:

* ``FILE.txt`` (or any name not ending in ``.jsonl``/``.json``): each non-blank line is a prompt, taken literally;
* ``FILE.jsonl``: each non-blank line is JSON, either a string (the prompt) or an object of
  :class:`~estable.params.GenerationParams` fields (``{"prompt": "...", "seed": 7, "steps": 30}``); the fields it
  leaves out come from the command's flags.

A line asks for ``batch_size × batch_count`` images (default 1). Image ``k`` of the line on (1-based) line number
``n`` is written to ``DIR/NNNNNN-KKK.png`` (``000012-000.png``): names depend on the line's position in the file
only, so a second run over the same file and folder skips every image already there and makes only the missing
ones (a resumed run). A file is written under a temporary name and renamed into place, so an interrupted run
never leaves a half-written PNG that would count as done.

Seeds: a line's own ``seed`` wins; else ``--seed S`` gives line number n the seed S + (n - 1)·1000 (image k: + k);
else the seed is random and recorded in the PNG, like ``estable generate``.

Pending images with the same settings (size, sampler, steps, guidance, clip skip, eta, weighting) are denoised
together, ``--batch`` at a time, whatever their prompts; image k of a line is the image ``estable generate`` makes
for that line's parameters with seed + k, up to batched-arithmetic rounding.

Under ``torchrun --nproc_per_node K`` each process takes the lines whose index i (0-based, among the non-blank
lines) has i mod K == its rank, on its own GPU (``cuda:LOCAL_RANK``; gloo ranks on the CPU), so no image is made
twice; the ranks meet at a barrier at the end.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import EstableError
from .params import GenerationParams

if TYPE_CHECKING:
    from .pipeline import Pipeline

__all__ = ["Item", "MAX_BULK_BATCH", "Writer", "group_batches", "plan_items", "read_prompt_file", "run_bulk", "shard"]

MAX_BULK_BATCH = 256
SEED_STRIDE = 1000  # --seed S: line n starts at S + (n - 1) * SEED_STRIDE
# Fields that must agree for images to share one sampler run (the prompt, negative prompt and seed may differ).
_BATCH_KEYS = ("sampler", "steps", "cfg_scale", "width", "height", "clip_skip", "eta", "weighting")


@dataclass(frozen=True)
class Line:
    """One request of the prompt file: its 1-based line number, its index among the requests, its parameters."""

    number: int
    index: int
    params: GenerationParams
    seeded: bool  # whether the seed came from the line or from --seed (else: random at generation time)
    given: frozenset[str] = frozenset()  # the fields set by the line or by the command's flags


@dataclass(frozen=True)
class Item:
    """One image to make: image ``k`` of ``line``, written to ``name``."""

    line: Line
    k: int
    name: str

    @property
    def seed(self) -> int:
        return self.line.params.seed + self.k


def file_name(number: int, k: int) -> str:
    return f"{number:06d}-{k:03d}.png"


def read_prompt_file(path: str | Path, defaults: dict[str, Any] | None = None,
                     base_seed: int | None = None) -> list[Line]:
    """The requests of ``path`` (see the module docstring), each a GenerationParams over ``defaults``."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise EstableError(f"--prompts {path}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise EstableError(f"--prompts {path}: cannot read it as UTF-8 text ({exc})") from None
    is_json = path.suffix.lower() in (".jsonl", ".json")
    defaults = dict(defaults or {})
    lines: list[Line] = []
    for number, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        values = dict(defaults)
        if is_json:
            try:
                entry = json.loads(raw)
            except json.JSONDecodeError as exc:
                raise EstableError(f"{path}:{number}: not valid JSON ({exc.msg}); each line must be a JSON string "
                                   "or object") from None
            if isinstance(entry, str):
                values["prompt"] = entry
            elif isinstance(entry, dict):
                values.update(entry)
            else:
                raise EstableError(f"{path}:{number}: a line must be a JSON string or object, not "
                                   f"{type(entry).__name__}")
        else:
            values["prompt"] = raw.strip()
        if not isinstance(values.get("prompt"), str) or not values["prompt"].strip():
            raise EstableError(f"{path}:{number}: the request has no prompt")
        seeded = "seed" in values and values["seed"] != -1
        if not seeded and base_seed is not None and base_seed != -1:
            values["seed"], seeded = base_seed + (number - 1) * SEED_STRIDE, True
        try:
            params = GenerationParams.from_dict(values)
        except EstableError as exc:
            raise EstableError(f"{path}:{number}: {exc}") from None
        except TypeError as exc:
            raise EstableError(f"{path}:{number}: invalid parameters ({exc})") from None
        lines.append(Line(number, len(lines), params, seeded, frozenset(values)))
    if not lines:
        raise EstableError(f"--prompts {path} holds no prompt")
    return lines


def shard(lines: Sequence[Line], rank: int, world: int) -> list[Line]:
    """The lines process ``rank`` of ``world`` makes: index mod world == rank (disjoint, together all lines)."""
    return [ln for ln in lines if ln.index % world == rank]


def plan_items(lines: Sequence[Line], out: Path) -> tuple[list[Item], int]:
    """(images still to make, images already in ``out``) for ``lines``."""
    todo, done = [], 0
    for ln in lines:
        for k in range(ln.params.batch_size * ln.params.batch_count):
            name = file_name(ln.number, k)
            if (out / name).is_file():
                done += 1
            else:
                todo.append(Item(ln, k, name))
    return todo, done


def _batch_key(params: GenerationParams) -> tuple:
    return tuple(getattr(params, name) for name in _BATCH_KEYS)


def group_batches(items: Sequence[Item], batch: int) -> Iterator[list[Item]]:
    """Items in file order, cut into runs of at most ``batch`` that share their sampler settings."""
    groups: dict[tuple, list[Item]] = {}
    for it in items:
        groups.setdefault(_batch_key(it.line.params), []).append(it)
    for group in groups.values():
        for start in range(0, len(group), batch):
            yield group[start:start + batch]


def _resolve_seeds(items: Sequence[Item]) -> list[Item]:
    """Lines without a seed get a random one now (the same for all images of the line in this run)."""
    seeds: dict[int, int] = {}
    out = []
    for it in items:
        ln = it.line
        if not ln.seeded:
            if ln.number not in seeds:
                seeds[ln.number] = ln.params.resolved().seed
            ln = dataclasses.replace(ln, params=dataclasses.replace(ln.params, seed=seeds[ln.number]), seeded=True)
            it = dataclasses.replace(it, line=ln)
        out.append(it)
    return out


class Writer:
    """Stamps and writes finished images on a few threads while the caller goes on to the next batch (the GPU's
    work): PNG compression, the DWT watermark, hashing and fsync release the GIL for most of their time. Results come
    back in submission order from :meth:`ready`. ``workers=0``: each job runs at once in the caller's thread."""

    def __init__(self, workers: int, limit: int = 16) -> None:
        self.pool = ThreadPoolExecutor(workers, thread_name_prefix="estable-write") if workers > 0 else None
        self.pending: deque[Future] = deque()
        self.limit = max(1, limit)  # at most this many jobs waiting; more and ready() waits for the oldest

    def submit(self, fn: Callable[..., Any], *args: Any) -> None:
        if self.pool is not None:
            self.pending.append(self.pool.submit(fn, *args))
            return
        fut: Future = Future()
        try:
            fut.set_result(fn(*args))
        except BaseException as exc:
            fut.set_exception(exc)
        self.pending.append(fut)

    def ready(self, wait: bool = False) -> Iterator[Any]:
        """Results of the finished jobs, oldest first (a job's exception is raised here); ``wait``: all of them."""
        while self.pending and (wait or self.pending[0].done() or len(self.pending) > self.limit):
            yield self.pending.popleft().result()

    def __enter__(self) -> Writer:
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)


def generate_items(pipe: Pipeline, items: Sequence[Item], out: Path, policy: Any, writer: Writer) -> None:
    """Make ``items`` (one sampler run; they share their settings) and hand each image to ``writer``, whose results
    are ``(path, None)`` for a PNG written into ``out`` or ``(None, reason)`` for an image the output check refused.

    ``policy`` (a :class:`~estable.provenance.policy.ProvenancePolicy`) stamps each image before it is written, as
    ``estable generate`` does."""
    import torch

    from .images import to_pil

    policy.prepare(pipe, "txt2img")

    first = items[0].line.params
    params, spec, plan, width, height, clip_skip = pipe._setup("txt2img", first, None)
    contexts: dict[tuple[str, str], tuple[torch.Tensor, torch.Tensor]] = {}
    conds, unconds, owns = [], [], []
    for it in items:
        # the image's own parameters: its line's, with the prompt completed as the model's file asks
        p = dataclasses.replace(it.line.params, prompt=pipe.completed_prompt(it.line.params, it.seed))
        owns.append(p)
        key = (p.prompt, p.negative_prompt)
        if key not in contexts:
            contexts[key] = pipe.encode_prompts(p.prompt, p.negative_prompt, clip_skip=clip_skip,
                                                weighting=p.weighting)
        cond, uncond = contexts[key]
        conds.append(cond)
        unconds.append(uncond)
    start = 0
    while start < len(items):
        # Runs of consecutive images whose contexts have the same length (the same number of 77-token windows).
        end = start + 1
        while end < len(items) and conds[end].shape == conds[start].shape and \
                unconds[end].shape == unconds[start].shape:
            end += 1
        chunk = items[start:end]
        cond, uncond = torch.cat(conds[start:end]), torch.cat(unconds[start:end])  # (B, T, D)
        z = pipe._sample("txt2img", params, spec, plan, [it.seed for it in chunk], cond, uncond, None, None,
                         width, height, lambda *_: None)
        decoded, note = pipe._decode(z)
        if note:
            print(f"estable: warning: {note}", file=sys.stderr)
        for it, own, image in zip(chunk, owns[start:end], to_pil(decoded)):
            run = {"seed": own.seed, "batch_size": own.batch_size, "batch_count": own.batch_count, "index": it.k,
                   "prompts_line": it.line.number}
            text = pipe.infotext(own, it.seed, "txt2img", width, height)
            record = pipe.record(own, it.seed, "txt2img", width, height, run)
            writer.submit(_stamp_and_write, pipe, policy, it, image, text, record, out)
        start = end


def _stamp_and_write(pipe: Pipeline, policy: Any, it: Item, image: Any, text: str, record: dict[str, Any],
                     out: Path) -> tuple[Path | None, str | None]:
    from .pipeline import GenerationResult
    from .provenance.infotext import write_png

    made = GenerationResult([image], [it.seed], [text], [record], it.line.params)
    made, lost = policy.stamp(made, pipe)  # output check, watermark, pixel hash, device, signature
    if lost:  # refused by the output check: not written
        return None, f"line {it.line.number} ({it.name}): " + lost[0].split(": ", 1)[-1]
    # write_png writes beside the destination and renames: an interrupted run leaves no half-written PNG
    return write_png(out / it.name, made.images[0], parameters=made.infotexts[0], record=made.records[0]), None


def run_bulk(
    load: Callable[[str], Pipeline],
    prompts: str | Path,
    out: str | Path,
    *,
    defaults: dict[str, Any],
    base_seed: int | None,
    batch: int,
    device: str = "auto",
    progress: bool | None = None,
    on_path: Callable[[Path], None] | None = None,
    adjust: Callable[[Pipeline, Line], GenerationParams] | None = None,
    policy: Any = None,
) -> dict[str, Any]:
    """Generate every missing image of ``prompts`` into ``out``; returns counts for this process.

    ``load(device)`` builds the pipeline on the given device ("cpu", "cuda:N", ...). ``adjust(pipe, line)`` may change
    each line's parameters once the model is known (e.g. the model's recommended guidance scale). Under torchrun the
    process group is joined from the environment (NCCL on CUDA, gloo on the CPU) and left at the end.

    ``policy`` (:class:`~estable.provenance.policy.ProvenancePolicy`) filters every line's prompt before the model
    loads and stamps each image as ``estable generate`` does (default: the DWT watermark and a completed record).
    Images refused by its output check are not written; ``stats["refused"]`` lists them.
    """
    from tqdm import tqdm

    from .provenance.filters import PromptRefused
    from .provenance.policy import ProvenancePolicy
    from .training import distributed as D

    if not 1 <= batch <= MAX_BULK_BATCH:
        raise EstableError(f"--batch must be between 1 and {MAX_BULK_BATCH} for --prompts, not {batch}")
    out = Path(out)
    if out.suffix.lower() == ".png" or (out.exists() and not out.is_dir()):
        raise EstableError(f"--out {out}: with --prompts, --out must be a folder")
    lines = read_prompt_file(prompts, defaults, base_seed)
    policy = policy if policy is not None else ProvenancePolicy()
    from .sampling.samplers import get_sampler

    for line in lines:  # every prompt through the filter, every sampler known, before anything loads or is made
        try:
            policy.check_prompt(line.params.prompt)
        except PromptRefused as exc:
            raise PromptRefused(f"{prompts}, line {line.number}: {exc}") from None
        try:
            get_sampler(line.params.sampler)
        except ValueError as exc:
            raise EstableError(f"{prompts}, line {line.number}: {exc}") from None
    info = _join_group(device, D)
    try:
        mine = shard(lines, info.rank, info.world_size)
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise EstableError(f"cannot create the output folder {out}: {exc.strerror or exc}") from None
        todo, done = plan_items(mine, out)
        stats: dict[str, Any] = {"rank": info.rank, "world_size": info.world_size, "lines": len(mine),
                                 "made": 0, "skipped": done, "seconds": 0.0, "refused": []}
        if todo:
            dev = device
            if info.enabled and info.backend == "nccl":
                dev = f"cuda:{info.local_rank}"
            pipe = load(dev)
            if adjust is not None:
                cache: dict[int, GenerationParams] = {}
                todo = [dataclasses.replace(it, line=dataclasses.replace(
                    it.line, params=cache.setdefault(it.line.number, adjust(pipe, it.line))))
                    for it in todo]
            todo = _resolve_seeds(todo)
            show = progress if progress is not None else None
            desc = f"rank {info.rank}" if info.enabled else "images"
            # PNGs are stamped and written on threads while the next batch is made; the output check (a CLIP
            # model) stays in this thread
            workers = 0 if policy.output_check is not None else min(8, os.cpu_count() or 1)
            t0 = time.perf_counter()
            with tqdm(total=len(todo), unit="img", file=sys.stderr, disable=show if show is None else not show,
                      desc=desc, position=info.rank if info.enabled else None, leave=True) as bar, \
                    Writer(workers, limit=2 * batch) as writer:

                def collect(wait: bool = False) -> None:
                    for path, lost in writer.ready(wait):
                        if lost:
                            stats["refused"].append(lost)
                        else:
                            stats["made"] += 1
                            if on_path is not None:
                                on_path(path)
                        bar.update(1)

                for group in group_batches(todo, batch):
                    generate_items(pipe, group, out, policy, writer)
                    collect()
                collect(wait=True)
            stats["seconds"] = time.perf_counter() - t0
    except BaseException:
        if info.enabled:  # leave without the closing barrier: the other ranks may never reach it
            import torch.distributed as dist

            dist.destroy_process_group()
        raise
    if info.enabled:
        D.cleanup()  # a barrier, then leave: every rank has written its images
    return stats


def _join_group(device: str, D: Any) -> Any:
    """The torchrun process group: gloo when the work runs on the CPU, NCCL on GPUs."""
    import torch

    backend = None
    if str(device).startswith("cpu") or not torch.cuda.is_available():
        backend = "gloo"
    try:
        return D.init_distributed(backend)
    except (RuntimeError, ValueError) as exc:
        raise EstableError(f"cannot join the torchrun process group: {exc}") from None
