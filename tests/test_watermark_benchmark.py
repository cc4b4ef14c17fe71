"""benchmarks/watermark_robustness.py at a tiny count (the full run is a GPU job), and its metrics."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "watermark_robustness.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("watermark_robustness", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_metrics(bench):
    assert bench.auc(np.array([2.0, 3.0]), np.array([1.0, 0.0])) == 1.0
    assert bench.auc(np.array([0.0]), np.array([1.0])) == 0.0
    assert bench.auc(np.array([1.0, 2.0]), np.array([1.0, 3.0])) == pytest.approx(0.375)
    neg = np.arange(100, dtype=float)
    assert bench.tpr_at_fpr(np.array([98.5, 99.5, 50.0]), neg, 0.01) == pytest.approx(1 / 3)


def test_attacks_change_images_and_keep_size(bench):
    from PIL import Image

    rng = np.random.default_rng(0)
    im = Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))
    for name in bench.ATTACKS:
        out = bench.attack(name, im, np.random.default_rng(1))
        assert out.size == im.size and out.mode == "RGB"
        assert (name == "none") == np.array_equal(np.asarray(out), np.asarray(im)), name


def test_tiny_dwtdct_run(bench, tmp_path):
    torch.set_num_threads(1)
    out = tmp_path / "wm"
    assert bench.main(["--count", "2", "--out", str(out), "--device", "cpu", "--steps", "2", "--batch", "2",
                       "--parts", "dwtdct"]) == 0
    res = json.loads((out / "results.json").read_text())
    assert set(res["dwtdct"]) == set(bench.ATTACKS) and "treering" not in res
    assert res["dwtdct"]["none"]["detected"] == 1.0 and res["dwtdct"]["none"]["false_positive"] == 0.0
    assert not (out / "ring").exists()  # the DWT part alone makes no Tree-Ring images


@pytest.mark.heavy
def test_tiny_run(bench, tmp_path):
    torch.set_num_threads(1)
    out = tmp_path / "wm"
    assert bench.main(["--count", "3", "--out", str(out), "--device", "cpu", "--steps", "2",
                       "--inversion-steps", "3", "--batch", "3", "--parts", "dwtdct,treering,quality"]) == 0
    res = json.loads((out / "results.json").read_text())
    assert set(res["dwtdct"]) == set(bench.ATTACKS) == set(res["treering"])
    # 2-step images are noisy and saturated: a few bits may clip, the mark is still found
    assert res["dwtdct"]["none"]["bit_accuracy"] > 0.9 and res["dwtdct"]["none"]["detected"] == 1.0
    assert res["dwtdct"]["none"]["false_positive"] == 0.0
    assert all(0.0 <= r["auc"] <= 1.0 for r in res["treering"].values())
    assert set(res["quality"]) == {"clean", "ring"}
    assert len(list((out / "marked").glob("*.png"))) == 3
    assert "| jpeg25 |" in (out / "table.md").read_text()
