"""``--control`` / ``--controlnet`` on the generation commands: the CLI gives the library's pixels and records the
units; mistakes are one-line errors before the model loads."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

import estable.cli as cli
import test_pipeline as tp
from estable import GenerationParams, load_pipeline
from estable.checkpoints.controlnet_format import save_controlnet
from estable.control import ControlUnit
from estable.models.controlnet import ControlNet

pytest.importorskip("diffusers")
folders = tp.folders  # the session fixture building the tiny models
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def setup(folders, tmp_path_factory):
    root = tmp_path_factory.mktemp("cli_control")
    pipe = load_pipeline(folders["epsilon"], device="cpu", dtype="fp32")
    net = ControlNet.from_unet(pipe.unet)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name.startswith(("controlnet_down_blocks", "controlnet_mid_block", "controlnet_cond_embedding")):
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    path = save_controlnet(net, root / "cn_shapes.safetensors")
    a = np.zeros((64, 64, 3), np.uint8)
    a[10:54, 30:34] = 255
    a[20:24, 5:60] = 255
    Image.fromarray(a).save(root / "ctrl.png")
    return pipe, net, path, root


def _run(capsys, *argv):
    capsys.readouterr()
    try:
        status = cli.main([str(a) for a in argv])
    except SystemExit as exc:
        status = int(exc.code or 0)
    out, err = capsys.readouterr()
    return status, out, err


def test_generate_with_control_matches_library(setup, folders, capsys):
    pipe, net, path, root = setup
    out = root / "out.png"
    status, _, err = _run(capsys, "generate", "a cat", "--model", folders["epsilon"], "--steps", 4, "--seed", 3,
                          "--sampler", "euler", "--device", "cpu", "--dtype", "fp32", "--out", out,
                          "--control", f"none:{root / 'ctrl.png'}:0.8", "--controlnet", path, "--control-end", 0.75,
                          "--no-watermark")  # the library call below does not watermark
    assert status == 0, err
    params = GenerationParams(prompt="a cat", steps=4, seed=3, sampler="euler", width=64, height=64)
    unit = ControlUnit(net=net, image=Image.open(root / "ctrl.png").convert("RGB"), scale=0.8, end=0.75)
    expected = np.asarray(pipe.txt2img(params, control=[unit]).images[0])
    plain = np.asarray(pipe.txt2img(params).images[0])
    got = np.asarray(Image.open(out).convert("RGB"))
    assert np.abs(got.astype(int) - expected.astype(int)).max() <= 1
    assert np.abs(got.astype(int) - plain.astype(int)).max() > 10
    status, info, _ = _run(capsys, "png-info", out)
    text, _, record = info.partition("\n\n")
    assert 'ControlNet 0: "Module: none, Model: cn_shapes [' in text and "Guidance End: 0.75" in text
    rec = json.loads(record)["control"][0]
    assert rec["scale"] == 0.8 and rec["end"] == 0.75 and rec["model"]["source"] == str(path.resolve())
    # --from-png brings the ControlNet units back: the same image
    again = root / "again.png"
    status, _, err = _run(capsys, "generate", "--from-png", out, "--out", again, "--no-watermark")
    assert status == 0, err
    assert np.array_equal(np.asarray(Image.open(again).convert("RGB")), got)


def test_two_controls_and_canny(setup, folders, capsys):
    pipe, net, path, root = setup
    out = root / "two.png"
    status, _, err = _run(capsys, "img2img", "a cat", "--image", root / "ctrl.png", "--model", folders["epsilon"],
                          "--steps", 3, "--seed", 1, "--device", "cpu", "--out", out,
                          "--control", f"canny:{root / 'ctrl.png'}", "--controlnet", path,
                          "--control", f"scribble:{root / 'ctrl.png'}:0.5", "--controlnet", path, "--guess-mode")
    assert status == 0, err
    _, info, _ = _run(capsys, "png-info", out)
    assert '"Module: canny' in info and '"Module: scribble' in info and "Guess Mode: True" in info


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--control", "canny:{ctrl}"], "1 --control but 0 --controlnet"),
        (["--control", "depth:{ctrl}", "--controlnet", "{cn}"], "TYPE one of"),
        (["--control", "canny:{root}/missing.png", "--controlnet", "{cn}"], "control image not found"),
        (["--control", "canny:{ctrl}", "--controlnet", "{root}/missing.safetensors"], "ControlNet not found"),
        (["--control", "canny:{ctrl}:11", "--controlnet", "{cn}"], "between 0 and 10"),
        (["--control", "canny:{ctrl}", "--controlnet", "{cn}", "--control-start", "0.8", "--control-end", "0.2"],
         "start < end"),
        (["--guess-mode"], "needs --control"),
    ],
)
def test_control_flag_errors(setup, folders, capsys, extra, needle):
    _, _, path, root = setup
    fill = {"ctrl": root / "ctrl.png", "cn": path, "root": root}
    argv = ["generate", "x", "--model", folders["epsilon"], "--steps", 2, "--device", "cpu",
            "--out", root / "e.png", *[a.format(**fill) if isinstance(a, str) else a for a in extra]]
    status, _, err = _run(capsys, *argv)
    assert status == 2 and needle in err and "Traceback" not in err, err


def test_help_documents_flags(capsys):
    for command in ("generate", "img2img", "inpaint"):
        _, out, _ = _run(capsys, command, "--help")
        for flag in ("--control", "--controlnet", "--control-start", "--control-end", "--guess-mode"):
            assert flag in out
    _, out, _ = _run(capsys, "control-image", "--help")
    assert "canny" in out and "seg" in out


def test_hires_second_pass_is_controlled_too(setup, monkeypatch):
    """The hires fix's second pass runs the ControlNet units (control image resized to the larger size), as
    A1111's extension does by default: dropping them from that pass alone changes the image."""
    import estable.hires as hires

    pipe, net, _, root = setup
    params = GenerationParams(prompt="a cat", steps=4, seed=3, sampler="euler", width=64, height=64,
                              hires_scale=2.0, hires_strength=0.5)
    unit = ControlUnit(net=net, image=Image.open(root / "ctrl.png").convert("RGB"), scale=0.8)
    both = pipe.txt2img(params, control=[unit])
    assert both.images[0].size == (128, 128)
    real = hires.run_hires
    monkeypatch.setattr(hires, "run_hires", lambda *a, **k: real(*a[:10], None))  # the first pass only
    first_only = pipe.txt2img(params, control=[unit])
    a, b = (np.asarray(r.images[0], dtype=np.int16) for r in (both, first_only))
    assert np.abs(a - b).max() > 10


def test_controlnet_cache_is_bounded_and_drops_changed_files(tmp_path, monkeypatch):
    """The server keeps one cache per pipeline: it must not grow with every file (or every rewrite of one)."""
    import types

    import estable.checkpoints.controlnet_format as fmt
    from estable.control.units import ControlNetCache

    loads = []
    monkeypatch.setattr(fmt, "load_controlnet", lambda path, **kw: loads.append(path.name) or object())
    pipe = types.SimpleNamespace(config=types.SimpleNamespace(unet=None), dtype=torch.float32, device="cpu")
    files = [tmp_path / f"cn{k}.safetensors" for k in range(4)]
    for f in files:
        f.write_bytes(b"x")
    cache = ControlNetCache(capacity=2)
    first = cache.get(files[0], pipe)
    assert cache.get(files[0], pipe) is first and loads == ["cn0.safetensors"]  # cached
    for f in files[1:]:
        cache.get(f, pipe)
    assert len(cache._nets) == 2  # the two most recent
    cache.get(files[0], pipe)
    assert loads.count("cn0.safetensors") == 2  # it had been evicted: read again
    files[0].write_bytes(b"xy")  # rewritten: a new key, and the old entry goes
    cache.get(files[0], pipe)
    assert len(cache._nets) == 2 and sum(k[0].endswith("cn0.safetensors") for k in cache._nets) == 1
