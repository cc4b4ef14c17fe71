"""The files a CLIP run exports, and their readers (the U-Net trainer reads the text tower; evaluation the pair).

Written by :class:`estable.training.clip_trainer.CLIPTrainer` into the run folder after every checkpoint (EMA
weights when the run keeps an EMA):

    clip.safetensors          the whole pair: keys text.…, image.…, logit_scale; metadata format "estable-clip",
                              config (CLIPPairConfig JSON), tokenizer
    text_encoder.safetensors  the text tower alone (keys text_model.…, text_projection.weight: transformers'
                              CLIPTextModelWithProjection layout); metadata format "estable-text-encoder",
                              config (TextConfig JSON), tokenizer. The U-Net trainer takes it (or the run folder)
                              as ``text.source``, with its tokenizer.

The tokenizer entry is "clip" for CLIP's own vocabulary, else the tokenizer files as one JSON object (the policy
of Estable model files, ``estable.checkpoints.store``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from estable.checkpoints.io import read_safetensors, read_safetensors_header, write_safetensors
from estable.checkpoints.store import tokenizer_metadata
from estable.config import TextConfig, TokenizerConfig
from estable.errors import CheckpointError, EstableError
from estable.models.clip import CLIPPair, CLIPPairConfig
from estable.models.text import TextEncoder
from estable.tokenizer import CLIPTokenizer

CLIP_FORMAT = "estable-clip"
TEXT_ENCODER_FORMAT = "estable-text-encoder"
EXPORT_FORMAT_VERSION = "1"
CLIP_FILE = "clip.safetensors"
TEXT_ENCODER_FILE = "text_encoder.safetensors"


def tokenizer_from_metadata(value: str, *, max_length: int | None, where: str) -> CLIPTokenizer:
    """The tokenizer an export's metadata describes (the store's policy); ``max_length`` None keeps the saved
    length. Raises the store's message when the standard vocabulary is needed and not installed."""
    from estable.checkpoints.store import tokenizer_from_metadata as read

    tok, why = read(value, TokenizerConfig(max_length=max_length or 77), where, max_length=max_length)
    if tok is None:
        raise EstableError(why or f"{where}: no tokenizer")
    return tok



def _save_export(path: str | Path, fmt: str, network: Any, tokenizer: CLIPTokenizer | str,
                 state_dict: dict[str, torch.Tensor] | None) -> Path:
    """Write ``state_dict`` (or ``network``'s own weights) with the network's config and the tokenizer."""
    tok = tokenizer if isinstance(tokenizer, str) else tokenizer_metadata(tokenizer)
    sd = state_dict if state_dict is not None else network.state_dict()
    write_safetensors(path, {k: v.detach().cpu().contiguous() for k, v in sd.items()},
                      {"format": fmt, "format_version": EXPORT_FORMAT_VERSION, "config": network.config.to_json(),
                       "tokenizer": tok})
    return Path(path)


def save_text_encoder(path: str | Path, encoder: TextEncoder, tokenizer: CLIPTokenizer | str, *,
                      state_dict: dict[str, torch.Tensor] | None = None) -> Path:
    """Write a text encoder (``state_dict`` or the encoder's own weights) with its config and tokenizer."""
    return _save_export(path, TEXT_ENCODER_FORMAT, encoder, tokenizer, state_dict)


def _check_export(path: Path, fmt: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    tensors, meta = read_safetensors(path)
    if meta.get("format") != fmt:
        raise CheckpointError(f"{path} is not an {fmt} file (format {meta.get('format')!r})")
    if meta.get("format_version") != EXPORT_FORMAT_VERSION:
        raise CheckpointError(f"{path}: {fmt} format version {meta.get('format_version')!r} is not supported")
    return tensors, meta


def _strict_load(module: nn.Module, sd: dict[str, torch.Tensor], path: Path) -> None:
    want, got = set(module.state_dict()), set(sd)
    if want != got:
        raise CheckpointError(f"{path}: the weights do not match the recorded config (missing "
                              f"{sorted(want - got)[:5]}, unexpected {sorted(got - want)[:5]})")
    try:
        module.load_state_dict(sd, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{path}: {str(exc).strip().splitlines()[0]}") from None


def load_text_encoder(path: str | Path, *, max_length: int | None = None) -> tuple[TextEncoder, CLIPTokenizer]:
    """(text encoder, tokenizer) from a ``text_encoder.safetensors`` export; the tokenizer pads to ``max_length``
    (None: the length it was trained with), which must fit the encoder's positions."""
    path = Path(path)
    tensors, meta = _check_export(path, TEXT_ENCODER_FORMAT)
    try:
        config = TextConfig.from_dict(json.loads(meta["config"]))
    except (KeyError, json.JSONDecodeError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: the text-encoder config in the metadata is invalid ({exc})") from None
    if max_length is not None and max_length > config.max_positions:
        raise EstableError(f"{path}: the text encoder has {config.max_positions} positions, fewer than the "
                           f"requested max_length {max_length}; set text.max_length={config.max_positions}")
    encoder = TextEncoder(config)
    _strict_load(encoder, tensors, path)
    tok = tokenizer_from_metadata(meta.get("tokenizer", "clip"), max_length=max_length, where=str(path))
    if tok.max_length > config.max_positions:
        raise EstableError(f"{path}: its tokenizer pads to {tok.max_length} tokens but the encoder has "
                           f"{config.max_positions} positions; pass max_length={config.max_positions}")
    if tok.vocab_size != config.vocab_size or tok.eos_token_id != config.eos_token_id:
        raise CheckpointError(f"{path}: the embedded tokenizer ({tok.vocab_size} tokens, eos {tok.eos_token_id}) "
                              f"does not fit the encoder ({config.vocab_size}, eos {config.eos_token_id})")
    return encoder.eval(), tok


def find_text_encoder_export(source: str | Path) -> Path | None:
    """The text-encoder export ``source`` names (the file, or a CLIP run folder holding it), else None."""
    path = Path(source)
    if path.is_dir():
        path = path / TEXT_ENCODER_FILE
    if not path.is_file() or path.suffix.lower() != ".safetensors":
        return None
    try:
        _, meta = read_safetensors_header(path)
    except CheckpointError:
        return None
    return path if meta.get("format") == TEXT_ENCODER_FORMAT else None


def save_clip_pair(path: str | Path, pair: CLIPPair, tokenizer: CLIPTokenizer | str, *,
                   state_dict: dict[str, torch.Tensor] | None = None) -> Path:
    """Write the whole pair with its CLIPPairConfig and tokenizer."""
    return _save_export(path, CLIP_FORMAT, pair, tokenizer, state_dict)


def load_clip_pair(path: str | Path) -> tuple[CLIPPair, CLIPTokenizer]:
    """(pair, tokenizer) from a ``clip.safetensors`` export."""
    path = Path(path)
    tensors, meta = _check_export(path, CLIP_FORMAT)
    try:
        config = CLIPPairConfig.from_dict(json.loads(meta["config"]))
    except (KeyError, json.JSONDecodeError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: the CLIP config in the metadata is invalid ({exc})") from None
    pair = CLIPPair(config)
    _strict_load(pair, tensors, path)
    return pair.eval(), tokenizer_from_metadata(meta.get("tokenizer", "clip"), max_length=None, where=str(path))


__all__ = [
    "CLIP_FILE",
    "CLIP_FORMAT",
    "EXPORT_FORMAT_VERSION",
    "TEXT_ENCODER_FILE",
    "TEXT_ENCODER_FORMAT",
    "find_text_encoder_export",
    "load_clip_pair",
    "load_text_encoder",
    "save_clip_pair",
    "save_text_encoder",
    "tokenizer_from_metadata",
]
