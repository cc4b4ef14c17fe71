"""`estable train lora` on a tiny base model saved by the store: only the adapters train, the base stays bit for
bit, checkpoints hold only LoRA tensors, and the final kohya-named lora.safetensors applied with ``apply_lora`` to a
freshly loaded base reproduces the trained U-Net and text encoder."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import pytest
import torch

from estable.checkpoints.io import read_safetensors, sha256_file
from estable.checkpoints.lora_format import apply_lora, load_lora
from estable.checkpoints.store import LoadedModel, load_model, save_model
from estable.cli_train import add_train_commands
from estable.config import ModelConfig, TokenizerConfig
from estable.errors import EstableError
from estable.models.unet import UNet
from estable.nn.lora import lora_modules
from estable.training.builders import build_text_encoder, build_vae
from estable.training.config import PRESETS, LoRATrainConfig, load_config
from estable.training.lora_trainer import LoRATrainer
from estable.training.runs import load_checkpoint

QUIET = ["log_every=1", "val_every=0", "sample_every=0", "save_every=0", "tensorboard=false"]


pytestmark = pytest.mark.usefixtures("one_thread")


def make_base(path: Path, seed: int = 0) -> Path:
    """A tiny whole model (tiny-unet's U-Net, VAE, text encoder and shapes tokenizer), random weights, written as an
    Estable file by the store."""
    p = PRESETS["tiny-unet"]
    torch.manual_seed(seed)
    unet = UNet(p.model)
    with torch.no_grad():  # move norms and biases off their 1/0 defaults so that mix-ups show
        for prm in unet.parameters():
            if prm.ndim == 1:
                prm.add_(0.1 * torch.randn_like(prm))
    text, tok = build_text_encoder(p.text, seed)
    vae = build_vae(p.vae, seed)
    cfg = ModelConfig(family="estable", unet=p.model, vae=p.vae.config, text=text.config,
                      tokenizer=TokenizerConfig(max_length=tok.max_length, pad_token_id=tok.pad_token_id,
                                                bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id))
    save_model(LoadedModel(cfg, unet, vae, text, tok, source=path, format="estable"), path, to="estable")
    return path


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return make_base(tmp_path_factory.mktemp("base") / "base.safetensors")


def test_config_and_errors(base, tmp_path):
    cfg = load_config("lora", "tiny-lora", [f"base={base}", "lora.rank=2", "lora.targets=unet+text",
                                            "lora.unet_modules=[\"attn2.to_k\"]"])
    assert isinstance(cfg, LoRATrainConfig) and cfg.lora.rank == 2 and cfg.lora.unet_modules == ("attn2.to_k",)
    assert LoRATrainConfig.from_dict(json.loads(cfg.to_json())) == cfg
    for bad, words in (("lora.targets=vae", "lora.targets"), ("lora.rank=0", "lora.rank"),
                       ("lora.dropout=1", "lora.dropout"), ("init_from=x.safetensors", "init_from")):
        with pytest.raises(EstableError, match=words):
            load_config("lora", "tiny-lora", [f"base={base}", bad])
    with pytest.raises(EstableError, match="base=PATH"):
        LoRATrainer(load_config("lora", "tiny-lora", QUIET), tmp_path / "r")
    with pytest.raises(EstableError, match="matches the LoRA targets|no module"):
        LoRATrainer(load_config("lora", "tiny-lora", [*QUIET, f"base={base}", "lora.unet_modules=[\"nope\"]"]),
                    tmp_path / "r2")


def test_trained_lora_reproduces_the_model_on_a_fresh_base(base, tmp_path):
    before = sha256_file(base)
    run = tmp_path / "run"
    parser = argparse.ArgumentParser()
    add_train_commands(parser.add_subparsers())
    args = parser.parse_args(["train", "lora", "--config", "tiny-lora", "--run-dir", str(run), "--no-progress",
                              f"base={base}", "lora.targets=unet+text", "lora.rank=4", "lora.alpha=8",
                              "lora.text_lr=5e-4", "max_steps=6", "log_every=2", "val_every=3", "sample_every=6",
                              "save_every=3", "tensorboard=false", "optim.lr=5e-3"])
    assert args.func(args) == 0
    assert sha256_file(base) == before  # the base file is never written

    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if r["type"] == "train"] == [2, 4, 6]
    assert all(math.isfinite(r["loss"]) for r in log if "loss" in r)
    assert (run / "samples" / "step_0000006.png").is_file()

    # Checkpoints hold the adapters only, under kohya names; the optimizer has one group per network.
    ck = load_checkpoint(run / "checkpoints" / "step_0000006")
    assert set(ck.tensors) == {"model"} and ck.state["kind"] == "lora"
    assert all(k.startswith(("lora_unet_", "lora_te_")) and k.endswith((".lora_down.weight", ".lora_up.weight"))
               for k in ck.tensors["model"])
    groups = ck.state["optimizer"]["param_groups"]
    assert [g["base_lr"] for g in groups] == [5e-3, 5e-4]

    tensors, meta = read_safetensors(run / "lora.safetensors")
    ours = json.loads(meta["estable_lora"])
    assert ours["components"] == ["unet", "text_encoder"] and ours["rank"] == 4 and ours["alpha"] == 8.0
    assert meta["ss_network_dim"] == "4" and meta["ss_network_alpha"] == "8.0"
    for k, v in ck.tensors["model"].items():  # the file holds the checkpoint's tensors, plus α
        assert torch.equal(tensors[k], v), k
    assert len(tensors) == len(ck.tensors["model"]) * 3 // 2

    # The trainer's model, rebuilt by resuming at the last step (no further steps): base + trained adapters.
    trained = LoRATrainer(load_config("lora", str(run / "config.json")), run, resume=True, progress=False)
    assert trained.step == 6
    fresh = load_model(base)
    base_sd = {k: v.clone() for k, v in fresh.unet.state_dict().items()}
    base_text = {k: v.clone() for k, v in fresh.text_encoder.state_dict().items()}
    # Base weights untouched by training: every non-adapter tensor of the trained networks equals the base's.
    for sd, want in ((trained.unet.state_dict(), base_sd), (trained.text_encoder.state_dict(), base_text)):
        plain = {k: v for k, v in sd.items() if ".lora_" not in k}
        assert plain.keys() == want.keys()
        for k, v in plain.items():
            assert torch.equal(v, want[k]), k

    applied = apply_lora(fresh.unet, fresh.text_encoder, load_lora(run / "lora.safetensors"))
    assert len(applied) == len(lora_modules(trained.unet)) + len(lora_modules(trained.text_encoder))
    ids = trained.tokenizer(["a red circle above a blue square", "two green stars"])
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([20, 700])
    for m in (trained.unet, trained.text_encoder, fresh.unet, fresh.text_encoder):
        m.eval()
    with torch.no_grad():
        ctx_trained = trained.text_encoder.encode(ids)
        ctx_fresh = fresh.text_encoder.encode(ids)
        out_trained = trained.unet(x, t, ctx_trained)
        out_fresh = fresh.unet(x, t, ctx_fresh)
        plain = load_model(base)
        out_base = plain.unet(x, t, plain.text_encoder.encode(ids))
    err_ctx = (ctx_trained - ctx_fresh).abs().max().item()
    err = (out_trained - out_fresh).abs().max().item()
    moved = (out_trained - out_base).abs().max().item()
    assert err_ctx <= 1e-6 and err <= 1e-6, (err_ctx, err)
    assert moved > 1e-3, "training must change the model for the comparison to mean anything"


def test_unet_only_with_ema_and_fp16_file(base, tmp_path):
    cfg = load_config("lora", "tiny-lora", [*QUIET, f"base={base}", "max_steps=3", "save_every=3", "ema_decay=0.5",
                                            "lora.save_precision=fp16", "lora.dropout=0.1", "caption_dropout=0.2"])
    tr = LoRATrainer(cfg, tmp_path / "r", progress=False)
    frozen = [n for n, p in tr.objective.named_parameters() if p.requires_grad and ".lora_" not in n]
    assert not frozen and not any(p.requires_grad for p in tr.text_encoder.parameters())
    assert set(tr.ema.shadow) == set(tr.network.state_dict())  # the EMA averages the adapters only
    tr.train()
    tensors, meta = read_safetensors(tmp_path / "r" / "lora.safetensors")
    assert json.loads(meta["estable_lora"])["components"] == ["unet"] and json.loads(meta["estable_lora"])["ema"]
    downs = {k: v for k, v in tensors.items() if not k.endswith(".alpha")}
    assert downs and all(v.dtype == torch.float16 for v in downs.values())
    # the file holds the EMA of the adapters, not the live values
    live = tr.network.state_dict()
    for k, v in downs.items():
        assert torch.equal(v, tr.ema.shadow[k].to(torch.float16)), k
    assert any(not torch.equal(tr.ema.shadow[k], live[k]) for k in live)


def test_fp16_base_file_trains_in_fp32(base, tmp_path):
    """An fp16 base file (as `estable train export --dtype fp16` writes the default model) trains on the CPU: the
    frozen base is loaded in fp32."""
    half = save_model(load_model(base), tmp_path / "half.safetensors", to="estable", dtype="fp16")
    cfg = load_config("lora", "tiny-lora", [*QUIET, f"base={half}", "max_steps=2", "save_every=2"])
    tr = LoRATrainer(cfg, tmp_path / "r", progress=False)
    assert all(p.dtype == torch.float32 for p in tr.unet.parameters())
    tr.train()
    assert (tmp_path / "r" / "lora.safetensors").is_file()
