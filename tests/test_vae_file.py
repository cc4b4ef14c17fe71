"""Swapped VAEs (--vae): LDM- and diffusers-named VAE files, pixel parity with a diffusers pipeline built with the
same VAE, infotext VAE hash / name, and clear errors for a VAE that does not fit."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch

from estable import load_pipeline
from estable.checkpoints.io import write_safetensors
from estable.checkpoints.ldm import vae_key_map
from estable.checkpoints.vae_file import load_vae_into
from estable.cli import main
from estable.errors import CheckpointError
from estable.provenance.infotext import parse_infotext, read_png_metadata

diffusers = pytest.importorskip("diffusers")
from test_extra_networks import CFG, PROMPT, SEED, SIZE, STEPS, _params, _pixels, make_tiny_sd  # noqa: E402

NEGATIVE = "blurry"


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return make_tiny_sd(tmp_path_factory.mktemp("vae_sd"))


@pytest.fixture(scope="module")
def ours(folder):
    return load_pipeline(folder, device="cpu", dtype="fp32")


def _other_vae(channels=(32, 32, 32, 32), seed=5):
    torch.manual_seed(seed)
    vae = diffusers.AutoencoderKL(
        block_out_channels=channels, down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, norm_num_groups=32, layers_per_block=1,
        sample_size=SIZE,
    )
    with torch.no_grad():
        for m in vae.modules():
            if isinstance(m, torch.nn.GroupNorm):
                m.weight.normal_(1.0, 0.3)
                m.bias.normal_(0.0, 0.3)
    return vae.eval()


@pytest.fixture(scope="module")
def vae_files(ours, tmp_path_factory) -> dict:
    """The same fine-tuned VAE as a diffusers folder and as an LDM-named .safetensors (with A1111's extras)."""
    root = tmp_path_factory.mktemp("vaes")
    vae = _other_vae()
    vae.save_pretrained(root / "diffusers_vae", safe_serialization=True)
    sd = vae.state_dict()
    ldm = {}
    for r in vae_key_map(ours.config.vae, prefix=""):
        t = sd[r.key]
        ldm[r.ldm] = t.reshape(r.ldm_shape).clone() if r.op == "conv1x1" else t.clone()
    ldm["model_ema.decay"] = torch.tensor(0.9999)
    ldm["loss.logvar"] = torch.zeros(())
    write_safetensors(root / "ft-mse.safetensors", ldm)
    return {"module": vae, "ldm": root / "ft-mse.safetensors", "diffusers": root / "diffusers_vae"}


def _theirs(folder: Path, vae) -> np.ndarray:
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(folder, vae=vae, local_files_only=True,
                                                             safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        out = pipe(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=STEPS, guidance_scale=CFG, height=SIZE,
                   width=SIZE, generator=[torch.Generator("cpu").manual_seed(SEED)], output_type="np").images
    return (out * 255).round().astype(np.int16)


def test_ldm_file_is_what_diffusers_single_file_reads(folder, vae_files):
    """Oracle for the LDM test file: diffusers' own single-file loader gives back the same VAE."""
    theirs = diffusers.AutoencoderKL.from_single_file(str(vae_files["ldm"]), config=str(folder), subfolder="vae",
                                                      local_files_only=True)
    want = vae_files["module"].state_dict()
    got = theirs.state_dict()
    assert set(got) == set(want) and all(torch.equal(got[k].float(), want[k].float()) for k in want)


@pytest.mark.parametrize("naming", ["ldm", "diffusers"])
def test_swapped_vae_parity_with_diffusers(folder, vae_files, naming):
    pipe = load_pipeline(folder, device="cpu", dtype="fp32")
    own = _pixels(pipe.txt2img(_params(negative_prompt=NEGATIVE)))
    info = pipe.swap_vae(vae_files[naming])
    result = pipe.txt2img(_params(negative_prompt=NEGATIVE))
    got = _pixels(result)
    ref = _theirs(folder, vae_files["module"])
    assert ref.std() > 5
    assert np.abs(ref - got).max() <= 1, f"{np.abs(ref - got).max()} levels"
    assert np.abs(own - got).max() > 20
    file = vae_files["ldm"] if naming == "ldm" else vae_files["diffusers"] / "diffusion_pytorch_model.safetensors"
    sha = hashlib.sha256(file.read_bytes()).hexdigest()
    fields = parse_infotext(result.infotexts[0])["params"]
    assert fields["VAE hash"] == sha[:10] and fields["VAE"] == file.name == info["name"]
    assert list(fields).index("VAE hash") == list(fields).index("Model") + 1  # A1111's order
    assert result.records[0]["vae"]["sha256"] == sha


def test_vae_that_does_not_fit(ours, vae_files, tmp_path):
    before = {k: v.clone() for k, v in ours.vae.state_dict().items()}
    wide = _other_vae(channels=(32, 32, 64, 64))
    wide.save_pretrained(tmp_path / "wide", safe_serialization=True)
    with pytest.raises(CheckpointError, match="does not fit this model's VAE.*wrong shape"):
        ours.swap_vae(tmp_path / "wide")
    write_safetensors(tmp_path / "unet.safetensors", {"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(1)})
    with pytest.raises(CheckpointError, match="does not fit"):
        ours.swap_vae(tmp_path / "unet.safetensors")
    with pytest.raises(CheckpointError, match="no such file"):
        ours.swap_vae(tmp_path / "nope.safetensors")
    after = ours.vae.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before) and ours.vae_info is None


def test_cli_vae_and_from_png(folder, vae_files, tmp_path, capsys):
    out = tmp_path / "a.png"
    args = ["generate", PROMPT, "--model", str(folder), "--device", "cpu", "--steps", "2", "--seed", "5",
            "--size", f"{SIZE}x{SIZE}", "--sampler", "euler"]
    assert main([*args, "--vae", str(vae_files["ldm"]), "--out", str(out)]) == 0
    text, record = read_png_metadata(out)
    assert parse_infotext(text)["params"]["VAE"] == "ft-mse.safetensors"
    assert main(["generate", "--from-png", str(out), "--out", str(tmp_path / "b.png")]) == 0
    assert np.array_equal(_pixels([_open(out)]), _pixels([_open(tmp_path / "b.png")]))
    assert main([*args, "--out", str(tmp_path / "c.png")]) == 0
    assert not np.array_equal(_pixels([_open(out)]), _pixels([_open(tmp_path / "c.png")]))
    capsys.readouterr()
    assert main([*args, "--vae", str(tmp_path / "missing.safetensors"), "--out", str(tmp_path / "d.png")]) == 2
    assert "is not there" in capsys.readouterr().err


def _open(path: Path):
    from PIL import Image

    return Image.open(path)


def test_a_vae_folder_made_for_another_scaling_factor_is_warned_about(folder, ours, vae_files, tmp_path, capsys):
    """An SDXL VAE has SD 1.x's shapes and loads, but its config names another latent scaling factor; the model's
    is kept (as A1111 does), and the user is told."""
    import json
    import shutil

    from estable.checkpoints.vae_file import scaling_note

    same = vae_files["diffusers"]
    cfg = json.loads((same / "config.json").read_text())
    model_vae = ours.config.vae
    ours_factor = model_vae.scaling_factor
    assert cfg["scaling_factor"] == pytest.approx(ours_factor)
    assert scaling_note(same, model_vae) is None
    other = tmp_path / "sdxl_vae"
    shutil.copytree(same, other)
    (other / "config.json").write_text(json.dumps({**cfg, "scaling_factor": 0.13025}))
    args = ["generate", PROMPT, "--model", str(folder), "--device", "cpu", "--steps", "1", "--seed", "5",
            "--size", f"{SIZE}x{SIZE}", "--sampler", "euler"]
    capsys.readouterr()
    weights = other / "diffusion_pytorch_model.safetensors"
    assert main([*args, "--vae", str(weights), "--out", str(tmp_path / "a.png")]) == 0
    err = capsys.readouterr().err
    assert "scaling_factor 0.13025" in err and f"{ours_factor:g}" in err
    assert main([*args, "--vae", str(same), "--out", str(tmp_path / "b.png")]) == 0
    assert "scaling_factor" not in capsys.readouterr().err


def test_another_estable_model_file_gives_its_vae(folder, vae_files, tmp_path):
    """`--vae` with a whole Estable model file takes its autoencoder (and nothing of its U-Net or text encoder)."""
    from estable.checkpoints.store import load_model, save_model

    donor = load_model(folder, dtype="fp32")
    load_vae_into(donor.vae, vae_files["ldm"])
    save_model(donor, tmp_path / "donor.safetensors", to="estable", dtype="fp32")
    pipe = load_pipeline(folder, device="cpu", dtype="fp32")
    unet = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    pipe.swap_vae(tmp_path / "donor.safetensors")
    want, got = vae_files["module"].state_dict(), pipe.vae.state_dict()
    assert set(got) == set(want) and all(torch.equal(got[k], want[k].float()) for k in want)
    assert all(torch.equal(unet[k], v) for k, v in pipe.unet.state_dict().items())
