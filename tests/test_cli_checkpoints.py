"""`estable info` and `estable convert` through ``main([...])``: exit codes, one-line errors, JSON output."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from estable.checkpoints import io, load_model
from estable.cli import main

pytest.importorskip("diffusers")
from clip_oracle import clip_vocab_gz  # noqa: E402
from test_store import WEIGHT_FILES, make_diffusers_folder  # noqa: E402


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Tiny SD 1.x / 2.x pipelines saved by diffusers itself (see test_store.make_diffusers_folder)."""
    root = tmp_path_factory.mktemp("cli-pipelines")
    return {family: make_diffusers_folder(root, family) for family in ("sd1", "sd2")}


@pytest.fixture(autouse=True)
def _vocab_env(monkeypatch):
    vocab = clip_vocab_gz()
    if vocab is not None:
        monkeypatch.setenv("ESTABLE_CLIP_VOCAB", str(vocab))


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code: int, err: str, *needles: str) -> None:
    assert code == 2
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("estable: error: "), err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def n_params(model) -> dict[str, int]:
    return {name: sum(p.numel() for p in getattr(model, name).parameters()) for name in WEIGHT_FILES}


# ------------------------------------------------------------------ info


def test_info_folder_text_and_json(capsys, folders):
    code, out, err = run(capsys, "info", folders["sd1"])
    assert code == 0, err
    assert "diffusers folder" in out and "Stable Diffusion 1.x" in out and "epsilon" in out

    code, out, _ = run(capsys, "info", folders["sd2"], "--json")
    assert code == 0
    info = json.loads(out)
    assert info["format"] == "diffusers" and info["family"] == "sd2"
    assert info["prediction_type"] == "v_prediction"
    assert info["dtypes"] == ["F32"]
    model = load_model(folders["sd2"])
    counts = n_params(model)
    assert {k: v["parameters"] for k, v in info["components"].items()} == counts
    unet_file = folders["sd2"] / WEIGHT_FILES["unet"]
    assert info["short_hash"] == io.sha256_file(unet_file)[:10]
    assert info["files"]["unet/diffusion_pytorch_model.safetensors"]["sha256"] == io.sha256_file(unet_file)
    assert info["resolution"] == 8 * 2  # unet sample_size 8 x VAE factor 2


def test_info_single_files(capsys, folders, tmp_path):
    model = load_model(folders["sd1"])
    for fmt in ("ldm", "estable"):
        dst = tmp_path / f"{fmt}.safetensors"
        code, _, err = run(capsys, "convert", folders["sd1"], dst, "--to", fmt)
        assert code == 0, err
        code, out, _ = run(capsys, "info", dst, "--json")
        assert code == 0
        info = json.loads(out)
        assert info["format"] == fmt and info["family"] == "sd1"
        assert info["sha256"] == io.sha256_file(dst) and info["short_hash"] == info["sha256"][:10]
        assert info["file_size"] == dst.stat().st_size
        assert {k: info["components"][k]["parameters"] for k in WEIGHT_FILES} == n_params(model)
        assert info["parameters"] == sum(n_params(model).values())
        assert info["prediction_type"] == "epsilon"
        code, out, _ = run(capsys, "info", dst, "--no-hash")
        assert code == 0 and "sha256" not in out and str(dst) in out


def test_info_pickle_needs_opt_in_to_look_inside(capsys, folders, tmp_path):
    code, _, err = run(capsys, "convert", folders["sd1"], tmp_path / "m.safetensors", "--to", "ldm")
    assert code == 0, err
    tensors, _ = io.read_safetensors(tmp_path / "m.safetensors")
    ckpt = tmp_path / "m.ckpt"
    torch.save({"state_dict": tensors}, ckpt)
    code, out, _ = run(capsys, "info", ckpt, "--json")
    assert code == 0
    info = json.loads(out)
    assert info["components"] == {} and "--allow-pickle" in info["note"]
    code, out, _ = run(capsys, "info", ckpt, "--json", "--allow-pickle")
    info = json.loads(out)
    assert info["family"] == "sd1" and info["parameters"] == sum(n_params(load_model(folders["sd1"])).values())


def test_info_errors(capsys, tmp_path):
    code, _, err = run(capsys, "info", tmp_path / "missing.safetensors")
    assert_one_line_error(code, err, "missing.safetensors", "no such file")
    bad = tmp_path / "cut.safetensors"
    io.write_safetensors(bad, {"w": torch.zeros(1000)})
    bad.write_bytes(bad.read_bytes()[:-100])
    code, _, err = run(capsys, "info", bad)
    assert_one_line_error(code, err, "cut.safetensors is truncated")
    (tmp_path / "plain").mkdir()
    code, _, err = run(capsys, "info", tmp_path / "plain")
    assert_one_line_error(code, err, "plain", "not a diffusers pipeline")


# ------------------------------------------------------------------ convert


def test_convert_chain_is_bit_exact(capsys, folders, tmp_path):
    src = folders["sd1"]
    steps = [("estable", tmp_path / "a.safetensors"), ("ldm", tmp_path / "b.safetensors"),
             ("diffusers", tmp_path / "c")]
    previous = src
    for fmt, dst in steps:
        code, out, err = run(capsys, "convert", previous, dst, "--to", fmt)
        assert code == 0, err
        assert f"wrote {dst}" in out and "Traceback" not in err
        previous = dst
    for name, rel in WEIGHT_FILES.items():
        a, b = load_file(src / rel), load_file(tmp_path / "c" / rel)
        if name == "text_encoder":  # transformers 5 writes CLIPTextModel keys without "text_model."
            a = {k.removeprefix("text_model."): v for k, v in a.items()}
            b = {k.removeprefix("text_model."): v for k, v in b.items()}
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), name


def test_convert_refuses_to_overwrite(capsys, folders, tmp_path):
    dst = tmp_path / "m.safetensors"
    assert run(capsys, "convert", folders["sd1"], dst, "--to", "estable")[0] == 0
    before = dst.read_bytes()
    code, _, err = run(capsys, "convert", folders["sd1"], dst, "--to", "estable", "--dtype", "fp16")
    assert_one_line_error(code, err, str(dst), "--overwrite")
    assert dst.read_bytes() == before
    code, _, err = run(capsys, "convert", folders["sd1"], dst, "--to", "estable", "--dtype", "fp16", "--overwrite")
    assert code == 0, err
    assert {i.dtype for i in io.read_safetensors_header(dst)[0].values()} == {"F16"}


def test_convert_options(capsys, folders, tmp_path):
    dst = tmp_path / "v.safetensors"
    code, _, err = run(capsys, "convert", folders["sd1"], dst, "--to", "ldm", "--prediction-type", "v_prediction",
                       "--dtype", "bf16")
    assert code == 0, err
    code, out, _ = run(capsys, "info", dst, "--json")
    info = json.loads(out)
    assert info["prediction_type"] == "v_prediction" and info["dtypes"] == ["BF16"]


def test_convert_errors(capsys, folders, tmp_path):
    code, _, err = run(capsys, "convert", tmp_path / "nope", tmp_path / "x.safetensors", "--to", "estable")
    assert_one_line_error(code, err, "nope", "no such file")

    # A pickle is refused without the opt-in and converts with it.
    assert run(capsys, "convert", folders["sd1"], tmp_path / "m.safetensors", "--to", "ldm")[0] == 0
    tensors, _ = io.read_safetensors(tmp_path / "m.safetensors")
    torch.save({"state_dict": tensors}, tmp_path / "m.ckpt")
    code, _, err = run(capsys, "convert", tmp_path / "m.ckpt", tmp_path / "n.safetensors", "--to", "estable")
    assert_one_line_error(code, err, "m.ckpt", "--allow-pickle")
    code, _, err = run(capsys, "convert", tmp_path / "m.ckpt", tmp_path / "n.safetensors", "--to", "estable",
                       "--allow-pickle")
    assert code == 0, err

    # A folder that is missing a component.
    broken = tmp_path / "broken"
    shutil.copytree(folders["sd1"], broken)
    shutil.rmtree(broken / "text_encoder")
    code, _, err = run(capsys, "convert", broken, tmp_path / "o.safetensors", "--to", "estable")
    assert_one_line_error(code, err, str(broken), "missing text_encoder/")

    # A destination whose parent is a file (an OSError underneath).
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    code, _, err = run(capsys, "convert", tmp_path / "n.safetensors", blocker / "out.safetensors", "--to", "ldm")
    assert_one_line_error(code, err, "file.txt")

    # Wrong suffix for a single-file format; unknown --to is argparse's own usage error.
    code, _, err = run(capsys, "convert", tmp_path / "n.safetensors", tmp_path / "out.ckpt", "--to", "ldm")
    assert_one_line_error(code, err, "out.ckpt", ".safetensors")
    with pytest.raises(SystemExit) as exit_info:
        main(["convert", str(tmp_path / "n.safetensors"), str(tmp_path / "o2"), "--to", "onnx"])
    assert exit_info.value.code == 2
    assert "Traceback" not in capsys.readouterr().err
    assert not list(tmp_path.glob(".*.tmp"))  # no temporary files left behind by the failures


def test_convert_records_a_default_cfg_and_sampler(capsys, folders, tmp_path):
    dst = tmp_path / "m.safetensors"
    code, _, err = run(capsys, "convert", folders["sd1"], dst, "--to", "estable", "--default-cfg", "6.5",
                       "--default-sampler", "DPM++ 2M")
    assert code == 0, err
    code, out, _ = run(capsys, "info", dst, "--json", "--no-hash")
    assert code == 0 and json.loads(out)["default_cfg"] == 6.5
    assert json.loads(out)["default_sampler"] == "dpmpp_2m"  # A1111's label stored as our name
    code, out, _ = run(capsys, "info", dst, "--no-hash")
    assert "dpmpp_2m by default (recorded in the file)" in out
    code, _, err = run(capsys, "convert", folders["sd1"], tmp_path / "s.safetensors", "--to", "estable",
                       "--default-sampler", "warp drive")
    assert_one_line_error(code, err, "unknown sampler 'warp drive'")
    code, _, err = run(capsys, "convert", folders["sd1"], tmp_path / "t.safetensors", "--to", "diffusers",
                       "--default-sampler", "ddim")
    assert_one_line_error(code, err, "--default-sampler", "--to estable")
    assert not (tmp_path / "s.safetensors").exists() and not (tmp_path / "t.safetensors").exists()
    code, _, err = run(capsys, "convert", folders["sd1"], tmp_path / "x.safetensors", "--to", "ldm",
                       "--default-cfg", "5")
    assert_one_line_error(code, err, "--default-cfg", "--to estable")
    code, _, err = run(capsys, "convert", dst, tmp_path / "y.safetensors", "--to", "estable", "--default-cfg", "-1")
    assert_one_line_error(code, err, "--default-cfg", "between 0 and 100")
    assert not (tmp_path / "x.safetensors").exists() and not (tmp_path / "y.safetensors").exists()


def test_a_closed_pipe_ends_quietly(tmp_path):
    """`estable info … | head -n 1`: the reader closes the pipe; the command stops with status 1 and no traceback."""
    import subprocess

    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    code = "from estable.cli import main; import sys; sys.exit(main(['info', 'default', '--no-hash']))"
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    proc.stdout.close()  # nobody reads: the first write (at the latest, the flush) meets a closed pipe
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 1, err
    assert "Traceback" not in err and "BrokenPipeError" not in err, err
