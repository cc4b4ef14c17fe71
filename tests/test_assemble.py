"""A U-Net training run assembled with its frozen VAE and text encoder into one model file that generates."""

from __future__ import annotations

import pytest
import torch

from estable.checkpoints.io import read_safetensors
from estable.checkpoints.store import load_model
from estable.errors import EstableError
from estable.params import GenerationParams
from estable.pipeline import load_pipeline
from estable.training.assemble import assemble_model
from estable.training.config import load_config
from estable.training.runs import latest_checkpoint
from estable.training.unet_trainer import UNetTrainer

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("assemble") / "run"
    over = ["max_steps=2", "log_every=1", "val_every=0", "sample_every=0", "save_every=0", "tensorboard=false",
            "device=cpu"]
    trainer = UNetTrainer(load_config("unet", "tiny-unet", over), root, progress=False)
    trainer.train()
    trainer.close()
    return root


def test_assembled_model_holds_the_runs_networks_and_generates(run, tmp_path):
    out = assemble_model(run, tmp_path / "model.safetensors", dtype="fp32")
    model = load_model(out)
    ema, _ = read_safetensors(latest_checkpoint(run / "checkpoints") / "ema.safetensors")
    assert all(torch.equal(model.unet.state_dict()[k], v) for k, v in ema.items())  # the EMA weights, exactly
    assert model.config.family == "estable" and model.config.tokenizer.max_length == 32  # a short text window

    pipe = load_pipeline(out, device="cpu", dtype="fp32")
    # longer than one 30-token window: encoded in chunks of the tokenizer's length, not CLIP's 77
    long = ", ".join(["a red circle above a blue square"] * 6)
    params = GenerationParams(prompt=long, negative_prompt="", steps=2, seed=3, width=32, height=32,
                              sampler="euler")
    cond, _ = pipe.encode_prompts(long, "", clip_skip=1)
    assert cond.shape[1] % 32 == 0 and cond.shape[1] > 32
    result = pipe.txt2img(params)
    assert result.images[0].size == (32, 32)


def test_assemble_refuses_a_folder_that_is_not_a_run(tmp_path):
    with pytest.raises(EstableError, match="not a training run"):
        assemble_model(tmp_path, tmp_path / "m.safetensors")


@pytest.mark.parametrize("where, message", [("unet", "U-Net produced NaN"), ("vae", "VAE decoder produced NaN")])
def test_corrupt_weights_are_an_error_not_a_black_image(run, tmp_path, where, message):
    pipe = load_pipeline(assemble_model(run, tmp_path / "model.safetensors", dtype="fp32"), device="cpu",
                         dtype="fp32")
    net = pipe.unet if where == "unet" else pipe.vae.decoder
    with torch.no_grad():
        net.conv_out.bias[0] = float("nan")
    params = GenerationParams(prompt="a red circle", steps=2, seed=1, width=32, height=32, sampler="euler")
    with pytest.raises(EstableError, match=message):
        pipe.txt2img(params)
