"""diffusers / transformers ``config.json`` files ↔ Estable's config dataclasses.

A diffusers folder describes each network with the keyword arguments of its class's constructor
(UNet2DConditionModel, AutoencoderKL, transformers' CLIPTextConfig, a scheduler class). Reading one, we
accept every option that Estable's networks implement and refuse, with an UnsupportedModelError naming
the option, everything else that is set to a value other than the constructor's default. A key missing
from a file means the constructor's default, so the defaults below are diffusers' (written out here,
not imported: the library never imports diffusers), not Estable's.

Naming trap: in UNet2DConditionModel, ``attention_head_dim`` holds the NUMBER OF HEADS whenever
``num_attention_heads`` is null (all Stable Diffusion configs): SD 1.5 has ``attention_head_dim: 8`` = 8 heads
of 40/80/160 channels, SD 2.x has ``[5, 10, 20, 20]`` = 64 channels per head. diffusers itself refuses
``num_attention_heads``; we accept it, since it can only mean the number of heads.

Keys that do not change the function the network computes are ignored: names starting with ``_``
(``_class_name``, ``_diffusers_version``, ``_name_or_path``, …), ``dropout`` (inactive at inference),
``force_upcast`` (a precision policy), ``sample_size`` (kept as information only).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..config import ModelConfig, ScheduleConfig, TextConfig, UNetConfig, VAEConfig
from ..errors import UnsupportedModelError

# The diffusers version whose formats these mappings were checked against (written into the files).
DIFFUSERS_FORMAT_VERSION = "0.42.1"

# ----------------------------------------------------------------------------------------------------------
# Shared helpers
# ----------------------------------------------------------------------------------------------------------


def _unsupported(component: str, option: str, value: Any, why: str = "") -> UnsupportedModelError:
    detail = f" ({why})" if why else ""
    return UnsupportedModelError(f"{component} config: {option}={value!r} is not supported by Estable{detail}")


def _check_defaults(component: str, cfg: Mapping[str, Any], required: Mapping[str, Any]) -> None:
    """Refuse any option in ``required`` whose value in ``cfg`` (default when absent) differs."""
    for option, default in required.items():
        value = cfg.get(option, default)
        if isinstance(default, float) and isinstance(value, (int, float)) and not isinstance(value, bool):
            same = float(value) == default
        else:
            same = value == default
        if not same:
            raise _unsupported(component, option, value)


def _check_known(component: str, cfg: Mapping[str, Any], known: set[str]) -> None:
    """Refuse options this module does not know, unless they are unset (null/false): an unknown option that
    is switched on could change the network, and silently ignoring it would produce garbage."""
    for option, value in cfg.items():
        if option.startswith("_") or option in known:
            continue
        if value is None or value is False:
            continue
        raise _unsupported(component, option, value, "unknown option")


def _int_list(component: str, option: str, value: Any) -> list[int]:
    if isinstance(value, bool) or not isinstance(value, (list, tuple)) or not value:
        raise _unsupported(component, option, value, "expected a non-empty list of integers")
    out = []
    for v in value:
        if isinstance(v, bool) or not isinstance(v, int):
            raise _unsupported(component, option, value, "expected a list of integers")
        out.append(v)
    return out


def _sample_size(value: Any, default: int) -> int:
    """sample_size is informational; accept an int, null (→ default) or [h, w] (→ the larger side)."""
    if value is None:
        return default
    if isinstance(value, (list, tuple)) and value:
        return int(max(value))
    return int(value)


# ----------------------------------------------------------------------------------------------------------
# U-Net
# ----------------------------------------------------------------------------------------------------------

_UNET = "UNet2DConditionModel"
_CROSS_DOWN, _PLAIN_DOWN = "CrossAttnDownBlock2D", "DownBlock2D"
_CROSS_UP, _PLAIN_UP = "CrossAttnUpBlock2D", "UpBlock2D"
_MID = "UNetMidBlock2DCrossAttn"

# UNet2DConditionModel options Estable has no counterpart for, with the only value we accept (diffusers'
# default, which is what SD 1.x/2.x use).
_UNET_FIXED: dict[str, Any] = {
    "center_input_sample": False,
    "only_cross_attention": False,
    "downsample_padding": 1,
    "mid_block_scale_factor": 1.0,
    "act_fn": "silu",
    "reverse_transformer_layers_per_block": None,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "dual_cross_attention": False,
    "class_embed_type": None,
    "addition_embed_type": None,
    "addition_time_embed_dim": None,
    "num_class_embeds": None,
    "resnet_time_scale_shift": "default",
    "resnet_skip_time_act": False,
    "resnet_out_scale_factor": 1.0,
    "time_embedding_type": "positional",
    "time_embedding_act_fn": None,
    "timestep_post_act": None,
    "time_cond_proj_dim": None,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "projection_class_embeddings_input_dim": None,
    "attention_type": "default",
    "class_embeddings_concat": False,
    "cross_attention_norm": None,
}
# Options we read (or that cannot change the math).
_UNET_READ = {
    "sample_size",
    "in_channels",
    "out_channels",
    "flip_sin_to_cos",
    "freq_shift",
    "down_block_types",
    "mid_block_type",
    "up_block_types",
    "block_out_channels",
    "layers_per_block",
    "dropout",
    "norm_num_groups",
    "norm_eps",
    "cross_attention_dim",
    "transformer_layers_per_block",
    "attention_head_dim",
    "num_attention_heads",
    "use_linear_projection",
    "upcast_attention",
    "time_embedding_dim",
    "mid_block_only_cross_attention",
    "addition_embed_type_num_heads",  # only read by addition_embed_type="text", which we refuse
}
# diffusers' defaults for the options we read, where they matter when the key is absent.
_UNET_DEFAULTS: dict[str, Any] = {
    "in_channels": 4,
    "out_channels": 4,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "down_block_types": [_CROSS_DOWN, _CROSS_DOWN, _CROSS_DOWN, _PLAIN_DOWN],
    "mid_block_type": _MID,
    "up_block_types": [_PLAIN_UP, _CROSS_UP, _CROSS_UP, _CROSS_UP],
    "block_out_channels": [320, 640, 1280, 1280],
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "norm_eps": 1e-5,
    "cross_attention_dim": 1280,
    "transformer_layers_per_block": 1,
    "attention_head_dim": 8,
    "num_attention_heads": None,
    "use_linear_projection": False,
    "upcast_attention": False,
}


def _used_levels(attention: list[bool]) -> list[int]:
    """Levels whose head count matters: those with attention, plus the last (the mid block uses it)."""
    n = len(attention)
    return [i for i in range(n) if attention[i] or i == n - 1]


def _heads_from_diffusers(cfg: Mapping[str, Any], channels: list[int], attention: list[bool]) -> dict[str, Any]:
    """Turn diffusers' head option into (num_heads, head_channels).

    An int is a number of heads for every level. A list gives heads per level; if the channels per head
    are the same at every level that uses attention (SD 2.x: [5, 10, 20, 20] over [320, 640, 1280, 1280]),
    it is read as ``head_channels`` (the way SD 2.x's own config says it, num_head_channels=64),
    otherwise as a per-level ``num_heads`` tuple.
    """
    n = len(channels)
    heads = cfg.get("num_attention_heads")
    option = "num_attention_heads"
    if heads is None:
        heads = cfg.get("attention_head_dim", _UNET_DEFAULTS["attention_head_dim"])
        option = "attention_head_dim"
    if isinstance(heads, int) and not isinstance(heads, bool):
        return {"num_heads": heads, "head_channels": None}
    per_level = _int_list(_UNET, option, heads)
    if len(per_level) != n:
        raise _unsupported(_UNET, option, heads, f"one entry per level expected, {n} levels")
    used = _used_levels(attention)
    if any(per_level[i] < 1 for i in used):
        raise _unsupported(_UNET, option, heads, "head counts must be positive")
    ratios = {channels[i] / per_level[i] for i in used}
    if len(ratios) == 1:
        (ratio,) = ratios
        if ratio == int(ratio):
            return {"num_heads": None, "head_channels": int(ratio)}
    return {"num_heads": tuple(per_level), "head_channels": None}


def _uniform(option: str, value: Any, levels: list[int], n: int) -> int:
    """An int, or a per-level list that is the same at every level in ``levels``."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    values = _int_list(_UNET, option, value)
    if len(values) != n:
        raise _unsupported(_UNET, option, value, f"one entry per level expected, {n} levels")
    distinct = {values[i] for i in levels}
    if len(distinct) != 1:
        raise _unsupported(_UNET, option, value, "Estable needs the same value at every attention level")
    return distinct.pop()


def unet_from_diffusers(cfg: Mapping[str, Any]) -> UNetConfig:
    """UNetConfig from a diffusers UNet2DConditionModel ``config.json`` dict."""
    only_cross = cfg.get("only_cross_attention")
    if isinstance(only_cross, (list, tuple)) and not any(only_cross):  # per-level list of False = False
        cfg = {**cfg, "only_cross_attention": False}
    _check_defaults(_UNET, cfg, _UNET_FIXED)
    _check_known(_UNET, cfg, set(_UNET_FIXED) | _UNET_READ)
    d = {**_UNET_DEFAULTS, **{k: v for k, v in cfg.items() if k in _UNET_DEFAULTS}}

    channels = _int_list(_UNET, "block_out_channels", d["block_out_channels"])
    n = len(channels)
    down = list(d["down_block_types"])
    up = list(d["up_block_types"])
    if len(down) != n:
        raise _unsupported(_UNET, "down_block_types", down, f"{n} entries expected (one per block_out_channels)")
    for t in down:
        if t not in (_CROSS_DOWN, _PLAIN_DOWN):
            raise _unsupported(_UNET, "down_block_types", down, f"block type {t!r}; use {_CROSS_DOWN} or {_PLAIN_DOWN}")
    attention = [t == _CROSS_DOWN for t in down]
    mirrored = [_CROSS_UP if a else _PLAIN_UP for a in reversed(attention)]
    if up != mirrored:
        raise _unsupported(_UNET, "up_block_types", up, f"must mirror down_block_types, i.e. {mirrored}")
    if d["mid_block_type"] != _MID:
        raise _unsupported(_UNET, "mid_block_type", d["mid_block_type"], f"only {_MID} is implemented")
    if cfg.get("mid_block_only_cross_attention") not in (None, False):
        raise _unsupported(_UNET, "mid_block_only_cross_attention", cfg["mid_block_only_cross_attention"])
    context = d["cross_attention_dim"]
    if isinstance(context, bool) or not isinstance(context, int):
        raise _unsupported(_UNET, "cross_attention_dim", context, "a single integer is required")
    layers = _uniform("transformer_layers_per_block", d["transformer_layers_per_block"], _used_levels(attention), n)
    time_dim = cfg.get("time_embedding_dim")
    if time_dim is not None and time_dim != 4 * channels[0]:
        raise _unsupported(_UNET, "time_embedding_dim", time_dim, "Estable uses 4 × block_out_channels[0]")
    if d["norm_num_groups"] is None:
        raise _unsupported(_UNET, "norm_num_groups", None)
    try:
        return UNetConfig(
            in_channels=d["in_channels"],
            out_channels=d["out_channels"],
            block_channels=tuple(channels),
            layers_per_block=_uniform("layers_per_block", d["layers_per_block"], list(range(n)), n),
            attention_levels=tuple(attention),
            transformer_layers=layers,
            context_dim=context,
            use_linear_projection=bool(d["use_linear_projection"]),
            upcast_attention=bool(d["upcast_attention"]),
            norm_groups=d["norm_num_groups"],
            norm_eps=float(d["norm_eps"]),
            flip_sin_to_cos=bool(d["flip_sin_to_cos"]),
            freq_shift=d["freq_shift"],
            sample_size=_sample_size(cfg.get("sample_size"), UNetConfig.sample_size),
            **_heads_from_diffusers(d, channels, attention),
        )
    except ValueError as e:
        raise UnsupportedModelError(f"{_UNET} config does not describe a valid U-Net: {e}") from None


def unet_to_diffusers(cfg: UNetConfig) -> dict[str, Any]:
    """A UNet2DConditionModel config dict that builds the same network as ``cfg``."""
    if cfg.head_channels is not None:
        # per-level head counts (the number diffusers' attention_head_dim holds); unused levels get ≥ 1
        heads: Any = [max(1, c // cfg.head_channels) for c in cfg.block_channels]
    elif isinstance(cfg.num_heads, tuple):
        heads = list(cfg.num_heads)
    else:
        heads = cfg.num_heads
    return {
        "_class_name": _UNET,
        "_diffusers_version": DIFFUSERS_FORMAT_VERSION,
        "sample_size": cfg.sample_size,
        "in_channels": cfg.in_channels,
        "out_channels": cfg.out_channels,
        "center_input_sample": False,
        "flip_sin_to_cos": cfg.flip_sin_to_cos,
        "freq_shift": cfg.freq_shift,
        "down_block_types": [_CROSS_DOWN if a else _PLAIN_DOWN for a in cfg.attention_levels],
        "mid_block_type": _MID,
        "up_block_types": [_CROSS_UP if a else _PLAIN_UP for a in reversed(cfg.attention_levels)],
        "only_cross_attention": False,
        "block_out_channels": list(cfg.block_channels),
        "layers_per_block": cfg.layers_per_block,
        "downsample_padding": 1,
        "mid_block_scale_factor": 1,
        "dropout": 0.0,
        "act_fn": "silu",
        "norm_num_groups": cfg.norm_groups,
        "norm_eps": cfg.norm_eps,
        "cross_attention_dim": cfg.context_dim,
        "transformer_layers_per_block": cfg.transformer_layers,
        "attention_head_dim": heads,  # = number of heads (diffusers' naming; see the module docstring)
        "num_attention_heads": None,
        "dual_cross_attention": False,
        "use_linear_projection": cfg.use_linear_projection,
        "class_embed_type": None,
        "num_class_embeds": None,
        "upcast_attention": cfg.upcast_attention,
        "resnet_time_scale_shift": "default",
        "conv_in_kernel": 3,
        "conv_out_kernel": 3,
        "attention_type": "default",
    }


# ----------------------------------------------------------------------------------------------------------
# VAE
# ----------------------------------------------------------------------------------------------------------

_VAE = "AutoencoderKL"
_VAE_FIXED: dict[str, Any] = {
    "act_fn": "silu",
    "shift_factor": None,
    "latents_mean": None,
    "latents_std": None,
    "use_quant_conv": True,
    "use_post_quant_conv": True,
}
_VAE_DEFAULTS: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"],
    "up_block_types": ["UpDecoderBlock2D"],
    "block_out_channels": [64],
    "layers_per_block": 1,
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 32,
    "scaling_factor": 0.18215,
    "mid_block_add_attention": True,
}
# AutoencoderKL has no norm_eps option: every GroupNorm in it uses 1e-6.
_VAE_NORM_EPS = 1e-6


CENTRED_VAE_UNSUPPORTED = ("this VAE's encoder downsamples with 4×4 kernels (VAEConfig.downsample_kernel=4); {layout} "
                           "holds the LDM autoencoder's 3×3 ones only: keep the model in Estable's format")


def vae_from_diffusers(cfg: Mapping[str, Any]) -> VAEConfig:
    """VAEConfig from a diffusers AutoencoderKL ``config.json`` dict."""
    _check_defaults(_VAE, cfg, _VAE_FIXED)
    _check_known(_VAE, cfg, set(_VAE_FIXED) | set(_VAE_DEFAULTS) | {"force_upcast"})
    d = {**_VAE_DEFAULTS, **{k: v for k, v in cfg.items() if k in _VAE_DEFAULTS}}
    channels = _int_list(_VAE, "block_out_channels", d["block_out_channels"])
    n = len(channels)
    for option, block in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
        types = list(d[option])
        if types != [block] * n:
            raise _unsupported(_VAE, option, types, f"expected {n} × {block}")
    try:
        return VAEConfig(
            in_channels=d["in_channels"],
            out_channels=d["out_channels"],
            latent_channels=d["latent_channels"],
            block_channels=tuple(channels),
            layers_per_block=d["layers_per_block"],
            norm_groups=d["norm_num_groups"],
            norm_eps=_VAE_NORM_EPS,
            mid_attention=bool(d["mid_block_add_attention"]),
            scaling_factor=float(d["scaling_factor"]),
            sample_size=_sample_size(d["sample_size"], VAEConfig.sample_size),
        )
    except ValueError as e:
        raise UnsupportedModelError(f"{_VAE} config does not describe a valid autoencoder: {e}") from None


def vae_to_diffusers(cfg: VAEConfig) -> dict[str, Any]:
    """An AutoencoderKL config dict that builds the same network as ``cfg``."""
    if cfg.norm_eps != _VAE_NORM_EPS:
        raise UnsupportedModelError(
            f"VAEConfig.norm_eps={cfg.norm_eps} cannot be written as an AutoencoderKL config (fixed at 1e-6)"
        )
    if cfg.downsample_kernel != 3:
        raise UnsupportedModelError(CENTRED_VAE_UNSUPPORTED.format(layout="an AutoencoderKL config"))
    n = len(cfg.block_channels)
    return {
        "_class_name": _VAE,
        "_diffusers_version": DIFFUSERS_FORMAT_VERSION,
        "in_channels": cfg.in_channels,
        "out_channels": cfg.out_channels,
        "down_block_types": ["DownEncoderBlock2D"] * n,
        "up_block_types": ["UpDecoderBlock2D"] * n,
        "block_out_channels": list(cfg.block_channels),
        "layers_per_block": cfg.layers_per_block,
        "act_fn": "silu",
        "latent_channels": cfg.latent_channels,
        "norm_num_groups": cfg.norm_groups,
        "sample_size": cfg.sample_size,
        "scaling_factor": cfg.scaling_factor,
        "force_upcast": True,
        "mid_block_add_attention": cfg.mid_attention,
    }


# ----------------------------------------------------------------------------------------------------------
# Text encoder (transformers CLIPTextConfig)
# ----------------------------------------------------------------------------------------------------------

_TEXT = "CLIPTextConfig"
_TEXT_DEFAULTS: dict[str, Any] = {  # transformers' CLIPTextConfig defaults
    "vocab_size": 49408,
    "hidden_size": 512,
    "intermediate_size": 2048,
    "projection_dim": 512,
    "num_hidden_layers": 12,
    "num_attention_heads": 8,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
    "eos_token_id": 49407,
}
# Configs written before transformers PR #24773 say eos_token_id=2; transformers then pools at the
# position of the LARGEST token id, which for the CLIP vocabulary is the EOS token (the last entry).
_LEGACY_EOS = 2


def text_from_diffusers(cfg: Mapping[str, Any]) -> TextConfig:
    """TextConfig from a transformers CLIPTextConfig ``config.json`` dict (a diffusers ``text_encoder/``).

    The projection exists when ``architectures`` names CLIPTextModelWithProjection (Estable's exports before
    the fix of issue 16 did); a CLIPTextModel config also carries ``projection_dim``, which then means nothing
    here: the loader adds a projection when the weights hold one (store.py, :data:`TEXT_PROJECTION_FILE`).
    Generic transformers options (dropout, initializer ranges, token ids other than EOS, dtype, …) are ignored.
    """
    model_type = cfg.get("model_type", "clip_text_model")
    if model_type != "clip_text_model":
        raise _unsupported(_TEXT, "model_type", model_type, "expected a CLIP text model config")
    d = {**_TEXT_DEFAULTS, **{k: v for k, v in cfg.items() if k in _TEXT_DEFAULTS}}
    if d["hidden_act"] not in ("quick_gelu", "gelu"):
        raise _unsupported(_TEXT, "hidden_act", d["hidden_act"], "use 'quick_gelu' or 'gelu'")
    architectures = cfg.get("architectures") or ["CLIPTextModel"]
    if architectures not in (["CLIPTextModel"], ["CLIPTextModelWithProjection"]):
        raise _unsupported(_TEXT, "architectures", architectures)
    with_projection = architectures == ["CLIPTextModelWithProjection"]
    eos = d["eos_token_id"]
    if eos == _LEGACY_EOS:
        eos = d["vocab_size"] - 1
    try:
        return TextConfig(
            vocab_size=d["vocab_size"],
            max_positions=d["max_position_embeddings"],
            width=d["hidden_size"],
            layers=d["num_hidden_layers"],
            heads=d["num_attention_heads"],
            mlp_width=d["intermediate_size"],
            activation=d["hidden_act"],
            layer_norm_eps=float(d["layer_norm_eps"]),
            projection_dim=d["projection_dim"] if with_projection else None,
            eos_token_id=eos,
        )
    except ValueError as e:
        raise UnsupportedModelError(f"{_TEXT} does not describe a valid CLIP text model: {e}") from None


# The class a StableDiffusionPipeline instantiates for its text_encoder/: the pipeline cross-attends to the hidden
# states, which only CLIPTextModel returns first (CLIPTextModelWithProjection returns the pooled projection first,
# and the pipeline then fails at the first prompt). A projection, where a model has one (Estable's own models: a
# text tower trained as half of a CLIP pair), is not part of this class; store.py writes it beside the weights in
# text_encoder/TEXT_PROJECTION_FILE, a file transformers and diffusers do not read.
TEXT_ENCODER_CLASS = "CLIPTextModel"
TEXT_PROJECTION_FILE = "text_projection.safetensors"


def text_to_diffusers(cfg: TextConfig) -> dict[str, Any]:
    """A transformers CLIPTextConfig dict for a ``CLIPTextModel`` with ``cfg``'s transformer.

    ``projection_dim`` records the width of the projection kept in :data:`TEXT_PROJECTION_FILE` (CLIPTextModel
    ignores it). ``dtype`` float32: transformers 5 loads a model in the dtype its config names, or else in the
    dtype of the stored weights, while diffusers loads its models in float32 unless told otherwise; without it a
    folder holding fp16 weights loads as a fp16 text encoder beside a fp32 U-Net and fails at the first prompt.
    With it, ``from_pretrained(folder)`` gives a float32 pipeline and ``torch_dtype=`` still sets every part.
    """
    return {
        "architectures": [TEXT_ENCODER_CLASS],
        "dtype": "float32",
        "model_type": "clip_text_model",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.width,
        "intermediate_size": cfg.mlp_width,
        # CLIPTextModel ignores projection_dim; write the width so that the value is at least plausible
        "projection_dim": cfg.projection_dim if cfg.projection_dim is not None else cfg.width,
        "num_hidden_layers": cfg.layers,
        "num_attention_heads": cfg.heads,
        "max_position_embeddings": cfg.max_positions,
        "hidden_act": cfg.activation,
        "layer_norm_eps": cfg.layer_norm_eps,
        "attention_dropout": 0.0,
        "dropout": 0.0,
        "initializer_factor": 1.0,
        "initializer_range": 0.02,
        "bos_token_id": 49406 if cfg.vocab_size > 49406 else 0,
        "eos_token_id": cfg.eos_token_id,
        "pad_token_id": 1,
    }


# ----------------------------------------------------------------------------------------------------------
# Scheduler
# ----------------------------------------------------------------------------------------------------------

_SCHEDULER = "scheduler"
# diffusers' schedulers share these defaults for a key a file leaves out (Heun and KDPM2 excepted: their
# beta_start is 0.00085).
_SCHED_DEFAULTS: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "prediction_type": "epsilon",
    "steps_offset": 0,
    "timestep_spacing": None,  # absent: each sampler's own default (ScheduleConfig's None means the same)
}
_KARRAS_DEFAULT_BETA_START = {"HeunDiscreteScheduler", "KDPM2DiscreteScheduler", "KDPM2AncestralDiscreteScheduler"}
# The class model_index_for names: what SD 1.x ships; diffusers loads it offline without warnings.
DEFAULT_SCHEDULER_CLASS = "PNDMScheduler"


def schedule_from_diffusers(cfg: Mapping[str, Any]) -> ScheduleConfig:
    """ScheduleConfig from a diffusers ``scheduler_config.json`` dict.

    Only the training schedule is read (betas, timesteps, parametrisation, spacing); the solver-specific
    options (clip_sample, set_alpha_to_one, skip_prk_steps, …) belong to a sampler, not to the model, and
    are ignored. Options that change the betas themselves are refused. A missing ``timestep_spacing`` stays
    None (SD 1.x/2.x files name none, and diffusers then uses each scheduler class's own default).
    """
    class_name = cfg.get("_class_name", DEFAULT_SCHEDULER_CLASS)
    if cfg.get("trained_betas") is not None:
        raise _unsupported(_SCHEDULER, "trained_betas", "[...]", "explicit beta tables")
    defaults = dict(_SCHED_DEFAULTS)
    if class_name in _KARRAS_DEFAULT_BETA_START:
        defaults["beta_start"] = 0.00085
    d = {**defaults, **{k: v for k, v in cfg.items() if k in defaults}}
    for option, allowed in (
        ("beta_schedule", ("scaled_linear", "linear", "squaredcos_cap_v2")),
        ("prediction_type", ("epsilon", "v_prediction")),
        ("timestep_spacing", (None, "leading", "trailing", "linspace")),
    ):
        if d[option] not in allowed:
            names = ", ".join(str(a) for a in allowed if a is not None)
            raise _unsupported(_SCHEDULER, option, d[option], f"use one of {names}")
    return ScheduleConfig(
        num_train_timesteps=int(d["num_train_timesteps"]),
        beta_start=float(d["beta_start"]),
        beta_end=float(d["beta_end"]),
        beta_schedule=d["beta_schedule"],
        prediction_type=d["prediction_type"],
        steps_offset=int(d["steps_offset"]),
        timestep_spacing=d["timestep_spacing"],
        rescale_betas_zero_snr=bool(cfg.get("rescale_betas_zero_snr", False)),
    )


def scheduler_class_for(cfg: ScheduleConfig) -> str:
    """The scheduler class a diffusers folder names: SD's PNDM, or DDIM for a zero-terminal-SNR schedule (PNDM
    has no ``rescale_betas_zero_snr``)."""
    return "DDIMScheduler" if cfg.rescale_betas_zero_snr else DEFAULT_SCHEDULER_CLASS


def schedule_to_diffusers(cfg: ScheduleConfig, class_name: str | None = None) -> dict[str, Any]:
    """A ``scheduler_config.json`` dict for ``class_name`` (PNDMScheduler or DDIMScheduler; default
    :func:`scheduler_class_for`)."""
    class_name = class_name or scheduler_class_for(cfg)
    if cfg.rescale_betas_zero_snr and class_name != "DDIMScheduler":
        raise ValueError(f"{class_name} has no zero-terminal-SNR option; write DDIMScheduler")
    out: dict[str, Any] = {
        "_class_name": class_name,
        "_diffusers_version": DIFFUSERS_FORMAT_VERSION,
        "num_train_timesteps": cfg.num_train_timesteps,
        "beta_start": cfg.beta_start,
        "beta_end": cfg.beta_end,
        "beta_schedule": cfg.beta_schedule,
        "trained_betas": None,
        "prediction_type": cfg.prediction_type,
        "steps_offset": cfg.steps_offset,
        "set_alpha_to_one": False,  # SD: the last step's "previous" ᾱ is ᾱ_0, not 1
    }
    if cfg.timestep_spacing is not None:  # None: leave the key out, so each scheduler uses its own default
        out["timestep_spacing"] = cfg.timestep_spacing
    if cfg.rescale_betas_zero_snr:
        out["rescale_betas_zero_snr"] = True
    if class_name == "PNDMScheduler":
        out["skip_prk_steps"] = True  # PLMS only, as SD's reference sampler
    elif class_name == "DDIMScheduler":
        out["clip_sample"] = False  # latents are not in [-1, 1]
    else:
        raise ValueError(f"schedule_to_diffusers writes PNDMScheduler or DDIMScheduler configs, not {class_name!r}")
    return out


# ----------------------------------------------------------------------------------------------------------
# Pipeline index
# ----------------------------------------------------------------------------------------------------------


def model_index_for(config: ModelConfig, scheduler_class: str | None = None) -> dict[str, Any]:
    """The ``model_index.json`` of a StableDiffusionPipeline folder holding ``config``'s networks.

    No safety checker or feature extractor is written ([null, null], requires_safety_checker false).
    """
    return {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": DIFFUSERS_FORMAT_VERSION,
        "feature_extractor": [None, None],
        "image_encoder": [None, None],
        "requires_safety_checker": False,
        "safety_checker": [None, None],
        "scheduler": ["diffusers", scheduler_class or scheduler_class_for(config.schedule)],
        "text_encoder": ["transformers", TEXT_ENCODER_CLASS],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", _UNET],
        "vae": ["diffusers", _VAE],
    }
