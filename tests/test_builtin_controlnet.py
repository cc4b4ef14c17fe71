"""The built-in model's Canny-edges ControlNet, shipped beside it: its images follow the edges they are given,
and ``--controlnet default`` (CLI) / ``"default"`` (server list) name it."""

from __future__ import annotations

import json
import statistics

import pytest
from PIL import Image

import estable.cli as cli
from estable.checkpoints.controlnet_format import load_controlnet
from estable.control import ControlUnit
from estable.control.preprocess import canny
from estable.control.units import BUILTIN_CONTROLNET, resolve_controlnet
from estable.evaluation.edges import edge_f1_images
from estable.params import GenerationParams
from estable.pipeline import load_pipeline
from estable.training.shapes import ShapesWorld

pytestmark = pytest.mark.usefixtures("one_thread")


def test_builtin_controlnet_follows_the_edges():
    """Three held-out scenes' Canny edges: the controlled images' edges match them (F1 at 2 px), the uncontrolled
    images' do not. Over 20 scenes on the CPU the shipped pair scored 0.664 against 0.048 (the sixth built-in
    model; RESULTS.md)."""
    assert BUILTIN_CONTROLNET.is_file() and BUILTIN_CONTROLNET.stat().st_size < 15e6
    pipe = load_pipeline("default", device="cpu", dtype="fp32")
    net = load_controlnet(BUILTIN_CONTROLNET, base=pipe.config.unet, dtype=pipe.dtype, device=pipe.device)
    world = ShapesWorld("heldout", 3, size=256)
    with_cn, without = [], []
    for i in range(3):
        image, caption, _ = world.sample(i)
        edges = canny(image, 100, 200, 1.0)
        params = GenerationParams(prompt=caption, steps=20, cfg_scale=5.0, seed=i, width=256, height=256)
        controlled = pipe.txt2img(params, control=[ControlUnit(net=net.model, image=edges)]).images[0]
        plain = pipe.txt2img(params).images[0]
        with_cn.append(edge_f1_images(controlled, edges, 2).f1)
        without.append(edge_f1_images(plain, edges, 2).f1)
    assert statistics.fmean(with_cn) > 0.4 and statistics.fmean(with_cn) > statistics.fmean(without) + 0.25, \
        (with_cn, without)


def test_controlnet_default_on_the_command_line(tmp_path, capsys):
    assert resolve_controlnet("default") == BUILTIN_CONTROLNET
    assert str(resolve_controlnet("nets/x.safetensors")) == "nets/x.safetensors"
    picture, _, _ = ShapesWorld("train", 5, size=256).sample(0)
    picture.save(tmp_path / "scene.png")
    out = tmp_path / "out.png"
    status = cli.main(["generate", "a red circle", "--steps", "2", "--device", "cpu", "--out", str(out),
                       "--control", f"canny:{tmp_path / 'scene.png'}", "--controlnet", "default"])
    assert status == 0, capsys.readouterr().err
    assert Image.open(out).size == (256, 256)
    status = cli.main(["png-info", str(out)])
    record = json.loads(capsys.readouterr().out.partition("\n\n")[2])
    assert status == 0 and record["control"][0]["model"]["source"] == str(BUILTIN_CONTROLNET)


def test_the_server_lists_the_builtin_controlnet_with_the_builtin_model(tmp_path):
    from estable.server.extras import Networks
    from estable.server.inputs import FieldError
    from server_util import settings

    nets = Networks(settings(tmp_path, "default"))  # no --controlnet-dir
    assert nets.controlnet_names() == ["default"] and nets.controlnet("default", "f") == BUILTIN_CONTROLNET
    other = Networks(settings(tmp_path, tmp_path / "some-model.safetensors"))  # another model: not offered
    assert other.controlnet_names() == []
    with pytest.raises(FieldError, match="no ControlNets"):
        other.controlnet("default", "f")
