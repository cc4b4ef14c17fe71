"""The training loop, one for every trainer: :class:`Trainer` and the schedule and data order it keeps.

Each trainer (``unet_trainer.py``, ``vae_trainer.py``, ``clip_trainer.py``, …) subclasses :class:`Trainer` and
builds its networks, data and objective; the loop, checkpoints, exact resume, EMA, DDP/FSDP and mixed precision
are here. ``estable.training.registry`` maps a trainer kind to its class.

One optimizer step (``Trainer.train``):

    lr ← schedule(step)                                   linear warm-up, then constant or cosine
    repeat grad_accum times:                              (gradients synchronised on the last one only)
        batch ← this rank's slice of the next global micro-batch (seeded order, resumable position)
        draws ← every random number of the global micro-batch from ONE seeded CPU generator; keep this rank's rows
        loss  ← objective(batch, draws) under autocast; backward(loss · scale / grad_accum)
    unscale, clip the gradient norm, AdamW step (skipped by the GradScaler on inf/NaN), EMA update
    log / validate / sample / checkpoint on their schedules (rank 0 writes)

Exact resume: the checkpoint holds the weights, EMA, optimizer, GradScaler, the draw generator, the global RNG
states and the data position, so N steps in one go and N/2 + resume + N/2 give identical weights on the CPU.
The draws come from one generator for the whole global batch, so K processes × batch b and 1 process ×
batch K·b see the same data and the same noise (gradients then agree up to float summation order).

strategy=fsdp (U-Net trainer; see training/distributed.py): the U-Net is sharded with FSDP2 (each down block, the
mid block and each up block is a unit, the U-Net the root); the frozen VAE and text encoder stay whole on every
rank. AdamW steps on the shards. The EMA shadows are DTensors sharded like the parameters (fp32, so 4 bytes ×
params / world per rank). Checkpoints gather everything to full tensors on rank 0, so the files have the
single-process layout and load anywhere (DDP, one process, or FSDP with another world size); resume cuts them back
into shards. Validation and sample grids run on every rank (each sharded forward needs all ranks); rank 0 writes.
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from PIL import Image
from torch import nn
from tqdm import tqdm

from estable.errors import CheckpointError, EstableError
from estable.nn.layout import pin_channels_last
from estable.training import distributed as D
from estable.training.builders import collate
from estable.training.config import OptimConfig, TrainConfig
from estable.training.ema import EMA
from estable.training.runs import (
    Checkpoint,
    Run,
    capture_rng_state,
    list_checkpoints,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
)
from estable.training.seeding import SEED_DRAWS, SEED_GLOBAL, SEED_INIT, SEED_VAL, seed_global_rngs, seeded

C = TypeVar("C", bound=TrainConfig)


# ---------------------------------------------------------------------------------------------------------
# Learning rate, data order, device
# ---------------------------------------------------------------------------------------------------------


def lr_factor(optim: OptimConfig, step: int, max_steps: int) -> float:
    """Multiplier of ``optim.lr`` for the optimizer step with 0-based index ``step``.

    Warm-up: (step + 1) / warmup_steps for the first warmup_steps steps; then 1 (constant) or the cosine
    half-wave from 1 to min_lr_ratio over the remaining steps (Loshchilov & Hutter 2017, eq. 5, one cycle).
    """
    if optim.warmup_steps and step < optim.warmup_steps:
        return (step + 1) / optim.warmup_steps
    if optim.schedule == "constant":
        return 1.0
    span = max(1, max_steps - optim.warmup_steps)
    progress = min(1.0, (step - optim.warmup_steps) / span)
    return optim.min_lr_ratio + (1 - optim.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


class ResumableBatchSampler(torch.utils.data.Sampler):
    """Endless per-rank batches over a seeded global order of ``n`` items.

    The global order is a fresh permutation per epoch, a pure function of (seed, epoch). Global micro-batch k
    is positions [k·B, (k + 1)·B) of the concatenated epochs, B = batch_size · world_size; rank r takes the
    contiguous slice [r·b, (r + 1)·b). ``start`` is the global position to begin at (samples consumed by all
    ranks), which is what a checkpoint records.
    """

    def __init__(self, n: int, batch_size: int, *, rank: int = 0, world_size: int = 1, seed: int = 0,
                 shuffle: bool = True, start: int = 0) -> None:
        if n < 1:
            raise EstableError("the dataset is empty")
        self.n, self.batch_size, self.rank, self.world_size = n, batch_size, rank, world_size
        self.seed, self.shuffle, self.start = seed, shuffle, start
        self._epoch_cache: tuple[int, np.ndarray] | None = None

    def order(self, epoch: int) -> np.ndarray:
        if self._epoch_cache is not None and self._epoch_cache[0] == epoch:
            return self._epoch_cache[1]
        order = np.random.default_rng([self.seed, epoch]).permutation(self.n) if self.shuffle else np.arange(self.n)
        self._epoch_cache = (epoch, order)
        return order

    def global_indices(self, position: int, count: int) -> list[int]:
        out = []
        for p in range(position, position + count):
            epoch, i = divmod(p, self.n)
            out.append(int(self.order(epoch)[i]))
        return out

    def __iter__(self) -> Iterator[list[int]]:
        b, world = self.batch_size, self.world_size
        position = self.start
        while True:
            yield self.global_indices(position + self.rank * b, b)
            position += b * world

    def __len__(self) -> int:  # endless; DataLoader only needs this for len(loader)
        return sys.maxsize


def resolve_device(spec: str, info: D.DistInfo) -> torch.device:
    if spec == "auto":
        return torch.device(f"cuda:{info.local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    if spec.startswith("cuda") and not torch.cuda.is_available():
        raise EstableError(f"device {spec!r} requested but CUDA is not available")
    if spec == "cuda":
        return torch.device(f"cuda:{info.local_rank}")
    return torch.device(spec)


def expect_config(config: TrainConfig, cls: type[C], trainer: str) -> C:
    """``config`` when it is a ``cls`` (how a trainer's ``resolve_config`` starts), else a one-line error."""
    if not isinstance(config, cls):
        raise EstableError(f"the {trainer} trainer needs a {cls.__name__}, not {type(config).__name__}")
    return config


# ---------------------------------------------------------------------------------------------------------
# The generic trainer
# ---------------------------------------------------------------------------------------------------------


class Trainer:
    """Owns the loop; subclasses build the networks and say how to draw, forward and sample.

    Subclass hooks: ``build()`` sets ``network`` (the trained nn.Module: EMA, checkpoints), ``objective``
    (nn.Module whose forward returns (loss, metrics); DDP wraps it), ``extra_networks`` (saved beside the model),
    ``train_data`` and ``val_items``; plus ``prepare``, ``draw``, ``call``, ``sample_image``, ``metadata``,
    ``param_groups`` and ``after_optimizer_step``.
    """

    kind = "base"
    # strategy=fsdp: whether the trainer shards its network (``fsdp_blocks``), else why not (said in the error)
    supports_fsdp = False
    no_fsdp_reason = "it has no FSDP support"

    def __init__(self, config: TrainConfig, run_dir: str | Path, *, resume: bool = False,
                 progress: bool | None = None) -> None:
        self.started = time.monotonic()  # max_minutes counts from here: set-up (latent caches, loading) included
        self.dist = D.init_distributed()
        if config.strategy == "fsdp" and not self.supports_fsdp:
            raise EstableError(f"strategy=fsdp is not available for the {self.kind} trainer ({self.no_fsdp_reason}); "
                               "use strategy=ddp")
        if config.strategy == "fsdp" and not D.fsdp_available():
            raise EstableError(f"strategy=fsdp needs torch >= 2.6 with torch.distributed (this is {torch.__version__});"
                               " use strategy=ddp")
        # FSDP shards only when there are several ranks; a single process trains as usual.
        self.sharded = config.strategy == "fsdp" and self.dist.enabled
        self.device = resolve_device(config.device, self.dist)
        self.config = self.resolve_config(config)
        cfg = self.config
        if resume and not Path(run_dir).is_dir():  # before Run() creates it: a typo must not start a fresh run
            raise EstableError(f"cannot resume: the run folder {run_dir} does not exist")
        self.progress = progress
        fresh = not Path(run_dir).exists()
        self.run = Run(run_dir, is_main=self.dist.is_main, tensorboard=cfg.tensorboard)
        try:
            self.set_up(resume)
        except BaseException:
            if fresh:  # a failed set-up leaves no empty run folder behind
                self.run.remove_if_unused()
            raise

    def set_up(self, resume: bool) -> None:
        """Build the networks, the EMA, the optimizer and the RNGs (from the checkpoint when resuming)."""
        cfg = self.config
        found = self.run.latest_checkpoint()
        if found is not None and not resume:
            raise EstableError(f"{self.run.root} already holds checkpoints; pass --resume to continue that run "
                               "or choose another --run-dir")
        self.extra_networks: dict[str, nn.Module] = {}
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seeded(cfg.seed, SEED_INIT))
            self.build()
        self.objective.to(self.device)
        if cfg.channels_last:
            self.network.to(memory_format=torch.channels_last)
            pin_channels_last(self.network)  # the convolutions' gradients too (nn/layout.py)
        if cfg.gradient_checkpointing:
            if not hasattr(self.network, "gradient_checkpointing"):
                raise EstableError(f"gradient_checkpointing is not available for the {self.kind} network")
            self.network.gradient_checkpointing = True
        if self.sharded:
            # Shard before the EMA and the optimizer are made, so that both hold shards (DTensors).
            D.shard_fsdp(self.network, self.fsdp_blocks(), self.device)
        self.ema = EMA(self.network, cfg.ema_decay, warmup=cfg.ema_warmup) if cfg.ema_decay is not None else None
        # extra networks that are trained too get an EMA of their own (saved as NAME_ema)
        self.extra_emas = {name: EMA(self.extra_networks[name], cfg.ema_decay, warmup=cfg.ema_warmup)
                           for name in self.averaged_extras()} if cfg.ema_decay is not None else {}
        if cfg.compile:
            self.compile_network()
        self.model = self.objective if self.sharded else D.wrap_ddp(self.objective, self.device)
        self.params = [p for p in self.objective.parameters() if p.requires_grad]
        if self.sharded and (self.extra_networks or not all(D.is_sharded(p) for p in self.params)):
            # Their gradients would never be synchronised between ranks (no DDP here).
            raise EstableError(f"strategy=fsdp: the {self.kind} trainer has trainable parameters outside the "
                               "sharded network; use strategy=ddp")
        self.optimizer = self.make_optimizer()
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=cfg.precision == "fp16")
        self.generator = torch.Generator().manual_seed(seeded(cfg.seed, SEED_DRAWS))
        self.step = 0
        self.position = 0  # global samples consumed (all ranks)
        self.last_log: dict[str, Any] = {}
        # The global RNGs (dropout such as LoRA's, random flips, a caption picked from a list) start from the seed,
        # one stream per rank, so that a run is a function of its config; a resume restores them instead.
        seed_global_rngs(seeded(cfg.seed, SEED_GLOBAL) + self.dist.rank)
        if resume and found is not None:
            self.load_state(self.read_checkpoint(found))
        # log records past the checkpoint's step (or all of them, when no checkpoint was reached) are of steps
        # that a killed run did not keep: this run does them again
        self.run.truncate_log(self.step)
        self.run.write_config(cfg.to_dict())

    def read_checkpoint(self, found: Path) -> Checkpoint:
        """The checkpoint to resume from; when it is damaged, the error names the one before it."""
        try:
            return load_checkpoint(found)
        except CheckpointError as exc:
            older = [p for p in list_checkpoints(self.run.checkpoints_dir) if p.name != found.name]
            if not older:
                raise
            raise CheckpointError(f"{exc}; to resume from the checkpoint before it, {older[-1].name}, move "
                                  f"{found.name} out of {self.run.checkpoints_dir}") from None

    # -- hooks -------------------------------------------------------------------------------------------------
    def resolve_config(self, config: TrainConfig) -> TrainConfig:
        return config

    def build(self) -> None:
        raise NotImplementedError

    def prepare(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def draw(self, n: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def call(self, model: nn.Module, batch: dict[str, torch.Tensor],
             draws: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict]:
        return model(batch, draws)

    def sample_image(self) -> Image.Image | None:
        return None

    def metadata(self) -> dict[str, str]:
        return {}

    def param_groups(self) -> list[dict[str, Any]]:
        return [{"params": self.params}]

    def compile_network(self) -> None:
        raise EstableError(f"compile is not available for the {self.kind} trainer")

    def averaged_extras(self) -> list[str]:
        """Names of ``extra_networks`` that are trained and kept with an EMA like ``network``."""
        return []

    def after_optimizer_step(self) -> None:
        """Called after every optimizer step, before the EMA update (e.g. to clamp a parameter)."""

    def fsdp_blocks(self) -> list[nn.Module]:
        """Submodules of ``network`` that FSDP shards as separate units (strategy=fsdp)."""
        raise EstableError(f"strategy=fsdp is not available for the {self.kind} trainer; use strategy=ddp")

    # -- pieces ------------------------------------------------------------------------------------------------
    def make_optimizer(self) -> torch.optim.Optimizer:
        o = self.config.optim
        groups = self.param_groups()
        for g in groups:
            g.setdefault("base_lr", o.lr)
        kwargs: dict[str, Any] = {"lr": o.lr, "betas": tuple(o.betas), "eps": o.eps, "weight_decay": o.weight_decay}
        if self.device.type == "cuda" and o.fused:
            try:
                return torch.optim.AdamW(groups, fused=True, **kwargs)
            except (RuntimeError, TypeError):  # fused kernels unsupported for these params / this build
                pass
        return torch.optim.AdamW(groups, **kwargs)

    def autocast(self) -> contextlib.AbstractContextManager:
        p = self.config.precision
        if p == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16 if p == "bf16" else torch.float16)

    def _slice(self, draws: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        b, r = self.config.batch_size, self.dist.rank
        return {k: self.to_device(v[r * b:(r + 1) * b]) for k, v in draws.items()}

    def to_device(self, v: torch.Tensor) -> torch.Tensor:
        """A host tensor of the step onto the run's device. On a GPU through pinned memory, asynchronously: a copy
        from pageable memory would wait for the GPU to finish its queue, and the host could not prepare the next
        step while the GPU works on this one."""
        if self.device.type == "cuda":
            return v.pin_memory().to(self.device, non_blocking=True)
        return v.to(self.device)

    def batches(self) -> Iterator[dict[str, torch.Tensor]]:
        """This rank's prepared micro-batches from the current data position on (endless)."""
        cfg, info = self.config, self.dist
        data = self.train_data
        common = {"collate_fn": collate, "num_workers": cfg.data.num_workers,
                  "pin_memory": self.device.type == "cuda", "generator": torch.Generator(),
                  "persistent_workers": cfg.data.num_workers > 0}
        if isinstance(data, torch.utils.data.IterableDataset):
            # A stream cannot seek: skip the micro-batches this rank consumed before the checkpoint.
            skip = self.position // (cfg.batch_size * info.world_size)
            epoch = 0
            while True:
                data.set_epoch(epoch)
                loader = torch.utils.data.DataLoader(data, batch_size=cfg.batch_size, drop_last=True, **common)
                got = False
                for batch in loader:
                    got = True
                    if skip:
                        skip -= 1
                        continue
                    yield self.prepare(batch)
                if not got:
                    raise EstableError(f"data source {cfg.data.source!r} yielded no complete batch")
                epoch += 1
        sampler = ResumableBatchSampler(len(data), cfg.batch_size, rank=info.rank, world_size=info.world_size,
                                        seed=cfg.seed, start=self.position)
        loader = torch.utils.data.DataLoader(data, batch_sampler=sampler, **common)
        for batch in loader:
            yield self.prepare(batch)

    # -- state -------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "lr_schedule": {"name": self.config.optim.schedule, "factor": lr_factor(
                self.config.optim, self.step, self.config.max_steps)},
            "rng": capture_rng_state(),
            "generator": self.generator.get_state(),
            "data": {"position": self.position},
            "config": self.config.to_json(),
        }

    def load_state(self, ckpt: Checkpoint) -> None:
        st = ckpt.state
        if st.get("kind") != self.kind:
            raise CheckpointError(f"{ckpt.path} is a {st.get('kind')!r} checkpoint, not {self.kind}")
        if "model" not in ckpt.tensors:
            raise CheckpointError(f"{ckpt.path} has no model.safetensors")
        model_sd = ckpt.tensors["model"]
        if self.sharded:  # full tensors from the file → this rank's shards
            model_sd = D.shard_like(model_sd, self.network.state_dict())
        try:
            self.network.load_state_dict(model_sd, strict=True)
            for name, module in self.extra_networks.items():
                module.load_state_dict(ckpt.tensors[name], strict=True)
        except (RuntimeError, KeyError) as exc:
            lines = str(exc).strip().splitlines() or [repr(exc)]
            # torch's first line only says "Error(s) in loading state_dict for UNet:"; the next says which tensor
            first = " ".join((lines[1] if len(lines) > 1 and lines[0].startswith("Error(s)") else lines[0]).split())
            first = first if len(first) <= 300 else first[:300] + " …"
            raise CheckpointError(f"{ckpt.path} does not fit the configured {self.kind} (was the model config or "
                                  f"the discriminator switch changed since the run started?): {first}") from None
        if self.ema is not None:
            if "ema" not in ckpt.tensors:
                raise CheckpointError(f"{ckpt.path} has no EMA weights but this run uses ema_decay")
            ema_sd = D.shard_like(ckpt.tensors["ema"], self.ema.shadow) if self.sharded else ckpt.tensors["ema"]
            self.ema.load_state_dict(ema_sd)
        for name, ema in self.extra_emas.items():
            if f"{name}_ema" not in ckpt.tensors:
                raise CheckpointError(f"{ckpt.path} has no EMA weights of the {name}")
            ema.load_state_dict(ckpt.tensors[f"{name}_ema"])
        optim_sd = D.shard_optimizer_state(self.optimizer, st["optimizer"]) if self.sharded else st["optimizer"]
        self.optimizer.load_state_dict(optim_sd)
        self.scaler.load_state_dict(st["scaler"])
        self.generator.set_state(st["generator"])
        restore_rng_state(st["rng"])
        self.position = int(st["data"]["position"])
        self.step = ckpt.step

    def save(self) -> Path | None:
        D.barrier()
        path = None
        # Under FSDP every rank takes part in gathering the shards into full tensors (collectives).
        if self.dist.is_main or self.sharded:
            tensors = {"model": self.network.state_dict()}
            if self.ema is not None:
                tensors["ema"] = self.ema.state_dict()
            tensors.update({k: m.state_dict() for k, m in self.extra_networks.items()})
            tensors.update({f"{k}_ema": e.state_dict() for k, e in self.extra_emas.items()})
            state = self.state_dict()
            if self.sharded:  # full CPU tensors on rank 0 (None elsewhere), one all-gather per DTensor
                tensors = D.gather_full(tensors, keep=self.dist.is_main)
                state["optimizer"] = D.gather_full(state["optimizer"], keep=self.dist.is_main)
            if self.dist.is_main:
                meta = {"kind": self.kind, "train_config": self.config.to_json(), **self.metadata()}
                path = save_checkpoint(self.run.checkpoints_dir, self.step, tensors, state, meta,
                                       keep=self.config.keep_checkpoints)
        D.barrier()
        return path

    # -- periodic work -----------------------------------------------------------------------------------------
    @torch.no_grad()
    def validate(self) -> dict[str, Any] | None:
        """Loss on the fixed held-out batch with fixed draws (rank 0; under FSDP every rank computes it, since the
        sharded forward needs all ranks, and rank 0 logs it)."""
        if not (self.dist.is_main or self.sharded) or not self.val_items:
            return None
        batch = self.prepare(collate(self.val_items))
        gen = torch.Generator().manual_seed(seeded(self.config.seed, SEED_VAL))
        draws = {k: v.to(self.device) for k, v in self.draw(len(self.val_items), gen).items()}
        self.objective.eval()
        with self.autocast():
            loss, metrics = self.call(self.objective, batch, draws)
        self.objective.train()
        record = {"type": "val", "step": self.step, "loss": float(loss),
                  **{k: float(v) for k, v in metrics.items()}}
        self.run.log(record)
        return record

    @torch.no_grad()
    def sample(self) -> Path | None:
        if not (self.dist.is_main or self.sharded):  # FSDP: every rank runs the sampler, rank 0 writes
            return None
        self.objective.eval()
        with contextlib.ExitStack() as stack:
            if self.ema is not None:
                stack.enter_context(self.ema.swapped(self.network))
            for name, ema in self.extra_emas.items():
                stack.enter_context(ema.swapped(self.extra_networks[name]))
            image = self.sample_image()
        self.objective.train()
        if image is None or not self.dist.is_main:
            return None
        path = self.run.save_image(image, self.step)
        self.run.log({"type": "sample", "step": self.step, "path": str(path.relative_to(self.run.root))})
        return path

    # -- the loop ----------------------------------------------------------------------------------------------
    def train(self, until: int | None = None) -> dict[str, Any]:
        """Run until ``max_steps`` (or stop early at step ``until``, saving a checkpoint there, as a preempted
        job would); returns the last training log record."""
        cfg, info = self.config, self.dist
        stop = cfg.max_steps if until is None else min(until, cfg.max_steps)
        b, accum, world = cfg.batch_size, cfg.grad_accum, info.world_size
        show = self.progress if self.progress is not None else (info.is_main and sys.stderr.isatty())
        bar = tqdm(total=cfg.max_steps, initial=self.step, disable=not show or not info.is_main, unit="step",
                   dynamic_ncols=True, file=sys.stderr)
        max_norm = cfg.optim.max_grad_norm if cfg.optim.max_grad_norm is not None else float("inf")
        data = self.batches()
        sums: dict[str, torch.Tensor] = {}
        count, window_steps, t0 = 0, 0, time.perf_counter()
        deadline = None if cfg.max_minutes is None else self.started + 60.0 * cfg.max_minutes
        self.objective.train()
        try:
            while self.step < stop:
                factor = lr_factor(cfg.optim, self.step, cfg.max_steps)
                for g in self.optimizer.param_groups:
                    g["lr"] = g["base_lr"] * factor
                for micro in range(accum):
                    batch = next(data)
                    self.position += b * world
                    draws = self._slice(self.draw(b * world, self.generator))
                    # backward inside the block: FSDP decides on gradient communication during backward
                    with D.no_sync(self.model, micro < accum - 1):
                        with self.autocast():
                            loss, metrics = self.call(self.model, batch, draws)
                        self.scaler.scale(loss / accum).backward()
                    for k, v in {"loss": loss.detach(), **metrics}.items():
                        sums[k] = sums.get(k, 0) + v.detach().float()
                    count += 1
                self.scaler.unscale_(self.optimizer)
                # FSDP: the norm over all shards (clip_grad_norm_ reduces DTensor norms); full_value makes it plain
                grad_norm = D.full_value(torch.nn.utils.clip_grad_norm_(self.params, max_norm))
                self.scaler.step(self.optimizer)
                self.scaler.update()
                self.optimizer.zero_grad(set_to_none=True)
                self.after_optimizer_step()
                self.step += 1
                window_steps += 1
                if self.ema is not None:
                    self.ema.update(self.network, self.step)
                for name, ema in self.extra_emas.items():
                    ema.update(self.extra_networks[name], self.step)
                bar.update(1)
                if deadline is not None and self.step % cfg.log_every == 0:
                    # every rank must stop at the same step: stop when any rank is out of time
                    late = torch.tensor(float(time.monotonic() > deadline), device=self.device)
                    if float(D.all_reduce_mean(late)) > 0:
                        stop = self.step
                if self.step % cfg.log_every == 0 or self.step == stop:
                    elapsed = max(time.perf_counter() - t0, 1e-9)
                    means = {k: float(D.all_reduce_mean(v / count)) for k, v in sums.items()}
                    rate = window_steps / elapsed
                    record = {"type": "train", "step": self.step, **means, "lr": cfg.optim.lr * factor,
                              "grad_norm": float(grad_norm), "steps_per_s": rate,
                              "images_per_s": rate * b * accum * world, "samples_seen": self.position}
                    if self.scaler.is_enabled():
                        record["loss_scale"] = float(self.scaler.get_scale())
                    self.run.log(record)
                    self.last_log = record
                    bar.set_postfix(loss=f"{means['loss']:.4f}", lr=f"{record['lr']:.2e}")
                    sums, count, window_steps, t0 = {}, 0, 0, time.perf_counter()
                if cfg.val_every and self.step % cfg.val_every == 0:
                    self.validate()
                if cfg.sample_every and self.step % cfg.sample_every == 0:
                    self.sample()
                if (cfg.save_every and self.step % cfg.save_every == 0) or self.step == stop:
                    self.save()
        finally:
            bar.close()
        D.barrier()
        self.run.close()
        return self.last_log

    def close(self) -> None:
        """Release the DDP wrapper before the process group goes away (gloo's worker threads may otherwise still
        hold work items when the interpreter shuts down, which aborts the process)."""
        import gc

        self.model = self.objective
        gc.collect()


__all__ = [
    "ResumableBatchSampler",
    "Trainer",
    "expect_config",
    "lr_factor",
    "resolve_device",
]
