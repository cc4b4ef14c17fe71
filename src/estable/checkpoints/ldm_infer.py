"""Stable Diffusion single-file checkpoints: which family a file is (SD 1.x, SD 2.x, SDXL, …) and the model config
its tensors imply (levels, channels, attention, text tower, prediction type), read from the key names and shapes.

The key names are those of :mod:`estable.checkpoints.ldm`. A file of another family (SDXL) or without one of the
three networks is a :class:`~estable.errors.CheckpointError` that lists the key prefixes it has; shapes Estable's
networks cannot take are an :class:`~estable.errors.UnsupportedModelError`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

from torch import Tensor

from ..config import ModelConfig, ScheduleConfig, TextConfig, TokenizerConfig, UNetConfig, VAEConfig
from ..errors import CheckpointError, UnsupportedModelError
from .ldm import (
    SD1_TEXT_PREFIX,
    SD1_UNET_HEADS,
    SD2_BASE_GLOBAL_STEP,
    SD2_TEXT_LAYERS_TRIMMED,
    SD2_TEXT_PREFIX,
    SD2_UNET_HEAD_CHANNELS,
    SDXL_PREFIX,
    TEXT_HEAD_CHANNELS,
    UNET_PREFIX,
    VAE_PREFIX,
    _shape,
)


def _prefix_summary(keys: Iterable[str]) -> str:
    """'model.diffusion_model. (686 keys), first_stage_model. (248 keys)' — the first two name parts."""
    counts: dict[str, int] = {}
    for k in keys:
        parts = k.split(".")
        head = ".".join(parts[:2]) + "." if len(parts) > 2 else k
        counts[head] = counts.get(head, 0) + 1
    top = sorted(counts.items(), key=lambda kv: -kv[1])[:6]
    more = f", and {len(counts) - 6} more prefixes" if len(counts) > 6 else ""
    return ", ".join(f"{h} ({n} keys)" for h, n in top) + more if top else "no keys"


def detect_family(keys: Iterable[str]) -> str:
    """Tell SD 1.x ("sd1") from SD 2.x ("sd2") single-file checkpoints by their text-encoder prefix.

    CheckpointError for anything else: SDXL (``conditioner.embedders.``), or a file that lacks one of the
    three networks (e.g. a VAE-only or U-Net-only file, or a diffusers-format state dict); the message lists
    the prefixes found.
    """
    keys = list(keys)
    if any(k.startswith(SDXL_PREFIX) for k in keys):
        raise CheckpointError(
            "this looks like an SDXL checkpoint (it has 'conditioner.embedders.' text encoders); SDXL is not "
            "supported, only SD 1.x and SD 2.x single-file checkpoints"
        )
    has = {
        "U-Net (model.diffusion_model.)": any(k.startswith(UNET_PREFIX) for k in keys),
        "VAE (first_stage_model.)": any(k.startswith(VAE_PREFIX) for k in keys),
        "text encoder (cond_stage_model.)": any(k.startswith("cond_stage_model.") for k in keys),
    }
    lacking = [name for name, present in has.items() if not present]
    if lacking:
        raise CheckpointError(
            f"not a complete SD 1.x/2.x single-file checkpoint: no {', no '.join(lacking)}; "
            f"it has {_prefix_summary(keys)}"
        )
    sd1 = any(k.startswith(SD1_TEXT_PREFIX) for k in keys)
    sd2 = any(k.startswith(SD2_TEXT_PREFIX) for k in keys)
    if sd1 and not sd2:
        return "sd1"
    if sd2 and not sd1:
        return "sd2"
    text = [k for k in keys if k.startswith("cond_stage_model.")]
    raise CheckpointError(
        "cannot tell the text encoder: expected 'cond_stage_model.transformer.' (SD 1.x) or "
        f"'cond_stage_model.model.' (SD 2.x), found {_prefix_summary(text)}"
    )


def _strip(sd: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    return {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}


def _get(part: Mapping[str, Any], key: str, prefix: str) -> Tensor:
    if key not in part:
        raise CheckpointError(f"checkpoint has no {prefix}{key}, which every model of its kind has")
    return part[key]


def _indices(part: Mapping[str, Any], pattern: str) -> list[int]:
    """Sorted distinct integers N of keys matching ``pattern`` (a regex with one group, anchored at start)."""
    rx = re.compile(pattern)
    return sorted({int(m.group(1)) for k in part if (m := rx.match(k))})


def _infer_unet(sd: Mapping[str, Any], family: str, prediction_type: str) -> UNetConfig:
    u = _strip(sd, UNET_PREFIX)
    if any(k.startswith("label_emb.") for k in u):
        raise UnsupportedModelError(
            "the U-Net has a class/vector conditioning embedding ('label_emb', as in SDXL or the x4 upscaler); "
            "not supported"
        )
    conv_in = _get(u, "input_blocks.0.0.weight", UNET_PREFIX)
    n_in = len(_indices(u, r"input_blocks\.(\d+)\."))
    downs = _indices(u, r"input_blocks\.(\d+)\.0\.op\.weight$")
    levels = len(downs) + 1
    per_level = (n_in - 1 - len(downs)) // levels
    n_out = len(_indices(u, r"output_blocks\.(\d+)\."))
    if per_level < 1 or 1 + levels * per_level + len(downs) != n_in or n_out != levels * (per_level + 1):
        raise CheckpointError(
            f"the U-Net's block structure is not an SD U-Net: {n_in} input blocks, {len(downs)} downsamplers, "
            f"{n_out} output blocks"
        )
    first = [1 + level * (per_level + 1) for level in range(levels)]  # first input block of each level
    channels = tuple(_shape(_get(u, f"input_blocks.{b}.0.out_layers.3.weight", UNET_PREFIX))[0] for b in first)
    attention = []
    for level, b in enumerate(first):
        # input_blocks.N.1 exists only for a spatial transformer; judge by any key under it, so that one renamed
        # or missing weight is reported as such rather than changing the inferred structure
        present = [any(k.startswith(f"input_blocks.{b + j}.1.") for k in u) for j in range(per_level)]
        if any(present) and not all(present):
            raise UnsupportedModelError(
                f"U-Net level {level} has attention in some blocks but not others; attention_levels must be "
                "all-or-nothing per level"
            )
        attention.append(all(present))
    depth = len(_indices(u, r"middle_block\.1\.transformer_blocks\.(\d+)\."))
    if depth == 0:
        raise UnsupportedModelError("the U-Net's middle block has no transformer (mid-block attention is required)")
    for level, b in enumerate(first):
        if attention[level]:
            d = len(_indices(u, rf"input_blocks\.{b}\.1\.transformer_blocks\.(\d+)\."))
            if d != depth:
                raise UnsupportedModelError(
                    f"transformer depth differs between levels (level {level}: {d}, middle: {depth}); "
                    "transformer_layers must be the same everywhere"
                )
    temb = _shape(_get(u, "time_embed.0.weight", UNET_PREFIX))[0]
    if temb != 4 * channels[0]:
        raise UnsupportedModelError(f"time embedding width {temb} is not 4 × {channels[0]} (time_embed_dim)")
    mid_proj = _get(u, "middle_block.1.proj_in.weight", UNET_PREFIX)
    heads: dict[str, Any] = {"num_heads": SD1_UNET_HEADS}
    if family == "sd2":
        heads = {"num_heads": None, "head_channels": SD2_UNET_HEAD_CHANNELS}
    try:
        return UNetConfig(
            in_channels=_shape(conv_in)[1],
            out_channels=_shape(_get(u, "out.2.weight", UNET_PREFIX))[0],
            block_channels=channels,
            layers_per_block=per_level,
            attention_levels=tuple(attention),
            transformer_layers=depth,
            context_dim=_shape(_get(u, "middle_block.1.transformer_blocks.0.attn2.to_k.weight", UNET_PREFIX))[1],
            use_linear_projection=mid_proj.ndim == 2,
            # SD 2.x's reference code computes q·k in fp32 (attention.py, _ATTN_PRECISION="fp32").
            upcast_attention=family == "sd2",
            # the 768-v model works on 96×96 latents; everything else on 64×64
            sample_size=96 if (family == "sd2" and prediction_type == "v_prediction") else 64,
            **heads,
        )
    except ValueError as e:
        raise CheckpointError(f"the U-Net's shapes do not form a valid {family} U-Net: {e}") from None


def _infer_vae(sd: Mapping[str, Any], sample_size: int) -> VAEConfig:
    v = _strip(sd, VAE_PREFIX)
    conv_in = _get(v, "encoder.conv_in.weight", VAE_PREFIX)
    levels = _indices(v, r"encoder\.down\.(\d+)\.")
    if not levels:
        raise CheckpointError(f"checkpoint has no {VAE_PREFIX}encoder.down.N blocks")
    channels = tuple(
        _shape(_get(v, f"encoder.down.{i}.block.0.conv1.weight", VAE_PREFIX))[0] for i in range(len(levels))
    )
    try:
        return VAEConfig(
            in_channels=_shape(conv_in)[1],
            out_channels=_shape(_get(v, "decoder.conv_out.weight", VAE_PREFIX))[0],
            latent_channels=_shape(_get(v, "decoder.conv_in.weight", VAE_PREFIX))[1],
            block_channels=channels,
            layers_per_block=len(_indices(v, r"encoder\.down\.0\.block\.(\d+)\.")),
            mid_attention="encoder.mid.attn_1.q.weight" in v,
            sample_size=sample_size,
        )
    except ValueError as e:
        raise CheckpointError(f"the VAE's shapes do not form a valid autoencoder: {e}") from None


def _infer_text(sd: Mapping[str, Any], family: str) -> TextConfig:
    if family == "sd2":
        t = _strip(sd, SD2_TEXT_PREFIX)
        p = SD2_TEXT_PREFIX
        tok, pos = _get(t, "token_embedding.weight", p), _get(t, "positional_embedding", p)
        layers = len(_indices(t, r"transformer\.resblocks\.(\d+)\."))
        mlp = _shape(_get(t, "transformer.resblocks.0.mlp.c_fc.weight", p))[0]
        proj = _shape(t["text_projection"])[1] if "text_projection" in t else None  # (width, proj)
        activation = "gelu"
    else:
        t = _strip(sd, SD1_TEXT_PREFIX)
        p = SD1_TEXT_PREFIX
        tok = _get(t, "text_model.embeddings.token_embedding.weight", p)
        pos = _get(t, "text_model.embeddings.position_embedding.weight", p)
        layers = len(_indices(t, r"text_model\.encoder\.layers\.(\d+)\."))
        mlp = _shape(_get(t, "text_model.encoder.layers.0.mlp.fc1.weight", p))[0]
        proj = _shape(t["text_projection.weight"])[0] if "text_projection.weight" in t else None  # (proj, width)
        activation = "quick_gelu"
    vocab, width = _shape(tok)
    try:
        return TextConfig(
            vocab_size=vocab,
            max_positions=_shape(pos)[0],
            width=width,
            layers=layers,
            heads=max(1, width // TEXT_HEAD_CHANNELS),
            mlp_width=mlp,
            activation=activation,
            projection_dim=proj,
        )
    except ValueError as e:
        raise CheckpointError(f"the text encoder's shapes do not form a valid CLIP text model: {e}") from None


def _global_step(sd: Mapping[str, Any]) -> int | None:
    step = sd.get("global_step")
    if isinstance(step, Tensor):  # a shapes-only (meta) state dict carries no value
        return int(step.item()) if step.numel() == 1 and step.device.type != "meta" else None
    return int(step) if isinstance(step, int) else None


def sd2_prediction_type(sd: Mapping[str, Any]) -> str:
    """diffusers' rule for SD 2.x single files, which do not record their parametrisation:

    * inpainting U-Nets (9 input channels) are ε-models (``from_single_file`` takes their scheduler config
      from stable-diffusion-2-inpainting);
    * a checkpoint saved at ``global_step`` 875000 is SD 2.0-base, an ε-model (diffusers' legacy scheduler
      loading, ``_legacy_load_scheduler``);
    * every other SD 2.x file is taken as a v-model (``from_single_file`` takes the scheduler config of
      stable-diffusion-2-1, the 768-v model).

    SD 2.1-base files therefore come out as v-models, as in diffusers: pass ``prediction_type="epsilon"``.
    """
    conv_in = sd.get(UNET_PREFIX + "input_blocks.0.0.weight")
    if conv_in is not None and _shape(conv_in)[1] == 9:
        return "epsilon"
    if _global_step(sd) == SD2_BASE_GLOBAL_STEP:
        return "epsilon"
    return "v_prediction"


def infer_config(
    sd: Mapping[str, Any], *, family: str | None = None, prediction_type: str | None = None
) -> ModelConfig:
    """Derive the whole ModelConfig of an LDM single-file checkpoint from its tensor shapes.

    Shapes give every width, level count, depth and in/out channel count; what shapes cannot say comes
    from the family: U-Net heads (SD 1.x: 8 heads; SD 2.x: 64 channels per head, attention upcast),
    text activation (quick-GELU / GELU), tokenizer padding (EOS / 0), clip_skip (SD 2.x conditions on the
    penultimate layer: clip_skip=2, or 1 when the file holds a trimmed 23-layer ViT-H tower) and the
    prediction type (``prediction_type`` if given; SD 1.x ε; SD 2.x see :func:`sd2_prediction_type`).
    """
    found = detect_family(sd.keys())
    family = family or found
    if family not in ("sd1", "sd2"):
        raise ValueError(
            f"infer_config reads SD 1.x/2.x files (family 'sd1' or 'sd2'), not {family!r}; LDM files do not "
            "record the head counts of other models, so pass their config explicitly"
        )
    if prediction_type is None:
        prediction_type = sd2_prediction_type(sd) if family == "sd2" else "epsilon"
    if prediction_type not in ("epsilon", "v_prediction"):
        raise ValueError(f"prediction_type must be 'epsilon' or 'v_prediction', not {prediction_type!r}")

    unet = _infer_unet(sd, family, prediction_type)
    vae = _infer_vae(sd, sample_size=768 if unet.sample_size == 96 else 512)  # 8 × the latent side
    text = _infer_text(sd, family)
    if family == "sd2":
        tokenizer = TokenizerConfig(pad_token_id=0)
        trimmed = text.layers == SD2_TEXT_LAYERS_TRIMMED and text.width == 1024
        clip_skip = 1 if (trimmed or text.layers < 2) else 2
    else:
        tokenizer, clip_skip = TokenizerConfig(), 1
    try:
        return ModelConfig(
            family=family,
            unet=unet,
            vae=vae,
            text=text,
            tokenizer=tokenizer,
            schedule=ScheduleConfig(prediction_type=prediction_type),  # type: ignore[arg-type]
            clip_skip=clip_skip,
        )
    except ValueError as e:
        raise CheckpointError(f"the checkpoint's networks do not fit together: {e}") from None
