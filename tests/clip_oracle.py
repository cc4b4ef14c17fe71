"""CLIP's real BPE vocabulary as the reference tokenizer's input, shared by the tests.

The files are built from ``bpe_simple_vocab_16e6.txt.gz`` by the published recipe, written out here
independently of the library: 256 byte symbols in GPT-2 order, the same with ``</w>``, the first 48,894
merges joined, then ``<|startoftext|>`` and ``<|endoftext|>`` (49,408 entries).
"""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
N_MERGES = 48_894


PACKAGED_VOCAB = REPO / "src" / "estable" / "assets" / "bpe_simple_vocab_16e6.txt.gz"


def clip_vocab_gz() -> Path | None:
    """$ESTABLE_CLIP_VOCAB (relative to the repository if not absolute), else the copy the package ships."""
    env = os.environ.get("ESTABLE_CLIP_VOCAB")
    p = Path(env) if env else PACKAGED_VOCAB
    p = p if p.is_absolute() else REPO / p
    return p if p.is_file() else None


def require_clip_vocab() -> Path:
    p = clip_vocab_gz()
    if p is None:
        pytest.skip("CLIP vocabulary not found: src/estable/assets/ lacks it and ESTABLE_CLIP_VOCAB is not set")
    return p


def gpt2_byte_symbols() -> list[str]:
    """GPT-2's 256 byte symbols in vocabulary order: printable bytes as themselves, then the rest as chr(256 + k)."""
    keep = [b for b in range(256) if 33 <= b <= 126 or 161 <= b <= 172 or 174 <= b <= 255]
    moved = [b for b in range(256) if b not in keep]
    table = {b: chr(b) for b in keep} | {b: chr(256 + k) for k, b in enumerate(moved)}
    return [table[b] for b in keep + moved]


def write_clip_vocab(folder: Path, gz: Path | None = None) -> Path:
    """Write ``vocab.json`` and ``merges.txt`` into ``folder`` (created); returns the folder."""
    with gzip.open(gz or require_clip_vocab(), "rt", encoding="utf-8") as f:
        merges = [tuple(line.split()) for line in f.read().split("\n")[1 : N_MERGES + 1]]
    symbols = gpt2_byte_symbols()
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    assert len(vocab) == 49408
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
    return folder
