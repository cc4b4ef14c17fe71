"""`estable train clip` on tiny CPU configs: the config and tokenizer choices, a run through the CLI that logs
retrieval metrics and writes the tokenizer, the pair and the text-tower exports, exports that reload to the same
functions, the logit-scale clamp, a fixed batch the objective learns, and a U-Net run on the exported text tower."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import pytest
import torch

from clip_oracle import require_clip_vocab
from estable.cli_train import add_train_commands
from estable.errors import CheckpointError, EstableError
from estable.models.clip import DEFAULT_MAX_LOGIT_SCALE
from estable.tokenizer import CLIPTokenizer
from estable.training.builders import collate
from estable.training.clip_exports import find_text_encoder_export, load_clip_pair, load_text_encoder
from estable.training.clip_trainer import CLIPTrainer, caption_sample
from estable.training.config import CLIPTrainConfig, load_config
from estable.training.runs import load_checkpoint
from estable.training.unet_trainer import UNetTrainer

REPO = Path(__file__).resolve().parents[1]
QUIET = ["log_every=1", "val_every=0", "sample_every=0", "save_every=0", "tensorboard=false"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def clip_run(tmp_path_factory) -> Path:
    """A 6-step tiny CLIP run through the CLI (validation, a retrieval picture, two checkpoints)."""
    run = tmp_path_factory.mktemp("clip") / "run"
    parser = argparse.ArgumentParser()
    add_train_commands(parser.add_subparsers())
    args = parser.parse_args(["train", "clip", "--config", "tiny-clip", "--run-dir", str(run), "--no-progress",
                              "max_steps=6", "log_every=2", "val_every=3", "sample_every=6", "save_every=3",
                              "tensorboard=false", "ema_decay=0.9"])
    assert args.func(args) == 0
    return run


# ------------------------------------------------------------------------------------------------ config


def test_config_presets_and_errors():
    cfg = load_config("clip", "tiny-clip", ["model.embed_dim=16", "model.text.width=48", "model.text.heads=3"])
    assert isinstance(cfg, CLIPTrainConfig)
    assert cfg.model.text.projection_dim == 16  # follows embed_dim
    assert CLIPTrainConfig.from_dict(json.loads(cfg.to_json())) == cfg
    with pytest.raises(EstableError, match="max_positions"):
        load_config("clip", "tiny-clip", ["max_length=64"])
    with pytest.raises(EstableError, match="duplicates"):
        load_config("clip", "tiny-clip", ["duplicates=maybe"])
    with pytest.raises(EstableError, match="for the clip trainer"):
        load_config("unet", "tiny-clip")
    with pytest.raises(EstableError, match="not 'learn', 'clip' or a folder"):
        CLIPTrainer(load_config("clip", "tiny-clip", [*QUIET, "tokenizer=/no/such/folder"]), "/tmp/unused-run")
    with pytest.raises(EstableError, match="strategy"):
        load_config("clip", "tiny-clip", ["strategy=zero"])
    with pytest.raises(EstableError, match="use strategy=ddp"):  # accepted by the config, refused clearly
        CLIPTrainer(load_config("clip", "tiny-clip", [*QUIET, "strategy=fsdp"]), "/tmp/unused-run")


def test_caption_sample_from_a_folder_excludes_validation(tmp_path):
    from estable.training.shapes import write_folder

    write_folder(tmp_path / "data", 6, size=32, progress=False)
    records = [json.loads(line) for line in (tmp_path / "data" / "metadata.jsonl").read_text().splitlines()]
    cfg = load_config("clip", "tiny-clip", [f"data.source={tmp_path / 'data'}", "data.val_size=2"])
    assert caption_sample(cfg, 100) == [r["text"] for r in records[:4]]
    assert caption_sample(cfg, 3) == [r["text"] for r in records[:3]]


def test_real_clip_vocabulary(tmp_path, monkeypatch):
    monkeypatch.setenv("ESTABLE_CLIP_VOCAB", str(require_clip_vocab()))
    tr = CLIPTrainer(load_config("clip", "tiny-clip", [*QUIET, "tokenizer=clip", "max_steps=1"]), tmp_path / "r",
                     progress=False)
    assert tr.pair_config.text.vocab_size == 49408 and tr.pair_config.text.eos_token_id == 49407
    assert tr.config.model.text.vocab_size == 49408  # the resolved config records it
    assert tr.tokenizer(["a red circle"]).shape == (1, 32)


# ------------------------------------------------------------------------------------------------ the run


def test_run_logs_retrieval_and_writes_exports(clip_run):
    cfg = json.loads((clip_run / "config.json").read_text())
    tok = CLIPTokenizer.from_folder(clip_run / "tokenizer")
    # The vocabulary was learned from shapes captions: far below the cap of 1024, and it sizes the text tower.
    assert 514 < tok.vocab_size < 1024
    assert cfg["model"]["text"]["vocab_size"] == tok.vocab_size and cfg["model"]["text"]["eos_token_id"] == \
        tok.eos_token_id
    log = [json.loads(line) for line in (clip_run / "log.jsonl").read_text().splitlines()]
    train = [r for r in log if r["type"] == "train"]
    val = [r for r in log if r["type"] == "val"]
    assert [r["step"] for r in train] == [2, 4, 6] and [r["step"] for r in val] == [3, 6]
    for r in train + val:
        assert math.isfinite(r["loss"]) and 0 <= r["acc_i2t"] <= 1 and 0 <= r["acc_t2i"] <= 1
        assert 0 < r["acc_chance"] <= 1 and 1 <= r["logit_scale"] <= 100
    assert (clip_run / "samples" / "step_0000006.png").is_file()  # the retrieval picture
    from PIL import Image

    with Image.open(clip_run / "samples" / "step_0000006.png") as im:  # 16 validation rows × (1 + 16) cells
        assert im.size == (17 * 32, 16 * 32)

    ck = load_checkpoint(clip_run / "checkpoints" / "step_0000006")
    assert set(ck.tensors) == {"model", "ema"} and ck.state["kind"] == "clip"
    pair, pair_tok = load_clip_pair(clip_run / "clip.safetensors")
    assert pair_tok.encoder == tok.encoder and pair_tok.merges == tok.merges
    assert json.loads(ck.metadata["model"]["config"]) == pair.config.to_dict()
    # The exports hold the EMA weights (the checkpoint keeps both).
    for k, v in pair.state_dict().items():
        assert torch.equal(v, ck.tensors["ema"][k]), k
    assert any(not torch.equal(ck.tensors["ema"][k], ck.tensors["model"][k]) for k in ck.tensors["ema"])

    enc, enc_tok = load_text_encoder(clip_run / "text_encoder.safetensors")
    assert find_text_encoder_export(clip_run) == clip_run / "text_encoder.safetensors"
    assert find_text_encoder_export(clip_run / "clip.safetensors") is None
    ids = enc_tok(["a red circle above a blue square", "three green stars", ""])
    assert torch.equal(ids, tok(["a red circle above a blue square", "three green stars", ""]))
    with torch.no_grad():
        ours = enc(ids)
        theirs = pair.text(ids)
    assert torch.equal(ours.last_hidden_state, theirs.last_hidden_state)
    assert torch.equal(ours.text_embeds, theirs.text_embeds)
    with pytest.raises(EstableError, match="text.max_length=32"):
        load_text_encoder(clip_run / "text_encoder.safetensors", max_length=77)
    with pytest.raises(CheckpointError, match="not an estable-text-encoder"):
        load_text_encoder(clip_run / "clip.safetensors")


def test_logit_scale_is_clamped_after_each_step(tmp_path):
    tr = CLIPTrainer(load_config("clip", "tiny-clip", [*QUIET, "max_steps=1"]), tmp_path / "r", progress=False)
    with torch.no_grad():
        tr.network.logit_scale.fill_(7.0)  # exp(7) ≈ 1097 > 100
    tr.train()
    assert tr.network.logit_scale.item() == pytest.approx(DEFAULT_MAX_LOGIT_SCALE, abs=1e-6)


def test_objective_learns_a_fixed_batch(tmp_path):
    """16 held-out pairs, 40 AdamW steps: the loss falls below a third and retrieval becomes near perfect."""
    tr = CLIPTrainer(load_config("clip", "tiny-clip", [*QUIET, "max_steps=1"]), tmp_path / "r", progress=False)
    batch = tr.prepare(collate(tr.val_items[:16]))
    opt = torch.optim.AdamW(tr.network.parameters(), lr=3e-3)
    losses, metrics = [], {}
    for _ in range(40):
        loss, metrics = tr.objective(batch, {})
        opt.zero_grad()
        loss.backward()
        opt.step()
        tr.network.clamp_logit_scale_()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < losses[0] / 3, losses
    assert metrics["acc_i2t"] >= 0.9 and metrics["acc_t2i"] >= 0.9, metrics
    assert metrics["acc_chance"] < 0.2


# ------------------------------------------------------------------------------------------------ into the U-Net


def test_unet_trains_on_the_exported_text_tower(clip_run, tmp_path):
    over = [*QUIET, "max_steps=2", "save_every=2", "sample_every=2"]
    for source in (clip_run / "text_encoder.safetensors", clip_run):
        name = "file" if source.is_file() else "folder"
        cfg = load_config("unet", "tiny-unet", [*over, f"text.source={source}"])
        tr = UNetTrainer(cfg, tmp_path / name, progress=False)
        enc, tok = load_text_encoder(clip_run / "text_encoder.safetensors", max_length=32)
        for k, v in enc.state_dict().items():
            assert torch.equal(tr.text_encoder.state_dict()[k], v), k
        assert tr.tokenizer.encoder == tok.encoder and tr.tokenizer.max_length == 32
        assert not any(p.requires_grad for p in tr.text_encoder.parameters())  # frozen
        last = tr.train()
        assert math.isfinite(last["loss"]) and (tmp_path / name / "samples" / "step_0000002.png").is_file()
    with pytest.raises(EstableError, match="text.max_length=32"):
        UNetTrainer(load_config("unet", "tiny-unet", [*over, f"text.source={clip_run}", "text.max_length=77"]),
                    tmp_path / "too-long", progress=False)
