"""``estable info``: what a checkpoint is, read from headers and config files only.

:func:`describe` never builds a network and never reads tensor data (except to hash the files), so it is fast on
multi-GB checkpoints: the safetensors header gives every tensor's name, dtype and shape, which is enough for the
family, the parameter counts and the resolution hints. Pickle checkpoints have no header; with ``allow_pickle``
they are loaded (tensors only, ``weights_only=True``) to be described, otherwise only their size and hash are
reported.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path
from typing import Any

import torch

from ..config import ModelConfig
from ..errors import EstableError
from .io import (
    PICKLE_SUFFIXES,
    TensorInfo,
    human_bytes,
    read_json_object,
    read_pickle,
    read_safetensors_header,
    sha256_file,
)
from .store import (
    COMPONENTS,
    LDM_CONFIG_KEY,
    WEIGHT_STEMS,
    _weights_file,
    detect_format,
    diffusers_missing,
)

# LDM single-file key prefixes -> component (REFERENCES.md, "Single-file checkpoint key prefixes").
_LDM_PREFIXES = (
    ("model.diffusion_model.", "unet"),
    ("first_stage_model.", "vae"),
    ("cond_stage_model.", "text_encoder"),
    ("model_ema.", "ema"),
)
_TORCH_TO_ST = {
    torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32", torch.float64: "F64",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}
_FLOAT_DTYPES = {"F16", "BF16", "F32", "F64", "F8_E4M3", "F8_E5M2"}
_SCALE_SUFFIX = ".weight_scale"  # per-channel scales of int8 layers (estable.nn.int8)


def _ldm_component(key: str) -> str:
    for prefix, name in _LDM_PREFIXES:
        if key.startswith(prefix):
            return name
    return "other"


def _summarise(infos: dict[str, TensorInfo], component_of: Any) -> dict[str, dict[str, Any]]:
    """Per component: floating-point parameter count, tensor count and dtype histogram."""
    out: dict[str, dict[str, Any]] = {}
    for key, info in infos.items():
        name = component_of(key)
        entry = out.setdefault(name, {"parameters": 0, "tensors": 0, "dtypes": Counter()})
        entry["tensors"] += 1
        entry["dtypes"][info.dtype] += 1
        if info.dtype in _FLOAT_DTYPES and not key.endswith(_SCALE_SUFFIX) or info.dtype == "I8":
            entry["parameters"] += info.numel  # int8 tensors are quantised weights; their scales are not counted
    for entry in out.values():
        entry["dtypes"] = dict(sorted(entry["dtypes"].items()))
    order = [*COMPONENTS, "ema", "other"]
    return dict(sorted(out.items(), key=lambda kv: order.index(kv[0]) if kv[0] in order else len(order)))


def _meta_state_dict(infos: dict[str, TensorInfo]) -> dict[str, torch.Tensor]:
    """Shape-only stand-ins (meta tensors: no memory, no data) for code that inspects shapes."""
    st_to_torch = {v: k for k, v in _TORCH_TO_ST.items()}
    return {
        k: torch.empty(i.shape, dtype=st_to_torch.get(i.dtype, torch.float32), device="meta")
        for k, i in infos.items()
    }


def _infos_from_tensors(tensors: dict[str, torch.Tensor]) -> dict[str, TensorInfo]:
    return {
        k: TensorInfo(_TORCH_TO_ST.get(t.dtype, str(t.dtype)), tuple(t.shape), 0, t.numel() * t.element_size())
        for k, t in tensors.items()
    }


def _config_summary(config: ModelConfig) -> dict[str, Any]:
    side = config.unet.sample_size * config.vae.downsample_factor
    return {
        "prediction_type": config.schedule.prediction_type,
        "resolution": side,
        "latent_size": config.unet.sample_size,
        "clip_skip": config.clip_skip,
        "default_cfg": config.default_cfg,
        "default_sampler": config.default_sampler,
        "prompt_completion": config.prompt_completion,
    }


def describe(source: str | os.PathLike[str], *, hashes: bool = True, allow_pickle: bool = False) -> dict[str, Any]:
    """Describe a checkpoint file or diffusers folder without building its networks.

    Returns a JSON-serialisable dict: ``path``, ``format``, ``family``, ``components`` (per component:
    ``parameters``, ``tensors``, ``dtypes``), ``dtypes``, ``parameters``, ``prediction_type`` (and
    ``prediction_type_source``), ``resolution`` (image side the model was trained at, when known),
    ``file_size``, and with ``hashes``: ``sha256`` + ``short_hash`` for a file; for a folder ``files``
    (each weights file's size and sha256) and ``short_hash`` of the U-Net weights file.
    """
    path = Path(source)
    from .controlnet_format import describe_controlnet, is_controlnet

    if is_controlnet(path):
        return describe_controlnet(path, hashes=hashes)
    fmt = detect_format(path)
    if fmt == "diffusers":
        out = _describe_diffusers(path, hashes=hashes, allow_pickle=allow_pickle)
    else:
        out = _describe_file(path, fmt, hashes=hashes, allow_pickle=allow_pickle)
    dtypes: set[str] = set()
    for comp in out["components"].values():
        dtypes.update(comp["dtypes"])
    out["dtypes"] = sorted(dtypes)
    out["parameters"] = sum(c["parameters"] for n, c in out["components"].items() if n in COMPONENTS)
    return out


def _describe_file(path: Path, fmt: str, *, hashes: bool, allow_pickle: bool) -> dict[str, Any]:
    out: dict[str, Any] = {"path": str(path), "format": fmt, "file_size": path.stat().st_size}
    meta: dict[str, str] = {}
    scalars: dict[str, torch.Tensor] = {}  # one-element tensors (e.g. global_step), read for real
    if path.suffix.lower() in PICKLE_SUFFIXES:
        out["pickle"] = True
        if not allow_pickle:
            out.update(family=None, components={}, prediction_type=None, resolution=None,
                       note="pickle checkpoint: contents not inspected (pass --allow-pickle to load its tensors "
                            "safely, or convert it to .safetensors)")
            infos = None
        else:
            tensors = read_pickle(path, allow_pickle=True)
            infos = _infos_from_tensors(tensors)
            scalars = {k: t for k, t in tensors.items() if t.numel() == 1}
            del tensors
    else:
        infos, meta = read_safetensors_header(path)
        scalars = _read_scalars(path, [k for k, i in infos.items() if i.numel == 1])

    if infos is not None and fmt == "estable":
        config, problem = _estable_config(path, meta)
        out["family"] = config.family if config else None
        if problem:
            out["note"] = problem
        out["components"] = _summarise(infos, lambda k: k.partition(".")[0])
        out["format_version"] = meta.get("format_version")
        out["tokenizer"] = "standard CLIP" if meta.get("tokenizer", "clip") == "clip" else "embedded"
        if meta.get("quantization"):
            out["quantization"] = meta["quantization"]
            out["int8_layers"] = sum(1 for k in infos if k.endswith(_SCALE_SUFFIX))
        if config is not None:
            out.update(_config_summary(config), prediction_type_source="recorded in the file's metadata")
            out["config"] = config.to_dict()
    elif infos is not None:
        out.update(_describe_ldm(infos, meta, scalars))
    if hashes:
        digest = sha256_file(path)
        out["sha256"], out["short_hash"] = digest, digest[:10]
    return out


def _estable_config(path: Path, meta: dict[str, str]) -> tuple[ModelConfig | None, str | None]:
    """The file's recorded config, or None and why it cannot be used (loading the file would refuse it)."""
    if "config" not in meta:
        return None, "the file's metadata records no model config (it cannot be loaded as an Estable model)"
    try:
        return ModelConfig.from_dict(json.loads(meta["config"])), None
    except (ValueError, TypeError, KeyError, RecursionError) as exc:
        return None, f"the file's recorded config is invalid, so it cannot be loaded: {exc}"


def _read_scalars(path: Path, keys: list[str]) -> dict[str, torch.Tensor]:
    if not keys:
        return {}
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in keys}


def _describe_ldm(
    infos: dict[str, TensorInfo], meta: dict[str, str], scalars: dict[str, torch.Tensor]
) -> dict[str, Any]:
    from . import ldm_infer

    out: dict[str, Any] = {"components": _summarise(infos, _ldm_component)}
    out["ema"] = "ema" in out["components"]
    keys = list(infos)
    try:
        out["family"] = ldm_infer.detect_family(keys)
    except EstableError as exc:
        out["family"] = None
        out["note"] = str(exc)
        return out
    recorded = _recorded(meta)
    config: ModelConfig | None = recorded
    if config is None:
        shapes = {**_meta_state_dict(infos), **scalars}
        try:
            config = ldm_infer.infer_config(shapes)
        except (EstableError, ValueError, KeyError, TypeError, RuntimeError):
            config = None
    if config is not None:
        out.update(_config_summary(config))
        out["config"] = config.to_dict()
    else:
        out.update(prediction_type=None, resolution=None)
    if recorded is not None:
        out["prediction_type_source"] = "recorded by Estable in the file's metadata"
    else:
        out["prediction_type_source"] = (
            "a guess: LDM files do not record it; override with --prediction-type"
        )
        out["resolution_source"] = "typical for the family (not recorded in LDM files)"
    return out


def _recorded(meta: dict[str, str]) -> ModelConfig | None:
    """The config Estable writes into the metadata of its LDM files."""
    try:
        return ModelConfig.from_dict(json.loads(meta[LDM_CONFIG_KEY]))
    except (KeyError, ValueError, TypeError, RecursionError):
        return None


def _describe_diffusers(path: Path, *, hashes: bool, allow_pickle: bool) -> dict[str, Any]:
    from . import diffusers_config as dc

    out: dict[str, Any] = {"path": str(path), "format": "diffusers", "components": {}}
    missing = diffusers_missing(path)
    if missing:
        out["missing"] = missing
    files: dict[str, dict[str, Any]] = {}
    total = 0
    configs: dict[str, Any] = {}
    for name in COMPONENTS:
        folder = path / name
        if not folder.is_dir():
            continue
        infos: dict[str, TensorInfo] = {}
        for f in _weights_file(folder, WEIGHT_STEMS[name], allow_pickle):
            if f.suffix.lower() in PICKLE_SUFFIXES:
                infos.update(_infos_from_tensors(read_pickle(f, allow_pickle=True)))
            else:
                infos.update(read_safetensors_header(f)[0])
            size = f.stat().st_size
            total += size
            entry: dict[str, Any] = {"size": size}
            if hashes:
                entry["sha256"] = sha256_file(f)
            files[str(f.relative_to(path))] = entry
        summary = _summarise(infos, lambda _key: "all")
        out["components"][name] = summary.get("all", {"parameters": 0, "tensors": 0, "dtypes": {}})
        if (folder / "config.json").is_file():
            configs[name] = read_json_object(folder / "config.json")
    out["file_size"] = total
    out["files"] = files
    out["tokenizer"] = "present" if (path / "tokenizer").is_dir() else "missing"
    sched_file = path / "scheduler" / "scheduler_config.json"
    out["family"] = None
    out["prediction_type"] = None
    out["resolution"] = None
    try:
        if "text_encoder" in configs:
            out["family"] = "sd2" if dc.text_from_diffusers(configs["text_encoder"]).activation == "gelu" else "sd1"
        if sched_file.is_file():
            out["prediction_type"] = dc.schedule_from_diffusers(read_json_object(sched_file)).prediction_type
            out["prediction_type_source"] = "scheduler/scheduler_config.json"
        if "unet" in configs and "vae" in configs:
            unet = dc.unet_from_diffusers(configs["unet"])
            vae = dc.vae_from_diffusers(configs["vae"])
            out["resolution"] = unet.sample_size * vae.downsample_factor
            out["latent_size"] = unet.sample_size
    except (EstableError, ValueError) as exc:
        out["note"] = str(exc)
    if hashes:
        unet_files = [k for k in files if k.startswith("unet/")]
        if len(unet_files) == 1:
            out["short_hash"] = files[unet_files[0]]["sha256"][:10]
    return out


# ---------------------------------------------------------------- text


def _count(n: int) -> str:
    if n >= 1e9:
        return f"{n / 1e9:.2f} B"
    if n >= 1e6:
        return f"{n / 1e6:.1f} M"
    if n >= 1e3:
        return f"{n / 1e3:.1f} k"
    return str(n)


_FORMAT_NAMES = {"ldm": "SD single file (LDM layout)", "diffusers": "diffusers folder", "estable": "Estable file"}
_FAMILY_NAMES = {"sd1": "Stable Diffusion 1.x", "sd2": "Stable Diffusion 2.x", "estable": "Estable"}


def format_info(info: dict[str, Any]) -> str:
    """A human-readable summary of :func:`describe`'s dict, one fact per line."""
    if info.get("kind") == "controlnet":
        from .controlnet_format import format_controlnet_info

        return format_controlnet_info(info)
    lines = [str(info.get("path", ""))]

    def row(label: str, value: str) -> None:
        lines.append(f"  {label + ':':<13}{value}")

    row("format", _FORMAT_NAMES.get(info.get("format", ""), str(info.get("format"))))
    family = info.get("family")
    row("family", _FAMILY_NAMES.get(family, family) if family else "unknown")
    comps = info.get("components", {})
    parts = [f"{name} {_count(c['parameters'])}" for name, c in comps.items() if name in COMPONENTS]
    if parts:
        row("components", ", ".join(parts) + f"  (total {_count(info.get('parameters', 0))} parameters)")
    missing = info.get("missing") or ([n for n in COMPONENTS if n not in comps] if comps else [])
    if missing:
        row("missing", ", ".join(missing))
    if info.get("ema"):
        row("EMA", f"present ({_count(comps['ema']['parameters'])} parameters; load it with --ema)")
    if "other" in comps:
        row("other", f"{comps['other']['tensors']} tensors outside the known components")
    if info.get("dtypes"):
        row("dtypes", ", ".join(info["dtypes"]))
    if info.get("quantization"):
        row("quantized", f"int8 weights, one scale per output channel ({info.get('int8_layers', 0)} Linear/Conv "
            f"layers; {info['quantization']})")
    pred = info.get("prediction_type")
    if pred:
        source = info.get("prediction_type_source")
        row("prediction", f"{pred}" + (f"  [{source}]" if source else ""))
    if info.get("resolution"):
        side = info["resolution"]
        latent = info.get("latent_size")
        hint = f"  [{info['resolution_source']}]" if info.get("resolution_source") else ""
        row("resolution", f"{side}x{side} (latents {latent}x{latent}){hint}")
    if info.get("clip_skip") and info["clip_skip"] != 1:
        row("clip skip", str(info["clip_skip"]))
    if info.get("default_cfg") is not None:
        row("guidance", f"CFG {info['default_cfg']:g} by default (recorded in the file)")
    if info.get("default_sampler") is not None:
        row("sampler", f"{info['default_sampler']} by default (recorded in the file)")
    if info.get("prompt_completion") is not None:
        row("prompts", f"completed by {info['prompt_completion']} in txt2img (recorded in the file; "
            "off with --no-prompt-completion)")
    if info.get("tokenizer"):
        row("tokenizer", str(info["tokenizer"]))
    if "file_size" in info:
        row("size", human_bytes(int(info["file_size"])))
    if info.get("sha256"):
        row("sha256", info["sha256"])
    if info.get("short_hash"):
        row("hash", f"{info['short_hash']}" + ("  (of the U-Net weights)" if info.get("files") else ""))
    for name, entry in (info.get("files") or {}).items():
        digest = entry.get("sha256")
        row("file", f"{name}  {human_bytes(entry['size'])}" + (f"  sha256 {digest}" if digest else ""))
    if info.get("note"):
        row("note", info["note"])
    return "\n".join(lines)

