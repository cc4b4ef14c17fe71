"""The U-Net trainer with the text encoder trained jointly (text.train) and with a chosen shapes-world kind mix.

Issue 11: a contrastive text tower hardly encodes relations; training it with the U-Net's loss is one of the
remedies compared. These tests pin the mechanics: the text encoder learns only when asked (with its own learning
rate), its weights and EMA are checkpointed and resume exactly, and `train export` writes the trained copy.
"""

from __future__ import annotations

import pytest
import torch

from estable.checkpoints.store import load_model
from estable.training.assemble import assemble_model
from estable.training.builders import build_datasets
from estable.training.config import load_config
from estable.training.runs import load_checkpoint
from estable.training.shapes import parse_caption
from estable.training.unet_trainer import UNetTrainer

pytestmark = pytest.mark.usefixtures("one_thread")

QUIET = ["log_every=1", "val_every=0", "sample_every=0", "save_every=0", "tensorboard=false", "batch_size=2"]


def _trainer(tmp_path, *over: str, name: str = "run", resume: bool = False) -> UNetTrainer:
    return UNetTrainer(load_config("unet", "tiny-unet", [*QUIET, *over]), tmp_path / name, resume=resume,
                       progress=False)


def _text_state(tr: UNetTrainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in tr.text_encoder.state_dict().items()}


def test_text_encoder_frozen_by_default_and_trained_when_asked(tmp_path):
    frozen = _trainer(tmp_path, "max_steps=2", name="frozen")
    before = _text_state(frozen)
    frozen.train()
    assert all(torch.equal(v, before[k]) for k, v in frozen.text_encoder.state_dict().items())
    assert len(frozen.optimizer.param_groups) == 1

    joint = _trainer(tmp_path, "max_steps=2", "text.train=true", "text.lr=1e-3", name="joint")
    before = _text_state(joint)
    groups = joint.optimizer.param_groups
    assert [g["base_lr"] for g in groups] == [joint.config.optim.lr, 1e-3]
    assert {id(p) for p in groups[1]["params"]} == {id(p) for p in joint.text_encoder.parameters()}
    joint.train()
    changed = [k for k, v in joint.text_encoder.state_dict().items() if not torch.equal(v, before[k])]
    assert changed, "the text encoder did not learn with text.train=true"


def test_joint_text_checkpoint_resume_and_export(tmp_path):
    over = ["max_steps=4", "save_every=2", "text.train=true", "text.lr=1e-3", "ema_decay=0.9", "caption_dropout=0.3"]
    _trainer(tmp_path, *over, name="full").train()
    _trainer(tmp_path, *over, name="split").train(until=2)
    _trainer(tmp_path, *over, name="split", resume=True).train()

    a = load_checkpoint(tmp_path / "full/checkpoints/step_0000004")
    b = load_checkpoint(tmp_path / "split/checkpoints/step_0000004")
    assert {"model", "ema", "text_encoder", "text_encoder_ema"} <= set(a.tensors)
    for name in ("model", "ema", "text_encoder", "text_encoder_ema"):
        for k, v in a.tensors[name].items():
            assert torch.equal(v, b.tensors[name][k]), f"{name}.{k} differs after resume"

    # the EMA of the text encoder trails its live weights
    live, ema = a.tensors["text_encoder"], a.tensors["text_encoder_ema"]
    assert any(not torch.equal(live[k], ema[k]) for k in live)

    out = assemble_model(tmp_path / "full", tmp_path / "model.safetensors", dtype=None)
    exported = load_model(out).text_encoder.state_dict()
    assert all(torch.equal(exported[k], ema[k]) for k in ema), "export must carry the trained text encoder's EMA"


def test_shapes_kind_mix(tmp_path):
    cfg = load_config("unet", "tiny-unet", [*QUIET])
    cfg = cfg.replace(data=cfg.data.replace(shapes_kinds={"pair": 1.0}))
    train, _ = build_datasets(cfg, 0, 1)
    kinds = {parse_caption(train[i]["text"]).kind for i in range(12)}
    assert kinds == {"pair"}
    with pytest.raises(ValueError, match="shapes_kinds"):
        cfg.data.replace(shapes_kinds={"pairs": 1.0})


def test_shapes_named_background_odds(tmp_path):
    cfg = load_config("unet", "tiny-unet", [*QUIET, "data.shapes_named_backgrounds={\"textured\": 1}"])
    train, _ = build_datasets(cfg, 0, 1)
    named = [spec.background.kind for spec in (parse_caption(train[i]["text"]) for i in range(60))
             if spec.background is not None]
    assert named and set(named) == {"textured"}
    with pytest.raises(ValueError, match="shapes_named_backgrounds"):
        cfg.data.replace(shapes_named_backgrounds={"striped": 1.0})


def test_shapes_grey_named_reaches_the_world():
    cfg = load_config("unet", "tiny-unet", [*QUIET, "data.shapes_grey_named=1"])
    train, _ = build_datasets(cfg, 0, 1)
    specs = [parse_caption(train[i]["text"]) for i in range(40)]
    assert all(s.background is not None for s in specs) and any(s.background.colour == "grey" for s in specs)
    with pytest.raises(ValueError, match="shapes_grey_named"):
        cfg.data.replace(shapes_grey_named=-0.1)


def test_shapes_relation_axis_ratio_reaches_the_world():
    cfg = load_config("unet", "tiny-unet", [*QUIET, "data.shapes_relation_axis_ratio=1.5"])
    train, _ = build_datasets(cfg, 0, 1)
    assert train.world.relation_axis_ratio == 1.5
    with pytest.raises(ValueError, match="shapes_relation_axis_ratio"):
        cfg.data.replace(shapes_relation_axis_ratio=0.8)
