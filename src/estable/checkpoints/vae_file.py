"""Swapped VAEs: a fine-tuned autoencoder from a separate file (A1111's ``--vae`` / "SD VAE" setting).

Files people share hold the KL-f8 autoencoder alone, in one of two namings:

* LDM (``vae-ft-mse-840000-ema-pruned.safetensors`` / ``.ckpt``): ``encoder.down.0.block.0.conv1.weight``,
  ``decoder.up.3.…``, ``quant_conv``, mid-block attention as 1×1 convolutions ``…mid.attn_1.q``; sometimes with
  the ``first_stage_model.`` prefix of a full checkpoint, ``loss.*`` tensors of the training loss and
  ``model_ema.decay`` / ``model_ema.num_updates``, which A1111 drops and so do we.
* diffusers (``vae/diffusion_pytorch_model.safetensors``, or a ``vae/`` folder): the names Estable uses
  (``encoder.down_blocks.0.resnets.0.…``, ``…mid_block.attentions.0.to_q``); files from before diffusers 0.14
  call the attention projections ``query`` / ``key`` / ``value`` / ``proj_attn``.

An Estable model file (``vae.…``, ``unet.…``, ``text_encoder.…``) gives its autoencoder too.

Every key of the model must be filled with a tensor of the right shape and no key may be left over, otherwise
:func:`read_vae_file` raises a CheckpointError that says what does not fit (an SD VAE given to a model with
another autoencoder, a U-Net file given as a VAE, …). The infotext records A1111's ``VAE hash`` (first 10 hex
digits of the file's SHA-256) and ``VAE`` (the file's name).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..config import VAEConfig
from ..errors import CheckpointError, UnsupportedModelError
from ..nn.int8 import is_quantized
from .io import cached_sha256, load_tensors
from .ldm import VAE_PREFIX, _ldm_to_ours, vae_key_map

__all__ = ["load_vae_into", "read_vae_file", "scaling_note", "vae_identity"]

_IGNORED = ("model_ema.decay", "model_ema.num_updates")
_OLD_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
_DIFFUSERS_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
ESTABLE_PARTS = ("vae", "unet", "text_encoder")  # the top-level names of an Estable model file's tensors


def _file(path: Path) -> Path:
    if path.is_dir():
        for name in _DIFFUSERS_FILES:
            if (path / name).is_file():
                return path / name
        raise CheckpointError(f"{path} is a folder without {' or '.join(_DIFFUSERS_FILES)}; give the VAE file")
    if not path.is_file():
        raise CheckpointError(f"--vae {path}: no such file")
    return path


def _strip(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    sd = {k: v for k, v in sd.items() if not k.startswith("loss") and k not in _IGNORED}
    if any(k.startswith(VAE_PREFIX) for k in sd):  # a full LDM checkpoint, or a VAE saved with its prefix
        sd = {k[len(VAE_PREFIX):]: v for k, v in sd.items() if k.startswith(VAE_PREFIX)}
    elif any(k.startswith("vae.") for k in sd) and all(k.split(".")[0] in ESTABLE_PARTS for k in sd):
        # a VAE saved with its prefix, or a whole Estable model file: its autoencoder
        sd = {k[4:]: v for k, v in sd.items() if k.startswith("vae.")}
    return sd


def _problems(where: str, missing: list[str], unexpected: list[str], shapes: list[str]) -> None:
    if not (missing or unexpected or shapes):
        return
    parts = []
    for what, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", shapes)):
        if items:
            more = f" and {len(items) - 3} more" if len(items) > 3 else ""
            parts.append(f"{len(items)} {what}: {', '.join(items[:3])}{more}")
    raise CheckpointError(f"{where} does not fit this model's VAE ({'; '.join(parts)}); it was made for another "
                          "autoencoder, or it is not a VAE file")


def _from_ldm(sd: dict[str, Tensor], cfg: VAEConfig, where: str) -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}
    missing, shapes = [], []
    rows = vae_key_map(cfg, prefix="")
    for r in rows:
        if r.ldm not in sd:
            missing.append(r.ldm)
        elif tuple(sd[r.ldm].shape) != r.ldm_shape:
            shapes.append(f"{r.ldm} {list(sd[r.ldm].shape)} (expected {list(r.ldm_shape)})")
        else:
            out[r.key] = _ldm_to_ours(sd[r.ldm], r)
    known = {r.ldm for r in rows}
    _problems(where, missing, sorted(k for k in sd if k not in known), shapes)
    return out


def _from_diffusers(sd: dict[str, Tensor], expected: dict[str, tuple[int, ...]], where: str) -> dict[str, Tensor]:
    out = {}
    for k, v in sd.items():
        parts = k.split(".")
        if len(parts) >= 2 and parts[-2] in _OLD_ATTENTION and "attentions" in parts:
            k = ".".join([*parts[:-2], _OLD_ATTENTION[parts[-2]], parts[-1]])
        if k in expected and v.ndim == 4 and len(expected[k]) == 2:  # a 1×1 conv where we hold a Linear
            v = v.reshape(v.shape[:2])
        out[k] = v
    shapes = [f"{k} {list(v.shape)} (expected {list(expected[k])})" for k, v in out.items()
              if k in expected and tuple(v.shape) != expected[k]]
    _problems(where, [k for k in expected if k not in out], sorted(k for k in out if k not in expected), shapes)
    return out


def read_vae_file(
    path: str | os.PathLike[str], cfg: VAEConfig, expected: dict[str, tuple[int, ...]], *,
    allow_pickle: bool = False,
) -> dict[str, Tensor]:
    """The autoencoder in ``path`` (LDM or diffusers naming) as a state dict for a VAE with config ``cfg`` whose
    own keys and shapes are ``expected``; CheckpointError naming what does not fit."""
    file = _file(Path(path))
    sd, _ = load_tensors(file, allow_pickle=allow_pickle)
    sd = _strip(dict(sd))
    where = f"the VAE file {file.name}"
    if not sd:
        raise CheckpointError(f"{where} holds no autoencoder tensors")
    if any(k.startswith(("encoder.down.", "decoder.up.", "encoder.mid.")) for k in sd):
        out = _from_ldm(sd, cfg, where)
    else:
        out = _from_diffusers(sd, expected, where)
    odd = [f"{k} ({str(v.dtype).removeprefix('torch.')})" for k, v in out.items() if not v.is_floating_point()]
    if odd:  # integers or complex numbers where the autoencoder holds floats: a silently wrong image
        raise CheckpointError(f"{where} is corrupt: {len(odd)} tensor(s) are not floating point: {', '.join(odd[:3])}")
    return {k: v.float() for k, v in out.items()}


def vae_identity(path: str | os.PathLike[str]) -> dict[str, Any]:
    """name (the file's name, as A1111's ``VAE``), path, sha256, hash (A1111's ``VAE hash``: 10 hex digits)."""
    file = _file(Path(path))
    sha = cached_sha256(file)
    return {"name": file.name, "path": str(file.resolve()), "sha256": sha, "hash": sha[:10]}


def load_vae_into(vae: torch.nn.Module, path: str | os.PathLike[str], *, allow_pickle: bool = False) -> dict[str, Any]:
    """Replace ``vae``'s weights (in place, keeping its dtype and device) by the file's; return its identity."""
    expected = {k: tuple(v.shape) for k, v in vae.state_dict().items()}
    if is_quantized(expected):  # its int8 layers hold weight_scale tensors no VAE file has
        raise UnsupportedModelError(
            f"--vae {Path(path).name}: this model's VAE is quantised to int8 (estable convert --quantize int8); a "
            "separate VAE cannot be swapped into it: use the model before quantisation, or convert that one with "
            "--vae FILE --quantize int8"
        )
    sd = read_vae_file(path, vae.config, expected, allow_pickle=allow_pickle)
    with torch.no_grad():
        for k, t in vae.state_dict().items():
            t.copy_(sd[k].to(t.dtype))
    return vae_identity(path)


def scaling_note(path: str | os.PathLike[str], cfg: VAEConfig) -> str | None:
    """A warning when ``path`` is a diffusers VAE whose ``config.json`` (beside the file, or in the folder) names
    another latent ``scaling_factor`` than the model's ``cfg``: the weights load (the shapes fit), but the U-Net
    was trained on latents scaled by the model's factor, which is kept (as A1111 does) — an SDXL VAE (0.13025) in an
    SD 1.x model (0.18215), say, draws wrong colours and contrast. None when no such config says otherwise."""
    file = _file(Path(path))
    config = file.parent / "config.json"
    try:
        data = json.loads(config.read_text(encoding="utf-8")) if config.is_file() else None
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    factor = data.get("scaling_factor") if isinstance(data, dict) else None
    if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not math.isfinite(factor):
        return None
    if math.isclose(factor, cfg.scaling_factor, rel_tol=1e-4):
        return None
    return (f"the VAE {file.parent.name}/ says scaling_factor {factor:g} in its config.json; this model's latents "
            f"are scaled by {cfg.scaling_factor:g}, which is kept: a VAE made for another model family draws wrong "
            "colours and contrast")
