"""Edge F1 at a tolerance (estable.evaluation.edges) and the ControlNet evaluation script at tiny size on the CPU."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from estable.checkpoints.controlnet_format import save_controlnet
from estable.checkpoints.store import load_model
from estable.evaluation.edges import edge_f1, edge_f1_images
from estable.models.controlnet import ControlNet
from test_train_lora import make_base

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")


def test_edge_f1_values():
    c = np.zeros((20, 20), bool)
    c[10, 2:18] = True  # a 16-pixel line
    g = np.zeros_like(c)
    g[12, 2:18] = True  # the same line 2 pixels lower
    assert edge_f1(g, c, tolerance=2).f1 == 1.0
    s = edge_f1(g, c, tolerance=1)
    assert s.precision == 0.0 and s.recall == 0.0 and s.f1 == 0.0
    g2 = g.copy()
    g2[0, :] = True  # 20 stray edge pixels far away
    s = edge_f1(g2, c, tolerance=2)
    assert s.precision == pytest.approx(16 / 36) and s.recall == 1.0
    assert s.f1 == pytest.approx(2 * (16 / 36) / (16 / 36 + 1))
    assert edge_f1(np.zeros_like(c), np.zeros_like(c)).f1 == 1.0
    assert edge_f1(np.zeros_like(c), c).f1 == 0.0
    with pytest.raises(ValueError, match="differ in size"):
        edge_f1(g[:10], c)
    # an image scored against its own Canny edges is perfect
    a = np.zeros((32, 32, 3), np.uint8)
    a[8:24, 8:24] = 230
    from estable.control.preprocess import canny

    assert edge_f1_images(Image.fromarray(a), canny(Image.fromarray(a))).f1 == 1.0


def test_eval_script_tiny(tmp_path):
    base = make_base(tmp_path / "base.safetensors")
    torch.manual_seed(0)
    net = ControlNet.from_unet(load_model(base).unet)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name.startswith("controlnet_"):
                p.normal_(0, 0.3)
    cn = save_controlnet(net, tmp_path / "cn.safetensors")
    spec = importlib.util.spec_from_file_location("controlnet_eval", REPO / "benchmarks" / "controlnet_eval.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    with torch.no_grad():
        result = mod.main(["--model", str(base), "--controlnet", str(cn), "--count", "2", "--size", "32",
                           "--steps", "2", "--device", "cpu", "--dtype", "fp32", "--sigma", "0", "--out",
                           str(tmp_path / "out")])
    saved = json.loads((tmp_path / "out" / "controlnet_eval.json").read_text())
    assert saved["summary"] == result["summary"] and len(saved["images"]) == 2
    for which in ("controlled", "uncontrolled"):
        assert 0.0 <= saved["summary"][which]["f1"] <= 1.0
    # the controlled images differ from the uncontrolled ones (the ControlNet acts)
    assert saved["images"][0]["controlled"] != saved["images"][0]["uncontrolled"] or \
        saved["images"][1]["controlled"] != saved["images"][1]["uncontrolled"]
    assert Image.open(tmp_path / "out" / "controlnet_eval.png").size == (64, 96)
