"""Issue 12's first complaint, as a new user meets it: an SD single file converts to a diffusers folder on a machine
with no $ESTABLE_CLIP_VOCAB, an empty home folder and no open_clip, because CLIP's vocabulary ships in the package."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from estable.checkpoints.store import load_model, save_model
from test_store import make_diffusers_folder

REPO = Path(__file__).resolve().parents[1]


def test_single_file_converts_offline_on_a_fresh_machine(tmp_path):
    pytest.importorskip("diffusers")
    ldm = save_model(load_model(make_diffusers_folder(tmp_path, "sd1")), tmp_path / "sd15.safetensors", to="ldm")
    env = {k: v for k, v in os.environ.items() if k != "ESTABLE_CLIP_VOCAB"}
    env.update(HOME=str(tmp_path / "empty-home"), PYTHONPATH=str(REPO / "src"), HF_HUB_OFFLINE="1")
    out = subprocess.run([sys.executable, "-m", "estable.cli", "convert", str(ldm), str(tmp_path / "out"),
                          "--to", "diffusers"], env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    vocab = json.loads((tmp_path / "out" / "tokenizer" / "vocab.json").read_text())
    assert len(vocab) == 49408 and vocab["<|endoftext|>"] == 49407
