"""Models Estable trains load in diffusers unchanged (issue 16).

The built-in model and a tiny model trained here (a CLIP pair, then a U-Net on its text tower, a few steps each)
are exported with ``save_model`` to a diffusers folder and to an SD single file; diffusers 0.42 loads them with
nothing beyond the path (``from_pretrained(folder)``; ``from_single_file(file, config=folder)``, the folder being
the offline stand-in for the Hub config) and must draw Estable's pixels: fp32 on the CPU, DPM++ 2M Karras, the
same seed, ≤ 1 level of 255. Before the fix the folder declared CLIPTextModelWithProjection (whose first output is
the pooled projection, so the pipeline failed at its first prompt), and the fp16 weights of the built-in model
loaded as a fp16 text encoder beside a fp32 U-Net.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from estable import GenerationParams, load_pipeline
from estable.checkpoints.io import read_safetensors
from estable.checkpoints.store import load_model, save_model
from estable.pipeline import default_model_path
from estable.training.assemble import assemble_model
from estable.training.clip_trainer import CLIPTrainer
from estable.training.config import load_config
from estable.training.unet_trainer import UNetTrainer

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")
logging.getLogger("diffusers").setLevel(logging.ERROR)

pytestmark = pytest.mark.usefixtures("one_thread")

QUIET = ["log_every=1", "val_every=0", "sample_every=0", "save_every=0", "tensorboard=false", "device=cpu"]
PROMPT = "a red circle above a blue square"
SEED, STEPS, CFG = 3, 6, 5.0
TOL = 1  # max |Δ| in 8-bit levels


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A model trained here: 2 CLIP steps, then 2 U-Net steps on the CLIP's text tower, assembled in fp32."""
    root = tmp_path_factory.mktemp("trained")
    clip = CLIPTrainer(load_config("clip", "tiny-clip", [*QUIET, "max_steps=2"]), root / "clip", progress=False)
    clip.train()
    clip.close()
    unet = UNetTrainer(load_config("unet", "tiny-unet", [*QUIET, "max_steps=2", f"text.source={root / 'clip'}"]),
                       root / "unet", progress=False)
    unet.train()
    unet.close()
    return assemble_model(root / "unet", root / "model.safetensors", dtype="fp32")


@pytest.fixture(scope="module")
def models(trained) -> dict[str, tuple[Path, int]]:
    """name -> (Estable file, image side in pixels)."""
    return {"default": (default_model_path(), 64), "trained": (trained, 32)}


@pytest.fixture(scope="module")
def exports(models, tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    """name -> (diffusers folder, LDM single file), written from the Estable file as `estable convert` does."""
    root = tmp_path_factory.mktemp("exports")
    out = {}
    for name, (path, _size) in models.items():
        model = load_model(path)
        out[name] = (save_model(model, root / name, to="diffusers"),
                     save_model(model, root / f"{name}.safetensors", to="ldm"))
    return out


def _estable_pixels(path: Path, size: int) -> tuple[np.ndarray, str]:
    """The image and the prompt it was drawn from: the request's, completed as the model's file asks (the built-in
    model's names its grey background; estable.prompt_completion), which is what diffusers is then given."""
    pipe = load_pipeline(path, dtype="fp32")
    params = GenerationParams(prompt=PROMPT, negative_prompt="", sampler="dpmpp_2m_karras", steps=STEPS,
                              cfg_scale=CFG, seed=SEED, width=size, height=size)
    return np.asarray(pipe.txt2img(params)[0].convert("RGB")), pipe.completed_prompt(params, SEED)


def _diffusers_pixels(pipe, size: int, prompt: str) -> np.ndarray:
    pipe.scheduler = diffusers.DPMSolverMultistepScheduler.from_config(pipe.scheduler.config, use_karras_sigmas=True)
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        image = pipe(prompt, negative_prompt="", num_inference_steps=STEPS, guidance_scale=CFG, width=size,
                     height=size, generator=[torch.Generator("cpu").manual_seed(SEED)], output_type="np").images[0]
    return (image * 255).round().astype(np.uint8)


@pytest.mark.parametrize("layout", ["folder", "single_file"])
@pytest.mark.parametrize("name", ["default", "trained"])
def test_exports_run_in_diffusers_unchanged(models, exports, name, layout):
    path, size = models[name]
    folder, single = exports[name]
    if layout == "folder":
        pipe = diffusers.StableDiffusionPipeline.from_pretrained(folder)
    else:
        pipe = diffusers.StableDiffusionPipeline.from_single_file(single, config=str(folder))
    assert type(pipe.text_encoder) is transformers.CLIPTextModel
    assert {pipe.unet.dtype, pipe.vae.dtype, pipe.text_encoder.dtype} == {torch.float32}
    ours, prompt = _estable_pixels(path, size)
    assert (prompt != PROMPT) == (name == "default")  # only the built-in model's file names a completion
    ref = _diffusers_pixels(pipe, size, prompt)
    assert ref.std() > 5, "degenerate image: the comparison would mean nothing"
    diff = int(np.abs(ref.astype(np.int16) - ours.astype(np.int16)).max())
    assert diff <= TOL, f"{name} {layout}: max pixel difference {diff} > {TOL}"


@pytest.mark.parametrize("name", ["default", "trained"])
def test_projection_kept_beside_the_text_encoder_and_read_back(models, exports, name):
    """The CLIP pair's text projection is not part of CLIPTextModel: it sits in text_projection.safetensors, which
    Estable reads back, so Estable → diffusers → Estable and Estable → LDM → Estable lose nothing."""
    path, _ = models[name]
    folder, single = exports[name]
    original = load_model(path)
    assert original.config.text.projection_dim is not None  # both are text towers of CLIP pairs
    assert json.loads((folder / "model_index.json").read_text())["text_encoder"] == ["transformers", "CLIPTextModel"]
    assert json.loads((folder / "text_encoder" / "config.json").read_text())["architectures"] == ["CLIPTextModel"]
    main, _ = read_safetensors(folder / "text_encoder" / "model.safetensors")
    assert "text_projection.weight" not in main
    for back in (load_model(folder), load_model(single)):
        assert back.config.text == original.config.text
        ours, theirs = original.state_dicts(), back.state_dicts()
        for comp in ours:
            assert ours[comp].keys() == theirs[comp].keys()
            assert all(torch.equal(ours[comp][k], theirs[comp][k]) for k in ours[comp]), comp


def test_folders_of_the_old_export_still_load(exports, tmp_path):
    """Folders written before the fix (CLIPTextModelWithProjection, projection inside model.safetensors) load."""
    import shutil

    folder = shutil.copytree(exports["trained"][0], tmp_path / "old")
    te = folder / "text_encoder"
    main, _ = read_safetensors(te / "model.safetensors")
    proj, _ = read_safetensors(te / "text_projection.safetensors")
    from estable.checkpoints.io import write_safetensors

    write_safetensors(te / "model.safetensors", {**main, **proj}, {"format": "pt"})
    (te / "text_projection.safetensors").unlink()
    cfg = json.loads((te / "config.json").read_text())
    (te / "config.json").write_text(json.dumps({**cfg, "architectures": ["CLIPTextModelWithProjection"]}))
    old = load_model(folder)
    new = load_model(exports["trained"][0])
    assert old.config.text == new.config.text
    assert torch.equal(old.text_encoder.text_projection.weight, new.text_encoder.text_projection.weight)
