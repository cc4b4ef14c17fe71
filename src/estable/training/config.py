"""Training configurations: one dataclass per trainer, named presets, JSON files and ``key=value`` overrides.

A config is resolved in three layers: a base (a preset name defined below, or a JSON file holding any subset
of the fields; missing fields keep their defaults), then ``key=value`` overrides from the command line, then
validation. Dotted keys reach nested fields (``optim.lr=3e-4``, ``model.block_channels=[32,64]``); values are
parsed as JSON when they parse (numbers, lists, ``true``/``false``/``null``), otherwise taken as strings. An
unknown key is an error that lists the valid keys at that level.

The resolved config is written into the run folder (``config.json``) and into every checkpoint; a run's
``config.json`` is itself a valid ``--config`` file.

Glossary:
  batch_size    samples per process per micro-step; the global batch is batch_size × grad_accum × world size
  objective     what the U-Net predicts: "eps" (ε, Ho et al. 2020) or "v" (Salimans & Ho 2022, sec. 4)
  min_snr_gamma γ of min-SNR-γ loss weighting (Hang et al. 2023), None = uniform weights
  offset_noise  strength of the per-channel constant added to ε (Guttenberg 2023, "diffusion with offset noise")
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from estable.config import ScheduleConfig, TextConfig, UNetConfig, VAEConfig
from estable.errors import EstableError

T = TypeVar("T")

PRECISIONS = ("fp32", "bf16", "fp16")
STRATEGIES = ("ddp", "fsdp")
LORA_TARGETS = ("unet", "unet+text")
LR_SCHEDULES = ("constant", "cosine")
OBJECTIVES = ("eps", "v")


# ---------------------------------------------------------------------------------------------------------
# Generic dict <-> dataclass conversion (nested, with tuples, with clear errors)
# ---------------------------------------------------------------------------------------------------------


def _to_plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _to_plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (tuple, list)):
        return [_to_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _to_plain(v) for k, v in value.items()}
    return value


def _dataclass_type(hint: Any) -> type | None:
    """The dataclass type of a field hint (``X`` or ``X | None``), or None."""
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        return hint
    for arg in typing.get_args(hint):
        if isinstance(arg, type) and dataclasses.is_dataclass(arg):
            return arg
    return None


def _is_tuple(hint: Any) -> bool:
    return typing.get_origin(hint) is tuple or any(typing.get_origin(a) is tuple for a in typing.get_args(hint))


def build_dataclass(cls: type[T], data: dict[str, Any], where: str = "") -> T:
    """Instantiate ``cls`` from a (possibly partial) plain dict; nested dataclasses are built recursively."""
    if not isinstance(data, dict):
        raise ValueError(f"config {where or cls.__name__}: expected an object, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - fields)
    if unknown:
        raise ValueError(
            f"unknown config key(s) {', '.join(repr(_join(where, k)) for k in unknown)}; "
            f"valid keys{' under ' + repr(where) if where else ''}: {', '.join(sorted(fields))}"
        )
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        hint = hints[name]
        sub = _dataclass_type(hint)
        if sub is not None and isinstance(value, dict):
            value = build_dataclass(sub, value, _join(where, name))
        elif isinstance(value, list) and _is_tuple(hint):
            value = tuple(value)
        kwargs[name] = value
    try:
        return cls(**kwargs)
    except TypeError as exc:  # a wrong type deep inside a nested config
        raise ValueError(f"config {where or cls.__name__}: {exc}") from None


def _join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


class _Plain:
    """to_dict / from_dict / to_json / replace for the training dataclasses."""

    def to_dict(self) -> dict[str, Any]:
        return _to_plain(self)

    @classmethod
    def from_dict(cls: type[T], data: dict[str, Any]) -> T:
        return build_dataclass(cls, data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    def replace(self: T, **changes: Any) -> T:
        return dataclasses.replace(self, **changes)  # type: ignore[type-var]


def _positive(name: str, value: Any, *, allow_zero: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and (value >= 0 if allow_zero else value > 0)
    if not ok:
        raise ValueError(f"{name} must be a {'non-negative' if allow_zero else 'positive'} number, got {value!r}")


def _positive_int(name: str, value: Any, *, allow_zero: bool = False) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < (0 if allow_zero else 1):
        raise ValueError(f"{name} must be a {'non-negative' if allow_zero else 'positive'} integer, got {value!r}")


def _check_diffusion_loss(cfg: Any, *, caption_dropout: bool = True) -> None:
    """The diffusion loss's options, alike in the U-Net, LoRA, ControlNet and TI configs: min-SNR-γ, offset noise
    and (where the trainer drops captions) caption dropout."""
    if cfg.min_snr_gamma is not None:
        _positive("min_snr_gamma", cfg.min_snr_gamma)
    _positive("offset_noise", cfg.offset_noise, allow_zero=True)
    if caption_dropout and not 0 <= cfg.caption_dropout <= 1:
        raise ValueError(f"caption_dropout must be in [0, 1], got {cfg.caption_dropout!r}")


def _check_frozen_base(cfg: Any, trainer: str, weights_from: str) -> None:
    """``clip_skip`` and ``init_from`` of a trainer on a frozen base model (LoRA, ControlNet, TI): init_from has no
    use there, so it is refused with where the weights come from instead."""
    if cfg.clip_skip is not None:
        _positive_int("clip_skip", cfg.clip_skip)
    if cfg.init_from:
        raise ValueError(f"init_from is not used by the {trainer} trainer; {weights_from}")


# ---------------------------------------------------------------------------------------------------------
# Sections shared by the trainers
# ---------------------------------------------------------------------------------------------------------


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
        if not isinstance(self.source, str) or not self.source:
            raise ValueError("data.source must be 'shapes', a folder path or a tar-shard pattern")
        if self.shapes_kinds is not None:
            from estable.training.shapes import PROMPT_KINDS

            kinds = self.shapes_kinds
            if (not isinstance(kinds, dict) or not kinds or set(kinds) - set(PROMPT_KINDS)
                    or not all(isinstance(w, (int, float)) and not isinstance(w, bool) and w >= 0
                               for w in kinds.values()) or sum(kinds.values()) <= 0):
                raise ValueError(f"data.shapes_kinds must map some of {', '.join(PROMPT_KINDS)} to non-negative "
                                 f"weights, got {kinds!r}")


@dataclass(frozen=True)
class TrainConfig(_Plain):
    """Fields every trainer has. ``batch_size`` is per process and per micro-step."""

    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N (under torchrun: the local rank's GPU)
    precision: str = "fp32"  # fp32 | bf16 (autocast, no scaling) | fp16 (autocast + GradScaler)
    batch_size: int = 4
    grad_accum: int = 1
    max_steps: int = 1000
    # Wall-clock budget of this invocation, in minutes: the run stops at the next log step after it and saves a
    # checkpoint, and ``--resume`` continues it (for time-limited jobs). None: no limit.
    max_minutes: float | None = None
    optim: OptimConfig = field(default_factory=OptimConfig)
    ema_decay: float | None = 0.9999  # None: no EMA
    ema_warmup: bool = True  # decay_t = min(decay, (1 + t) / (10 + t)), as the LDM code's LitEma
    gradient_checkpointing: bool = False
    compile: bool = False  # torch.compile the trained network
    # "whole": the network in one graph; "blocks": each repeated block (ResNet, transformer) on its own, which
    # compiles several times faster (one graph per block shape) and works with gradient checkpointing.
    compile_scope: str = "whole"
    channels_last: bool = False  # convolution weights (and so activations) in NHWC layout
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
        if self.ema_decay is not None and not 0 <= self.ema_decay < 1:
            raise ValueError(f"ema_decay must be in [0, 1) or null (no EMA), got {self.ema_decay!r}")


# ---------------------------------------------------------------------------------------------------------
# U-Net
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TextSource(_Plain):
    """The frozen text encoder and its tokenizer.

    source: "random" (a text encoder built from ``config`` with seeded random weights: for tests and smoke
    runs) or a checkpoint path the core loads (SD single file, diffusers folder, Estable file).
    tokenizer: "clip" (CLIP's BPE vocabulary), "shapes" (a small word-level vocabulary of the shapes world's
    grammar) or a folder with vocab.json + merges.txt. With a checkpoint source, "clip" means "the
    checkpoint's own tokenizer". With source "random", ``config.vocab_size``/``eos_token_id`` are taken from
    the tokenizer.
    """

    source: str = "random"
    config: TextConfig = field(default_factory=TextConfig)
    tokenizer: str = "clip"
    max_length: int = 77
    clip_skip: int = 1
    # Train the text encoder jointly with the U-Net (U-Net trainer only) at learning rate ``lr`` (None: optim.lr),
    # following the same warm-up and schedule. Its weights, and an EMA of them when the run keeps one, are saved
    # in every checkpoint and exported with the model.
    train: bool = False
    lr: float | None = None

    def __post_init__(self) -> None:
        if self.lr is not None:
            _positive("text.lr", self.lr)


@dataclass(frozen=True)
class VAESource(_Plain):
    """The frozen VAE that makes latents: "random" (built from ``config``), an Estable VAE training run or
    checkpoint folder, or any checkpoint the core loads (its VAE is used)."""

    source: str = "random"
    config: VAEConfig = field(default_factory=VAEConfig)


@dataclass(frozen=True)
class SampleConfig(_Plain):
    """The periodic sample grid: fixed prompts through a sampler with the EMA weights (or the live ones)."""

    prompts: tuple[str, ...] = (
        "a red circle",
        "a blue square above a yellow star",
        "three green triangles",
        "a white heart on a purple background",
    )
    sampler: str = "euler"
    steps: int = 20
    cfg_scale: float = 4.0
    seed: int = 1234

    def __post_init__(self) -> None:
        _positive_int("sample.steps", self.steps)
        if not self.prompts:
            raise ValueError("sample.prompts needs at least one prompt")


@dataclass(frozen=True)
class UNetTrainConfig(TrainConfig):
    """Latent-diffusion U-Net training (Rombach et al. 2022, eq. 2)."""

    model: UNetConfig = field(default_factory=UNetConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    objective: str = "eps"  # eps | v; sets schedule.prediction_type
    min_snr_gamma: float | None = None  # e.g. 5.0
    offset_noise: float = 0.0  # 0 = off; ~0.05–0.1 in practice
    caption_dropout: float = 0.1  # fraction of captions replaced by "" (for classifier-free guidance)
    latents: str = "online"  # online | cache (VAE posteriors precomputed once into the run folder)
    text: TextSource = field(default_factory=TextSource)
    vae: VAESource = field(default_factory=VAESource)
    sample: SampleConfig = field(default_factory=SampleConfig)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective must be 'eps' or 'v', not {self.objective!r}")
        # The objective decides the prediction type recorded with the model and used when sampling.
        prediction = "epsilon" if self.objective == "eps" else "v_prediction"
        if self.schedule.prediction_type != prediction:
            object.__setattr__(self, "schedule", self.schedule.replace(prediction_type=prediction))
        _check_diffusion_loss(self)
        if self.latents not in ("online", "cache"):
            raise ValueError(f"latents must be 'online' or 'cache', not {self.latents!r}")
        if self.model.in_channels != self.vae.config.latent_channels and self.vae.source == "random":
            raise ValueError(
                f"model.in_channels ({self.model.in_channels}) must equal vae.config.latent_channels "
                f"({self.vae.config.latent_channels})"
            )
        if self.text.source == "random" and self.model.context_dim != self.text.config.width:
            raise ValueError(
                f"model.context_dim ({self.model.context_dim}) must equal text.config.width ({self.text.config.width})"
            )


# ---------------------------------------------------------------------------------------------------------
# VAE
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DiscriminatorConfig(_Plain):
    """Optional PatchGAN discriminator (Isola et al. 2017) with the hinge loss, switched on at ``start``."""

    enabled: bool = False
    start: int = 50_001  # optimizer step from which the adversarial terms count (LDM's disc_start)
    weight: float = 0.5  # weight of the generator's adversarial term
    channels: int = 64
    layers: int = 3
    lr: float | None = None  # None: optim.lr

    def __post_init__(self) -> None:
        _positive_int("disc.start", self.start, allow_zero=True)
        _positive("disc.weight", self.weight, allow_zero=True)
        _positive_int("disc.channels", self.channels)
        _positive_int("disc.layers", self.layers)


@dataclass(frozen=True)
class VAETrainConfig(TrainConfig):
    """KL autoencoder training (Rombach et al. 2022, sec. 3.1): L1 + KL + (1 − SSIM) (+ hinge GAN)."""

    model: VAEConfig = field(default_factory=VAEConfig)
    l1_weight: float = 1.0
    kl_weight: float = 1e-6
    ssim_weight: float = 0.2
    disc: DiscriminatorConfig = field(default_factory=DiscriminatorConfig)
    sample_count: int = 4  # images in the reconstruction grid
    ema_decay: float | None = None
    # A fresh VAE's posterior starts at σ ≈ 1, so its decoder first sees mostly noise. init_logvar (e.g. -6)
    # sets the log σ² half of quant_conv's bias, starting from a nearly deterministic autoencoder; the KL term
    # then widens σ as it needs. None: the layer's default initialisation. Ignored with init_from.
    init_logvar: float | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("l1_weight", "kl_weight", "ssim_weight"):
            _positive(name, getattr(self, name), allow_zero=True)
        _positive_int("sample_count", self.sample_count)
        f = self.model.downsample_factor
        if self.data.size % f:
            raise ValueError(f"data.size ({self.data.size}) must be a multiple of the VAE's factor {f}")


# ---------------------------------------------------------------------------------------------------------
# CLIP pair
# ---------------------------------------------------------------------------------------------------------
# The model section mirrors estable.models.clip.CLIPPairConfig / ImageEncoderConfig field for field instead of
# importing them: that module imports torch, and this one is imported by the CLI at start-up. The trainer turns
# it into a CLIPPairConfig (``CLIPTrainer.pair_config``), where the full validation runs.


@dataclass(frozen=True)
class ImageTowerConfig(_Plain):
    """The convolutional image tower (estable.models.clip.ImageEncoderConfig; the image size is data.size)."""

    stage_channels: tuple[int, ...] = (32, 64, 128, 256)
    blocks_per_stage: int = 2
    stem_stride: int = 2  # 1, 2 or 4
    norm_groups: int = 8


def _clip_text() -> TextConfig:
    # vocab_size / eos_token_id are placeholders: the tokenizer sets them (CLIPPairConfig.with_vocabulary).
    return TextConfig(vocab_size=1024, max_positions=77, width=256, layers=4, heads=4, mlp_width=1024,
                      projection_dim=256, eos_token_id=1023)


@dataclass(frozen=True)
class CLIPModelConfig(_Plain):
    """Text tower (CLIP text transformer), image tower and the joint embedding width.

    ``text.projection_dim`` always follows ``embed_dim``; ``text.vocab_size``/``eos_token_id`` follow the
    tokenizer (they are rewritten when the run starts and the resolved values are what config.json records).
    """

    text: TextConfig = field(default_factory=_clip_text)
    image: ImageTowerConfig = field(default_factory=ImageTowerConfig)
    embed_dim: int = 256
    init_logit_scale: float = math.log(1 / 0.07)  # CLIP's τ = 0.07 (Radford et al. 2021, sec. 2.5)
    max_logit_scale: float = math.log(100.0)

    def __post_init__(self) -> None:
        _positive_int("model.embed_dim", self.embed_dim)
        if self.text.projection_dim != self.embed_dim:
            object.__setattr__(self, "text", self.text.replace(projection_dim=self.embed_dim))


@dataclass(frozen=True)
class CLIPTrainConfig(TrainConfig):
    """Contrastive text–image pair (Radford et al. 2021), the source of a text encoder for the U-Net.

    tokenizer: "learn" (a byte-level BPE vocabulary of at most ``vocab_size`` entries learned from
    ``tokenizer_sample`` captions of the data), "clip" (CLIP's own 49,408-entry vocabulary) or a folder with
    vocab.json + merges.txt.
    """

    model: CLIPModelConfig = field(default_factory=CLIPModelConfig)
    tokenizer: str = "learn"
    vocab_size: int = 4096  # cap for "learn" (small caption sets give fewer: the size comes from the result)
    tokenizer_sample: int = 20_000  # captions the vocabulary is learned from
    max_length: int = 77  # tokenizer sequence length (bos + tokens + eos/padding)
    duplicates: str = "soft"  # soft: paraphrases/duplicates in a batch are positives of each other; none: CLIP's
    ema_decay: float | None = None
    sample_every: int = 0  # the "sample" of a CLIP run is a retrieval-matrix picture of the validation batch
    data: DataConfig = field(default_factory=lambda: DataConfig(val_size=32))

    def __post_init__(self) -> None:
        super().__post_init__()
        _positive_int("vocab_size", self.vocab_size)
        _positive_int("tokenizer_sample", self.tokenizer_sample)
        if not isinstance(self.max_length, int) or self.max_length < 2:
            raise ValueError(f"max_length must be an integer ≥ 2 (bos + eos), got {self.max_length!r}")
        if self.model.text.max_positions < self.max_length:
            raise ValueError(f"model.text.max_positions ({self.model.text.max_positions}) must be at least "
                             f"max_length ({self.max_length})")
        if self.duplicates not in ("soft", "none"):
            raise ValueError(f"duplicates must be 'soft' or 'none', not {self.duplicates!r}")
        if not isinstance(self.tokenizer, str) or not self.tokenizer:
            raise ValueError("tokenizer must be 'learn', 'clip' or a tokenizer folder")


# ---------------------------------------------------------------------------------------------------------
# LoRA
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LoRAConfig(_Plain):
    """Low-rank adapters (Hu et al. 2021): W x + (alpha / rank) · B A x on the target layers, base frozen.

    targets: "unet" or "unet+text". unet_modules / text_modules: module-path patterns (estable.nn.lora.matches);
    empty = kohya's default sets (attention and feed-forward linears; the text encoder's attention and MLP).
    """

    rank: int = 4
    alpha: float | None = None  # None: alpha = rank (scaling 1), as kohya
    dropout: float = 0.0
    targets: str = "unet"
    unet_modules: tuple[str, ...] = ()
    text_modules: tuple[str, ...] = ()
    text_lr: float | None = None  # learning rate of the text-encoder adapters; None: optim.lr
    save_precision: str = "fp32"  # dtype of lora.safetensors: fp32 | fp16 | bf16

    def __post_init__(self) -> None:
        _positive_int("lora.rank", self.rank)
        if self.alpha is not None:
            _positive("lora.alpha", self.alpha, allow_zero=True)
        if not 0 <= self.dropout < 1:
            raise ValueError(f"lora.dropout must be in [0, 1), got {self.dropout!r}")
        if self.targets not in LORA_TARGETS:
            raise ValueError(f"lora.targets must be one of {', '.join(LORA_TARGETS)}, not {self.targets!r}")
        if self.text_lr is not None:
            _positive("lora.text_lr", self.text_lr)
        if self.save_precision not in PRECISIONS:
            raise ValueError(f"lora.save_precision must be one of {', '.join(PRECISIONS)}, not "
                             f"{self.save_precision!r}")


@dataclass(frozen=True)
class LoRATrainConfig(TrainConfig):
    """LoRA fine-tuning of a whole model's U-Net (and optionally its text encoder) with the U-Net's diffusion
    loss; ε or v follows the base model's prediction type.

    base: any checkpoint ``estable.checkpoints.store.load_model`` reads (SD file, diffusers folder, Estable
    file). clip_skip None: the base model's.
    """

    base: str = ""
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    min_snr_gamma: float | None = None
    offset_noise: float = 0.0
    caption_dropout: float = 0.0
    clip_skip: int | None = None
    sample: SampleConfig = field(default_factory=SampleConfig)
    ema_decay: float | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.base, str):
            raise ValueError("base must be a checkpoint path (SD file, diffusers folder or Estable file)")
        _check_diffusion_loss(self)
        _check_frozen_base(self, "LoRA", "the frozen weights come from base")


CONTROL_KINDS = ("canny", "scribble", "lines", "seg")


@dataclass(frozen=True)
class ControlNetTrainConfig(TrainConfig):
    """ControlNet training (Zhang et al. 2023, sec. 3.3) on a frozen base model: a trainable copy of the base U-Net's
    encoder with zero-initialised output convolutions; the control image of every training image is made by
    ``control`` (estable.control.preprocess) with the Canny thresholds ``control_low``/``control_high`` and
    smoothing ``control_sigma`` (canny and scribble). ``caption_dropout`` 0.5: the paper replaces half of the
    prompts by the empty one, so that the ControlNet learns to read the control image itself. ``hint_channels``
    None: SD's (16, 32, 96, 256), one stage per halving of the VAE (so the hint encoder downsamples as the VAE).
    """

    base: str = ""
    control: str = "canny"
    control_low: float = 100.0
    control_high: float = 200.0
    control_sigma: float = 0.0
    hint_channels: tuple[int, ...] | None = None
    min_snr_gamma: float | None = None
    offset_noise: float = 0.0
    caption_dropout: float = 0.5
    clip_skip: int | None = None
    sample: SampleConfig = field(default_factory=SampleConfig)
    ema_decay: float | None = None
    save_precision: str = "fp32"  # dtype of RUN/controlnet.safetensors: fp32 | fp16 | bf16

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.base, str):
            raise ValueError("base must be a checkpoint path (SD file, diffusers folder or Estable file)")
        if self.save_precision not in PRECISIONS:
            raise ValueError(f"save_precision must be one of {', '.join(PRECISIONS)}, not {self.save_precision!r}")
        if self.control not in CONTROL_KINDS:
            raise ValueError(f"control must be one of {', '.join(CONTROL_KINDS)}, not {self.control!r}")
        if not 0 <= self.control_low <= self.control_high:
            raise ValueError("control_low and control_high must satisfy 0 ≤ low ≤ high")
        _positive("control_sigma", self.control_sigma, allow_zero=True)
        _check_diffusion_loss(self)
        _check_frozen_base(self, "ControlNet", "it starts from the base U-Net's encoder")


@dataclass(frozen=True)
class TITrainConfig(TrainConfig):
    """Textual inversion (Gal et al. 2022): learn ``num_vectors`` input vectors for the word ``token`` on a frozen
    model (base: any checkpoint, "default" = the built-in model) with the U-Net's diffusion loss.

    Data: ``data.source="shapes"`` renders a concept the shapes world does not have, the colour ``colour`` (RGB),
    on single objects and counts whose captions name it ``token`` ("a small teal star", "three teal hearts");
    an image folder's captions must contain ``token`` themselves. ``init_word``: the vectors start as that word's
    token embeddings (averaged; "" = the mean of the whole token table). clip_skip None: the base model's.
    """

    base: str = "default"
    token: str = "teal"
    num_vectors: int = 1
    init_word: str = "green"
    colour: tuple[int, int, int] = (0, 160, 160)
    cache_latents: bool = True  # shapes data: encode the data.shapes_length images once, in memory
    min_snr_gamma: float | None = None
    offset_noise: float = 0.0
    clip_skip: int | None = None
    sample: SampleConfig = field(default_factory=lambda: SampleConfig(
        prompts=("a teal circle", "two teal squares", "a large teal star", "a teal heart")))
    ema_decay: float | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.base, str) or not self.base:
            raise ValueError("base must be a checkpoint path (SD file, diffusers folder, Estable file) or 'default'")
        if not isinstance(self.token, str) or not self.token.strip() or any(c in self.token for c in ":,<>"):
            raise ValueError(f"token must be a word without ':' ',' '<' '>', got {self.token!r}")
        _positive_int("num_vectors", self.num_vectors)
        if len(self.colour) != 3 or not all(isinstance(c, int) and 0 <= c <= 255 for c in self.colour):
            raise ValueError(f"colour must be three integers 0..255, got {self.colour!r}")
        _check_diffusion_loss(self, caption_dropout=False)  # no caption dropout: the context always has the word
        _check_frozen_base(self, "textual-inversion", "the frozen model comes from base")


CONFIG_CLASSES: dict[str, type[TrainConfig]] = {"unet": UNetTrainConfig, "vae": VAETrainConfig,
                                                "clip": CLIPTrainConfig, "lora": LoRATrainConfig,
                                                "controlnet": ControlNetTrainConfig, "ti": TITrainConfig}

# ---------------------------------------------------------------------------------------------------------
# Presets
# ---------------------------------------------------------------------------------------------------------

_TINY_VAE = VAEConfig(block_channels=(16, 32, 32), layers_per_block=1, norm_groups=8, latent_channels=4,
                      scaling_factor=1.0, sample_size=32)
_TINY_TEXT = TextConfig(vocab_size=49408, max_positions=32, width=32, layers=2, heads=2, mlp_width=64)

PRESETS: dict[str, TrainConfig] = {
    # A few-second CPU smoke run on the shapes world at 32×32 (latents 4×8×8).
    "tiny-unet": UNetTrainConfig(
        model=UNetConfig(block_channels=(32, 64), layers_per_block=1, attention_levels=(True, False),
                         num_heads=2, context_dim=32, norm_groups=8, sample_size=8),
        text=TextSource(config=_TINY_TEXT, tokenizer="shapes", max_length=32),
        vae=VAESource(config=_TINY_VAE),
        data=DataConfig(size=32, val_size=4),
        sample=SampleConfig(steps=4, prompts=("a red circle", "two blue squares")),
        batch_size=4, max_steps=100, ema_decay=0.999, optim=OptimConfig(lr=1e-3, warmup_steps=5),
        log_every=5, val_every=25, sample_every=50, save_every=50,
    ),
    "tiny-vae": VAETrainConfig(
        model=_TINY_VAE,
        data=DataConfig(size=32, val_size=4),
        batch_size=4, max_steps=100, optim=OptimConfig(lr=1e-3, warmup_steps=5),
        log_every=5, val_every=25, sample_every=50, save_every=50,
    ),
    # A CLIP pair whose text tower (width 32) is a drop-in text encoder for tiny-unet (context_dim 32).
    "tiny-clip": CLIPTrainConfig(
        model=CLIPModelConfig(
            text=TextConfig(vocab_size=1024, max_positions=32, width=32, layers=2, heads=2, mlp_width=64,
                            projection_dim=32, eos_token_id=1023),
            image=ImageTowerConfig(stage_channels=(16, 32), blocks_per_stage=1, stem_stride=2, norm_groups=8),
            embed_dim=32,
        ),
        max_length=32, tokenizer_sample=2000, vocab_size=1024,
        data=DataConfig(size=32, val_size=16),
        batch_size=16, max_steps=100, optim=OptimConfig(lr=1e-3, warmup_steps=5, weight_decay=0.1),
        log_every=5, val_every=25, sample_every=0, save_every=50,
    ),
    # Rank-4 adapters on the U-Net of a small model (set base=PATH).
    "tiny-lora": LoRATrainConfig(
        lora=LoRAConfig(rank=4, alpha=4.0),
        data=DataConfig(size=32, val_size=4),
        sample=SampleConfig(steps=4, prompts=("a red circle", "two blue squares")),
        batch_size=4, max_steps=100, optim=OptimConfig(lr=1e-3, warmup_steps=5, weight_decay=0.0),
        log_every=5, val_every=25, sample_every=50, save_every=50,
    ),
    # A ControlNet on a small model (set base=PATH): Canny edges of the shapes world.
    "tiny-controlnet": ControlNetTrainConfig(
        data=DataConfig(size=32, val_size=4),
        sample=SampleConfig(steps=4, prompts=("a red circle", "two blue squares")),
        batch_size=4, max_steps=100, optim=OptimConfig(lr=1e-4, warmup_steps=5, weight_decay=0.0),
        log_every=5, val_every=25, sample_every=50, save_every=50,
    ),
    # A new word for an unseen colour (teal) on the built-in model, CPU-sized.
    "tiny-ti": TITrainConfig(
        data=DataConfig(size=256, val_size=4, shapes_length=256),
        batch_size=4, max_steps=200, optim=OptimConfig(lr=5e-3, warmup_steps=10, weight_decay=0.0),
        log_every=10, val_every=50, sample_every=0, save_every=100,
    ),
}
_PRESET_KIND = {"tiny-unet": "unet", "tiny-vae": "vae", "tiny-clip": "clip", "tiny-lora": "lora",
                "tiny-controlnet": "controlnet", "tiny-ti": "ti"}


def apply_overrides(data: dict[str, Any], overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """Apply ``key=value`` overrides (dotted keys) to a FULL config dict; returns a new dict.

    Values are JSON when they parse (``3e-4``, ``[32,64]``, ``true``, ``null``), else strings. A key that is
    not in the config is a ValueError naming the valid keys at that level.
    """
    out = json.loads(json.dumps(data))  # deep copy of plain data
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ValueError(f"override {item!r} is not key=value (e.g. optim.lr=3e-4)")
        parts = key.split(".")
        node: Any = out
        for depth, part in enumerate(parts):
            where = ".".join(parts[:depth])
            if not isinstance(node, dict):
                raise ValueError(f"config key {where!r} is a value, not a section; cannot set {key!r}")
            if part not in node:
                raise ValueError(
                    f"unknown config key {key!r}; valid keys{' under ' + repr(where) if where else ''}: "
                    f"{', '.join(sorted(node))}"
                )
            if depth == len(parts) - 1:
                node[part] = parse_value(raw)
            else:
                node = node[part]
    return out


def parse_value(raw: str) -> Any:
    """JSON if it parses (numbers, lists, objects, true/false/null), Python's None/True/False, else the string."""
    text = raw.strip()
    if text in ("None", "True", "False"):
        return {"None": None, "True": True, "False": False}[text]
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def load_config(kind: str, base: str | Path | dict[str, Any] | None = None,
                overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    """Resolve a training config: ``base`` (preset name, JSON file, dict or None = defaults) + overrides.

    Raises EstableError for a missing file, bad JSON, an unknown key or an invalid value.
    """
    cls = CONFIG_CLASSES.get(kind)
    if cls is None:
        raise EstableError(f"unknown trainer {kind!r}; choose one of {', '.join(CONFIG_CLASSES)}")
    try:
        if base is None:
            cfg = cls()
        elif isinstance(base, dict):
            cfg = cls.from_dict(base)
        elif str(base) in PRESETS:
            if _PRESET_KIND[str(base)] != kind:
                raise EstableError(f"preset {base!r} is for the {_PRESET_KIND[str(base)]} trainer, not {kind}")
            cfg = PRESETS[str(base)]
        else:
            path = Path(base)
            if not path.is_file():
                names = ", ".join(n for n, k in _PRESET_KIND.items() if k == kind)
                raise EstableError(f"config {str(base)!r} is neither a file nor a preset (presets: {names})")
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
            except json.JSONDecodeError as exc:
                raise EstableError(f"{path}: not valid JSON ({exc})") from None
            cfg = cls.from_dict(data)
        if overrides:
            cfg = cls.from_dict(apply_overrides(cfg.to_dict(), overrides))
    except ValueError as exc:
        raise EstableError(str(exc)) from None
    return cfg


__all__ = [
    "CONFIG_CLASSES",
    "PRESETS",
    "CLIPModelConfig",
    "CLIPTrainConfig",
    "ControlNetTrainConfig",
    "DataConfig",
    "DiscriminatorConfig",
    "ImageTowerConfig",
    "LoRAConfig",
    "LoRATrainConfig",
    "OptimConfig",
    "SampleConfig",
    "TITrainConfig",
    "TextSource",
    "TrainConfig",
    "UNetTrainConfig",
    "VAESource",
    "VAETrainConfig",
    "apply_overrides",
    "build_dataclass",
    "load_config",
    "parse_value",
]
