"""Decoder-only VAE fine-tuning (``train_encoder=false``) and baking the new decoder into a model
(``estable convert --vae``): the encoder, its latents and the scaling factor must not move, so a U-Net trained on
the old VAE's latents works unchanged with the new decoder."""

from __future__ import annotations

import math

import pytest
import torch

from estable.checkpoints.store import load_model
from estable.cli import main
from estable.errors import EstableError
from estable.training.builders import load_network
from estable.training.config import load_config
from estable.training.vae_trainer import VAETrainer
from test_train_lora import make_base

QUIET = ["log_every=1", "val_every=0", "sample_every=0", "tensorboard=false"]
FROZEN = ("encoder.", "quant_conv.")


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return make_base(tmp_path_factory.mktemp("base") / "base.safetensors")


@pytest.fixture(scope="module")
def finetuned(base, tmp_path_factory):
    """A 3-step decoder fine-tune of the base model's VAE: (run folder, base model)."""
    run = tmp_path_factory.mktemp("ft") / "vae"
    cfg = load_config("vae", "tiny-vae", [*QUIET, f"init_from={base}", "train_encoder=false", "max_steps=3",
                                          "save_every=3", "optim.lr=1e-2", "optim.warmup_steps=0"])
    last = VAETrainer(cfg, run, progress=False).train()
    assert math.isfinite(last["loss"])
    return run, load_model(base)


def test_only_the_decoder_moves_and_the_scaling_factor_is_kept(finetuned):
    run, model = finetuned
    before = model.vae.state_dict()
    cfg, after = load_network("vae", run)
    assert cfg.scaling_factor == model.vae.config.scaling_factor
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    assert moved, "the fine-tune changed nothing"
    assert not any(k.startswith(FROZEN) for k in moved)
    assert all(k.startswith(("decoder.", "post_quant_conv.")) for k in moved)
    assert any(k.startswith("decoder.") for k in moved)


def test_a_frozen_encoder_gets_no_gradient(base, tmp_path):
    cfg = load_config("vae", "tiny-vae", [*QUIET, f"init_from={base}", "train_encoder=false", "save_every=0"])
    tr = VAETrainer(cfg, tmp_path / "vae", progress=False)
    obj = tr.objective
    batch = tr.prepare({"pixel_values": torch.stack([it["pixel_values"] for it in tr.val_items])})
    loss, _ = obj(batch, obj.draw(len(tr.val_items), torch.Generator().manual_seed(0), 32))
    loss.backward()
    for name, p in obj.vae.named_parameters():
        assert (p.grad is None) == name.startswith(FROZEN), name
    assert {id(p) for g in tr.param_groups() for p in g["params"]} == {
        id(p) for n, p in obj.vae.named_parameters() if not n.startswith(FROZEN)}


def test_decoder_finetune_needs_a_starting_vae():
    with pytest.raises(EstableError, match="needs init_from"):
        load_config("vae", "tiny-vae", ["train_encoder=false"])


def test_convert_bakes_in_the_new_decoder(finetuned, base, tmp_path, capsys):
    run, old = finetuned
    _, new_vae = load_network("vae", run)
    ckpt = run / "checkpoints" / "step_0000003" / "model.safetensors"
    out = tmp_path / "baked.safetensors"
    assert main(["convert", str(base), str(out), "--to", "estable", "--vae", str(ckpt)]) == 0
    baked = load_model(out)
    for k, v in baked.vae.state_dict().items():
        torch.testing.assert_close(v, new_vae[k].to(v.dtype), rtol=0, atol=0)
    for name in ("unet", "text_encoder"):  # the rest of the model is untouched
        a, b = getattr(old, name).state_dict(), getattr(baked, name).state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a), name
    assert baked.config.vae == old.config.vae  # the scaling factor the U-Net was trained with
    capsys.readouterr()
    assert main(["convert", str(base), str(tmp_path / "x.safetensors"), "--to", "estable",
                 "--vae", str(tmp_path / "missing.safetensors")]) == 2
    assert "missing.safetensors: no such file" in capsys.readouterr().err
    assert not (tmp_path / "x.safetensors").exists()
