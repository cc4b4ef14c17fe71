"""The config sections every trainer has: optimizer, data, and ``TrainConfig`` (the fields of every trainer)."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

from estable.training.config.plain import _Plain, _positive, _positive_int

PRECISIONS = ("fp32", "bf16", "fp16")
STRATEGIES = ("ddp", "fsdp")
LR_SCHEDULES = ("constant", "cosine")


@dataclass(frozen=True)
class OptimConfig(_Plain):
    """AdamW (Loshchilov & Hutter 2019) with linear warm-up and a constant or cosine schedule."""

    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 1e-2
    eps: float = 1e-8
    warmup_steps: int = 0
    schedule: str = "constant"  # constant | cosine (to min_lr_ratio·lr at max_steps)
    min_lr_ratio: float = 0.0
    max_grad_norm: float | None = 1.0  # None: no clipping (the norm is still logged)
    fused: bool = True  # on CUDA, AdamW's fused kernel (one launch for all parameters); ignored on the CPU

    def __post_init__(self) -> None:
        _positive("optim.lr", self.lr)
        _positive("optim.eps", self.eps)
        _positive("optim.weight_decay", self.weight_decay, allow_zero=True)
        _positive_int("optim.warmup_steps", self.warmup_steps, allow_zero=True)
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"optim.betas must be two numbers in [0, 1), got {self.betas!r}")
        if self.schedule not in LR_SCHEDULES:
            raise ValueError(f"optim.schedule must be one of {', '.join(LR_SCHEDULES)}, not {self.schedule!r}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"optim.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio!r}")
        if self.max_grad_norm is not None:
            _positive("optim.max_grad_norm", self.max_grad_norm)


@dataclass(frozen=True)
class DataConfig(_Plain):
    """Where the images come from.

    source: "shapes" (the procedural shapes world, rendered on the fly), a folder with ``metadata.jsonl``, or
    tar shards (a glob or brace pattern ending in ``.tar``).
    """

    source: str = "shapes"
    size: int = 256
    shapes_length: int = 100_000  # how many shapes-world indices make one epoch
    shapes_seed: int = 0
    # Mix of the shapes world's prompt kinds (single, count, pair, colour_binding → weight); None: the world's
    # default mix (shapes.KIND_WEIGHTS).
    shapes_kinds: dict[str, float] | None = None
    # Odds of the background kinds (plain, gradient, textured → weight) among backgrounds a shapes caption names;
    # None: one in three each, the world's default. (Backgrounds a caption leaves unnamed are half plain, a quarter
    # each gradient and textured, always.)
    shapes_named_backgrounds: dict[str, float] | None = None
    # The share of the shapes captions that would name no background which name its grey instead ("on a textured grey
    # background"; the image is the same): 0, the world's default, never says "grey".
    shapes_grey_named: float = 0.0
    # Pair layouts with the relation's axis at least this many times the other (1, the world's default: any layout
    # the judge reads as the relation; 1.5 keeps training pairs further from the diagonal). Captions are unchanged.
    shapes_relation_axis_ratio: float = 1.0
    # The share of shapes scenes with objects of two colours laid out touching (the second against the first,
    # overlapping by at most the world's 20 %): 0, the world's default, changes no scene.
    shapes_contact: float = 0.0
    center_crop: bool = True
    random_flip: bool = False
    caption_column: str = "text"
    num_workers: int = 0
    # Validation: the last val_size items of a folder are held out of training; the shapes world uses a
    # separate seed; tar shards use their first val_size samples (not held out: documented limitation).
    val_size: int = 8

    def __post_init__(self) -> None:
        _positive_int("data.size", self.size)
        _positive_int("data.shapes_length", self.shapes_length)
        _positive_int("data.num_workers", self.num_workers, allow_zero=True)
        _positive_int("data.val_size", self.val_size, allow_zero=True)
        if not isinstance(self.shapes_grey_named, (int, float)) or not 0 <= self.shapes_grey_named <= 1:
            raise ValueError(f"data.shapes_grey_named must be between 0 and 1, not {self.shapes_grey_named!r}")
        if not isinstance(self.shapes_contact, (int, float)) or not 0 <= self.shapes_contact <= 1:
            raise ValueError(f"data.shapes_contact must be between 0 and 1, not {self.shapes_contact!r}")
        ratio = self.shapes_relation_axis_ratio
        if not isinstance(ratio, (int, float)) or not 1 <= ratio < math.inf:  # no pair layout meets an infinite one
            raise ValueError(f"data.shapes_relation_axis_ratio must be a finite number of at least 1, not {ratio!r}")
        if not isinstance(self.source, str) or not self.source:
            raise ValueError("data.source must be 'shapes', a folder path or a tar-shard pattern")
        from estable.training.shapes import BACKGROUND_KINDS, PROMPT_KINDS
        from estable.training.shapes.world import check_weights

        for name, value, keys in (("data.shapes_kinds", self.shapes_kinds, PROMPT_KINDS),
                                  ("data.shapes_named_backgrounds", self.shapes_named_backgrounds, BACKGROUND_KINDS)):
            if value is not None:
                check_weights(name, value, keys)


@dataclass(frozen=True)
class TrainConfig(_Plain):
    """Fields every trainer has. ``batch_size`` is per process and per micro-step."""

    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N (under torchrun: the local rank's GPU)
    precision: str = "fp32"  # fp32 | bf16 (autocast, no scaling) | fp16 (autocast + GradScaler)
    batch_size: int = 4
    grad_accum: int = 1
    max_steps: int = 1000
    # Wall-clock budget of this invocation, in minutes, counted from the trainer's start (building a latent cache
    # included): the run stops at the next log step after it and saves a checkpoint, and ``--resume`` continues it
    # (for time-limited jobs). None: no limit; 0: stop at the first log step.
    max_minutes: float | None = None
    optim: OptimConfig = field(default_factory=OptimConfig)
    ema_decay: float | None = 0.9999  # None: no EMA
    ema_warmup: bool = True  # decay_t = min(decay, (1 + t) / (10 + t)), as the LDM code's LitEma
    gradient_checkpointing: bool = False
    compile: bool = False  # torch.compile the trained network
    # "whole": the network in one graph; "blocks": each repeated block (ResNet, transformer) on its own, which
    # compiles several times faster (one graph per block shape) and works with gradient checkpointing.
    compile_scope: str = "whole"
    # torch.compile's mode: "default", or "reduce-overhead" (the compiled network replayed in torch's CUDA graphs;
    # whole scope only): on an H200 it trained the SD 1.5-shaped U-Net at batch 8 1.9x faster than eager
    # (benchmarks/RESULTS.md, seventh GPU run), where eager spends the step launching kernels.
    compile_mode: str = "default"
    # Convolution weights and activations in NHWC layout, and each convolution's input and output gradient held
    # to it (estable.nn.layout): with compile_mode=reduce-overhead (and GEGLU split, which the whole-scope compile
    # does: nn/attention.py) the SD 1.5-shaped U-Net's step at batch 32 ran 1.54-1.57x diffusers' on an H200
    # (benchmarks/RESULTS.md, fourteenth GPU run).
    channels_last: bool = False
    log_every: int = 10
    val_every: int = 100  # 0: never
    sample_every: int = 500  # 0: never
    save_every: int = 500  # 0: only at the end
    keep_checkpoints: int = 3  # the newest K checkpoints are kept
    tensorboard: bool = True  # also write TensorBoard events when torch.utils.tensorboard imports
    init_from: str | None = None  # fine-tune: weights of the trained network from a checkpoint
    # How several processes share the work: "ddp" (every rank holds the whole model) or "fsdp" (parameters,
    # gradients, optimizer state and EMA sharded over the ranks with FSDP2, torch >= 2.6; U-Net trainer only,
    # fp32 or bf16, no compile; see training/distributed.py).
    strategy: str = "ddp"
    data: DataConfig = field(default_factory=DataConfig)

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {', '.join(STRATEGIES)}, not {self.strategy!r}")
        if self.strategy == "fsdp" and self.precision == "fp16":
            # GradScaler's inf/NaN check would see only this rank's gradient shards, so ranks could disagree on
            # skipping a step; bf16 needs no scaler.
            raise ValueError("strategy=fsdp does not support precision=fp16; use precision=bf16 (or fp32)")
        if self.strategy == "fsdp" and self.compile:
            raise ValueError("compile=true is not supported with strategy=fsdp yet; use compile=false or "
                             "strategy=ddp")
        if self.compile_scope not in ("whole", "blocks"):
            raise ValueError(f"compile_scope must be 'whole' or 'blocks', not {self.compile_scope!r}")
        if self.compile_mode not in ("default", "reduce-overhead"):
            raise ValueError(f"compile_mode must be 'default' or 'reduce-overhead', not {self.compile_mode!r}")
        if self.compile_mode == "reduce-overhead" and self.compile_scope != "whole":
            raise ValueError("compile_mode=reduce-overhead needs compile_scope=whole (one CUDA graph for the "
                             "network, not one per block)")
        _positive_int("batch_size", self.batch_size)
        _positive_int("grad_accum", self.grad_accum)
        _positive_int("max_steps", self.max_steps)
        for name in ("log_every", "val_every", "sample_every", "save_every"):
            _positive_int(name, getattr(self, name), allow_zero=name != "log_every")
        _positive_int("keep_checkpoints", self.keep_checkpoints)
        _positive_int("seed", self.seed, allow_zero=True)
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, not {self.precision!r}")
        if not isinstance(self.device, str) or not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", self.device):
            raise ValueError(f"device must be auto, cpu, cuda, cuda:N or mps, not {self.device!r}")
        if self.max_minutes is not None:  # 0: stop at the first log step (after set-up), with a checkpoint
            _positive("max_minutes", self.max_minutes, allow_zero=True)
        if self.ema_decay is not None and not 0 <= self.ema_decay < 1:
            raise ValueError(f"ema_decay must be in [0, 1) or null (no EMA), got {self.ema_decay!r}")

