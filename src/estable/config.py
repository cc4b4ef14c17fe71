"""Model configurations: one dataclass per network, plus named presets.

Each config is validated in ``__post_init__`` with a ``ValueError`` whose message says what to change.
Configs are plain data: ``to_dict()`` / ``from_dict()`` round-trip through JSON, which is how Estable's own
checkpoint files carry them (see ``estable.checkpoints``).

Glossary (diffusers' names in brackets, where they differ):
  block_channels      output channels of each resolution level      [block_out_channels]
  attention_levels    which down levels carry transformer blocks;    [down_block_types]
                      up levels mirror them in reverse order
  num_heads           attention heads per level (int or per level)   [attention_head_dim, when
                                                                      num_attention_heads is unset]
  head_channels       channels per head; the alternative to num_heads (SD 2.x: 64)
  context_dim         width of the text context for cross-attention  [cross_attention_dim]
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

T = TypeVar("T")


def _tuple(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


# Bounds that no real model comes near (SD: 4 levels, 2 layers per block, 12 to 32 text layers, 1000 timesteps). A
# config beyond them comes from a corrupt or hostile file: building its network would take hours (1000 layers per
# block: 10 s on the meta device), and its schedule terabytes.
MAX_DEPTH = 100
MAX_TIMESTEPS = 100_000


def _check_ints(owner: str, low: int | None = 1, high: int | None = None, **values: Any) -> None:
    """ValueError unless every value is an int (not a bool) in [low, high]; a tuple's entries are checked one by one.
    Configs come from files as JSON: a string or a negative width would otherwise fail deep inside torch."""
    for name, value in values.items():
        for v in value if isinstance(value, tuple) else (value,):
            if isinstance(v, bool) or not isinstance(v, int):
                raise ValueError(f"{owner}.{name} must be an integer, not {value!r}")
            if low is not None and v < low:
                raise ValueError(f"{owner}.{name} must be at least {low}, not {value!r}")
            if high is not None and v > high:
                raise ValueError(f"{owner}.{name} must be at most {high}, not {value!r}")


def _check_eps(owner: str, name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value > 0):
        raise ValueError(f"{owner}.{name} must be a small positive number, not {value!r}")


class _Config:
    """Shared helpers for the config dataclasses (JSON round trip, replace)."""

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            v = getattr(self, f.name)
            if isinstance(v, _Config):
                v = v.to_dict()
            elif isinstance(v, tuple):
                v = list(v)
            out[f.name] = v
        return out

    @classmethod
    def from_dict(cls: type[T], data: dict[str, Any]) -> T:
        fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(data) - set(fields))
        if unknown:
            raise ValueError(f"{cls.__name__}: unknown field(s) {', '.join(unknown)}")
        kwargs: dict[str, Any] = {}
        for name, value in data.items():
            sub = _NESTED.get((cls.__name__, name))
            if sub is not None and isinstance(value, dict):
                value = sub.from_dict(value)
            elif sub is not None and not isinstance(value, sub):
                raise ValueError(f"{cls.__name__}.{name} must be an object of {sub.__name__} fields, not {value!r}")
            kwargs[name] = _tuple(value)
        return cls(**kwargs)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    def replace(self: T, **changes: Any) -> T:
        return dataclasses.replace(self, **changes)  # type: ignore[type-var]


@dataclass(frozen=True)
class UNetConfig(_Config):
    """The conditional U-Net ε_θ(z_t, t, c) of latent diffusion (Rombach et al. 2022, sec. 3.3)."""

    in_channels: int = 4
    out_channels: int = 4
    block_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    layers_per_block: int = 2
    attention_levels: tuple[bool, ...] = (True, True, True, False)
    transformer_layers: int = 1
    num_heads: int | tuple[int, ...] | None = 8
    head_channels: int | None = None
    context_dim: int = 768
    use_linear_projection: bool = False
    upcast_attention: bool = False
    norm_groups: int = 32
    norm_eps: float = 1e-5
    # Sinusoidal timestep embedding: order [cos, sin] and frequency shift (diffusers' flip_sin_to_cos,
    # freq_shift); SD uses True and 0.
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    sample_size: int = 64  # latent side the model was trained at (informational)

    def __post_init__(self) -> None:
        object.__setattr__(self, "block_channels", _tuple(self.block_channels))
        object.__setattr__(self, "attention_levels", _tuple(self.attention_levels))
        object.__setattr__(self, "num_heads", _tuple(self.num_heads))
        n = len(self.block_channels) if isinstance(self.block_channels, tuple) else 0
        if n < 1:
            raise ValueError("UNetConfig.block_channels needs at least one level")
        _check_ints("UNetConfig", in_channels=self.in_channels, out_channels=self.out_channels,
                    block_channels=self.block_channels, context_dim=self.context_dim, sample_size=self.sample_size)
        if n > MAX_DEPTH:
            raise ValueError(f"UNetConfig.block_channels has {n} levels; at most {MAX_DEPTH} are supported")
        _check_ints("UNetConfig", norm_groups=self.norm_groups)
        _check_ints("UNetConfig", None, None, freq_shift=self.freq_shift)
        _check_ints("UNetConfig", 1, MAX_DEPTH, layers_per_block=self.layers_per_block,
                    transformer_layers=self.transformer_layers)
        _check_eps("UNetConfig", "norm_eps", self.norm_eps)
        if len(self.attention_levels) != n:
            raise ValueError(
                f"UNetConfig.attention_levels has {len(self.attention_levels)} entries but there are "
                f"{n} levels (block_channels={self.block_channels}); give one True/False per level"
            )
        for c in self.block_channels:
            if c % self.norm_groups:
                raise ValueError(
                    f"UNetConfig.block_channels entry {c} is not divisible by norm_groups={self.norm_groups}"
                )
        if (self.num_heads is None) == (self.head_channels is None):
            raise ValueError("UNetConfig: set exactly one of num_heads and head_channels")
        if self.num_heads is not None:
            _check_ints("UNetConfig", num_heads=self.num_heads)
        if self.head_channels is not None:
            _check_ints("UNetConfig", head_channels=self.head_channels)
        if isinstance(self.num_heads, tuple) and len(self.num_heads) != n:
            raise ValueError(f"UNetConfig.num_heads has {len(self.num_heads)} entries for {n} levels")
        for level, c in enumerate(self.block_channels):
            if self.attention_levels[level] or level == n - 1:  # the mid block uses the last level's heads
                heads = self.heads_at(level)
                per_head = self.head_channels
                if heads < 1 or c % heads or (per_head is not None and c % per_head):
                    what = f"heads of {per_head} channels" if per_head is not None else f"{heads} heads"
                    raise ValueError(f"UNetConfig: level {level} has {c} channels, which do not split into {what}")

    @property
    def time_embed_dim(self) -> int:
        return 4 * self.block_channels[0]

    def heads_at(self, level: int) -> int:
        """Number of attention heads at a resolution level (the mid block uses the last level)."""
        if self.head_channels is not None:
            return self.block_channels[level] // self.head_channels
        if isinstance(self.num_heads, tuple):
            return self.num_heads[level]
        assert self.num_heads is not None
        return self.num_heads


@dataclass(frozen=True)
class VAEConfig(_Config):
    """The KL-regularised autoencoder (Rombach et al. 2022, sec. 3.1 and appendix G), f = 8 for 4 levels."""

    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 4
    block_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    norm_groups: int = 32
    norm_eps: float = 1e-6
    mid_attention: bool = True
    # The encoder's downsamplings: 3, the LDM autoencoder's 3×3 stride-2 convolutions padded at the bottom and right
    # (each level's grid half a pixel off centre); 4, 4×4 stride-2 convolutions padded all round (centred). Estable's
    # own models only: SD and diffusers files hold 3.
    downsample_kernel: int = 3
    # Latents are multiplied by this before diffusion so that they have roughly unit variance.
    scaling_factor: float = 0.18215
    sample_size: int = 512  # image side the model was trained at (informational)

    def __post_init__(self) -> None:
        object.__setattr__(self, "block_channels", _tuple(self.block_channels))
        if not self.block_channels or not isinstance(self.block_channels, tuple):
            raise ValueError("VAEConfig.block_channels needs at least one level")
        _check_ints("VAEConfig", in_channels=self.in_channels, out_channels=self.out_channels,
                    latent_channels=self.latent_channels, block_channels=self.block_channels,
                    sample_size=self.sample_size)
        if len(self.block_channels) > MAX_DEPTH:
            raise ValueError(f"VAEConfig.block_channels has {len(self.block_channels)} levels; at most {MAX_DEPTH} "
                             "are supported")
        if self.downsample_kernel not in (3, 4):
            raise ValueError(f"VAEConfig.downsample_kernel must be 3 (the LDM autoencoder's) or 4, not "
                             f"{self.downsample_kernel!r}")
        _check_ints("VAEConfig", norm_groups=self.norm_groups)
        _check_ints("VAEConfig", 1, MAX_DEPTH, layers_per_block=self.layers_per_block)
        _check_eps("VAEConfig", "norm_eps", self.norm_eps)
        if not (math.isfinite(self.scaling_factor) and self.scaling_factor > 0):
            raise ValueError(f"VAEConfig.scaling_factor must be a positive finite number, not {self.scaling_factor!r}")
        for c in self.block_channels:
            if c % self.norm_groups:
                raise ValueError(
                    f"VAEConfig.block_channels entry {c} is not divisible by norm_groups={self.norm_groups}"
                )

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.block_channels) - 1)


@dataclass(frozen=True)
class TextConfig(_Config):
    """The CLIP text transformer (Radford et al. 2021): causal, pre-LN, final LayerNorm."""

    vocab_size: int = 49408
    max_positions: int = 77
    width: int = 768
    layers: int = 12
    heads: int = 12
    mlp_width: int = 3072
    activation: Literal["quick_gelu", "gelu"] = "quick_gelu"
    layer_norm_eps: float = 1e-5
    projection_dim: int | None = None  # width of the text projection, None when the file has none
    eos_token_id: int = 49407  # the pooled output is read at the first EOS token

    def __post_init__(self) -> None:
        _check_ints("TextConfig", vocab_size=self.vocab_size, max_positions=self.max_positions, width=self.width,
                    mlp_width=self.mlp_width)
        _check_ints("TextConfig", heads=self.heads)
        _check_ints("TextConfig", 1, MAX_DEPTH, layers=self.layers)
        _check_ints("TextConfig", None, None, eos_token_id=self.eos_token_id)
        if self.projection_dim is not None:
            _check_ints("TextConfig", projection_dim=self.projection_dim)
        _check_eps("TextConfig", "layer_norm_eps", self.layer_norm_eps)
        if self.width % self.heads:
            raise ValueError(f"TextConfig.width={self.width} is not divisible by heads={self.heads}")
        if self.activation not in ("quick_gelu", "gelu"):
            raise ValueError(f"TextConfig.activation must be 'quick_gelu' or 'gelu', not {self.activation!r}")


@dataclass(frozen=True)
class ScheduleConfig(_Config):
    """The training noise schedule the denoiser was trained with (Ho et al. 2020, sec. 2)."""

    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: Literal["scaled_linear", "linear", "squaredcos_cap_v2"] = "scaled_linear"
    prediction_type: Literal["epsilon", "v_prediction"] = "epsilon"
    steps_offset: int = 1
    # None: each sampler's own default, as diffusers does for a scheduler config that names no spacing
    # (SD 1.x and 2.x name none: DDIM/PNDM/DDPM then use "leading", Euler/Heun/DPM-Solver/UniPC "linspace").
    timestep_spacing: Literal["leading", "trailing", "linspace"] | None = None
    # Lin et al. 2024 ("Common Diffusion Noise Schedules and Sample Steps are Flawed", algorithm 1): the betas
    # rescaled so the last step is pure noise (ᾱ_T = 0). Without it SD's schedule leaves √ᾱ_T ≈ 0.068 of the image
    # in x_T, enough for a model to read the layout from the noise. Needs v-prediction (ε is undefined at ᾱ = 0).
    rescale_betas_zero_snr: bool = False

    def __post_init__(self) -> None:
        if self.beta_schedule not in ("scaled_linear", "linear", "squaredcos_cap_v2"):
            raise ValueError(f"unsupported beta_schedule {self.beta_schedule!r}")
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(
                f"unsupported prediction_type {self.prediction_type!r}; use 'epsilon' or 'v_prediction'"
            )
        if self.timestep_spacing not in (None, "leading", "trailing", "linspace"):
            raise ValueError(f"unsupported timestep_spacing {self.timestep_spacing!r}")
        _check_ints("ScheduleConfig", None, None, steps_offset=self.steps_offset)
        _check_ints("ScheduleConfig", 1, MAX_TIMESTEPS, num_train_timesteps=self.num_train_timesteps)
        for name in ("beta_start", "beta_end"):
            beta = getattr(self, name)
            if not 0.0 < beta < 1.0:  # also false for NaN
                raise ValueError(f"ScheduleConfig.{name} must be between 0 and 1 (exclusive), not {beta!r}")
        if self.beta_start > self.beta_end:
            raise ValueError(f"ScheduleConfig.beta_start ({self.beta_start}) must not exceed beta_end "
                             f"({self.beta_end})")


@dataclass(frozen=True)
class TokenizerConfig(_Config):
    max_length: int = 77
    pad_token_id: int = 49407  # SD 1.x pads with EOS; SD 2.x pads with 0 ("!")
    bos_token_id: int = 49406
    eos_token_id: int = 49407

    def __post_init__(self) -> None:
        _check_ints("TokenizerConfig", 0, None, max_length=self.max_length, pad_token_id=self.pad_token_id,
                    bos_token_id=self.bos_token_id, eos_token_id=self.eos_token_id)


@dataclass(frozen=True)
class ModelConfig(_Config):
    """A whole text-to-image model: the three networks, the tokenizer settings and the schedule."""

    family: str = "sd1"  # "sd1", "sd2" or "estable"
    unet: UNetConfig = field(default_factory=UNetConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)
    text: TextConfig = field(default_factory=TextConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    # Which text-encoder hidden state conditions the U-Net: 1 = the last layer, 2 = the penultimate
    # (SD 2.x, A1111's "clip skip 2"), always followed by the final LayerNorm.
    clip_skip: int = 1
    # The guidance scale this model was measured best at (Estable's default model: its guidance sweep); the
    # generate command uses it when no --cfg is given. None: GenerationParams' default (7).
    default_cfg: float | None = None
    # The sampler to use when none is asked for (our name, e.g. "dpmpp_2m": the built-in model breaks up with Karras
    # sigmas at few steps). None: GenerationParams' default.
    default_sampler: str | None = None
    # A rewrite of the prompt the pipeline applies before encoding (a name in estable.prompt_completion.COMPLETIONS,
    # e.g. "shapes-grey-background" for a model trained on captions that name their grey background). None: none.
    prompt_completion: str | None = None

    def __post_init__(self) -> None:
        _check_ints("ModelConfig", None, None, clip_skip=self.clip_skip)
        if self.default_cfg is not None and not 0.0 <= float(self.default_cfg) <= 100.0:
            raise ValueError(f"ModelConfig.default_cfg must be between 0 and 100, not {self.default_cfg!r}")
        if self.prompt_completion is not None:
            from .prompt_completion import COMPLETIONS

            if self.prompt_completion not in COMPLETIONS:
                raise ValueError(f"ModelConfig.prompt_completion: unknown completion {self.prompt_completion!r}; "
                                 f"known: {', '.join(sorted(COMPLETIONS))}")
        if self.default_sampler is not None:
            from .sampling.samplers import get_sampler

            try:  # stored by our name whatever label it was given as
                object.__setattr__(self, "default_sampler", get_sampler(self.default_sampler).name)
            except ValueError as exc:
                raise ValueError(f"ModelConfig.default_sampler: {exc}") from None
        if self.unet.context_dim != self.text.width:
            raise ValueError(
                f"ModelConfig: the U-Net's context_dim ({self.unet.context_dim}) must equal the text "
                f"encoder's width ({self.text.width})"
            )
        if not 1 <= self.clip_skip <= self.text.layers:
            raise ValueError(f"ModelConfig.clip_skip must be in 1..{self.text.layers}, not {self.clip_skip}")


@dataclass(frozen=True)
class ControlNetConfig(_Config):
    """ControlNet (Zhang, Rao & Agrawala 2023, "Adding Conditional Control to Text-to-Image Diffusion Models"):
    a trainable copy of a U-Net's encoder (``unet``: its down levels and mid block; the decoder fields are unused)
    plus the hint encoder that maps the control image to the first level's width.

    hint_channels          widths of the hint encoder's stages; each stage after the first halves the
                           resolution, so the hint image is ``2^(len-1)`` × the latent size   [conditioning_
                           embedding_out_channels]
    conditioning_channels  channels of the control image (3: RGB)
    bgr                    the network expects the control image's channels in BGR order
                           [controlnet_conditioning_channel_order="bgr"]
    """

    unet: UNetConfig = field(default_factory=UNetConfig)
    conditioning_channels: int = 3
    hint_channels: tuple[int, ...] = (16, 32, 96, 256)
    bgr: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "hint_channels", _tuple(self.hint_channels))
        if not self.hint_channels or any(int(c) < 1 for c in self.hint_channels):
            raise ValueError("ControlNetConfig.hint_channels needs at least one positive width")
        _check_ints("ControlNetConfig", hint_channels=self.hint_channels)
        _check_ints("ControlNetConfig", None, None, conditioning_channels=self.conditioning_channels)
        if len(self.hint_channels) > MAX_DEPTH:
            raise ValueError(f"ControlNetConfig.hint_channels has {len(self.hint_channels)} stages; at most "
                             f"{MAX_DEPTH} are supported")
        if self.conditioning_channels < 1:
            raise ValueError(
                f"ControlNetConfig.conditioning_channels must be positive, not {self.conditioning_channels}"
            )

    @property
    def hint_factor(self) -> int:
        """Control-image pixels per latent cell: the hint encoder downsamples by 2 per stage after the first."""
        return 2 ** (len(self.hint_channels) - 1)


_NESTED: dict[tuple[str, str], type[_Config]] = {
    ("ModelConfig", "unet"): UNetConfig,
    ("ModelConfig", "vae"): VAEConfig,
    ("ModelConfig", "text"): TextConfig,
    ("ModelConfig", "tokenizer"): TokenizerConfig,
    ("ModelConfig", "schedule"): ScheduleConfig,
    ("ControlNetConfig", "unet"): UNetConfig,
}


_SD2_TEXT = TextConfig(width=1024, layers=24, heads=16, mlp_width=4096, activation="gelu", projection_dim=1024)
_SD2_UNET = UNetConfig(
    num_heads=None, head_channels=64, context_dim=1024, use_linear_projection=True, upcast_attention=True
)

PRESETS: dict[str, ModelConfig] = {
    "sd15": ModelConfig(family="sd1"),
    "sd21-base": ModelConfig(
        family="sd2",
        unet=_SD2_UNET,
        text=_SD2_TEXT,
        tokenizer=TokenizerConfig(pad_token_id=0),
        clip_skip=2,
    ),
    "sd21-768-v": ModelConfig(
        family="sd2",
        unet=_SD2_UNET.replace(sample_size=96),
        vae=VAEConfig(sample_size=768),
        text=_SD2_TEXT,
        tokenizer=TokenizerConfig(pad_token_id=0),
        schedule=ScheduleConfig(prediction_type="v_prediction"),
        clip_skip=2,
    ),
}


def preset(name: str) -> ModelConfig:
    """Return the named preset (``sd15``, ``sd21-base``, ``sd21-768-v``)."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(sorted(PRESETS))}") from None
