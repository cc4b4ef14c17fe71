"""ControlNet files: SD 1.x/2.x single files (original layout), diffusers folders and Estable files.

Layouts:

* ``ldm``: the original ControlNet code's names (github.com/lllyasviel/ControlNet, ``cldm/cldm.py``), usually
  under ``control_model.`` (some files store the names bare; the ControlNet 1.0 "full" files also carry the
  base model, whose keys are ignored). The copied encoder keeps openaimodel's names (``time_embed``,
  ``input_blocks``, ``middle_block``); besides them:

      input_hint_block.{0, 2, …, 4k-2}   hint encoder convolutions (SiLU between them): conv_in, (k-1) pairs
                                         [conv3×3, conv3×3 stride 2], conv_out
      zero_convs.N.0                     the zero 1×1 convolution on skip N (one per input block)
      middle_block_out.0                 the zero 1×1 convolution on the mid block's output

* ``diffusers``: a folder with ``config.json`` (``ControlNetModel``) and ``diffusion_pytorch_model.safetensors``
  whose keys are Estable's own (:class:`~estable.models.controlnet.ControlNet` uses diffusers' names).
* ``estable``: one safetensors file with diffusers' key names and ``{"format": "estable.controlnet",
  "format_version": "1", "config": <ControlNetConfig JSON>}`` metadata (what ``estable train controlnet`` writes).

Loading is strict as for whole models: every key is mapped or refused, every shape checked, and the network is
built on the meta device and filled with ``assign=True``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from ..config import ControlNetConfig, UNetConfig
from ..errors import CheckpointError, EstableError, UnsupportedModelError
from . import diffusers_config as dc
from .io import json_error, load_tensors, read_json_object, read_safetensors_header, write_safetensors
from .ldm import (
    LDM_EXTRAS,
    SD1_UNET_HEADS,
    SD2_UNET_HEAD_CHANNELS,
    KeyMap,
    _shape,
    _Table,
    _unet_resnet,
    _unet_transformer,
)
from .ldm_infer import _get, _indices

CONTROL_PREFIX = "control_model."
FORMAT_NAME = "estable.controlnet"
FORMAT_VERSION = "1"
LDM_CONFIG_KEY = "estable.controlnet_config"  # metadata of the single files Estable writes
_WEIGHTS = "diffusion_pytorch_model.safetensors"
_CLASS = "ControlNetModel"
# Prefixes of the base model that ControlNet 1.0's "full" files carry beside control_model.
_BASE_PREFIXES = ("model.diffusion_model.", "first_stage_model.", "cond_stage_model.", "model_ema.")

ControlFormat = Literal["ldm", "diffusers", "estable"]


# ---------------------------------------------------------------------------------------------- key map


def controlnet_key_map(cfg: ControlNetConfig, prefix: str = CONTROL_PREFIX) -> list[KeyMap]:
    """Every Estable ControlNet key with its original-layout key (``prefix`` + cldm name) and shape."""
    t = _Table()
    u = cfg.unet
    ch = u.block_channels
    n = len(ch)
    temb = u.time_embed_dim
    t.param("time_embedding.linear_1", f"{prefix}time_embed.0", (temb, ch[0]))
    t.param("time_embedding.linear_2", f"{prefix}time_embed.2", (temb, temb))
    t.param("conv_in", f"{prefix}input_blocks.0.0", (ch[0], u.in_channels, 3, 3))

    widths = cfg.hint_channels
    t.param("controlnet_cond_embedding.conv_in", f"{prefix}input_hint_block.0",
            (widths[0], cfg.conditioning_channels, 3, 3))
    for j, (cin, cout) in enumerate(zip(widths[:-1], widths[1:])):  # SiLUs sit at the odd indices
        t.param(f"controlnet_cond_embedding.blocks.{2 * j}", f"{prefix}input_hint_block.{4 * j + 2}", (cin, cin, 3, 3))
        t.param(f"controlnet_cond_embedding.blocks.{2 * j + 1}", f"{prefix}input_hint_block.{4 * j + 4}",
                (cout, cin, 3, 3))
    t.param("controlnet_cond_embedding.conv_out", f"{prefix}input_hint_block.{4 * len(widths) - 2}",
            (ch[0], widths[-1], 3, 3))

    block, cin = 1, ch[0]
    zero = [ch[0]]
    for level in range(n):
        for j in range(u.layers_per_block):
            key, ldm = f"down_blocks.{level}", f"{prefix}input_blocks.{block}"
            _unet_resnet(t, f"{key}.resnets.{j}", f"{ldm}.0", cin, ch[level], temb)
            if u.attention_levels[level]:
                _unet_transformer(t, f"{key}.attentions.{j}", f"{ldm}.1", ch[level], u.context_dim,
                                  u.transformer_layers, u.use_linear_projection)
            cin = ch[level]
            zero.append(cin)
            block += 1
        if level < n - 1:
            t.param(f"down_blocks.{level}.downsamplers.0.conv", f"{prefix}input_blocks.{block}.0.op", (cin, cin, 3, 3))
            zero.append(cin)
            block += 1
    for i, c in enumerate(zero):
        t.param(f"controlnet_down_blocks.{i}", f"{prefix}zero_convs.{i}.0", (c, c, 1, 1))

    c = ch[-1]
    _unet_resnet(t, "mid_block.resnets.0", f"{prefix}middle_block.0", c, c, temb)
    _unet_transformer(t, "mid_block.attentions.0", f"{prefix}middle_block.1", c, u.context_dim, u.transformer_layers,
                      u.use_linear_projection)
    _unet_resnet(t, "mid_block.resnets.1", f"{prefix}middle_block.2", c, c, temb)
    t.param("controlnet_mid_block", f"{prefix}middle_block_out.0", (c, c, 1, 1))
    return t.rows


def _control_part(sd: Mapping[str, Any], where: str) -> dict[str, Any]:
    """The ControlNet's own keys without prefix; the base model's keys in "full" files are dropped."""
    if any(k.startswith(CONTROL_PREFIX) for k in sd):
        part = {k[len(CONTROL_PREFIX):]: v for k, v in sd.items() if k.startswith(CONTROL_PREFIX)}
        stray = sorted(k for k in sd if not k.startswith((CONTROL_PREFIX, *_BASE_PREFIXES)) and k not in LDM_EXTRAS)
        if stray:
            raise CheckpointError(f"{where}: {len(stray)} key(s) belong to no ControlNet part: {', '.join(stray[:5])}")
        return part
    return dict(sd)


def ldm_to_controlnet(sd: Mapping[str, Tensor], cfg: ControlNetConfig, where: str = "ControlNet") -> dict[str, Tensor]:
    """An original-layout ControlNet state dict (with or without ``control_model.``) → Estable's names, checked."""
    part = _control_part(sd, where)
    out: dict[str, Tensor] = {}
    missing, shapes = [], []
    for r in controlnet_key_map(cfg, prefix=""):
        if r.ldm not in part:
            missing.append(r.ldm)
            continue
        if _shape(part[r.ldm]) != r.ldm_shape:
            shapes.append(f"{r.ldm} {list(_shape(part[r.ldm]))}, expected {list(r.ldm_shape)}")
            continue
        out[r.key] = part[r.ldm]
    used = {r.ldm for r in controlnet_key_map(cfg, prefix="")}
    unexpected = sorted(k for k in part if k not in used)
    problems = []
    for what, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", shapes)):
        if items:
            problems.append(f"{len(items)} {what}: {', '.join(items[:5])}" + (" …" if len(items) > 5 else ""))
    if problems:
        raise CheckpointError(f"{where}: the ControlNet weights do not match their config: " + "; ".join(problems))
    return out


def controlnet_to_ldm(state: Mapping[str, Tensor], cfg: ControlNetConfig) -> dict[str, Tensor]:
    """Estable names → the original layout under ``control_model.`` (what A1111's extension reads)."""
    rows = controlnet_key_map(cfg)
    missing = [r.key for r in rows if r.key not in state]
    if missing or len(state) != len(rows):
        raise CheckpointError(f"controlnet_to_ldm: the state dict does not match the config (missing {missing[:5]})")
    return {r.ldm: state[r.key] for r in rows}


# ---------------------------------------------------------------------------------------------- configs


def infer_controlnet_config(sd: Mapping[str, Any], base: UNetConfig | None = None,
                            where: str = "ControlNet") -> ControlNetConfig:
    """The config of an original-layout ControlNet from its shapes.

    Shapes give the widths, levels, layers, attention levels, transformer depth, context width and hint
    encoder; the attention head split is not in the weights. It is taken from ``base`` (the U-Net the
    ControlNet will steer, which it must match), else from the family the context width implies: 768 → SD 1.x
    (8 heads), 1024 → SD 2.x (64 channels per head, attention upcast); likewise GroupNorm's group count (base's, else
    32, or the largest power of two that divides every width).
    """
    u = _control_part(sd, where)
    p = CONTROL_PREFIX
    if "input_hint_block.0.weight" not in u or "time_embed.0.weight" not in u:
        raise CheckpointError(f"{where}: not a ControlNet (no input_hint_block / time_embed keys)")
    conv_in = _get(u, "input_blocks.0.0.weight", p)
    n_in = len(_indices(u, r"input_blocks\.(\d+)\."))
    downs = _indices(u, r"input_blocks\.(\d+)\.0\.op\.weight$")
    levels = len(downs) + 1
    per_level = (n_in - 1 - len(downs)) // levels
    if per_level < 1 or 1 + levels * per_level + len(downs) != n_in:
        raise CheckpointError(f"{where}: the encoder's block structure is not an SD U-Net encoder "
                              f"({n_in} input blocks, {len(downs)} downsamplers)")
    first = [1 + level * (per_level + 1) for level in range(levels)]
    channels = tuple(_shape(_get(u, f"input_blocks.{b}.0.out_layers.3.weight", p))[0] for b in first)
    attention = tuple(any(k.startswith(f"input_blocks.{b}.1.") for k in u) for b in first)
    depth = len(_indices(u, r"middle_block\.1\.transformer_blocks\.(\d+)\."))
    if depth == 0:
        raise UnsupportedModelError(f"{where}: the ControlNet's middle block has no transformer")
    context = _shape(_get(u, "middle_block.1.transformer_blocks.0.attn2.to_k.weight", p))[1]
    linear = _get(u, "middle_block.1.proj_in.weight", p).ndim == 2
    hint_idx = _indices(u, r"input_hint_block\.(\d+)\.weight$")
    if len(hint_idx) < 2 or hint_idx != list(range(0, 2 * len(hint_idx), 2)) or len(hint_idx) % 2:
        raise CheckpointError(f"{where}: unexpected hint encoder layout (convolutions at {hint_idx})")
    first_hint = _shape(u["input_hint_block.0.weight"])
    widths = [first_hint[0]] + [_shape(u[f"input_hint_block.{i}.weight"])[0] for i in hint_idx[2:-1:2]]
    if base is not None:
        heads: dict[str, Any] = {"num_heads": base.num_heads, "head_channels": base.head_channels,
                                 "upcast_attention": base.upcast_attention, "flip_sin_to_cos": base.flip_sin_to_cos,
                                 "freq_shift": base.freq_shift, "norm_groups": base.norm_groups,
                                 "norm_eps": base.norm_eps, "sample_size": base.sample_size}
    elif context == 1024:
        heads = {"num_heads": None, "head_channels": SD2_UNET_HEAD_CHANNELS, "upcast_attention": True}
    else:
        heads = {"num_heads": SD1_UNET_HEADS}
    if base is None:  # GroupNorm's group count is not in the weights either: SD's 32, or what divides the widths
        heads["norm_groups"] = next(g for g in (32, 16, 8, 4, 2, 1) if all(c % g == 0 for c in channels))
    try:
        unet = UNetConfig(in_channels=_shape(conv_in)[1], block_channels=channels, layers_per_block=per_level,
                          attention_levels=attention, transformer_layers=depth, context_dim=context,
                          use_linear_projection=linear, **heads)
        return ControlNetConfig(unet=unet, conditioning_channels=first_hint[1], hint_channels=tuple(widths))
    except ValueError as exc:
        raise CheckpointError(f"{where}: the shapes do not form a valid ControlNet: {exc}") from None


_CONTROL_OPTIONS = {"conditioning_channels", "controlnet_conditioning_channel_order",
                    "conditioning_embedding_out_channels", "global_pool_conditions"}


def controlnet_from_diffusers(cfg: Mapping[str, Any]) -> ControlNetConfig:
    """ControlNetConfig from a diffusers ``ControlNetModel`` config.json dict (the U-Net options are read by
    :func:`~estable.checkpoints.diffusers_config.unet_from_diffusers`)."""
    if cfg.get("global_pool_conditions"):
        raise UnsupportedModelError(f"{_CLASS} config: global_pool_conditions=True (the 'shuffle' ControlNet) is "
                                    "not supported by Estable")
    order = cfg.get("controlnet_conditioning_channel_order", "rgb")
    if order not in ("rgb", "bgr"):
        raise UnsupportedModelError(f"{_CLASS} config: controlnet_conditioning_channel_order={order!r}")
    unet_part = {k: v for k, v in cfg.items() if k not in _CONTROL_OPTIONS}
    down = unet_part.get("down_block_types", dc._UNET_DEFAULTS["down_block_types"])
    if isinstance(down, (list, tuple)):  # a ControlNet has no decoder: give the mirror the U-Net reader wants
        unet_part["up_block_types"] = ["CrossAttnUpBlock2D" if t == "CrossAttnDownBlock2D" else "UpBlock2D"
                                       for t in reversed(list(down))]
    unet = dc.unet_from_diffusers(unet_part)
    hint = cfg.get("conditioning_embedding_out_channels", [16, 32, 96, 256])
    try:
        return ControlNetConfig(unet=unet, conditioning_channels=int(cfg.get("conditioning_channels", 3)),
                                hint_channels=tuple(hint), bgr=order == "bgr")
    except (ValueError, TypeError) as exc:
        raise UnsupportedModelError(f"{_CLASS} config does not describe a valid ControlNet: {exc}") from None


def controlnet_to_diffusers(cfg: ControlNetConfig) -> dict[str, Any]:
    """A diffusers ``ControlNetModel`` config dict that builds the same network."""
    d = dc.unet_to_diffusers(cfg.unet)
    for key in ("up_block_types", "out_channels", "conv_out_kernel", "dual_cross_attention"):
        d.pop(key, None)
    d["_class_name"] = _CLASS
    d.update(conditioning_channels=cfg.conditioning_channels,
             conditioning_embedding_out_channels=list(cfg.hint_channels),
             controlnet_conditioning_channel_order="bgr" if cfg.bgr else "rgb", global_pool_conditions=False)
    return d


# ---------------------------------------------------------------------------------------------- files


@dataclass
class LoadedControlNet:
    """A ControlNet read from disk."""

    model: Any  # estable.models.controlnet.ControlNet
    source: Path
    format: ControlFormat

    @property
    def name(self) -> str:
        return self.source.name if self.source.is_dir() else self.source.stem


def detect_controlnet_format(path: Path) -> ControlFormat:
    if not path.exists():
        raise CheckpointError(f"{path}: no such ControlNet file or folder")
    if path.is_dir():
        return "diffusers"
    if path.suffix.lower() == ".safetensors":
        header, meta = read_safetensors_header(path)
        if meta.get("format") == FORMAT_NAME:
            return "estable"
        if "controlnet_cond_embedding.conv_in.weight" in header:
            if (path.parent / "config.json").is_file():
                return "diffusers"
            raise CheckpointError(f"{path}: a diffusers ControlNet weights file needs its config.json beside it")
    return "ldm"


def read_controlnet(path: str | os.PathLike[str], *, base: UNetConfig | None = None,
                    allow_pickle: bool = False) -> tuple[ControlNetConfig, dict[str, Tensor], ControlFormat]:
    """(config, state dict with Estable's names, format) of a ControlNet file or folder; nothing built yet."""
    path = Path(path)
    fmt = detect_controlnet_format(path)
    if fmt == "diffusers":
        folder = path if path.is_dir() else path.parent
        cfg_path = folder / "config.json"
        raw = read_json_object(cfg_path)
        if raw.get("_class_name", _CLASS) != _CLASS:
            raise UnsupportedModelError(f"{cfg_path}: a {raw.get('_class_name')}, not a {_CLASS}")
        try:
            cfg = controlnet_from_diffusers(raw)
        except EstableError as exc:
            raise type(exc)(f"{cfg_path}: {exc}") from None
        weights = path if path.is_file() else folder / _WEIGHTS
        if not weights.is_file():
            raise CheckpointError(f"{folder}: no {_WEIGHTS}")
        sd, _ = load_tensors(weights, allow_pickle=allow_pickle)
        return cfg, dict(sd), fmt
    sd, meta = load_tensors(path, allow_pickle=allow_pickle)
    if fmt == "estable":
        try:
            cfg = ControlNetConfig.from_dict(json.loads(meta["config"]))
        except (KeyError, ValueError, TypeError, RecursionError) as exc:
            raise CheckpointError(f"{path}: the ControlNet config in the metadata is invalid ({json_error(exc)})") \
                from None
        return cfg, dict(sd), fmt
    cfg = _recorded_config(meta) or infer_controlnet_config(sd, base, where=str(path))
    return cfg, ldm_to_controlnet(sd, cfg, where=str(path)), fmt


def _recorded_config(meta: Mapping[str, str]) -> ControlNetConfig | None:
    """The config Estable writes into the metadata of the single files it makes."""
    try:
        return ControlNetConfig.from_dict(json.loads(meta[LDM_CONFIG_KEY]))
    except (KeyError, ValueError, TypeError, RecursionError):
        return None


def load_controlnet(path: str | os.PathLike[str], *, base: UNetConfig | None = None, allow_pickle: bool = False,
                    dtype: torch.dtype | None = None, device: str | torch.device = "cpu") -> LoadedControlNet:
    """Build and strictly fill a ControlNet from any of the three layouts. With ``base`` (the U-Net it will
    steer) the two must agree on everything the residuals touch: widths, levels, layers per block, input."""
    from ..models.controlnet import ControlNet
    from .store import _cast, _fill, check_state_dict

    path = Path(path)
    cfg, sd, fmt = read_controlnet(path, base=base, allow_pickle=allow_pickle)
    if base is not None:
        check_matches_unet(cfg, base, str(path))
    with torch.device("meta"):
        net = ControlNet(cfg)
    check_state_dict(net, sd, where=str(path), component="ControlNet")
    _fill(net, _cast(sd, dtype, device), str(path))
    return LoadedControlNet(net, path, fmt)


def check_matches_unet(cfg: ControlNetConfig, base: UNetConfig, where: str) -> None:
    """CheckpointError unless the ControlNet's residuals fit ``base``'s skips and mid block."""
    c = cfg.unet
    theirs = (c.block_channels, c.layers_per_block, c.context_dim)
    ours = (base.block_channels, base.layers_per_block, base.context_dim)
    if theirs != ours:
        raise CheckpointError(
            f"{where}: this ControlNet does not fit the model (its widths, layers per block and text width are "
            f"{theirs}; the model's U-Net has {ours}); use a ControlNet made for this base model")
    if c.in_channels != 4:
        raise CheckpointError(f"{where}: the ControlNet reads {c.in_channels}-channel latents; 4 are needed")


def convert_controlnet(src: str | os.PathLike[str], dst: str | os.PathLike[str], *, to: str,
                       dtype: str | None = None, overwrite: bool = False, allow_pickle: bool = False) -> Path:
    """``estable convert`` for a ControlNet: read any layout, write ``to`` (ldm, diffusers or estable)."""
    from .store import parse_dtype

    dst = Path(dst)
    if to not in ("ldm", "diffusers", "estable"):
        raise EstableError(f"unknown output format {to!r}; use ldm, diffusers or estable")
    if dst.exists() and not overwrite:
        raise CheckpointError(f"{dst} already exists; pass --overwrite to replace it")
    if to != "diffusers" and dst.suffix.lower() != ".safetensors":
        raise EstableError(f"{dst}: an {to} ControlNet is a single .safetensors file; name it *.safetensors")
    loaded = load_controlnet(src, allow_pickle=allow_pickle)
    return save_controlnet(loaded.model, dst, to=to, dtype=parse_dtype(dtype))  # type: ignore[arg-type]


def save_controlnet(net: Any, dst: str | os.PathLike[str], *, to: ControlFormat = "estable",
                    dtype: torch.dtype | None = None) -> Path:
    """Write a ControlNet as an Estable file, an original-layout single file or a diffusers folder."""
    from .io import atomic_write_text
    from .store import _cast, clean_state_dict

    dst = Path(dst)
    cfg: ControlNetConfig = net.config
    sd = _cast(clean_state_dict(net.state_dict()), dtype, "cpu")
    if to == "estable":
        write_safetensors(dst, sd, {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "config": cfg.to_json()})
    elif to == "ldm":  # the config rides along in the metadata: heads and groups are not in the weights
        write_safetensors(dst, controlnet_to_ldm(sd, cfg), {"format": "pt", LDM_CONFIG_KEY: cfg.to_json()})
    elif to == "diffusers":
        dst.mkdir(parents=True, exist_ok=True)
        atomic_write_text(dst / "config.json", json.dumps(controlnet_to_diffusers(cfg), indent=2, sort_keys=True))
        write_safetensors(dst / _WEIGHTS, sd, {"format": "pt"})
    else:
        raise EstableError(f"unknown ControlNet format {to!r}; use estable, ldm or diffusers")
    return dst


# ---------------------------------------------------------------------------------------------- info


def is_controlnet(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a ControlNet (file in any of the three layouts, or a diffusers ControlNetModel folder);
    headers and config files only."""
    path = Path(path)
    try:
        if path.is_dir():
            cfg = path / "config.json"
            return cfg.is_file() and json.loads(cfg.read_text(encoding="utf-8")).get("_class_name") == _CLASS
        if path.is_file() and path.suffix.lower() == ".safetensors":
            header, meta = read_safetensors_header(path)
            return meta.get("format") == FORMAT_NAME or "controlnet_cond_embedding.conv_in.weight" in header or any(
                k.startswith(f"{CONTROL_PREFIX}input_hint_block.") or k.startswith("input_hint_block.") for k in header)
    except (OSError, ValueError, AttributeError, RecursionError, EstableError):  # AttributeError: not a JSON object
        return False
    return False


def describe_controlnet(path: str | os.PathLike[str], *, hashes: bool = True) -> dict[str, Any]:
    """``estable info`` for a ControlNet: layout, parameters, dtypes, the U-Net it fits, hint encoder, hashes."""
    from collections import Counter

    from .io import sha256_file

    path = Path(path)
    fmt = detect_controlnet_format(path)
    weights = path / _WEIGHTS if path.is_dir() else path
    header, _ = read_safetensors_header(weights)
    out: dict[str, Any] = {"path": str(path), "kind": "controlnet", "format": fmt,
                           "file_size": weights.stat().st_size}
    dtypes = Counter(info.dtype for info in header.values())
    out["dtypes"] = sorted(dtypes)
    out["parameters"] = sum(info.numel for info in header.values())
    try:
        if fmt == "ldm":
            shapes = {k: torch.empty(i.shape, device="meta") for k, i in header.items()}
            cfg = _recorded_config(read_safetensors_header(weights)[1]) or infer_controlnet_config(shapes,
                                                                                                 where=str(path))
        elif fmt == "diffusers":
            folder = path if path.is_dir() else path.parent
            cfg = controlnet_from_diffusers(json.loads((folder / "config.json").read_text(encoding="utf-8")))
        else:
            cfg = ControlNetConfig.from_dict(json.loads(read_safetensors_header(path)[1]["config"]))
        u = cfg.unet
        out["config"] = cfg.to_dict()
        out["fits"] = {"block_channels": list(u.block_channels), "layers_per_block": u.layers_per_block,
                       "context_dim": u.context_dim}
        out["family"] = {768: "sd1", 1024: "sd2"}.get(u.context_dim, "estable")
        out["hint"] = {"channels": list(cfg.hint_channels), "factor": cfg.hint_factor,
                       "conditioning_channels": cfg.conditioning_channels, "bgr": cfg.bgr}
    except (EstableError, ValueError, KeyError, TypeError, AttributeError, RecursionError) as exc:
        out["note"] = json_error(exc) if isinstance(exc, (ValueError, RecursionError)) else str(exc)
    if hashes:
        digest = sha256_file(weights)
        out["sha256"], out["short_hash"] = digest, digest[:10]
    return out


def format_controlnet_info(info: dict[str, Any]) -> str:
    """The human-readable form of :func:`describe_controlnet`."""
    from .io import human_bytes

    names = {"ldm": "ControlNet single file (original layout)", "diffusers": "diffusers ControlNetModel",
             "estable": "Estable ControlNet file"}
    lines = [str(info["path"])]

    def row(label: str, value: str) -> None:
        lines.append(f"  {label + ':':<13}{value}")

    row("format", names.get(info["format"], info["format"]))
    row("parameters", f"{info['parameters'] / 1e6:.2f} M")
    if info.get("fits"):
        fam = {"sd1": "Stable Diffusion 1.x", "sd2": "Stable Diffusion 2.x"}.get(info.get("family", ""), "Estable")
        f = info["fits"]
        row("fits", f"{fam} U-Nets: widths {f['block_channels']}, {f['layers_per_block']} layers per level, "
                    f"text width {f['context_dim']}")
    if info.get("hint"):
        h = info["hint"]
        row("hint", f"{h['conditioning_channels']}-channel control image at {h['factor']}× the latent size, "
                    f"encoder widths {h['channels']}" + (" (BGR)" if h["bgr"] else ""))
    row("dtypes", ", ".join(info["dtypes"]))
    row("size", human_bytes(int(info["file_size"])))
    if info.get("sha256"):
        row("sha256", info["sha256"])
    if info.get("note"):
        row("note", info["note"])
    return "\n".join(lines)
