"""One config dataclass per trainer (U-Net, VAE, CLIP pair, LoRA, ControlNet, textual inversion) and their
sections, and ``CONFIG_CLASSES`` (trainer kind → config class)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from estable.config import ScheduleConfig, TextConfig, UNetConfig, VAEConfig
from estable.training.config.plain import _Plain, _positive, _positive_int
from estable.training.config.sections import PRECISIONS, DataConfig, TrainConfig

LORA_TARGETS = ("unet", "unet+text")
OBJECTIVES = ("eps", "v")


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

    def __post_init__(self) -> None:  # the sampler's name is checked by check_sampler (it needs torch)
        _positive_int("sample.steps", self.steps)
        if not isinstance(self.prompts, (tuple, list)) or not all(isinstance(q, str) for q in self.prompts):
            raise ValueError(f"sample.prompts must be a list of prompts, e.g. [\"a red circle\"], not {self.prompts!r}")
        if not self.prompts:
            raise ValueError("sample.prompts needs at least one prompt")
        if isinstance(self.cfg_scale, bool) or not isinstance(self.cfg_scale, (int, float)) \
                or not math.isfinite(self.cfg_scale):
            raise ValueError(f"sample.cfg_scale must be a finite number, got {self.cfg_scale!r}")


def check_sampler(config: Any) -> None:
    """ValueError (listing the valid names) unless ``config.sample.sampler``, where the config has a sample section,
    is a sampler :func:`estable.sampling.samplers.get_sampler` knows. Kept out of ``SampleConfig`` itself: the
    sampler registry imports torch, and the presets are built when the CLI starts."""
    sample = getattr(config, "sample", None)
    if sample is None:
        return
    from estable.sampling.samplers import get_sampler

    try:
        get_sampler(sample.sampler)
    except ValueError as exc:
        raise ValueError(f"sample.sampler: {exc}") from None


@dataclass(frozen=True)
class TimestepBias(_Plain):
    """Training timesteps drawn non-uniformly: the noisiest ``portion`` of the schedule (where a layout is decided)
    ``multiplier`` times as often as the rest; ``portion`` 0 draws t uniformly. The same idea as the "later"
    timestep bias of diffusers' SDXL training scripts; it shifts the loss's weight toward high noise as P2
    weighting does (Choi et al. 2022)."""

    portion: float = 0.0
    multiplier: float = 1.0

    def __post_init__(self) -> None:
        if not 0 <= self.portion < 1:
            raise ValueError(f"timestep_bias.portion must be in [0, 1), got {self.portion!r}")
        _positive("timestep_bias.multiplier", self.multiplier)


@dataclass(frozen=True)
class RoleContrast(_Plain):
    """A loss term for the roles of a relation (shapes-world pair captions): the caption with its two objects
    exchanged ("a blue square above a red circle" for "a red circle above a blue square") describes the mirrored
    scene, so the U-Net's error on the true target under it should exceed its error under the true caption. For
    the pair rows with t ≥ ``min_t`` (where the layout is decided) the term is ``weight`` × mean relu(margin −
    (mse_swapped − mse) / mse), the relative gap held to at least ``margin`` (mse not differentiated in the
    divisor). It costs one more U-Net pass on those rows. ``weight`` 0 turns it off.

    ``kind="shapes"`` contrasts a caption with one object's shape replaced by a look-alike instead ("a red hexagon
    above a blue square": ``shapes.captions.swap_shape``), for every caption of the grammar — the outline the
    unguided built-in model gets wrong most (RESULTS.md, "what the unguided model gets wrong on pairs")."""

    weight: float = 0.0
    margin: float = 0.2
    min_t: int = 600
    kind: str = "roles"  # roles | shapes

    def __post_init__(self) -> None:
        _positive("role_contrast.weight", self.weight, allow_zero=True)
        _positive("role_contrast.margin", self.margin)
        if self.min_t < 0:
            raise ValueError(f"role_contrast.min_t must be ≥ 0, got {self.min_t!r}")
        if self.kind not in ("roles", "shapes"):
            raise ValueError(f"role_contrast.kind must be 'roles' or 'shapes', not {self.kind!r}")


@dataclass(frozen=True)
class UNetTrainConfig(TrainConfig):
    """Latent-diffusion U-Net training (Rombach et al. 2022, eq. 2)."""

    model: UNetConfig = field(default_factory=UNetConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    objective: str = "eps"  # eps | v; sets schedule.prediction_type
    min_snr_gamma: float | None = None  # e.g. 5.0
    offset_noise: float = 0.0  # 0 = off; ~0.05–0.1 in practice
    timestep_bias: TimestepBias = field(default_factory=TimestepBias)  # uniform t unless set
    role_contrast: RoleContrast = field(default_factory=RoleContrast)  # off unless weight > 0
    caption_dropout: float = 0.1  # fraction of captions replaced by "" (for classifier-free guidance)
    latents: str = "online"  # online | cache (VAE posteriors precomputed once into the run folder)
    text: TextSource = field(default_factory=TextSource)
    vae: VAESource = field(default_factory=VAESource)
    sample: SampleConfig = field(default_factory=SampleConfig)
    # With init_from: U-Net levels (0: the finest) that gain attention blocks where the loaded network has none. The
    # new blocks' output projections start at zero, so the grown network starts as the loaded one computes.
    grow_attention: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "grow_attention", tuple(self.grow_attention))
        if any(not isinstance(level, int) or level < 0 for level in self.grow_attention):
            raise ValueError(f"grow_attention takes U-Net levels (0, 1, …), not {list(self.grow_attention)}")
        if self.grow_attention and not self.init_from:
            raise ValueError("grow_attention adds attention blocks to a trained U-Net: it needs init_from")
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective must be 'eps' or 'v', not {self.objective!r}")
        # The objective decides the prediction type recorded with the model and used when sampling.
        prediction = "epsilon" if self.objective == "eps" else "v_prediction"
        if self.schedule.prediction_type != prediction:
            object.__setattr__(self, "schedule", self.schedule.replace(prediction_type=prediction))
        if self.schedule.rescale_betas_zero_snr and self.objective != "v":
            raise ValueError("schedule.rescale_betas_zero_snr needs objective 'v': at zero SNR the noise is the "
                             "whole input and predicting it teaches nothing")
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
    # False: fine-tune the decoder only (SD's ft-EMA / ft-MSE VAEs): the encoder, quant_conv and the latent
    # scaling_factor stay those of init_from, so the latents a U-Net was trained on do not move and the new
    # decoder can replace the old one in a finished model (``estable convert --vae``).
    train_encoder: bool = True
    # Against latent spikes (issue 11; estable.training.objectives): outlier_weight × mean relu(‖μ‖ − k · median
    # ‖μ‖)² with k = outlier_ratio, and anchor_weight × the MSE between μ and the starting encoder's μ (a frozen
    # copy of init_from's) on the pixels that are not outliers there, so that the latents a U-Net was trained on
    # move little. 0: off.
    outlier_weight: float = 0.0
    outlier_ratio: float = 3.0
    anchor_weight: float = 0.0
    # Against the decoder's normalisation droplet (issue 11; estable.training.objectives): droplet_weight × the mean
    # over the decoder's GroupNorm inputs of mean relu(‖a‖ / median ‖a‖ − k)², k = droplet_ratio. Works with a
    # frozen encoder. 0: off.
    droplet_weight: float = 0.0
    droplet_ratio: float = 16.0
    # Against the spots themselves (issue 11): worst_weight × the mean absolute error of each image's worst
    # worst_fraction of pixels, where a few pixels of large error count as much as the rest of the image. 0: off.
    worst_weight: float = 0.0
    worst_fraction: float = 0.005

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.train_encoder and not self.init_from:
            raise ValueError("train_encoder=false fine-tunes a decoder: it needs init_from (the VAE whose "
                             "encoder is kept)")
        for name in ("l1_weight", "kl_weight", "ssim_weight", "outlier_weight", "anchor_weight", "droplet_weight",
                     "worst_weight"):
            _positive(name, getattr(self, name), allow_zero=True)
        if not 0 < self.worst_fraction <= 1:
            raise ValueError(f"worst_fraction is a share of the pixels, in (0, 1], not {self.worst_fraction}")
        _positive("outlier_ratio", self.outlier_ratio)
        _positive("droplet_ratio", self.droplet_ratio)
        if self.anchor_weight > 0 and not self.init_from:
            raise ValueError("anchor_weight > 0 holds the latents to those of a starting encoder: it needs "
                             "init_from (the VAE to start from)")
        if (self.outlier_weight > 0 or self.anchor_weight > 0) and not self.train_encoder:
            raise ValueError("outlier_weight and anchor_weight act on the encoder's latents: they need "
                             "train_encoder=true")
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

    def __post_init__(self) -> None:  # the rest is checked by estable.models.clip.ImageEncoderConfig
        _positive_int("model.image.norm_groups", self.norm_groups)


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
        bad = not isinstance(self.token, str) or not self.token or ".." in self.token
        if bad or any(c in ':,<>/\\' or c.isspace() or not c.isprintable() for c in self.token):
            raise ValueError(f"token must be one word (it names the file RUN/<token>.safetensors): no spaces, '..', "
                             f"or ':' ',' '<' '>' '/' '\\', got {self.token!r}")
        _positive_int("num_vectors", self.num_vectors)
        if len(self.colour) != 3 or not all(isinstance(c, int) and 0 <= c <= 255 for c in self.colour):
            raise ValueError(f"colour must be three integers 0..255, got {self.colour!r}")
        _check_diffusion_loss(self, caption_dropout=False)  # no caption dropout: the context always has the word
        _check_frozen_base(self, "textual-inversion", "the frozen model comes from base")


CONFIG_CLASSES: dict[str, type[TrainConfig]] = {"unet": UNetTrainConfig, "vae": VAETrainConfig,
                                                "clip": CLIPTrainConfig, "lora": LoRATrainConfig,
                                                "controlnet": ControlNetTrainConfig, "ti": TITrainConfig}
