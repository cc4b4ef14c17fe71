"""The shipped default model: it loads from the package, and a golden image pins its output on the CPU.

Golden image: tests/data/golden_default.png, made by `python tests/test_default_model.py` (this file's main) with
torch 2.13.0+cpu, fp32: "a red circle above a blue square", seed 1, 15 steps of DPM++ 2M Karras, CFG 5, 256×256.
Tolerance: mean absolute difference ≤ 0.5 level of 255 and 99th percentile ≤ 4 levels (the same machine gives 0).
That admits the rounding of other CPUs' kernels (oneDNN picks them per instruction set), not a changed model, sampler
or pipeline: one more sampling step moves the image by a mean of 14 and a 99th percentile of 107 levels, another
seed by 36 and 238 (test_golden_image_tolerance_is_tight; measured on the sixth built-in model).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from estable import GenerationParams, load_pipeline
from estable.checkpoints.info import describe, format_info
from estable.pipeline import DEFAULT_MODEL_CARD, DEFAULT_MODEL_PATH

pytestmark = pytest.mark.usefixtures("one_thread")

GOLDEN = Path(__file__).parent / "data" / "golden_default.png"
PARAMS = GenerationParams(prompt="a red circle above a blue square", seed=1, steps=15, cfg_scale=5.0,
                          sampler="dpmpp_2m_karras")


@pytest.fixture(scope="module")
def pipe():
    return load_pipeline("default", device="cpu", dtype="fp32")


def _pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def _close(a: np.ndarray, b: np.ndarray) -> tuple[bool, float, float]:
    diff = np.abs(a - b)
    mean, p99 = float(diff.mean()), float(np.percentile(diff, 99))
    return mean <= 0.5 and p99 <= 4.0, mean, p99


def test_default_model_is_shipped_small_and_documented(pipe):
    assert DEFAULT_MODEL_PATH.is_file() and DEFAULT_MODEL_PATH.stat().st_size <= 30_000_000
    assert DEFAULT_MODEL_CARD.is_file() and "Known limits" in DEFAULT_MODEL_CARD.read_text(encoding="utf-8")
    assert pipe.native_size == (256, 256) and pipe.config.vae.latent_channels == 4 and pipe.factor == 8
    assert pipe.config.default_cfg is not None
    info = describe(DEFAULT_MODEL_PATH, hashes=False)
    assert info["default_cfg"] == pipe.config.default_cfg
    assert f"CFG {info['default_cfg']:g} by default" in format_info(info)
    total = sum(p.numel() for m in (pipe.unet, pipe.vae, pipe.text_encoder) for p in m.parameters())
    assert 10e6 < total < 15e6


def test_golden_image(pipe):
    got = _pixels(pipe.txt2img(PARAMS).images[0])
    ok, mean, p99 = _close(got, _pixels(Image.open(GOLDEN)))
    assert ok, f"default model drifted from the golden image: mean {mean:.3f}, 99th percentile {p99:.1f} levels"


def test_golden_image_tolerance_is_tight(pipe):
    golden = _pixels(Image.open(GOLDEN))
    for change in ({"seed": 2}, {"steps": 16}, {"cfg_scale": 6.0}, {"prompt": "a blue circle above a red square"}):
        other = _pixels(pipe.txt2img(GenerationParams(**{**PARAMS.to_dict(), **change})).images[0])
        assert not _close(other, golden)[0], change


if __name__ == "__main__":  # regenerate the golden image (after a deliberate change to the model)
    import torch

    torch.set_num_threads(1)
    image = load_pipeline("default", device="cpu", dtype="fp32").txt2img(PARAMS).images[0]
    image.save(GOLDEN)
    print(f"wrote {GOLDEN}", file=sys.stderr)
