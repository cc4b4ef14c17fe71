"""Bad input gets a clear error and loses nothing: --out names, prompts that are not UTF-8, model configs, --from-png
records, eval flags, verify, keys new, serve flags and --lora weights."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
from PIL import Image, PngImagePlugin

from cli_util import run_cli as _run
from estable.cli import build_parser, main
from estable.errors import EstableError
from estable.provenance.infotext import read_png_metadata, write_png


@pytest.fixture(scope="module")
def made(tmp_path_factory) -> Path:
    """A PNG made by Estable (the built-in model, 64x64, two steps)."""
    out = tmp_path_factory.mktemp("made") / "base.png"
    assert main(["generate", "a red circle", "--steps", "2", "--size", "64x64", "--seed", "1", "--device", "cpu",
                 "--out", str(out)]) == 0
    return out



# ------------------------------------------------------------------------------------------------- --out names


def test_a_name_near_the_limit_is_written(made, tmp_path):
    """The temporary file beside the destination must not be longer than the destination's own name."""
    text, record = read_png_metadata(made)
    out = tmp_path / ("y" * 240 + ".png")
    write_png(out, Image.open(made), parameters=text, record=record)
    assert out.is_file() and read_png_metadata(out)[1] == record
    assert not list(tmp_path.glob(".*.tmp"))


@pytest.mark.parametrize("length", [252, 300])
def test_a_name_too_long_fails_before_the_model(tmp_path, capsys, no_model, length):
    code, err = _run(capsys, "generate", "x", "--steps", "2", "--size", "64x64", "--out",
                     tmp_path / ("y" * length + ".png"))
    assert code == 2 and "bytes long" in err and "255" in err
    code, err = _run(capsys, "generate", "x", "--out", tmp_path / ("d" * (length + 48)) / "a.png")
    assert code == 2 and "bytes long" in err


@pytest.mark.parametrize("name", ["a.jpg", "b.JPEG", "c.webp"])
def test_another_image_suffix_is_refused(tmp_path, capsys, no_model, name):
    code, err = _run(capsys, "generate", "x", "--out", tmp_path / name)
    assert code == 2 and "only PNG" in err and ".png" in err
    assert not (tmp_path / name).exists()


# --------------------------------------------------------------------------------------------- non-UTF-8 text


def test_a_prompt_that_is_not_utf8_is_named(capsys, no_model):
    code, err = _run(capsys, "generate", "caf\udce9", "--steps", "2", "--size", "64x64")
    assert code == 2 and "PROMPT" in err and "UTF-8" in err and "0xe9" in err
    code, err = _run(capsys, "generate", "a cat", "--negative", "\udcff", "--steps", "2")
    assert code == 2 and "--negative" in err and "0xff" in err


def test_a_recorded_prompt_with_a_lone_surrogate(made, tmp_path, capsys, no_model):
    text, record = read_png_metadata(made)
    record["params"]["prompt"] = "a \ud800 b"
    info = PngImagePlugin.PngInfo()
    info.add_itxt("estable", json.dumps(record), zip=True)  # ASCII JSON: the surrogate as a \ud800 escape
    crafted = tmp_path / "crafted.png"
    Image.open(made).save(crafted, pnginfo=info)
    code, err = _run(capsys, "generate", "--from-png", crafted, "--out", tmp_path / "again.png")
    assert code == 2 and "the prompt is not valid UTF-8" in err and "U+D800" in err


def test_the_tokenizer_refuses_lone_surrogates():
    from estable.tokenizer import CLIPTokenizer, find_clip_vocab

    tok = CLIPTokenizer.from_bpe_file(find_clip_vocab())
    with pytest.raises(EstableError, match="U\\+D800"):
        tok.encode("a \ud800 b")
    assert tok.encode("café") == tok.encode("caf\u00e9")


# --------------------------------------------------------------------------------------------- model configs


@pytest.mark.parametrize("section,field,value,words", [
    ("text", "heads", 0, "heads must be at least 1"),
    ("text", "heads", -4, "heads must be at least 1"),
    ("unet", "norm_groups", 0, "norm_groups must be at least 1"),
    ("vae", "norm_groups", 0, "norm_groups must be at least 1"),
    ("vae", "scaling_factor", float("inf"), "scaling_factor"),
    ("vae", "scaling_factor", 0.0, "scaling_factor"),
    ("vae", "scaling_factor", float("nan"), "scaling_factor"),
    ("schedule", "beta_end", 5.0, "beta_end must be between 0 and 1"),
    ("schedule", "beta_start", 0.0, "beta_start must be between 0 and 1"),
    ("schedule", "beta_start", 0.5, "must not exceed beta_end"),
])
def test_config_validation_refuses_zero_and_out_of_range_values(section, field, value, words):
    from estable.config import ModelConfig

    data = ModelConfig().to_dict()
    data[section][field] = value
    with pytest.raises(ValueError, match=words):
        ModelConfig.from_dict(data)


def _with_config(src: Path, out: Path, edit) -> Path:
    """A copy of the Estable file ``src`` whose metadata config ``edit`` changed."""
    raw = src.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    config = json.loads(header["__metadata__"]["config"])
    edit(config)
    header["__metadata__"]["config"] = json.dumps(config)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    out.write_bytes(len(text).to_bytes(8, "little") + text + raw[8 + n:])
    return out


@pytest.mark.parametrize("section,field", [("text", "heads"), ("unet", "norm_groups"), ("vae", "norm_groups")])
def test_a_checkpoint_with_zero_heads_or_groups_is_a_clear_error(tmp_path, capsys, section, field):
    from estable.pipeline import DEFAULT_MODEL_PATH

    bad = _with_config(DEFAULT_MODEL_PATH, tmp_path / "bad.safetensors", lambda c: c[section].update({field: 0}))
    capsys.readouterr()
    assert main(["info", str(bad)]) == 0  # info describes the file, and says why it cannot be loaded
    out = capsys.readouterr().out
    assert "family:      unknown" in out and "recorded config is invalid" in out and f"{field} must be at least 1" \
        in out
    code, err = _run(capsys, "generate", "x", "--steps", "2", "--size", "64x64", "--model", bad,
                     "--out", tmp_path / "o.png")
    assert code == 2 and f"{field} must be at least 1" in err and not (tmp_path / "o.png").exists()


# ------------------------------------------------------------------------------------------ --from-png records


@pytest.mark.parametrize("key,value,field", [
    ("vae", "somepath", "vae"),
    ("vae", {"path": 5}, "vae.path"),
    ("loras", 5, "loras"),
    ("loras", ["a"], "loras[0]"),
    ("loras", [{"source": "flag", "path": "base.png"}], "loras[0].te"),
    ("loras", [{"source": "flag", "path": "base.png", "te": "x", "unet": 1}], "loras[0].te"),
    ("loras", [{"source": "flag", "path": "base.png", "te": 1, "unet": None}], "loras[0].unet"),
    ("loras", [{"source": "prompt"}], "loras[0].path"),
    ("embeddings", [{"path": 5}], "embeddings[0].path"),
    ("embeddings", {"path": "x"}, "embeddings"),
])
def test_a_crafted_record_names_its_bad_field(made, tmp_path, capsys, no_model, key, value, field):
    text, record = read_png_metadata(made)
    record[key] = value
    crafted = tmp_path / "crafted.png"
    write_png(crafted, Image.open(made), parameters=text, record=record)
    code, err = _run(capsys, "generate", "--from-png", crafted, "--out", tmp_path / "again.png")
    assert code == 2 and f"record's {field} must be" in err and str(crafted) in err
    assert not (tmp_path / "again.png").exists()


# ------------------------------------------------------------------------------------------------ eval flags


@pytest.mark.parametrize("argv", [
    ["compositional", "--prompts", "1", "--images-per-prompt", "1"],
    ["fid", "--fake", "shapes:4", "--real", "shapes:4"],
    ["judge-accuracy", "--count", "2"],
    ["train-judge", "--steps", "2", "--eval-count", "0"],
])
def test_eval_refuses_an_unknown_device(tmp_path, capsys, no_model, argv):
    extra = ["--out", tmp_path / "j.safetensors"] if argv[0] == "train-judge" else []
    code, err = _run(capsys, "eval", *argv, "--device", "bogus", *extra)
    assert code == 2 and "unknown device 'bogus'" in err


@pytest.mark.parametrize("argv,words", [
    (["fid", "--fake", "shapes:4", "--real", "shapes:4", "--batch-size", "0"], "--batch-size must be at least 1"),
    (["compositional", "--prompts", "1", "--seed", "-5"], "--seed must be 0 or more"),
    (["train-judge", "--minutes", "0", "--steps", "2", "--workers", "0"], "--minutes must be a positive number"),
    (["train-judge", "--minutes", "-1", "--steps", "2", "--workers", "0"], "--minutes must be a positive number"),
    (["train-judge", "--minutes", "nan", "--steps", "2", "--workers", "0"], "--minutes must be a positive number"),
    (["fid", "--fake", "model:", "--real", "shapes:4", "--count", "2"], "'model:' names no model"),
    (["fid", "--fake", "shapes:4", "--real", "shapes:4", "--inception-weights", "w.pth"],  # was silently unused
     "--inception-weights is read with --features inception"),
])
def test_eval_refuses_bad_numbers(tmp_path, capsys, no_model, argv, words):
    extra = ["--out", tmp_path / "j.safetensors"] if argv[0] == "train-judge" else []
    code, err = _run(capsys, "eval", *argv, *extra)
    assert code == 2 and words in err
    assert not (tmp_path / "j.safetensors").exists()


@pytest.mark.parametrize("count", ["-1", "0", "1"])
def test_fid_refuses_a_count_below_two_for_folders(tmp_path, capsys, no_model, count):
    for k in range(3):  # --count -1 took files[:-1]: two of the three images, silently
        Image.new("RGB", (16, 16), (k * 80, 0, 0)).save(tmp_path / f"{k}.png")
    code, err = _run(capsys, "eval", "fid", "--real", tmp_path, "--fake", tmp_path, "--count", count, "--no-floor",
                     "--device", "cpu")
    assert code == 2 and f"--count must be at least 2 (FID needs 2 images per set), not {count}" in err


def test_train_judge_refuses_a_zero_time_limit():
    from estable.evaluation.judge import train_judge

    with pytest.raises(ValueError, match="time limit"):
        train_judge(2, 2, 32, "cpu", workers=0, progress=False, time_limit_s=0.0)


# ---------------------------------------------------------------------------------------------------- verify


def test_verify_reports_an_oversized_text_chunk(made, tmp_path, capsys):
    info = PngImagePlugin.PngInfo()
    info.add_text("junk", "a" * (2 << 20), zip=True)  # a zTXt chunk inflating past Pillow's MAX_TEXT_CHUNK
    bomb = tmp_path / "ztxt_bomb.png"
    Image.open(made).save(bomb, pnginfo=info)
    code, err = _run(capsys, "verify", bomb, "--no-tree-ring")
    assert code == 2 and "cannot read image" in err and "ztxt_bomb.png" in err
    code, err = _run(capsys, "verify", bomb)
    assert code == 2 and "cannot read image" in err


def test_verify_skips_the_tree_ring_test_of_a_tiny_image(made, tmp_path, capsys):
    one = tmp_path / "one.png"
    Image.open(made).resize((1, 1)).save(one)
    capsys.readouterr()
    assert main(["verify", str(one), "--steps", "2", "--device", "cpu"]) == 1
    out = capsys.readouterr().out
    assert "Tree-Ring: not tested" in out and "too small for the Tree-Ring test" in out
    assert "noise-residue detector: not run" in out and "too small for the noise-residue detector" in out
    code, err = _run(capsys, "detect", one)
    assert code == 2 and "too small for the noise-residue detector" in err


def test_verify_refuses_an_empty_key(made, capsys):
    code, err = _run(capsys, "verify", made, "--no-tree-ring", "--key", "")
    assert code == 2 and "--key is empty" in err


# ------------------------------------------------------------------------------------------------------ keys


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc is Linux's")
def test_keys_new_into_proc_is_a_clear_error(capsys):
    code, err = _run(capsys, "keys", "new", "--out", "/proc")
    assert code == 2 and "/proc" in err


def test_keys_new_into_a_folder_that_refuses_files(tmp_path, capsys, monkeypatch):
    import estable.provenance.records as records

    def refuse(*a, **k):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(records.os, "open", refuse)  # the write itself fails (as in a read-only folder)
    code, err = _run(capsys, "keys", "new", "--out", tmp_path)
    assert code == 2 and "Permission denied" in err and str(tmp_path) in err
    assert not list(tmp_path.iterdir())


# ---------------------------------------------------------------------------------------------- serve flags


@pytest.mark.parametrize("flag,value", [
    ("--grace", "nan"), ("--grace", "inf"), ("--grace", "-1"),
    ("--timeout", "nan"), ("--timeout", "inf"), ("--timeout", "0"),
    ("--preview-interval", "-1"), ("--preview-interval", "nan"),
])
def test_serve_refuses_non_finite_and_negative_seconds(flag, value):
    from estable.cli_serve import settings_from_args

    with pytest.raises(EstableError, match=f"^{flag} must be a finite number of seconds"):
        settings_from_args(build_parser().parse_args(["serve", flag, value]))


@pytest.mark.parametrize("flag", ["--max-body-mb", "--max-megapixels"])
def test_serve_refuses_infinite_limits(flag):
    from estable.cli_serve import settings_from_args

    for value in ("inf", "nan"):
        with pytest.raises(EstableError, match="positive"):
            settings_from_args(build_parser().parse_args(["serve", flag, value]))


def test_serve_refuses_an_api_key_file_that_is_not_text(tmp_path):
    from estable.cli_serve import settings_from_args

    key = tmp_path / "key.png"
    key.write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe")
    with pytest.raises(EstableError, match="is not a text file"):
        settings_from_args(build_parser().parse_args(["serve", "--api-key-file", str(key)]))


def test_serve_accepts_zero_grace_and_preview_interval():
    from estable.cli_serve import settings_from_args

    s = settings_from_args(build_parser().parse_args(["serve", "--grace", "0", "--preview-interval", "0"]))
    assert s.grace == 0 and s.preview_interval == 0


# ---------------------------------------------------------------------------------------------------- --lora


def test_a_lora_weight_that_is_not_a_number(tmp_path, capsys, monkeypatch, no_model):
    from estable.extra_networks import parse_lora_arg

    monkeypatch.chdir(tmp_path)
    Path("judge.safetensors").write_bytes(b"\0" * 16)
    with pytest.raises(EstableError, match="the weight 'abc' is not a number"):
        parse_lora_arg("judge.safetensors:abc")
    for weight in ("nan", "inf", "-inf"):
        with pytest.raises(EstableError, match="finite number"):
            parse_lora_arg(f"judge.safetensors:{weight}")
    assert parse_lora_arg("judge.safetensors:0.5").te == 0.5
    assert parse_lora_arg("judge.safetensors").te == 1.0
    code, err = _run(capsys, "generate", "x", "--lora", "judge.safetensors:abc", "--out", "o.png")
    assert code == 2 and "not a number" in err
    with pytest.raises(EstableError, match="no such file"):
        parse_lora_arg("nope.safetensors:abc")
    os.mkdir("sub")
    Path("sub/a:b.safetensors").write_bytes(b"\0" * 16)  # a colon in the file's own name
    assert parse_lora_arg("sub/a:b.safetensors").path == Path("sub/a:b.safetensors")


def test_a_lora_dir_that_is_not_a_folder(tmp_path, capsys, no_model):
    code, err = _run(capsys, "generate", "a red circle", "--lora-dir", tmp_path / "nowhere", "--out",
                     tmp_path / "a.png")
    assert code == 2 and "--lora-dir" in err and "is not a folder" in err
