"""The noise-residue detector: features, weights on disk, and `estable detect`."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from estable.cli import main
from estable.errors import EstableError
from estable.provenance.detector import (
    DEFAULT_WEIGHTS,
    DetectorConfig,
    ResidualDetector,
    load_detector,
    residual_spectrum,
    save_detector,
)


def _noise(seed: int, size: int = 256) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8))


def test_residual_spectrum():
    s = residual_spectrum(_noise(0))
    assert s.shape == (1, 64, 64) and abs(float(s.mean())) < 1e-4 and abs(float(s.std()) - 1) < 1e-3
    # any size or aspect: centre square, resized
    assert residual_spectrum(_noise(1, 100).resize((150, 100))).shape == (1, 64, 64)
    # a flat image has no residue beyond rounding; a periodic pattern shows as a spectral peak
    grid = np.zeros((256, 256, 3), np.uint8)
    grid[::8, :, :] = 255
    g = residual_spectrum(Image.fromarray(grid))[0]
    peak = torch.nonzero(g == g.max())[0].tolist()
    assert peak[1] == 32 and abs(peak[0] - 32) in (0, 8, 16, 24, 32)  # on the vertical frequency axis


def test_save_load_round_trip(tmp_path):
    torch.manual_seed(0)
    m = ResidualDetector(DetectorConfig(channels=(4, 8)))
    path = save_detector(m, tmp_path / "d.safetensors", info={"note": "test"})
    back = load_detector(path)
    x = torch.stack([residual_spectrum(_noise(2))])
    assert torch.allclose(m(x), back(x))
    assert 0.0 < back.probability([_noise(3)])[0] < 1.0
    (tmp_path / "bad.safetensors").write_bytes(b"nope")
    with pytest.raises(EstableError):
        load_detector(tmp_path / "bad.safetensors")
    with pytest.raises(EstableError, match="no detector weights"):
        load_detector(tmp_path / "missing.safetensors")


@pytest.mark.parametrize("config, words", [
    (None, "no 'config' entry"), ("{bad", "Expecting property name"), ('{"width": 4}', "no 'channels' entry"),
    ('{"channels": [4, 16]}', "size mismatch"),  # the weights are of channels (4, 8)
])
def test_a_detector_file_with_damaged_metadata_is_a_one_line_error(tmp_path, capsys, config, words):
    from estable.checkpoints.io import write_safetensors

    meta = {"format": "estable-residual-detector/1"} | ({} if config is None else {"config": config})
    path = tmp_path / "d.safetensors"
    write_safetensors(path, ResidualDetector(DetectorConfig(channels=(4, 8))).state_dict(), meta)
    with pytest.raises(EstableError, match="the detector's config or weights are invalid") as info:
        load_detector(path)
    assert words in str(info.value) and "\n" not in str(info.value)
    image = tmp_path / "x.png"
    _noise(1, 64).save(image)
    capsys.readouterr()
    assert main(["detect", str(image), "--weights", str(path)]) == 2
    assert capsys.readouterr().err.startswith("estable: error:")


def test_detect_cli(tmp_path, capsys):
    torch.manual_seed(0)
    weights = save_detector(ResidualDetector(), tmp_path / "d.safetensors")
    img = tmp_path / "a.png"
    _noise(4).save(img)
    assert main(["detect", str(img), "--weights", str(weights), "--json"]) == 0
    row = json.loads(capsys.readouterr().out)
    assert row["path"] == str(img) and 0.0 <= row["p_generated"] <= 1.0
    assert main(["detect", str(tmp_path / "missing.png"), "--weights", str(weights)]) == 2


@pytest.mark.skipif(not DEFAULT_WEIGHTS.is_file(), reason="the shipped detector is not there")
def test_shipped_detector_tells_the_built_in_model_from_renders():
    """Eight built-in images against eight held-out renders: the shipped detector ranks a made image above a render
    in most pairs (ROC AUC; 0.875 with the fifteenth model and its detector, 0.5 for a constant one). Its held-out
    AUC is about 0.9 (RESULTS.md), so perfect separation of a handful is luck, not a property: the two-against-two
    check this replaced failed on the fourteenth model (a render at 0.81, a made image at 0.77)."""
    from estable.params import GenerationParams
    from estable.pipeline import load_pipeline
    from estable.training.shapes import ShapesWorld, render

    torch.set_num_threads(1)
    pipe = load_pipeline("default", device="cpu")
    prompts = ["a red circle above a blue square", "a large green star", "two yellow hearts",
               "a small white cross on a blue background"]
    made = pipe.txt2img_each([prompts[i % 4] for i in range(8)], [90001 + i for i in range(8)],
                             GenerationParams(steps=25, cfg_scale=pipe.config.default_cfg or 7.0))
    world = ShapesWorld("heldout", 77)  # renders the detector never saw
    renders = [render(world.scene(i), 256) for i in range(8)]
    model = load_detector(DEFAULT_WEIGHTS)
    p_made, p_renders = model.probability(made), model.probability(renders)
    auc = sum(float(a > b) + 0.5 * float(a == b) for a in p_made for b in p_renders) / 64
    assert auc >= 0.75, (auc, p_made, p_renders)
