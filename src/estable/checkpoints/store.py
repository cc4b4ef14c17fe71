"""Loading and saving whole models: SD single files (LDM layout), diffusers folders and Estable files.

Formats:

* ``ldm``: one ``.safetensors`` (or, with ``allow_pickle``, ``.ckpt``/``.pt``/``.pth``/``.bin``) file with
  the original CompVis key names (``model.diffusion_model.…``, ``first_stage_model.…``, ``cond_stage_model.…``).
  The key maps live in :mod:`estable.checkpoints.ldm`.
* ``diffusers``: a folder with ``model_index.json`` and ``unet/``, ``vae/``, ``text_encoder/``, ``tokenizer/``,
  ``scheduler/``; the config translations live in :mod:`estable.checkpoints.diffusers_config`. The text encoder is
  written as transformers' ``CLIPTextModel`` (what StableDiffusionPipeline instantiates); a text projection (the
  text tower of a CLIP pair, as in Estable's own models) goes to ``text_encoder/text_projection.safetensors``,
  which diffusers and transformers do not read and Estable reads back.
* ``estable``: one safetensors file whose keys are prefixed ``unet.``, ``vae.``, ``text_encoder.`` and whose
  metadata carries ``{"format": "estable", "format_version": "1", "config": <ModelConfig JSON>,
  "tokenizer": "clip" | <JSON {"vocab": {...}, "merges": "..."}>}``.

Loading is strict: every network is built on the meta device, its state dict is compared with the file's
(unknown keys, missing keys, shapes) BEFORE anything is loaded, and only then filled with
``load_state_dict(assign=True, strict=True)``. A mismatch raises a CheckpointError naming the file and the
first offending keys; no half-loaded model is ever returned.

Tokenizer policy: a diffusers folder brings its own ``tokenizer/``. LDM files carry no vocabulary; for them (and
for Estable files that record ``"tokenizer": "clip"``) we load the standard CLIP vocabulary found by
``estable.tokenizer.find_clip_vocab()``. If it cannot be found, the model still loads, with ``tokenizer=None``;
:meth:`LoadedModel.require_tokenizer` then raises the tokenizer module's message that says where to get it.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import nn

from ..config import ModelConfig, TokenizerConfig
from ..errors import CheckpointError, EstableError, UnsupportedModelError
from .io import (
    PICKLE_SUFFIXES,
    SAFETENSORS_SUFFIXES,
    atomic_write_text,
    json_error,
    load_tensors,
    read_json_object,
    read_safetensors,
    read_safetensors_header,
    write_safetensors,
)

if TYPE_CHECKING:
    from ..models.text import TextEncoder
    from ..models.unet import UNet
    from ..models.vae import AutoencoderKL
    from ..tokenizer import CLIPTokenizer

Format = Literal["ldm", "diffusers", "estable"]
FORMATS: tuple[str, ...] = ("ldm", "diffusers", "estable")
COMPONENTS: tuple[str, ...] = ("unet", "vae", "text_encoder")
ESTABLE_FORMAT_VERSION = "1"
LOAD_STAGES = 3  # how many times load_model calls its progress hook
SAVE_STAGES = 2  # ... and save_model
LDM_CONFIG_KEY = "estable.config"  # metadata entry of the LDM files Estable writes

_DTYPES: dict[str, torch.dtype] = {
    "fp16": torch.float16,
    "float16": torch.float16,
    "half": torch.float16,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp32": torch.float32,
    "float32": torch.float32,
    "float": torch.float32,
}
_DTYPE_NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}

# diffusers folder layout: the weights file stem of each component folder (<stem>.safetensors, sharded
# <stem>.safetensors.index.json, or the pickle named in _PICKLE_WEIGHTS).
WEIGHT_STEMS = {"unet": "diffusion_pytorch_model", "vae": "diffusion_pytorch_model", "text_encoder": "model"}
_PICKLE_WEIGHTS = {"diffusion_pytorch_model": "diffusion_pytorch_model.bin", "model": "pytorch_model.bin"}
_SCHEDULER_CONFIG = "scheduler_config.json"


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """``"fp16"``/``"bf16"``/``"fp32"`` (and their long names) or a torch dtype -> torch dtype; None stays None."""
    if dtype is None or (isinstance(dtype, torch.dtype) and dtype in _DTYPE_NAMES):
        return dtype
    if isinstance(dtype, str) and dtype.lower() in _DTYPES:
        return _DTYPES[dtype.lower()]
    raise EstableError(f"unknown dtype {dtype!r}; use fp16, bf16 or fp32")


@dataclass
class LoadedModel:
    """A text-to-image model read from disk: its resolved config, the three networks and the tokenizer."""

    config: ModelConfig
    unet: UNet
    vae: AutoencoderKL
    text_encoder: TextEncoder
    tokenizer: CLIPTokenizer | None
    source: Path
    format: Format
    # Why ``tokenizer`` is None (the vocabulary lookup's message), for require_tokenizer().
    tokenizer_error: str | None = field(default=None, repr=False)

    def require_tokenizer(self) -> CLIPTokenizer:
        """The tokenizer, or an EstableError that says how to provide the CLIP vocabulary."""
        if self.tokenizer is None:
            raise EstableError(self.tokenizer_error or f"{self.source} has no tokenizer")
        return self.tokenizer

    def state_dicts(self) -> dict[str, dict[str, torch.Tensor]]:
        """``{"unet": …, "vae": …, "text_encoder": …}``, keys cleaned of ``_orig_mod.``/``module.`` wrappers."""
        return {name: clean_state_dict(getattr(self, name).state_dict()) for name in COMPONENTS}


# ---------------------------------------------------------------- helpers


def clean_state_dict(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Remove the ``_orig_mod.`` (torch.compile) and ``module.`` (DataParallel/DDP) wrapper prefixes."""
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        parts = [p for p in key.split(".") if p != "_orig_mod"]
        while parts and parts[0] == "module":
            parts = parts[1:]
        out[".".join(parts)] = value
    return out


def _list(keys: Iterable[str], limit: int = 5) -> str:
    keys = list(keys)
    shown = ", ".join(repr(k) for k in keys[:limit])
    return shown + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def check_state_dict(module: nn.Module, sd: Mapping[str, torch.Tensor], *, where: str, component: str) -> None:
    """Raise CheckpointError unless ``sd`` has exactly the module's keys with exactly its shapes.

    ``where`` names the file (or folder) the tensors came from; the message lists the first few offending
    keys of each kind and how many there are in total.
    """
    own = module.state_dict()
    expected = {k: tuple(v.shape) for k, v in own.items()}
    unexpected = [k for k in sd if k not in expected]
    missing = [k for k in expected if k not in sd]
    wrong = [k for k in sd if k in expected and tuple(sd[k].shape) != expected[k]]
    # floating point where the model holds floats (not integers, booleans or complex numbers), else the exact dtype
    # (the int8 layers' weights)
    kinds = [k for k in sd if k in own and not (sd[k].is_floating_point() if own[k].is_floating_point()
                                                 else sd[k].dtype == own[k].dtype)]
    if not (unexpected or missing or wrong or kinds):
        return
    parts = []
    if unexpected:
        parts.append(f"{len(unexpected)} unknown key(s): {_list(unexpected)}")
    if missing:
        parts.append(f"{len(missing)} missing key(s): {_list(missing)}")
    if wrong:
        shown = "; ".join(
            f"{k!r} is {list(sd[k].shape)} but the model expects {list(expected[k])}" for k in wrong[:5]
        )
        more = f" and {len(wrong) - 5} more" if len(wrong) > 5 else ""
        parts.append(f"{len(wrong)} shape mismatch(es): {shown}{more}")
    if kinds:
        shown = "; ".join(
            f"{k!r} is {str(sd[k].dtype).removeprefix('torch.')} but the model expects "
            f"{'floating point' if own[k].is_floating_point() else str(own[k].dtype).removeprefix('torch.')}"
            for k in kinds[:5]
        )
        more = f" and {len(kinds) - 5} more" if len(kinds) > 5 else ""
        parts.append(f"{len(kinds)} tensor(s) of the wrong type: {shown}{more}")
    raise CheckpointError(f"{where}: the {component} weights do not match its config: " + "; ".join(parts))


def _cast(sd: Mapping[str, torch.Tensor], dtype: torch.dtype | None, device: str | torch.device) -> dict:
    """The tensors on ``device``, floating-point ones in ``dtype``. On an accelerator each tensor is copied as
    stored and converted there: ``to(device, dtype)`` from the CPU converts on the CPU first (ATen's CPU-to-GPU
    copy), into a temporary, for every tensor of a file stored in another precision."""
    on_cpu = torch.device(device).type == "cpu"
    out = {}
    for k, t in sd.items():
        target = dtype if dtype is not None and t.is_floating_point() else t.dtype
        out[k] = t.to(device=device, dtype=target) if on_cpu else t.to(device=device).to(dtype=target)
    return out


def _build(cls: type[nn.Module], cfg: Any) -> nn.Module:
    with torch.device("meta"):
        return cls(cfg)


def _fill(module: nn.Module, sd: dict[str, torch.Tensor], where: str) -> nn.Module:
    module.load_state_dict(sd, strict=True, assign=True)
    leftovers = [n for n, t in [*module.named_parameters(), *module.named_buffers()] if t.device.type == "meta"]
    if leftovers:  # a buffer the file does not store (should not happen with the current models)
        raise CheckpointError(f"{where}: tensors left without data after loading: {_list(leftovers)}")
    return module.eval()


def _converted(fn: Callable[..., Any], *args: Any, where: str, **kwargs: Any) -> Any:
    """Call a format-mapping function; errors that are not already ours get the file name attached."""
    try:
        return fn(*args, **kwargs)
    except EstableError as exc:
        msg = str(exc)
        if where in msg or Path(where).name in msg:
            raise
        raise type(exc)(f"{where}: {msg}") from exc
    except (ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{where}: {exc}") from exc


# ---------------------------------------------------------------- tokenizer


def _standard_tokenizer(tok_cfg: TokenizerConfig) -> tuple[CLIPTokenizer | None, str | None]:
    """The standard CLIP vocabulary with ``tok_cfg``'s special ids, or (None, why) when it is not installed."""
    from .. import tokenizer as tokmod

    try:
        return tokmod.CLIPTokenizer.from_bpe_file(tokmod.find_clip_vocab(), **_tokenizer_kwargs(tok_cfg)), None
    except EstableError as exc:
        return None, str(exc)


def _tokenizer_kwargs(tok_cfg: TokenizerConfig) -> dict[str, Any]:
    return {"max_length": tok_cfg.max_length, "pad_token_id": tok_cfg.pad_token_id}


def _tokenizer_from_folder(folder: Path, max_length: int | None = None) -> CLIPTokenizer:
    """A diffusers ``tokenizer/`` folder (``vocab.json`` + ``merges.txt``, or transformers 5's ``tokenizer.json``)."""
    from ..tokenizer import CLIPTokenizer

    try:
        return CLIPTokenizer.from_folder(folder, max_length=max_length)
    except EstableError as exc:
        msg = str(exc)
        raise CheckpointError(msg if str(folder) in msg else f"{folder}: {msg}") from exc
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{folder}: cannot read the tokenizer ({exc})") from exc


def _tokenizer_config(tok: CLIPTokenizer, default: TokenizerConfig) -> TokenizerConfig:
    """TokenizerConfig from a loaded tokenizer's special ids (falls back to ``default`` field by field)."""
    values = default.to_dict()
    for name in values:
        v = getattr(tok, name, None)
        if isinstance(v, int) and not isinstance(v, bool):
            values[name] = v
    return TokenizerConfig.from_dict(values)


def _is_standard(tok: CLIPTokenizer, std: CLIPTokenizer) -> bool:
    """Same vocabulary, merges, special tokens and matching flags as the standard CLIP tokenizer."""
    return (
        tok.encoder == std.encoder
        and tok.merges == std.merges
        and (tok.bos_token, tok.eos_token, tok.unk_token) == (std.bos_token, std.eos_token, std.unk_token)
        and not tok.extra_special_tokens
        and not any(tok.normalized.values())
    )


def tokenizer_metadata(tok: CLIPTokenizer | None) -> str:
    """``"clip"`` for the standard vocabulary (or none), else the tokenizer's files as one JSON object.

    The pad token and length are part of the ModelConfig (``config.tokenizer``), so "clip" loses nothing.
    """
    if tok is None:
        return "clip"
    std, _ = _standard_tokenizer(TokenizerConfig())
    if std is not None and _is_standard(tok, std):
        return "clip"
    with tempfile.TemporaryDirectory(prefix="estable-tok-") as tmp:
        tok.save(tmp)
        files = {name: (Path(tmp) / name).read_text(encoding="utf-8") for name in _TOKENIZER_FILES}
    return json.dumps(files, ensure_ascii=False)


_TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json")


def tokenizer_from_metadata(
    value: str, tok_cfg: TokenizerConfig, where: str, *, max_length: int | None = None
) -> tuple[Any, str | None]:
    """Inverse of :func:`tokenizer_metadata`: (tokenizer, None), or (None, why) when the standard vocabulary
    is not installed. ``max_length`` overrides the embedded tokenizer's padding length."""
    if value == "clip":
        return _standard_tokenizer(tok_cfg)
    try:
        files = json.loads(value)
        texts = {name: files[name] for name in _TOKENIZER_FILES}
        if not all(isinstance(t, str) for t in texts.values()):
            raise TypeError
    except (ValueError, RecursionError, KeyError, TypeError):
        raise CheckpointError(f"{where}: the tokenizer embedded in the metadata is corrupt") from None
    with tempfile.TemporaryDirectory(prefix="estable-tok-") as tmp:
        for name, text in texts.items():
            (Path(tmp) / name).write_text(text, encoding="utf-8")
        try:
            return _tokenizer_from_folder(Path(tmp), max_length=max_length), None
        except CheckpointError as exc:  # its message names the temporary folder, gone by now
            why = str(exc).replace(f"{tmp}{os.sep}", "").replace(f"{tmp}: ", "")
            raise CheckpointError(f"{where}: the tokenizer embedded in the metadata is corrupt ({why})") from None


# ---------------------------------------------------------------- format detection


def detect_format(source: str | os.PathLike[str]) -> Format:
    """``"diffusers"`` for a folder, ``"estable"`` for a safetensors file that says so, else ``"ldm"``."""
    path = Path(source)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or folder")
    if path.is_dir():
        return "diffusers"
    suffix = path.suffix.lower()
    if suffix in SAFETENSORS_SUFFIXES:
        _, meta = read_safetensors_header(path)
        return "estable" if meta.get("format") == "estable" else "ldm"
    if suffix in PICKLE_SUFFIXES:
        return "ldm"
    raise CheckpointError(
        f"{path.name}: unknown checkpoint type {suffix or '(no suffix)'!r}; expected a .safetensors file, a "
        f"pickle checkpoint ({', '.join(PICKLE_SUFFIXES)}, with --allow-pickle) or a diffusers folder ({path})"
    )


# ---------------------------------------------------------------- loading


def load_model(
    source: str | os.PathLike[str],
    *,
    allow_pickle: bool = False,
    ema: bool = False,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device = "cpu",
    prediction_type: str | None = None,
    progress: Callable[[str], None] | None = None,
) -> LoadedModel:
    """Load a whole model from an SD single file, a diffusers folder or an Estable file.

    ``dtype`` (fp16/bf16/fp32) converts floating-point weights; None keeps the file's. ``ema`` takes the EMA
    weights of an LDM file. ``prediction_type`` (epsilon / v_prediction) overrides what the source says or
    what is inferred (LDM files do not record it). The tokenizer comes from a diffusers folder's
    ``tokenizer/``; for LDM and Estable files it is the standard CLIP vocabulary, or None when that cannot be
    found (see the module docstring and :meth:`LoadedModel.require_tokenizer`). ``progress`` is called with
    a short label as each of the :data:`LOAD_STAGES` stages begins (the CLI drives its progress bar with it).
    """
    stage = progress or (lambda _label: None)
    torch_dtype = parse_dtype(dtype)
    if prediction_type not in (None, "epsilon", "v_prediction"):
        raise EstableError(f"unknown prediction type {prediction_type!r}; use epsilon or v_prediction")
    path = Path(source)
    fmt = detect_format(path)
    if ema and fmt in ("diffusers", "estable"):
        raise EstableError(f"--ema takes the EMA weights of an SD single file; {path.name} is a {fmt} "
                           f"{'folder' if fmt == 'diffusers' else 'file'}, which holds one set of U-Net weights")
    stage(f"reading {path.name}")
    if fmt == "diffusers":
        config, comps, tok, tok_err = _read_diffusers(path, allow_pickle=allow_pickle)
    elif fmt == "estable":
        config, comps, tok, tok_err = _read_estable(path)
    else:
        config, comps, tok, tok_err = _read_ldm(path, allow_pickle=allow_pickle, ema=ema,
                                                prediction_type=prediction_type)
    if prediction_type is not None and config.schedule.prediction_type != prediction_type:
        config = config.replace(schedule=config.schedule.replace(prediction_type=prediction_type))
    why = _vocabulary_misfit(tok, config.text.vocab_size, str(path)) if tok is not None else None
    if why and fmt == "ldm":  # the standard vocabulary, not part of the file: the weights still load and convert
        tok, tok_err = None, why
    elif why:
        raise CheckpointError(why)

    from ..models.text import TextEncoder
    from ..models.unet import UNet
    from ..models.vae import AutoencoderKL

    classes = {"unet": (UNet, config.unet), "vae": (AutoencoderKL, config.vae),
               "text_encoder": (TextEncoder, config.text)}
    stage("checking weights")
    shells: dict[str, nn.Module] = {}
    try:
        for name, (cls, cfg) in classes.items():
            shells[name] = _build(cls, cfg)
    except ValueError as exc:  # the config itself is invalid for our networks
        raise UnsupportedModelError(f"{path}: cannot build the model: {exc}") from exc
    # int8 layers (an Estable file written with --quantize int8): the shells get int8 modules where the file has
    # ``<layer>.weight_scale``, so that the int8 tensors load as they are (estable.nn.int8).
    from ..nn.int8 import int8_layout, is_quantized

    for name, (sd, where) in comps.items():
        if is_quantized(sd):
            try:
                int8_layout(shells[name], sd.keys())
            except ValueError as exc:
                raise CheckpointError(f"{where}: {exc}") from None
    # Check all three before loading any, so that a bad file never yields a partial model.
    for name, (sd, where) in comps.items():
        check_state_dict(shells[name], sd, where=where, component=name.replace("_", " "))
    stage("loading weights")
    try:
        nets = {
            name: _fill(shells[name], _cast(sd, torch_dtype, device), where) for name, (sd, where) in comps.items()
        }
    except (RuntimeError, AssertionError) as exc:  # e.g. device="cuda" without a GPU build or device
        raise EstableError(f"cannot put the weights on device {str(device)!r}: {exc}") from exc
    return LoadedModel(
        config=config,
        unet=nets["unet"],  # type: ignore[arg-type]
        vae=nets["vae"],  # type: ignore[arg-type]
        text_encoder=nets["text_encoder"],  # type: ignore[arg-type]
        tokenizer=tok,
        source=path,
        format=fmt,
        tokenizer_error=tok_err,
    )


Components = dict[str, tuple[dict[str, torch.Tensor], str]]  # name -> (state dict, where it came from)


def _vocabulary_misfit(tok: CLIPTokenizer, vocab_size: int, where: str) -> str | None:
    """Why ``tok`` does not fit a text encoder of ``vocab_size`` token embeddings (a token id without a row: the first
    prompt would fail with an IndexError), or None when it fits."""
    top = max(tok.encoder.values(), default=0)
    if top < vocab_size and min(tok.encoder.values(), default=0) >= 0:
        return None
    return (f"{where}: the tokenizer has token ids up to {top}, but the text encoder has only {vocab_size} token "
            "embeddings: the tokenizer (for single files: the standard CLIP vocabulary) does not belong to this model")


def _read_ldm(
    path: Path, *, allow_pickle: bool, ema: bool, prediction_type: str | None
) -> tuple[ModelConfig, Components, Any, str | None]:
    from . import ldm, ldm_infer

    sd, meta = load_tensors(path, allow_pickle=allow_pickle)
    sd = clean_state_dict(sd)
    where = str(path)
    config = _recorded_config(sd, meta)
    if config is None:
        config = _converted(ldm_infer.infer_config, sd, prediction_type=prediction_type, where=where)
    parts = _converted(ldm.ldm_to_components, sd, config, ema=ema, where=where)
    del sd
    tok, err = _standard_tokenizer(config.tokenizer)
    return config, {name: (parts[name], where) for name in COMPONENTS}, tok, err


def _recorded_config(sd: Mapping[str, torch.Tensor], meta: Mapping[str, str]) -> ModelConfig | None:
    """The config that Estable records in the metadata of the LDM files it writes (None for other files).

    LDM files do not record head counts, the prediction type or how many text layers are read; the recorded
    config keeps a round trip through the LDM format exact. It is used only when its family agrees with the
    file's text-encoder layout; the strict key and shape checks still apply.
    """
    from . import ldm_infer

    raw = meta.get(LDM_CONFIG_KEY)
    if not raw:
        return None
    try:
        config = ModelConfig.from_dict(json.loads(raw))
        family = ldm_infer.detect_family(sd.keys())
    except (ValueError, TypeError, RecursionError, EstableError):
        return None
    if config.family in ("sd1", "sd2") and config.family != family:
        return None
    return config


def _read_estable(path: Path) -> tuple[ModelConfig, Components, Any, str | None]:
    tensors, meta = read_safetensors(path)
    version = meta.get("format_version")
    if version != ESTABLE_FORMAT_VERSION:
        raise UnsupportedModelError(
            f"{path}: Estable file format version {version!r} is not supported by this Estable "
            f"(it reads version {ESTABLE_FORMAT_VERSION}); upgrade Estable or re-export the file"
        )
    try:
        config = ModelConfig.from_dict(json.loads(meta["config"]))
    except KeyError:
        raise CheckpointError(f"{path}: the Estable metadata has no 'config' entry") from None
    except (TypeError, ValueError, RecursionError) as exc:
        raise CheckpointError(f"{path}: the model config in the metadata is invalid ({json_error(exc)})") from None
    comps: dict[str, dict[str, torch.Tensor]] = {name: {} for name in COMPONENTS}
    stray = []
    for key, t in tensors.items():
        head, _, rest = key.partition(".")
        if head in comps and rest:
            comps[head][rest] = t
        else:
            stray.append(key)
    if stray:
        raise CheckpointError(
            f"{path}: {len(stray)} key(s) belong to no component (expected prefixes unet., vae., "
            f"text_encoder.): {_list(stray)}"
        )
    tok, err = tokenizer_from_metadata(meta.get("tokenizer", "clip"), config.tokenizer, str(path))
    return config, {name: (sd, str(path)) for name, sd in comps.items()}, tok, err


def _weights_file(folder: Path, stem: str, allow_pickle: bool) -> list[Path]:
    """The weights file(s) of a diffusers component folder: single, sharded (index) or pickle."""
    single = folder / f"{stem}.safetensors"
    if single.is_file():
        return [single]
    index = folder / f"{stem}.safetensors.index.json"
    if index.is_file():
        weight_map = read_json_object(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index}: no 'weight_map' in the shard index")
        names = sorted(set(weight_map.values()))
        bad = [n for n in names if not isinstance(n, str) or Path(n).name != n or n in ("", ".", "..")]
        if bad:
            raise CheckpointError(f"{index}: shard names must be plain file names in the same folder, got {bad[0]!r}")
        return [folder / name for name in names]
    variants = sorted(folder.glob(f"{stem}.*.safetensors"))
    if variants:
        return variants[:1]  # e.g. diffusion_pytorch_model.fp16.safetensors
    pickle_file = folder / _PICKLE_WEIGHTS[stem]
    if pickle_file.is_file():
        if not allow_pickle:
            load_tensors(pickle_file, allow_pickle=False)  # raises the explanation
        return [pickle_file]
    raise CheckpointError(f"{folder}: no weights file (expected {single.name})")


DIFFUSERS_PARTS = ("model_index.json", "unet/", "vae/", "text_encoder/", "tokenizer/", "scheduler/")


def diffusers_missing(path: Path) -> list[str]:
    """The parts of a diffusers pipeline folder that ``path`` lacks; CheckpointError if it has none of them."""
    missing = [n for n in DIFFUSERS_PARTS if not (path / n.rstrip("/")).exists()]
    if len(missing) == len(DIFFUSERS_PARTS):
        raise CheckpointError(
            f"{path} is a folder but not a diffusers pipeline (no model_index.json, unet/, vae/, "
            "text_encoder/, tokenizer/ or scheduler/); give an SD .safetensors file or a diffusers folder"
        )
    return missing


def _read_diffusers(path: Path, *, allow_pickle: bool) -> tuple[ModelConfig, Components, Any, str | None]:
    from . import diffusers_config as dc

    missing = diffusers_missing(path)
    if missing:
        raise CheckpointError(f"{path} is not a complete diffusers pipeline: missing {', '.join(missing)}")
    read_json_object(path / "model_index.json")

    def cfg(sub: str, name: str = "config.json") -> dict[str, Any]:
        return read_json_object(path / sub / name)

    unet_cfg = _converted(dc.unet_from_diffusers, cfg("unet"), where=str(path / "unet" / "config.json"))
    vae_cfg = _converted(dc.vae_from_diffusers, cfg("vae"), where=str(path / "vae" / "config.json"))
    text_cfg = _converted(dc.text_from_diffusers, cfg("text_encoder"),
                          where=str(path / "text_encoder" / "config.json"))
    sched_cfg = _converted(dc.schedule_from_diffusers, cfg("scheduler", _SCHEDULER_CONFIG),
                           where=str(path / "scheduler" / _SCHEDULER_CONFIG))
    comps: Components = {}
    for name in COMPONENTS:
        files = _weights_file(path / name, WEIGHT_STEMS[name], allow_pickle)
        sd: dict[str, torch.Tensor] = {}
        for f in files:
            part, _meta = load_tensors(f, allow_pickle=allow_pickle)
            sd.update(part)
        sd = clean_state_dict(sd)
        if name == "text_encoder":
            sd = _transformers_text_keys(sd)
            extra = path / name / dc.TEXT_PROJECTION_FILE
            if _PROJECTION_KEY not in sd and extra.is_file():
                sd[_PROJECTION_KEY] = _read_projection(extra)
            if _PROJECTION_KEY in sd and text_cfg.projection_dim is None:
                # a CLIPTextModel folder whose weights carry a text projection (Estable's exports)
                text_cfg = text_cfg.replace(projection_dim=int(sd[_PROJECTION_KEY].shape[0]))
        comps[name] = (sd, str(files[0] if len(files) == 1 else path / name))

    tok = _tokenizer_from_folder(path / "tokenizer")
    if tok.max_length > text_cfg.max_positions:  # the prompt encoder would fail at the first prompt
        raise CheckpointError(
            f"{path / 'tokenizer'}: the tokenizer pads prompts to {tok.max_length} tokens, but the text encoder has "
            f"only {text_cfg.max_positions} positions; set model_max_length to {text_cfg.max_positions} in "
            "tokenizer_config.json"
        )
    family = "sd2" if text_cfg.activation == "gelu" else "sd1"
    default_tok = TokenizerConfig(pad_token_id=0) if family == "sd2" else TokenizerConfig()
    try:
        config = ModelConfig(
            family=family, unet=unet_cfg, vae=vae_cfg, text=text_cfg,
            tokenizer=_tokenizer_config(tok, default_tok), schedule=sched_cfg, clip_skip=1,
        )
    except ValueError as exc:
        raise CheckpointError(f"{path}: the component configs do not fit together: {exc}") from exc
    return config, comps, tok, None


_PROJECTION_KEY = "text_projection.weight"


def _read_projection(path: Path) -> torch.Tensor:
    """The text projection stored beside a CLIPTextModel's weights: one (projection_dim, width) matrix."""
    tensors, _meta = read_safetensors(path)
    t = tensors.get(_PROJECTION_KEY)
    if set(tensors) != {_PROJECTION_KEY} or t is None or t.ndim != 2:
        raise CheckpointError(f"{path}: expected one 2-D tensor named {_PROJECTION_KEY!r}, found {_list(tensors)}")
    return t


# transformers 5 saves CLIPTextModel without its ``text_model.`` prefix (and reads both forms); older files and
# the Hub's SD folders have it. Older files may also carry the persistent ``position_ids`` buffer: [0..77).
_TEXT_ROOTS = ("embeddings.", "encoder.", "final_layer_norm.")
_TEXT_EXTRAS = frozenset({"text_model.embeddings.position_ids"})


def _transformers_text_keys(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A diffusers text_encoder state dict in Estable's (= transformers 4.x) key form."""
    if not any(k.startswith("text_model.") for k in sd) and any(k.startswith(_TEXT_ROOTS) for k in sd):
        sd = {("text_model." + k if k.startswith(_TEXT_ROOTS) else k): v for k, v in sd.items()}
    return {k: v for k, v in sd.items() if k not in _TEXT_EXTRAS}


# ---------------------------------------------------------------- saving


def save_model(
    model: LoadedModel,
    dst: str | os.PathLike[str],
    *,
    to: Format,
    dtype: str | torch.dtype | None = None,
    overwrite: bool = False,
    progress: Callable[[str], None] | None = None,
) -> Path:
    """Write ``model`` as an LDM single file, a diffusers folder or an Estable file; return the path.

    Files are written atomically (temporary file, fsync, rename); a diffusers folder is assembled in a
    temporary sibling folder and renamed into place. ``dtype`` converts floating-point weights.
    ``_orig_mod.``/``module.`` prefixes are never written. ``progress`` is called as each of the
    :data:`SAVE_STAGES` stages begins.
    """
    stage = progress or (lambda _label: None)
    if to not in FORMATS:
        raise EstableError(f"unknown output format {to!r}; use one of {', '.join(FORMATS)}")
    torch_dtype = parse_dtype(dtype)
    dst = Path(dst)
    if dst.exists() and not overwrite:
        raise CheckpointError(f"{dst} already exists; choose another destination or allow overwriting")
    if to != "diffusers" and dst.suffix.lower() != ".safetensors":
        raise EstableError(f"{dst}: an {to} checkpoint is a single .safetensors file; name it *.safetensors")
    if to != "diffusers" and dst.is_dir():
        raise CheckpointError(f"{dst} is a folder; an {to} checkpoint is a single file")
    if to == "diffusers":
        check_replaceable_folder(dst)
    stage(f"converting to {to}")
    comps = {name: _cast(sd, torch_dtype, "cpu") for name, sd in model.state_dicts().items()}
    config = model.config
    from ..nn.int8 import QUANTIZATION, is_quantized

    quantized = any(is_quantized(sd) for sd in comps.values())
    if quantized and to != "estable":
        raise EstableError(f"an int8 model is written as an Estable file only (--to estable), not {to}")
    if to == "estable":
        tensors = {f"{name}.{k}": t for name, sd in comps.items() for k, t in sd.items()}
        meta = {
            "format": "estable",
            "format_version": ESTABLE_FORMAT_VERSION,
            "config": config.to_json(),
            "tokenizer": tokenizer_metadata(model.tokenizer),
        }
        if quantized:
            meta["quantization"] = QUANTIZATION
        stage(f"writing {dst.name}")
        write_safetensors(dst, tensors, meta)
    elif to == "ldm":
        from . import ldm

        sd = _converted(ldm.components_to_ldm, comps, config, where=str(dst))
        meta = {"format": "pt", LDM_CONFIG_KEY: config.to_json(),
                "estable.prediction_type": config.schedule.prediction_type}
        stage(f"writing {dst.name}")
        write_safetensors(dst, sd, meta)
    else:
        stage(f"writing {dst.name}/")
        _save_diffusers(model, comps, dst, overwrite=overwrite)
    return dst


def check_replaceable_folder(dst: str | os.PathLike[str]) -> Path:
    """``dst`` resolved, after checking that writing a diffusers model there may replace it: it does not exist, or
    it is a diffusers model folder (has ``model_index.json``). Anything else (a folder of other files, ``.``, ``/``)
    is an EstableError, so replacing never deletes a folder that is not a model."""
    dst = Path(dst).resolve()
    if not dst.name:
        raise EstableError(f"cannot write a diffusers model as {dst}; name a new folder")
    if dst.is_dir() and not (dst / "model_index.json").is_file():
        raise EstableError(f"{dst} is a folder but not a diffusers model (no model_index.json); not replacing it "
                           "(it would be deleted): choose a new folder name")
    return dst


def _save_diffusers(model: LoadedModel, comps: dict[str, dict[str, torch.Tensor]], dst: Path, *,
                    overwrite: bool) -> None:
    from . import diffusers_config as dc
    from . import ldm

    dst = check_replaceable_folder(dst)
    if dst.exists() and not dst.is_dir():
        raise CheckpointError(f"{dst} is a file; a diffusers model is a folder")
    comps, config = _converted(ldm.trim_text_layers, comps, model.config, where=str(dst))
    tok = model.tokenizer
    if tok is None:
        tok, err = _standard_tokenizer(config.tokenizer)
        if tok is None:
            raise EstableError(f"cannot write the diffusers tokenizer/ folder: {err}")
    parent = dst.parent if str(dst.parent) else Path(".")
    try:
        parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", suffix=".tmp", dir=parent))
    except OSError as exc:
        raise CheckpointError(f"cannot write {dst}: {exc.strerror or exc}") from exc
    try:
        writers = {
            "unet": (dc.unet_to_diffusers(config.unet), "diffusion_pytorch_model.safetensors"),
            "vae": (dc.vae_to_diffusers(config.vae), "diffusion_pytorch_model.safetensors"),
            "text_encoder": (dc.text_to_diffusers(config.text), "model.safetensors"),
        }
        text = dict(comps["text_encoder"])
        projection = text.pop(_PROJECTION_KEY, None)
        comps = {**comps, "text_encoder": text}
        for name, (cfg_dict, weights) in writers.items():
            (tmp / name).mkdir()
            atomic_write_text(tmp / name / "config.json", json.dumps(cfg_dict, indent=2, sort_keys=True) + "\n")
            write_safetensors(tmp / name / weights, comps[name], {"format": "pt"})
        if projection is not None:  # CLIPTextModel has none: kept beside it for Estable (see diffusers_config)
            write_safetensors(tmp / "text_encoder" / dc.TEXT_PROJECTION_FILE, {_PROJECTION_KEY: projection},
                              {"format": "pt"})
        (tmp / "scheduler").mkdir()
        atomic_write_text(
            tmp / "scheduler" / _SCHEDULER_CONFIG,
            json.dumps(dc.schedule_to_diffusers(config.schedule), indent=2, sort_keys=True) + "\n",
        )
        tok.save(tmp / "tokenizer")
        atomic_write_text(tmp / "model_index.json", json.dumps(dc.model_index_for(config), indent=2) + "\n")
        _replace_folder(tmp, dst, overwrite=overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _replace_folder(new: Path, dst: Path, *, overwrite: bool) -> None:
    """Move the finished folder ``new`` to ``dst``; an existing ``dst`` (a diffusers model folder only) is swapped
    out, then deleted."""
    old = None
    if dst.exists():
        if not overwrite:
            raise CheckpointError(f"{dst} already exists")
        dst = check_replaceable_folder(dst)
        old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
        os.replace(dst, old)
    try:
        os.replace(new, dst)
    except OSError:
        if old is not None:
            os.replace(old, dst)  # put the previous folder back
        raise
    if old is not None:
        with contextlib.suppress(OSError):
            shutil.rmtree(old)
