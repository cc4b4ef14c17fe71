"""The generation commands through ``estable.cli.main``: generate → png-info → --from-png, img2img, inpaint,
one-line errors, and a --help that documents every option. Tiny random model from test_pipeline (CPU, fp32)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import estable.pipeline
from estable.cli_generate import parse_size
from estable.errors import EstableError

sys.path.insert(0, str(Path(__file__).parent))
from test_pipeline import SIZE, folders  # noqa: E402, F401  (the session fixture building the tiny models)

pytest.importorskip("diffusers")

COMMON_OPTIONS = ["--negative", "--model", "--sampler", "--steps", "--cfg", "--seed", "--size", "--batch",
                  "--batch-count", "--clip-skip", "--no-weighting", "--eta", "--out", "--device", "--dtype",
                  "--allow-pickle", "--from-png", "--cfg-start"]


@pytest.fixture(scope="module")
def model(folders) -> Path:  # noqa: F811
    return folders["epsilon"]


def _pixels(path: Path | str) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def test_generate_png_info_from_png_round_trip(run, model, tmp_path):
    out = tmp_path / "first.png"
    status, stdout, err = run("generate", "a red cube, (shiny:1.2)", "--negative", "blurry", "--model", model,
                              "--sampler", "Euler a", "--steps", 4, "--cfg", 5, "--cfg-start", 0.3, "--seed", 42,
                              "--size", "64x64", "--device", "cpu", "--dtype", "fp32", "--out", out)
    assert status == 0, err
    assert stdout.strip() == str(out) and out.is_file()

    status, info, err = run("png-info", out)
    assert status == 0, err
    text, _, record_json = info.partition("\n\n")
    assert text.startswith("a red cube, (shiny:1.2)\nNegative prompt: blurry\nSteps: 4, Sampler: Euler a, ")
    assert "Seed: 42" in text and "Size: 64x64" in text and "CFG scale: 5, CFG start: 0.3" in text
    record = json.loads(record_json)
    assert record["params"]["seed"] == 42 and record["params"]["sampler"] == "euler_a"
    assert record["params"]["cfg_start"] == 0.3
    assert record["model"]["source"] == str(model)

    # Every parameter (and the model) from the record: the identical image, byte for byte in pixels.
    again = tmp_path / "again.png"
    status, stdout, err = run("generate", "--from-png", out, "--out", again)
    assert status == 0, err
    assert np.array_equal(_pixels(again), _pixels(out))

    # An explicit flag overrides the record.
    other = tmp_path / "other.png"
    status, _, err = run("generate", "--from-png", out, "--seed", 43, "--out", other)
    assert status == 0, err
    assert np.abs(_pixels(other).astype(int) - _pixels(out).astype(int)).max() > 10
    _, info, _ = run("png-info", other)
    assert "Seed: 43" in info and "a red cube, (shiny:1.2)" in info


def test_batch_into_numbered_folder(run, model, tmp_path):
    folder = tmp_path / "outs"
    argv = ["generate", "x", "--model", model, "--steps", 2, "--seed", 5, "--batch", 2, "--batch-count", 2,
            "--device", "cpu", "--out", folder]
    status, stdout, err = run(*argv)
    assert status == 0, err
    assert [Path(p).name for p in stdout.split()] == ["00000-5.png", "00001-6.png", "00002-7.png", "00003-8.png"]
    status, stdout, _ = run(*argv[:-1], folder)
    assert [Path(p).name for p in stdout.split()][0] == "00004-5.png"


def test_img2img_and_inpaint(run, model, tmp_path, folders):  # noqa: F811
    image = tmp_path / "in.png"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)).save(image)
    mask = tmp_path / "mask.png"
    m = np.zeros((SIZE, SIZE), dtype=np.uint8)
    m[:, : SIZE // 2] = 255
    Image.fromarray(m).save(mask)
    base = ["--steps", 4, "--seed", 1, "--device", "cpu"]
    status, _, err = run("img2img", "a cat", "--image", image, "--strength", 0.5, "--model", model, *base,
                         "--out", tmp_path / "i2i.png")
    assert status == 0, err
    assert Image.open(tmp_path / "i2i.png").size == (SIZE, SIZE)
    for name, src in (("inpaint4", model), ("inpaint9", folders["inpaint"])):
        out = tmp_path / f"{name}.png"
        status, _, err = run("inpaint", "a cat", "--image", image, "--mask", mask, "--model", src, *base,
                             "--sampler", "ddim", "--out", out)
        assert status == 0, err
        _, info, _ = run("png-info", out)
        assert "Denoising strength: 0.75" in info and '"mode": "inpaint"' in info
    # the 4-channel blend keeps the unmasked (black) half of the input up to the autoencoder's round trip
    kept = np.abs(_pixels(tmp_path / "inpaint4.png").astype(int) - _pixels(image).astype(int))[:, SIZE // 2 + 8 :]
    repainted = np.abs(_pixels(tmp_path / "inpaint4.png").astype(int) - _pixels(image).astype(int))[:, : SIZE // 2]
    assert repainted.mean() > kept.mean()


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["generate", "x", "--sampler", "nope"], "unknown sampler 'nope'"),
        (["generate", "x", "--size", "65x64"], "not a multiple of 8"),
        (["generate", "x", "--size", "big"], "--size must be WIDTHxHEIGHT"),
        (["generate", "x", "--steps", "0"], "steps must be between"),
        (["generate", "x", "--cfg-start", "1"], "cfg start must be in [0, 1)"),
        (["generate"], "give a PROMPT"),
        (["img2img", "x"], "needs --image"),
        (["img2img", "x", "--image", "{tmp}/missing.png"], "image not found"),
        (["inpaint", "x", "--image", "{img}"], "needs --mask"),
        (["inpaint", "x", "--image", "{img}", "--mask", "{small}"], "must have the same size"),
        (["generate", "x", "--from-png", "{tmp}/missing.png"], "no such file"),
        (["generate", "x", "--model", "{tmp}/missing.safetensors"], "no such file or folder"),
        (["generate", "x"], "default model is not available"),  # an install without the built-in model
        (["png-info", "{img}"], "carries no generation parameters"),
    ],
)
def test_bad_input_is_one_line_exit_2(run, tmp_path, monkeypatch, argv, needle):
    monkeypatch.setattr(estable.pipeline, "DEFAULT_MODEL_PATH", tmp_path / "absent.safetensors")
    img = tmp_path / "img.png"
    Image.new("RGB", (64, 64)).save(img)
    Image.new("L", (32, 64)).save(tmp_path / "small.png")
    argv = [a.format(tmp=tmp_path, img=img, small=tmp_path / "small.png") for a in argv]
    status, out, err = run(*argv, "--out", tmp_path / "o") if argv[0] != "png-info" else run(*argv)
    assert status == 2
    assert err.startswith("estable: error: ") and err.count("\n") == 1, err
    assert needle in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()  # nothing written


def test_help_lists_every_option(run):
    for command, extra in (("generate", []), ("img2img", ["--image", "--strength"]),
                           ("inpaint", ["--image", "--mask", "--strength"])):
        status, out, _ = run(command, "--help")
        assert status == 0
        for option in COMMON_OPTIONS + extra:
            assert option in out, f"{command} --help does not mention {option}"
        assert "PROMPT" in out
    status, out, _ = run("png-info", "--help")
    assert status == 0 and "FILE" in out
    status, out, _ = run("--help")
    for command in ("generate", "img2img", "inpaint", "png-info"):
        assert command in out


def test_parse_size():
    assert parse_size("512x768") == (512, 768)
    assert parse_size("64") == (64, 64)
    with pytest.raises(EstableError):
        parse_size("512 by 512")


def test_model_recommended_cfg_and_sampler_are_the_defaults(run, model, tmp_path):
    """A model file that records default_cfg / default_sampler (the shipped default model does) sets --cfg /
    --sampler when they are not given, and only then."""
    import dataclasses

    from estable.checkpoints.store import load_model, save_model

    loaded = load_model(model)
    loaded = dataclasses.replace(loaded, config=dataclasses.replace(loaded.config, default_cfg=3.0,
                                                                     default_sampler="Euler a"))
    tuned = save_model(loaded, tmp_path / "tuned.safetensors", to="estable")
    base = ["--steps", 2, "--seed", 1, "--device", "cpu"]
    for src, flags, want in ((tuned, [], ("CFG scale: 3,", "Sampler: Euler a,")),
                             (tuned, ["--cfg", 6, "--sampler", "ddim"], ("CFG scale: 6,", "Sampler: DDIM,")),
                             (model, [], ("CFG scale: 7,", "Sampler: DPM++ 2M, Schedule type: Karras"))):
        out = tmp_path / f"{len(flags)}-{Path(src).name}.png"
        status, _, err = run("generate", "x", "--model", src, *base, *flags, "--out", out)
        assert status == 0, err
        _, info, _ = run("png-info", out)
        assert all(w in info for w in want), (src, flags, info)
