"""Bad input gets a clear error and loses nothing: control-image, convert --overwrite, data shapes, training configs,
train export and run folders."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cli_util import run_cli as _run
from estable.errors import EstableError


def _picture(path: Path) -> bytes:
    a = np.zeros((48, 48, 3), dtype=np.uint8)
    a[12:36, 12:36] = (200, 40, 40)
    Image.fromarray(a).save(path)
    return path.read_bytes()


# ---------------------------------------------------------------------------------------------- control-image


def test_control_image_never_writes_over_its_input(tmp_path, capsys, monkeypatch):
    base = tmp_path / "base.png"
    data = _picture(base)
    code, err = _run(capsys, "control-image", "canny", base, base)
    assert code == 2 and "input image" in err
    code, err = _run(capsys, "control-image", "canny", base, base, "--overwrite")
    assert code == 2 and "input image" in err
    monkeypatch.chdir(tmp_path)
    code, err = _run(capsys, "control-image", "canny", "base.png", "./sub/../base.png", "--overwrite")
    assert code == 2 and "input image" in err
    assert base.read_bytes() == data


def test_control_image_refuses_an_existing_output_without_overwrite(tmp_path, capsys):
    base, out = tmp_path / "base.png", tmp_path / "out.png"
    _picture(base)
    out.write_bytes(b"keep me")
    code, err = _run(capsys, "control-image", "canny", base, out)
    assert code == 2 and "already exists" in err and "--overwrite" in err
    assert out.read_bytes() == b"keep me"
    assert _run(capsys, "control-image", "canny", base, out, "--overwrite")[0] == 0
    assert Image.open(out).size == (48, 48)


@pytest.mark.parametrize("flags, needle", [
    (["--thickness", "100000"], "--thickness"), (["--thickness", "0"], "--thickness"),
    (["--thickness", "-3"], "--thickness"), (["--sigma", "1e9"], "--sigma"), (["--sigma", "-1"], "--sigma"),
    (["--sigma", "nan"], "--sigma"), (["--sigma", "inf"], "--sigma"),
])
def test_control_image_range_checks(tmp_path, capsys, flags, needle):
    base = tmp_path / "base.png"
    _picture(base)
    code, err = _run(capsys, "control-image", "scribble", base, tmp_path / "t.png", *flags)
    assert code == 2 and needle in err
    assert not (tmp_path / "t.png").exists()


def test_control_makers_check_thickness_and_sigma():
    from estable.control.preprocess import canny, lines, make_control_image, scribble

    image = Image.new("RGB", (16, 16))
    for bad in (0, -3, 100_000, 2.5):
        with pytest.raises(EstableError, match="thickness"):
            scribble(image, thickness=bad)
        with pytest.raises(EstableError, match="thickness"):
            lines(image, thickness=bad)
    for bad in (-1.0, 1e9, math.nan, math.inf):
        with pytest.raises(EstableError, match="sigma"):
            canny(image, sigma=bad)
        with pytest.raises(EstableError, match="sigma"):
            make_control_image("scribble", image, sigma=bad)
    assert scribble(image, thickness=64, sigma=50).size == (16, 16)


# ---------------------------------------------------------------------------------------------- convert


def test_convert_overwrite_replaces_only_a_diffusers_folder(tmp_path, capsys, monkeypatch):
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "thesis.txt").write_text("x")
    code, err = _run(capsys, "convert", "default", precious, "--to", "diffusers", "--overwrite")
    assert code == 2 and "model_index.json" in err
    assert (precious / "thesis.txt").read_text() == "x"
    monkeypatch.chdir(precious)
    code, err = _run(capsys, "convert", "default", ".", "--to", "diffusers", "--overwrite")
    assert code == 2 and "model_index.json" in err
    assert (precious / "thesis.txt").read_text() == "x"
    code, err = _run(capsys, "convert", "default", "/", "--to", "diffusers", "--overwrite")
    assert code == 2


def test_replace_folder_keeps_a_folder_that_is_not_a_model(tmp_path):
    from estable.checkpoints.store import _replace_folder

    new, dst = tmp_path / "new", tmp_path / "dst"
    new.mkdir()
    (new / "model_index.json").write_text("{}")
    dst.mkdir()
    (dst / "thesis.txt").write_text("x")
    with pytest.raises(EstableError, match="not a diffusers model"):
        _replace_folder(new, dst, overwrite=True)
    assert (dst / "thesis.txt").read_text() == "x" and new.is_dir()
    (dst / "model_index.json").write_text("{}")  # a model folder: replaced
    _replace_folder(new, dst, overwrite=True)
    assert not (dst / "thesis.txt").exists() and (dst / "model_index.json").is_file() and not new.exists()


# ---------------------------------------------------------------------------------------------- data shapes


def test_data_shapes_count_must_be_positive(tmp_path, capsys):
    pics = tmp_path / "pics"
    pics.mkdir()
    (pics / "mine.png").write_bytes(b"mine")
    code, err = _run(capsys, "data", "shapes", pics, "--count", "0", "--overwrite")
    assert code == 2 and "--count" in err
    assert (pics / "mine.png").read_bytes() == b"mine"


def test_data_shapes_overwrite_refuses_a_folder_it_did_not_write(tmp_path, capsys):
    pics = tmp_path / "pics"
    pics.mkdir()
    (pics / "mine.png").write_bytes(b"mine")
    (pics / "00000000.png").write_bytes(b"also mine")
    code, err = _run(capsys, "data", "shapes", pics, "--count", "1", "--size", "32", "--overwrite")
    assert code == 2 and "shapes_world.json" in err
    assert (pics / "mine.png").read_bytes() == b"mine" and (pics / "00000000.png").read_bytes() == b"also mine"
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "thesis.txt").write_text("x")
    code, err = _run(capsys, "data", "shapes", notes, "--count", "1", "--size", "32", "--overwrite")
    assert code == 2 and sorted(p.name for p in notes.iterdir()) == ["thesis.txt"]


def test_data_shapes_overwrite_deletes_only_its_own_files(tmp_path, capsys):
    out = tmp_path / "shapes"
    assert _run(capsys, "data", "shapes", out, "--count", "3", "--size", "32")[0] == 0
    (out / "mine.png").write_bytes(b"mine")
    (out / "0001.png").write_bytes(b"not one of its names")
    assert _run(capsys, "data", "shapes", out, "--count", "1", "--size", "32", "--overwrite")[0] == 0
    assert sorted(p.name for p in out.glob("*.png")) == ["00000000.png", "0001.png", "mine.png"]
    assert (out / "mine.png").read_bytes() == b"mine"
    assert len((out / "metadata.jsonl").read_text().splitlines()) == 1


# ---------------------------------------------------------------------------------------------- training configs


@pytest.mark.parametrize("token", ["../../pwn_ti", "a/b", "a\\b", "..", "two words", "tab\there", "nul\0x", "x\ny"])
def test_ti_token_must_be_a_plain_name(tmp_path, capsys, token):
    from estable.training.config import load_config

    with pytest.raises(EstableError, match="token"):
        load_config("ti", "tiny-ti", [f"token={json.dumps(token)}"])
    code, err = _run(capsys, "train", "ti", "--config", "tiny-ti", "--run-dir", tmp_path / "ti1",
                     f"token={json.dumps(token)}", "max_steps=2", "--print-config")
    assert code == 2 and "token" in err
    assert load_config("ti", "tiny-ti", ["token=my-teal_2"]).token == "my-teal_2"


@pytest.mark.parametrize("kind, override, needle", [
    ("unet", "sample.sampler=bogus", "euler"),  # the message lists the valid samplers
    ("ti", "sample.sampler=bogus", "unknown sampler"),
    ("unet", "sample.cfg_scale=NaN", "cfg_scale"),
    ("unet", "sample.cfg_scale=Infinity", "cfg_scale"),
    ("unet", "max_minutes=-1", "max_minutes"),
    ("unet", "max_minutes=NaN", "max_minutes"),
    ("clip", "model.image.norm_groups=0", "norm_groups"),
    ("unet", "optim.lr=Infinity", "optim.lr must be a positive finite number"),  # JSON's Infinity passed > 0
    ("unet", "optim.lr=1e999", "optim.lr must be a positive finite number"),
    ("unet", "offset_noise=Infinity", "offset_noise"),
    ("vae", "disc.weight=Infinity", "disc.weight"),
    ("lora", "lora.alpha=Infinity", "lora.alpha"),
    ("unet", "data.shapes_relation_axis_ratio=Infinity", "shapes_relation_axis_ratio"),  # no layout met it
    ("unet", 'sample.prompts="a red circle"', "sample.prompts must be a list"),  # was one prompt per character
    ("unet", "sample.prompts=[5]", "sample.prompts must be a list"),
])
def test_training_config_rejects(kind, override, needle):
    from estable.training.config import load_config

    with pytest.raises(EstableError, match=needle):
        load_config(kind, f"tiny-{kind}", [override])


def test_training_config_accepts_valid_values():
    from estable.training.config import load_config

    cfg = load_config("unet", "tiny-unet", ["sample.sampler=dpmpp_2m", "max_minutes=0", "sample.cfg_scale=0"])
    assert cfg.sample.sampler == "dpmpp_2m" and cfg.max_minutes == 0


# ---------------------------------------------------------------------------------------------- train export


def test_train_export_never_writes_over_the_run(tmp_path, capsys):
    from estable.training.config import load_config

    run = tmp_path / "run"
    ckpt = run / "checkpoints" / "step_0000004"
    ckpt.mkdir(parents=True)
    (run / "config.json").write_text(load_config("unet", "tiny-unet").to_json())
    (ckpt / "model.safetensors").write_bytes(b"weights")
    for out in (ckpt / "model.safetensors", run / "config.json", run / "checkpoints" / "x.safetensors"):
        before = out.read_bytes() if out.exists() else None
        code, err = _run(capsys, "train", "export", run, out, "--overwrite")
        assert code == 2 and "export reads" in err
        assert (out.read_bytes() if out.exists() else None) == before


# ---------------------------------------------------------------------------------------------- run folders


def test_run_dir_that_is_a_file(tmp_path, capsys):
    base = tmp_path / "base.png"
    data = _picture(base)
    code, err = _run(capsys, "train", "unet", "--config", "tiny-unet", "--run-dir", base, "max_steps=1")
    assert code == 2 and "is a file" in err
    code, err = _run(capsys, "train", "unet", "--config", "tiny-unet", "--run-dir", base / "run", "max_steps=1")
    assert code == 2 and "is a file" in err
    assert base.read_bytes() == data


@pytest.mark.parametrize("override", ["data.source={tmp}/no-data", "text.source={tmp}/missing.safetensors"])
def test_a_failed_set_up_leaves_no_new_run_folder(tmp_path, capsys, override):
    override = override.format(tmp=tmp_path)  # both fail while the networks and data are built, after Run()
    run = tmp_path / "runs" / "new"
    code, err = _run(capsys, "train", "unet", "--config", "tiny-unet", "--run-dir", run, "max_steps=1", override)
    assert code == 2 and ("no-data" in err or "missing.safetensors" in err)
    assert not run.exists() and (tmp_path / "runs").is_dir()  # the folder it made is gone, its parent stays
    # a folder that was there before is left as it was, with whatever it held
    kept = tmp_path / "kept"
    kept.mkdir()
    (kept / "notes.txt").write_text("mine")
    code, err = _run(capsys, "train", "unet", "--config", "tiny-unet", "--run-dir", kept, "max_steps=1", override)
    assert code == 2 and (kept / "notes.txt").read_text() == "mine" and (kept / "checkpoints").is_dir()


def test_run_folder_errors_are_estable_errors(tmp_path, monkeypatch):
    from estable.training.runs import Run

    base = tmp_path / "base.png"
    base.write_bytes(b"x")
    with pytest.raises(EstableError, match="is a file"):
        Run(base, tensorboard=False)

    def refuse(self, *args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(Path, "mkdir", refuse)
    with pytest.raises(EstableError, match="Permission denied"):
        Run(tmp_path / "locked" / "run", tensorboard=False)


@pytest.mark.parametrize("text", ["{not json", "[1, 2]", "\udcff"])
def test_resume_with_a_damaged_config(tmp_path, capsys, text):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_bytes(text.encode("utf-8", "surrogateescape"))
    code, err = _run(capsys, "train", "unet", "--run-dir", run, "--resume")
    assert code == 2 and "config.json" in err and "damaged" in err


def test_run_log_with_a_half_written_last_line(tmp_path):
    from estable.training.runs import Run

    run = Run(tmp_path / "run")
    run.log({"step": 1, "loss": 0.5})
    run.log({"step": 2, "loss": 0.4})
    with open(run.log_path, "a", encoding="utf-8") as f:
        f.write('{"step": 3, "lo')  # killed while appending
    assert [r["step"] for r in run.read_log()] == [1, 2]
    run.truncate_log(2)
    assert [r["step"] for r in run.read_log()] == [1, 2]
    run.log_path.write_text('{"step": 1}\nnot json\n{"step": 3}\n', encoding="utf-8")
    with pytest.raises(EstableError, match="damaged at line 2"):
        run.read_log()


def test_train_overrides_may_follow_options(run):
    status, out, err = run("train", "unet", "--config", "tiny-unet", "max_steps=3", "--print-config", "optim.lr=0.125")
    assert status == 0, err
    printed = json.loads(out)
    assert printed["max_steps"] == 3 and printed["optim"]["lr"] == 0.125
    status, out, err = run("train", "unet", "--config", "tiny-unet", "--print-config", "--nonsense")
    assert status == 2 and "unrecognized arguments: --nonsense" in err
    status, out, err = run("info", "default", "max_steps=3")  # a command without overrides
    assert status == 2 and "unrecognized arguments: max_steps=3" in err


def test_a_folder_given_for_a_file_is_named_a_folder(run, tmp_path):
    folder = tmp_path / "adir"
    folder.mkdir()
    for argv, words in ((("img2img", "x", "--image", folder, "--out", tmp_path / "o.png"), "is a folder, not an image"),
                        (("png-info", folder), "is a folder, not a PNG"),
                        (("train", "unet", "--config", folder, "--print-config"), "is a folder")):
        status, _, err = run(*argv)
        assert status == 2 and words in err, (argv, err)
    status, _, err = run("verify", "--steps", "100000", folder)
    assert status == 2 and "--steps must be from 2 to 1000" in err
    status, _, err = run("verify", folder)
    assert status == 2 and "is a folder, not an image" in err
    status, _, err = run("generate", "x", "--lora", folder, "--out", tmp_path / "o.png")
    assert status == 2 and "is a folder, not a LoRA file" in err


def test_a_training_config_that_is_not_text(run, tmp_path):
    config = tmp_path / "config.json"
    config.write_bytes(b"\xff\xfe{}")
    status, _, err = run("train", "unet", "--config", config, "--print-config")
    assert status == 2 and f"{config}: not a JSON text file (not UTF-8)" in err


def test_resize_note_says_what_happened():
    from estable.images import resize_note

    up = resize_note((1, 1), (8, 8))
    assert "resized (stretched with Lanczos, not cropped) to 8x8: 1x1 is not a multiple of 8" in up
    assert "below" not in up  # 1x1 went up to 8x8, not down
    assert "the generation size differs" in resize_note((64, 64), (128, 128))
    assert "pass --size" not in resize_note((64, 64), (128, 128))  # the user may have passed it


def test_ema_is_refused_for_a_file_without_ema_weights(run, tmp_path):
    status, _, err = run("convert", "default", tmp_path / "x.safetensors", "--to", "estable", "--ema")
    assert status == 2 and "--ema takes the EMA weights of an SD single file" in err
    assert not (tmp_path / "x.safetensors").exists()
