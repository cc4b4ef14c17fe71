"""Stable Diffusion single-file checkpoints ("original LDM" layout) ↔ Estable state dicts.

The single ``.ckpt`` / ``.safetensors`` files that CompVis and Stability AI published hold the whole
LatentDiffusion module of the reference code (github.com/CompVis/stable-diffusion,
github.com/Stability-AI/stablediffusion), so its names follow that code's attributes:

    model.diffusion_model.   the U-Net (``openaimodel.UNetModel``: input_blocks / middle_block / output_blocks)
    first_stage_model.       the KL autoencoder (``encoder.down.N.block.M``, ``decoder.up.N.block.M``)
    cond_stage_model.transformer.text_model.   SD 1.x text encoder (a transformers CLIPTextModel, same names)
    cond_stage_model.model.  SD 2.x text encoder (open_clip names, fused q/k/v ``in_proj``)
    model_ema.               EMA copies of the U-Net (LitEma: the U-Net name without ``model.`` and without dots)

Estable's models use diffusers' / transformers' names (UNet2DConditionModel, AutoencoderKL, CLIPTextModel
under ``text_model.``), so converting is a renaming plus three reshapes:

* VAE mid-block attention q/k/v/proj_out are 1×1 convolutions ``(C, C, 1, 1)`` in LDM and Linear ``(C, C)``
  in Estable;
* open_clip fuses the attention input projections: ``in_proj_weight`` is ``[W_q; W_k; W_v]`` stacked on
  dim 0, ``(3·width, width)``;
* open_clip's ``text_projection`` is a ``(width, proj)`` matrix applied as ``x @ P``; a Linear layer stores
  ``P.T``, shape ``(proj, width)``.

Each network has ONE mapping table, generated from its config (levels, layers per block, attention levels,
transformer depth, text layers): :func:`unet_key_map`, :func:`vae_key_map`, :func:`text_key_map`. Every row
carries the expected Estable shape, so conversion checks every tensor's shape and reports every missing or
unexpected key. Which family a file is and the config its shapes imply: :mod:`estable.checkpoints.ldm_infer`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from ..config import ModelConfig, TextConfig, UNetConfig, VAEConfig
from ..errors import CheckpointError, UnsupportedModelError
from .diffusers_config import CENTRED_VAE_UNSUPPORTED

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
SD1_TEXT_PREFIX = "cond_stage_model.transformer."  # + "text_model." (transformers CLIPTextModel names)
SD2_TEXT_PREFIX = "cond_stage_model.model."  # open_clip names
EMA_PREFIX = "model_ema."
SDXL_PREFIX = "conditioner.embedders."

# Entries that LDM files legitimately carry besides the three networks; ignored when reading.
# The DDPM buffers come from ``LatentDiffusion.register_schedule`` (ldm/models/diffusion/ddpm.py), the
# EMA counters from ``LitEma``, ``position_ids`` from transformers' CLIPTextModel (a persistent buffer in
# old transformers versions), ``logit_scale`` / ``attn_mask`` from the open_clip model SD 2.x wraps,
# ``global_step`` from Lightning checkpoints that were flattened into one dict.
LDM_EXTRAS: frozenset[str] = frozenset(
    {
        "betas",
        "alphas_cumprod",
        "alphas_cumprod_prev",
        "sqrt_alphas_cumprod",
        "sqrt_one_minus_alphas_cumprod",
        "log_one_minus_alphas_cumprod",
        "sqrt_recip_alphas_cumprod",
        "sqrt_recipm1_alphas_cumprod",
        "posterior_variance",
        "posterior_log_variance_clipped",
        "posterior_mean_coef1",
        "posterior_mean_coef2",
        "lvlb_weights",
        "logvar",
        "scale_factor",
        "cond_ids",
        "global_step",
        "model_ema.decay",
        "model_ema.num_updates",
        SD1_TEXT_PREFIX + "text_model.embeddings.position_ids",
        SD2_TEXT_PREFIX + "logit_scale",
        SD2_TEXT_PREFIX + "attn_mask",
    }
)

# Heads are not encoded in the weights (q/k/v are (C, C) whatever the split), so they come from the family:
# SD 1.x uses 8 heads at every level (v1-inference.yaml: num_heads 8); SD 2.x uses 64 channels per head
# (v2-inference.yaml: num_head_channels 64). CLIP text towers use 64 channels per head (ViT-L/14: 768/12,
# ViT-H/14: 1024/16).
SD1_UNET_HEADS = 8
SD2_UNET_HEAD_CHANNELS = 64
TEXT_HEAD_CHANNELS = 64
# The ViT-H/14 text tower SD 2.x ships has 24 layers; diffusers' SD 2.x folders keep 23 (the penultimate
# layer's output is what SD 2.x conditions on). See :func:`trim_text_layers`.
SD2_TEXT_LAYERS_TRIMMED = 23
# SD 2.0-base's checkpoint was saved at this global step; diffusers uses it to tell ε- from v-models.
SD2_BASE_GLOBAL_STEP = 875000

Op = Literal["copy", "conv1x1", "transpose", "qkv"]
Layout = Literal["sd1", "sd2"]


@dataclass(frozen=True)
class KeyMap:
    """One row of a mapping table: an Estable tensor and where it lives in the LDM file.

    ``op`` says how the LDM tensor relates to the Estable one:
      copy       same tensor
      conv1x1    LDM holds a 1×1 convolution (C_out, C_in, 1, 1) of the Estable Linear (C_out, C_in)
      transpose  LDM holds the transpose (open_clip ``text_projection``)
      qkv        LDM holds [q; k; v] stacked on dim 0; ``part`` (0, 1, 2) says which third this row is
    """

    key: str
    ldm: str
    shape: tuple[int, ...]
    op: Op = "copy"
    part: int = 0

    @property
    def ldm_shape(self) -> tuple[int, ...]:
        if self.op == "conv1x1":
            return (*self.shape, 1, 1)
        if self.op == "transpose":
            return tuple(reversed(self.shape))
        if self.op == "qkv":
            return (3 * self.shape[0], *self.shape[1:])
        return self.shape


class _Table:
    """Accumulates KeyMap rows; ``param`` adds a weight/bias pair."""

    def __init__(self) -> None:
        self.rows: list[KeyMap] = []

    def add(self, key: str, ldm: str, shape: tuple[int, ...], op: Op = "copy", part: int = 0) -> None:
        self.rows.append(KeyMap(key, ldm, tuple(shape), op, part))

    def param(self, key: str, ldm: str, weight: tuple[int, ...], op: Op = "copy", bias: bool = True) -> None:
        """A layer's weight (shape ``weight``) and, if present, its bias (shape ``weight[0]``)."""
        self.add(f"{key}.weight", f"{ldm}.weight", weight, op)
        if bias:
            self.add(f"{key}.bias", f"{ldm}.bias", (weight[0],))

    def norm(self, key: str, ldm: str, channels: int) -> None:
        self.param(key, ldm, (channels,))


# ----------------------------------------------------------------------------------------------------------
# U-Net
# ----------------------------------------------------------------------------------------------------------


def _unet_resnet(t: _Table, key: str, ldm: str, cin: int, cout: int, temb: int) -> None:
    # ResBlock (openaimodel.py): in_layers = [GroupNorm, SiLU, conv3×3], emb_layers = [SiLU, Linear],
    # out_layers = [GroupNorm, SiLU, Dropout, conv3×3], skip_connection = 1×1 conv when cin != cout.
    t.norm(f"{key}.norm1", f"{ldm}.in_layers.0", cin)
    t.param(f"{key}.conv1", f"{ldm}.in_layers.2", (cout, cin, 3, 3))
    t.param(f"{key}.time_emb_proj", f"{ldm}.emb_layers.1", (cout, temb))
    t.norm(f"{key}.norm2", f"{ldm}.out_layers.0", cout)
    t.param(f"{key}.conv2", f"{ldm}.out_layers.3", (cout, cout, 3, 3))
    if cin != cout:
        t.param(f"{key}.conv_shortcut", f"{ldm}.skip_connection", (cout, cin, 1, 1))


def _unet_transformer(t: _Table, key: str, ldm: str, c: int, context: int, depth: int, linear: bool) -> None:
    # SpatialTransformer (ldm/modules/attention.py) and diffusers' Transformer2DModel share their inner
    # names; only the prefix changes. Inner width = heads × head_channels = c.
    proj = (c, c) if linear else (c, c, 1, 1)
    t.norm(f"{key}.norm", f"{ldm}.norm", c)
    t.param(f"{key}.proj_in", f"{ldm}.proj_in", proj)
    for d in range(depth):
        k, n = f"{key}.transformer_blocks.{d}", f"{ldm}.transformer_blocks.{d}"
        for attn, kv_width in (("attn1", c), ("attn2", context)):  # self-attention, cross-attention
            t.param(f"{k}.{attn}.to_q", f"{n}.{attn}.to_q", (c, c), bias=False)
            t.param(f"{k}.{attn}.to_k", f"{n}.{attn}.to_k", (c, kv_width), bias=False)
            t.param(f"{k}.{attn}.to_v", f"{n}.{attn}.to_v", (c, kv_width), bias=False)
            t.param(f"{k}.{attn}.to_out.0", f"{n}.{attn}.to_out.0", (c, c))
        # GEGLU feed-forward: Linear(c → 2·4c), gate, Linear(4c → c)
        t.param(f"{k}.ff.net.0.proj", f"{n}.ff.net.0.proj", (8 * c, c))
        t.param(f"{k}.ff.net.2", f"{n}.ff.net.2", (c, 4 * c))
        for i in (1, 2, 3):
            t.norm(f"{k}.norm{i}", f"{n}.norm{i}", c)
    t.param(f"{key}.proj_out", f"{ldm}.proj_out", proj)


def unet_key_map(cfg: UNetConfig, prefix: str = UNET_PREFIX) -> list[KeyMap]:
    """The U-Net's mapping table: every Estable key with its LDM key (``prefix`` + openaimodel name).

    LDM numbers the encoder sequentially: ``input_blocks.0`` is conv_in, then per level ``layers_per_block``
    blocks ``[ResBlock, SpatialTransformer?]`` and (except at the last level) one Downsample; the decoder
    ``output_blocks`` run the levels in reverse with ``layers_per_block + 1`` blocks each, the Upsample
    sharing the level's last block.
    """
    t = _Table()
    ch = cfg.block_channels
    n = len(ch)
    temb = cfg.time_embed_dim
    per_level = cfg.layers_per_block

    def attention(key: str, ldm: str, level: int) -> None:
        _unet_transformer(t, key, ldm, ch[level], cfg.context_dim, cfg.transformer_layers, cfg.use_linear_projection)

    t.param("time_embedding.linear_1", f"{prefix}time_embed.0", (temb, ch[0]))
    t.param("time_embedding.linear_2", f"{prefix}time_embed.2", (temb, temb))
    t.param("conv_in", f"{prefix}input_blocks.0.0", (ch[0], cfg.in_channels, 3, 3))

    skips = [ch[0]]  # channels of every encoder activation the decoder concatenates back, in push order
    block = 1
    cin = ch[0]
    for level in range(n):
        for j in range(per_level):
            key, ldm = f"down_blocks.{level}", f"{prefix}input_blocks.{block}"
            _unet_resnet(t, f"{key}.resnets.{j}", f"{ldm}.0", cin, ch[level], temb)
            if cfg.attention_levels[level]:
                attention(f"{key}.attentions.{j}", f"{ldm}.1", level)
            cin = ch[level]
            skips.append(cin)
            block += 1
        if level < n - 1:
            t.param(f"down_blocks.{level}.downsamplers.0.conv", f"{prefix}input_blocks.{block}.0.op", (cin, cin, 3, 3))
            skips.append(cin)
            block += 1

    c = ch[-1]
    _unet_resnet(t, "mid_block.resnets.0", f"{prefix}middle_block.0", c, c, temb)
    attention("mid_block.attentions.0", f"{prefix}middle_block.1", n - 1)
    _unet_resnet(t, "mid_block.resnets.1", f"{prefix}middle_block.2", c, c, temb)

    block = 0
    for i, level in enumerate(reversed(range(n))):
        for j in range(per_level + 1):
            key, ldm = f"up_blocks.{i}", f"{prefix}output_blocks.{block}"
            # input = previous activation ⊕ the matching encoder activation (channel concat)
            _unet_resnet(t, f"{key}.resnets.{j}", f"{ldm}.0", cin + skips.pop(), ch[level], temb)
            cin = ch[level]
            if cfg.attention_levels[level]:
                attention(f"{key}.attentions.{j}", f"{ldm}.1", level)
            if level > 0 and j == per_level:
                slot = 2 if cfg.attention_levels[level] else 1
                t.param(f"{key}.upsamplers.0.conv", f"{ldm}.{slot}.conv", (cin, cin, 3, 3))
            block += 1

    t.norm("conv_norm_out", f"{prefix}out.0", ch[0])
    t.param("conv_out", f"{prefix}out.2", (cfg.out_channels, ch[0], 3, 3))
    return t.rows


def ema_key(ldm_key: str) -> str:
    """LitEma's name for an LDM parameter: drop the leading ``model.`` and every dot, prefix ``model_ema.``.

    ``model.diffusion_model.input_blocks.0.0.weight`` → ``model_ema.diffusion_modelinput_blocks00weight``.
    """
    if not ldm_key.startswith("model."):
        raise ValueError(f"only parameters under 'model.' have EMA copies, not {ldm_key!r}")
    return EMA_PREFIX + ldm_key[len("model.") :].replace(".", "")


# ----------------------------------------------------------------------------------------------------------
# VAE
# ----------------------------------------------------------------------------------------------------------


def _vae_resnet(t: _Table, key: str, ldm: str, cin: int, cout: int) -> None:
    # ResnetBlock (ldm/modules/diffusionmodules/model.py) without a time embedding.
    t.norm(f"{key}.norm1", f"{ldm}.norm1", cin)
    t.param(f"{key}.conv1", f"{ldm}.conv1", (cout, cin, 3, 3))
    t.norm(f"{key}.norm2", f"{ldm}.norm2", cout)
    t.param(f"{key}.conv2", f"{ldm}.conv2", (cout, cout, 3, 3))
    if cin != cout:
        t.param(f"{key}.conv_shortcut", f"{ldm}.nin_shortcut", (cout, cin, 1, 1))


def _vae_attention(t: _Table, key: str, ldm: str, c: int) -> None:
    # AttnBlock: single-head attention whose projections are 1×1 convolutions in LDM.
    t.norm(f"{key}.group_norm", f"{ldm}.norm", c)
    for ours, theirs in (("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out")):
        t.add(f"{key}.{ours}.weight", f"{ldm}.{theirs}.weight", (c, c), "conv1x1")
        t.add(f"{key}.{ours}.bias", f"{ldm}.{theirs}.bias", (c,))


def _vae_mid(t: _Table, key: str, ldm: str, c: int, attention: bool) -> None:
    _vae_resnet(t, f"{key}.resnets.0", f"{ldm}.block_1", c, c)
    if attention:
        _vae_attention(t, f"{key}.attentions.0", f"{ldm}.attn_1", c)
    _vae_resnet(t, f"{key}.resnets.1", f"{ldm}.block_2", c, c)


def vae_key_map(cfg: VAEConfig, prefix: str = VAE_PREFIX) -> list[KeyMap]:
    """The autoencoder's mapping table. LDM numbers decoder levels by resolution (``up.0`` is the finest and
    runs last); diffusers numbers them in execution order, so ``up_blocks.i`` ↔ ``up.(n-1-i)``."""
    t = _Table()
    ch = cfg.block_channels
    n = len(ch)
    z = cfg.latent_channels

    t.param("encoder.conv_in", f"{prefix}encoder.conv_in", (ch[0], cfg.in_channels, 3, 3))
    cin = ch[0]
    for level in range(n):
        for j in range(cfg.layers_per_block):
            _vae_resnet(t, f"encoder.down_blocks.{level}.resnets.{j}", f"{prefix}encoder.down.{level}.block.{j}",
                        cin, ch[level])
            cin = ch[level]
        if level < n - 1:
            t.param(f"encoder.down_blocks.{level}.downsamplers.0.conv", f"{prefix}encoder.down.{level}.downsample.conv",
                    (cin, cin, 3, 3))
    _vae_mid(t, "encoder.mid_block", f"{prefix}encoder.mid", ch[-1], cfg.mid_attention)
    t.norm("encoder.conv_norm_out", f"{prefix}encoder.norm_out", ch[-1])
    t.param("encoder.conv_out", f"{prefix}encoder.conv_out", (2 * z, ch[-1], 3, 3))  # mean and log-variance
    t.param("quant_conv", f"{prefix}quant_conv", (2 * z, 2 * z, 1, 1))
    t.param("post_quant_conv", f"{prefix}post_quant_conv", (z, z, 1, 1))

    t.param("decoder.conv_in", f"{prefix}decoder.conv_in", (ch[-1], z, 3, 3))
    _vae_mid(t, "decoder.mid_block", f"{prefix}decoder.mid", ch[-1], cfg.mid_attention)
    cin = ch[-1]
    for i, level in enumerate(reversed(range(n))):
        for j in range(cfg.layers_per_block + 1):
            _vae_resnet(t, f"decoder.up_blocks.{i}.resnets.{j}", f"{prefix}decoder.up.{level}.block.{j}",
                        cin, ch[level])
            cin = ch[level]
        if level > 0:
            t.param(f"decoder.up_blocks.{i}.upsamplers.0.conv", f"{prefix}decoder.up.{level}.upsample.conv",
                    (cin, cin, 3, 3))
    t.norm("decoder.conv_norm_out", f"{prefix}decoder.norm_out", ch[0])
    t.param("decoder.conv_out", f"{prefix}decoder.conv_out", (cfg.out_channels, ch[0], 3, 3))
    return t.rows


# ----------------------------------------------------------------------------------------------------------
# Text encoder
# ----------------------------------------------------------------------------------------------------------


def text_key_map(cfg: TextConfig, layout: Layout) -> list[KeyMap]:
    """The text encoder's mapping table.

    ``layout="sd1"``: transformers CLIPTextModel names under ``cond_stage_model.transformer.`` (identity
    apart from the prefix; a projection, which SD 1.x files never have, goes to ``…transformer.text_projection``).
    ``layout="sd2"``: open_clip names under ``cond_stage_model.model.``.
    """
    t = _Table()
    w, m = cfg.width, cfg.mlp_width
    if layout == "sd1":
        p = SD1_TEXT_PREFIX
        names = {
            "tok": "text_model.embeddings.token_embedding.weight",
            "pos": "text_model.embeddings.position_embedding.weight",
            "final": "text_model.final_layer_norm",
        }
        t.add(names["tok"], p + names["tok"], (cfg.vocab_size, w))
        t.add(names["pos"], p + names["pos"], (cfg.max_positions, w))
        for i in range(cfg.layers):
            k = f"text_model.encoder.layers.{i}"
            for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
                t.param(f"{k}.self_attn.{proj}", f"{p}{k}.self_attn.{proj}", (w, w))
            t.norm(f"{k}.layer_norm1", f"{p}{k}.layer_norm1", w)
            t.norm(f"{k}.layer_norm2", f"{p}{k}.layer_norm2", w)
            t.param(f"{k}.mlp.fc1", f"{p}{k}.mlp.fc1", (m, w))
            t.param(f"{k}.mlp.fc2", f"{p}{k}.mlp.fc2", (w, m))
        t.norm(names["final"], p + names["final"], w)
        if cfg.projection_dim is not None:
            t.add("text_projection.weight", p + "text_projection.weight", (cfg.projection_dim, w))
        return t.rows
    if layout != "sd2":
        raise ValueError(f"unknown text layout {layout!r}; use 'sd1' or 'sd2'")
    p = SD2_TEXT_PREFIX
    t.add("text_model.embeddings.token_embedding.weight", p + "token_embedding.weight", (cfg.vocab_size, w))
    t.add("text_model.embeddings.position_embedding.weight", p + "positional_embedding", (cfg.max_positions, w))
    for i in range(cfg.layers):
        k, r = f"text_model.encoder.layers.{i}", f"{p}transformer.resblocks.{i}"
        for part, proj in enumerate(("q_proj", "k_proj", "v_proj")):  # in_proj = [W_q; W_k; W_v]
            t.add(f"{k}.self_attn.{proj}.weight", f"{r}.attn.in_proj_weight", (w, w), "qkv", part)
            t.add(f"{k}.self_attn.{proj}.bias", f"{r}.attn.in_proj_bias", (w,), "qkv", part)
        t.param(f"{k}.self_attn.out_proj", f"{r}.attn.out_proj", (w, w))
        t.norm(f"{k}.layer_norm1", f"{r}.ln_1", w)
        t.norm(f"{k}.layer_norm2", f"{r}.ln_2", w)
        t.param(f"{k}.mlp.fc1", f"{r}.mlp.c_fc", (m, w))
        t.param(f"{k}.mlp.fc2", f"{r}.mlp.c_proj", (w, m))
    t.norm("text_model.final_layer_norm", p + "ln_final", w)
    if cfg.projection_dim is not None:
        # open_clip: pooled @ P with P (width, proj); Linear stores P.T (proj, width)
        t.add("text_projection.weight", p + "text_projection", (cfg.projection_dim, w), "transpose")
    return t.rows


def text_layout(config: ModelConfig) -> Layout:
    """Which LDM text layout a model uses: open_clip for SD 2.x, transformers names for SD 1.x and ours."""
    return "sd2" if config.family == "sd2" else "sd1"


def key_maps(config: ModelConfig) -> dict[str, list[KeyMap]]:
    """All three mapping tables of a model, by component name."""
    return {
        "unet": unet_key_map(config.unet),
        "vae": vae_key_map(config.vae),
        "text_encoder": text_key_map(config.text, text_layout(config)),
    }


# ----------------------------------------------------------------------------------------------------------
# Conversion
# ----------------------------------------------------------------------------------------------------------


def _listing(what: str, items: list[str], limit: int = 5) -> str:
    shown = ", ".join(items[:limit])
    more = f" (and {len(items) - limit} more)" if len(items) > limit else ""
    return f"{len(items)} {what}: {shown}{more}"


def _raise_problems(context: str, missing: list[str], unexpected: list[str], shapes: list[str]) -> None:
    parts = []
    if missing:
        parts.append(_listing("missing key(s)", missing))
    if unexpected:
        parts.append(_listing("unexpected key(s)", unexpected))
    if shapes:
        parts.append(_listing("key(s) with the wrong shape", shapes))
    if parts:
        raise CheckpointError(f"{context}: " + "; ".join(parts))


def _shape(t: Any) -> tuple[int, ...]:
    return tuple(t.shape)


def _fmt(shape: tuple[int, ...]) -> str:
    return "(" + ", ".join(str(s) for s in shape) + ")"


def ldm_to_components(
    sd: Mapping[str, Tensor], config: ModelConfig, *, ema: bool = False
) -> dict[str, dict[str, Tensor]]:
    """Split an LDM single-file state dict into Estable state dicts ``{"unet", "vae", "text_encoder"}``.

    With ``ema=True`` the U-Net comes from the ``model_ema.`` copy (CheckpointError if the file has none);
    otherwise EMA copies are ignored. Every key of the file must be used or be a known extra
    (:data:`LDM_EXTRAS`); every tensor must have the shape the config implies.
    """
    maps = key_maps(config)
    if ema:
        if not any(k.startswith(EMA_PREFIX) and k not in LDM_EXTRAS for k in sd):
            raise CheckpointError(
                "EMA weights were requested, but the checkpoint has no 'model_ema.' copy of the U-Net "
                "(load it without EMA instead)"
            )
        maps["unet"] = [KeyMap(r.key, ema_key(r.ldm), r.shape, r.op, r.part) for r in maps["unet"]]

    out: dict[str, dict[str, Tensor]] = {}
    used: set[str] = set()
    missing: list[str] = []
    shapes: list[str] = []
    for component, rows in maps.items():
        state: dict[str, Tensor] = {}
        for r in rows:
            if r.ldm not in sd:
                if r.ldm not in used:  # a fused in_proj is reported once
                    missing.append(r.ldm)
                    used.add(r.ldm)
                continue
            used.add(r.ldm)
            t = sd[r.ldm]
            if _shape(t) != r.ldm_shape:
                if r.part == 0:
                    shapes.append(f"{r.ldm} {_fmt(_shape(t))}, expected {_fmt(r.ldm_shape)}")
                continue
            state[r.key] = _ldm_to_ours(t, r)
        out[component] = state
    ignored_prefix = UNET_PREFIX if ema else EMA_PREFIX  # the copy of the U-Net we did not take
    unexpected = sorted(k for k in sd if k not in used and k not in LDM_EXTRAS and not k.startswith(ignored_prefix))
    _raise_problems(f"checkpoint does not match the {config.family} model", missing, unexpected, shapes)
    return out


def _ldm_to_ours(t: Tensor, r: KeyMap) -> Tensor:
    if r.op == "conv1x1":
        return t.reshape(r.shape)  # (C, C, 1, 1) → (C, C)
    if r.op == "transpose":
        return t.t().contiguous()  # (width, proj) → (proj, width)
    if r.op == "qkv":
        n = r.shape[0]
        return t[r.part * n : (r.part + 1) * n].clone()  # rows of [W_q; W_k; W_v]; own storage
    return t


def components_to_ldm(components: Mapping[str, Mapping[str, Tensor]], config: ModelConfig) -> dict[str, Tensor]:
    """Join Estable state dicts ``{"unet", "vae", "text_encoder"}`` into one LDM single-file state dict.

    SD 2.x text encoders are written in open_clip layout (fused ``in_proj``); SD 1.x and Estable's own
    models in transformers layout. The EMA copy and the DDPM buffers are not written.
    """
    if config.vae.downsample_kernel != 3:
        raise UnsupportedModelError(CENTRED_VAE_UNSUPPORTED.format(layout="an SD single file"))
    maps = key_maps(config)
    unknown = sorted(set(components) - set(maps))
    if unknown:
        raise ValueError(f"unknown component(s) {', '.join(unknown)}; expected {', '.join(maps)}")
    out: dict[str, Tensor] = {}
    missing: list[str] = []
    unexpected: list[str] = []
    shapes: list[str] = []
    for component, rows in maps.items():
        state = components.get(component)
        if state is None:
            raise CheckpointError(f"components_to_ldm: the {component!r} state dict is missing")
        fused: dict[str, list[Tensor | None]] = {}
        for r in rows:
            if r.key not in state:
                missing.append(f"{component}: {r.key}")
                continue
            t = state[r.key]
            if _shape(t) != r.shape:
                shapes.append(f"{component}: {r.key} {_fmt(_shape(t))}, expected {_fmt(r.shape)}")
                continue
            if r.op == "qkv":
                fused.setdefault(r.ldm, [None, None, None])[r.part] = t
            elif r.op == "conv1x1":
                out[r.ldm] = t.reshape(r.ldm_shape)  # (C, C) → (C, C, 1, 1)
            elif r.op == "transpose":
                out[r.ldm] = t.t().contiguous()
            else:
                out[r.ldm] = t
        for ldm, parts in fused.items():
            if all(p is not None for p in parts):
                out[ldm] = torch.cat(parts, dim=0)  # type: ignore[arg-type]  # (3·w, w) or (3·w,)
        expected = {r.key for r in rows}
        unexpected += [f"{component}: {k}" for k in sorted(set(state) - expected)]
    _raise_problems(f"the {config.family} model's state dicts do not match its config", missing, unexpected, shapes)
    return out


def trim_text_layers(
    components: Mapping[str, Mapping[str, Tensor]], config: ModelConfig
) -> tuple[dict[str, dict[str, Tensor]], ModelConfig]:
    """Drop the text layers that ``clip_skip`` skips, giving an equivalent model with ``clip_skip=1``.

    SD 2.x conditions on the penultimate layer of a 24-layer tower (clip_skip=2); diffusers' SD 2.x folders
    (and ``from_single_file``, which ignores ``resblocks.23`` and ``text_projection``) keep 23 layers and read
    the last one. The conditioning — hidden state after layer ``layers - clip_skip + 1``, then the final
    LayerNorm — is unchanged. The text projection acts on the pooled output of the LAST layer, so once layers
    are dropped it no longer means what it did; it is dropped too (``projection_dim=None``), as diffusers does.
    A model with ``clip_skip=1`` is returned unchanged (copied).
    """
    comps = {name: dict(state) for name, state in components.items()}
    drop = config.clip_skip - 1
    if drop == 0:
        return comps, config
    keep = config.text.layers - drop
    text = comps["text_encoder"]
    pattern = re.compile(r"^text_model\.encoder\.layers\.(\d+)\.")
    for k in list(text):
        m = pattern.match(k)
        if (m and int(m.group(1)) >= keep) or k == "text_projection.weight":
            del text[k]
    new_text = config.text.replace(layers=keep, projection_dim=None)
    return comps, config.replace(text=new_text, clip_skip=1)
