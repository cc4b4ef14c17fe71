"""Training-speed options of the trainers: channels_last, fused AdamW switch, compile of the whole network or of
its blocks. Each must train the same numbers as the plain eager run (losses of the first steps, CPU, fp32)."""

from __future__ import annotations

import json

import pytest
import torch

from estable.errors import EstableError
from estable.training.config import load_config
from estable.training.unet_trainer import UNetTrainer

pytestmark = pytest.mark.usefixtures("one_thread")

QUIET = ["log_every=1", "val_every=0", "sample_every=0", "save_every=0", "tensorboard=false", "max_steps=3",
         "device=cpu", "batch_size=2", "optim.warmup_steps=0", "optim.lr=1e-3"]


def _losses(tmp_path, name: str, *over: str) -> list[float]:
    cfg = load_config("unet", "tiny-unet", [*QUIET, *over])
    trainer = UNetTrainer(cfg, tmp_path / name, progress=False)
    trainer.train()
    return [json.loads(line)["loss"] for line in (tmp_path / name / "log.jsonl").read_text().splitlines()
            if json.loads(line).get("type") == "train"]


def test_options_validate():
    with pytest.raises(EstableError, match="compile_scope"):
        load_config("unet", "tiny-unet", ["compile_scope=region"])
    with pytest.raises(EstableError, match="compile_mode"):
        load_config("unet", "tiny-unet", ["compile_mode=max-autotune"])
    with pytest.raises(EstableError, match="needs compile_scope=whole"):
        load_config("unet", "tiny-unet", ["compile_mode=reduce-overhead", "compile_scope=blocks"])
    cfg = load_config("unet", "tiny-unet", ["channels_last=true", "optim.fused=false", "compile_scope=blocks"])
    assert cfg.channels_last and not cfg.optim.fused and cfg.compile_scope == "blocks"


def test_channels_last_trains_the_same_numbers(tmp_path):
    eager = _losses(tmp_path, "eager")
    cl = _losses(tmp_path, "cl", "channels_last=true")
    assert len(eager) == 3 and len(set(eager)) == 3  # three distinct steps were logged
    assert max(abs(a - b) for a, b in zip(eager, cl)) < 1e-5 * max(map(abs, eager))
    t = UNetTrainer(load_config("unet", "tiny-unet", [*QUIET, "channels_last=true"]), tmp_path / "x", progress=False)
    assert t.network.conv_in.weight.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.heavy
@pytest.mark.parametrize("scope", ["whole", "blocks"])
def test_compiled_step_gives_the_eager_losses(tmp_path, monkeypatch, scope):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    eager = _losses(tmp_path, "eager")
    compiled = _losses(tmp_path, "compiled", "compile=true", f"compile_scope={scope}")
    assert max(abs(a - b) for a, b in zip(eager, compiled)) < 1e-4 * max(map(abs, eager))


def test_vae_compile_compiles_the_encoder_and_decoder(tmp_path):
    """The VAE objective calls encode() and decode(): compiling the whole module's forward would compile nothing."""
    from estable.training.vae_trainer import VAETrainer

    cfg = load_config("vae", "tiny-vae", ["device=cpu", "compile=true", "tensorboard=false"])
    trainer = VAETrainer(cfg, tmp_path / "vae", progress=False)
    assert trainer.objective.vae is trainer.network
    for part in (trainer.network.encoder, trainer.network.decoder):
        assert part._compiled_call_impl is not None


def test_compile_mode_reaches_torch_compile(tmp_path, monkeypatch):
    """compile_mode=reduce-overhead (CUDA graphs, which only a GPU replays) is handed to torch.compile."""
    seen = []
    monkeypatch.setattr(torch, "compile", lambda module, **kw: seen.append(kw) or module)
    cfg = load_config("unet", "tiny-unet", [*QUIET, "compile=true", "compile_mode=reduce-overhead"])
    UNetTrainer(cfg, tmp_path / "ro", progress=False)
    assert seen == [{"mode": "reduce-overhead"}]
