"""`estable train ti`: textual inversion on a tiny frozen model. A few steps lower the held-out loss (fixed draws),
only the vectors change, the exported <token>.safetensors loads through --embeddings-dir and conditions generation
exactly as the trainer's text path did; config errors are one-line EstableErrors."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pytest
import torch

from estable.checkpoints.io import sha256_file
from estable.checkpoints.store import load_model, save_model
from estable.cli_train import add_train_commands
from estable.embeddings import EmbeddingLibrary, load_embedding
from estable.errors import EstableError
from estable.pipeline import Pipeline
from estable.training.config import TITrainConfig, load_config
from estable.training.ti_trainer import NewColourShapes, TITrainer
from test_train_lora import QUIET, make_base

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """tiny-unet's random model with stronger cross-attention, so that the text matters to the U-Net."""
    root = tmp_path_factory.mktemp("ti_base")
    model = load_model(make_base(root / "plain.safetensors"))
    with torch.no_grad():
        for name, p in model.unet.named_parameters():
            if name.endswith(("attn2.to_k.weight", "attn2.to_v.weight")):
                p.mul_(5.0)
            elif name.endswith("attn2.to_out.0.weight"):
                p.mul_(3.0)
    save_model(model, root / "base.safetensors", to="estable")
    return root / "base.safetensors"


def test_config_and_data(tmp_path):
    cfg = load_config("ti", "tiny-ti", ["token=aqua", "colour=[10,200,220]", "num_vectors=2"])
    assert isinstance(cfg, TITrainConfig) and cfg.colour == (10, 200, 220) and cfg.num_vectors == 2
    for bad, words in (("token=\"a:b\"", "token"), ("colour=[1,2]", "colour"), ("num_vectors=0", "num_vectors"),
                       ("init_from=x.safetensors", "init_from")):
        with pytest.raises(EstableError, match=words):
            load_config("ti", "tiny-ti", [bad])
    with pytest.raises(EstableError, match="does not exist"):
        TITrainer(load_config("ti", "tiny-ti", [*QUIET, f"base={tmp_path / 'none.safetensors'}"]), tmp_path / "r")
    data = NewColourShapes("aqua", (10, 200, 220), 32, 50)
    captions = [data[i]["text"] for i in range(12)]
    assert all("aqua" in c and "red" not in c for c in captions)
    assert any(c.startswith(("two", "three", "four")) for c in captions) and any(c.startswith("a") for c in captions)
    pixels = (data[0]["pixel_values"].permute(1, 2, 0).numpy() + 1) * 127.5
    assert np.abs(pixels - np.array([10, 200, 220])).max(axis=-1).min() < 3  # the new colour is painted
    assert data[3]["text"] == data[3]["text"] and torch.equal(data[3]["pixel_values"], data[3]["pixel_values"])


def test_training_lowers_the_loss_and_the_file_conditions_generation(base, tmp_path):
    before = sha256_file(base)
    run = tmp_path / "run"
    overrides = [*QUIET, f"base={base}", "data.size=32", "data.val_size=8", "max_steps=40", "optim.lr=0.05",
                 "num_vectors=2"]
    tr = TITrainer(load_config("ti", "tiny-ti", overrides), run, progress=False)
    frozen = {k: v.clone() for k, v in [*tr.unet.state_dict().items(), *tr.text_encoder.state_dict().items()]}
    start = tr.validate()["loss"]
    init = tr.network.vectors.detach().clone()
    tr.train()
    end = tr.validate()["loss"]
    tr.close()
    assert end < start - 0.01, (start, end)
    assert not torch.allclose(tr.network.vectors, init)
    after = {**tr.unet.state_dict(), **tr.text_encoder.state_dict()}
    assert set(after) == set(frozen) and all(torch.equal(frozen[k], after[k]) for k in frozen)
    assert sha256_file(base) == before

    emb = load_embedding(run / "teal.safetensors")
    assert emb.name == "teal" and torch.equal(emb.vectors, tr.network.vectors.detach())
    # generation: --embeddings-dir RUN gives the context the trainer's text path computes
    model = load_model(base)
    pipe = Pipeline(model)
    pipe.embeddings = EmbeddingLibrary(run)
    cond, _ = pipe.encode_prompts("a large teal star", "", clip_skip=1)
    ids = tr.tokenizer(["a large teal star"])
    with torch.no_grad():
        want = tr.text_encoder.encode(ids, clip_skip=1)
    assert [e.name for e in pipe.used_embeddings] == ["teal"]
    assert torch.allclose(cond, want, atol=1e-6)
    plain, _ = Pipeline(load_model(base)).encode_prompts("a large teal star", "", clip_skip=1)
    assert (plain - cond).abs().max() > 1e-2


def test_cli_train_ti(base, tmp_path, capsys):
    parser = argparse.ArgumentParser()
    add_train_commands(parser.add_subparsers())
    run = tmp_path / "cli"
    args = parser.parse_args(["train", "ti", "--config", "tiny-ti", "--run-dir", str(run), "--no-progress",
                              f"base={base}", "data.size=32", "max_steps=3", "token=aqua", *QUIET])
    assert args.func(args) == 0
    assert f"wrote {run / 'aqua.safetensors'}" in capsys.readouterr().out
    assert load_embedding(run / "aqua.safetensors").vectors.shape == (1, 32)
