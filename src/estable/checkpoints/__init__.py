"""Checkpoints: safe tensor-file IO, whole-model loading and saving, and checkpoint descriptions.

    read_safetensors / write_safetensors   validated reading, atomic writing (io.py)
    load_tensors                           safetensors, or pickles with allow_pickle=True (weights only)
    sha256_file / short_hash               file hashes; short_hash is A1111's 10-digit "Model hash"
    load_model / save_model / LoadedModel  SD single files (ldm), diffusers folders, Estable files (store.py)
    describe / format_info                 what a checkpoint is, from headers only (info.py)

The key maps between formats live in ``ldm.py`` (single files) and ``diffusers_config.py`` (folder configs).
"""

from .info import describe, format_info
from .io import load_tensors, read_safetensors, read_safetensors_header, sha256_file, short_hash, write_safetensors
from .store import FORMATS, LoadedModel, detect_format, load_model, parse_dtype, save_model

__all__ = [
    "FORMATS",
    "LoadedModel",
    "describe",
    "detect_format",
    "format_info",
    "load_model",
    "load_tensors",
    "parse_dtype",
    "read_safetensors",
    "read_safetensors_header",
    "save_model",
    "sha256_file",
    "short_hash",
    "write_safetensors",
]
