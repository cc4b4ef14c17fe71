"""Issue 17, "images silently wrong": 16-bit, EXIF-rotated and alpha-only inputs, empty masks, a changed model behind
--from-png, resized inputs, --resume on a missing folder, hostile PNG text, and a progress bar from the start."""

from __future__ import annotations

import io
import sys

import numpy as np
import pytest
from PIL import Image

import estable.cli_generate as cli_generate
from estable.errors import EstableError
from estable.images import load_image, mask_to_tensor
from estable.provenance.infotext import write_png

pytestmark = pytest.mark.usefixtures("one_thread")

FAST = ["--steps", "2", "--seed", "3", "--device", "cpu"]


def _ramp16(h: int = 32, w: int = 48) -> np.ndarray:
    return (np.linspace(0, 65535, w)[None, :].repeat(h, 0)).astype(np.uint16)


def test_sixteen_bit_grey_is_scaled_not_clipped(tmp_path):
    path = tmp_path / "g16.png"
    Image.fromarray(_ramp16()).save(path)
    assert Image.open(path).mode == "I;16"
    rgb = np.asarray(load_image(path), dtype=np.float64)
    want = np.linspace(0, 255, 48)  # 65535 -> 255, linearly
    assert np.abs(rgb[0, :, 0] - want).max() <= 1.0
    assert (rgb == 255).mean() < 0.05  # was 99.5 % white
    mask = load_image(path, mode="mask")
    assert abs(float(mask_to_tensor(mask).mean()) - 0.5) < 0.05  # half the ramp is ≥ 50 %


def _exif_jpeg(arr: np.ndarray, orientation: int) -> bytes:
    im = Image.fromarray(arr)
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    im.save(buf, format="JPEG", exif=exif.tobytes(), quality=95)
    return buf.getvalue()


def test_exif_orientation_is_applied_to_images_and_masks(tmp_path):
    arr = np.zeros((40, 64, 3), np.uint8)
    arr[:, :16] = 255  # a white band on the left of the stored pixels
    path = tmp_path / "phone.jpg"
    path.write_bytes(_exif_jpeg(arr, 6))  # 6: display rotated 90° clockwise
    im = load_image(path)
    assert im.size == (40, 64)  # upright: portrait
    top = np.asarray(im)[:16].mean()
    assert top > 200  # the left band of the stored image is the top band once rotated clockwise
    mask = load_image(path, mode="mask")
    assert mask.size == (40, 64) and np.asarray(mask)[:16].mean() > 200
    from estable.images import decode_image  # the server's entry point: the bytes of an upload

    assert decode_image(path.read_bytes()).size == (40, 64)


def test_alpha_only_mask_and_all_black_mask():
    rgba = np.zeros((32, 32, 4), np.uint8)  # black strokes on a transparent layer
    rgba[8:24, 8:24, 3] = 255
    m = mask_to_tensor(Image.fromarray(rgba, "RGBA"))
    assert float(m.sum()) == 16 * 16 and float(m[0, 0, 8:24, 8:24].min()) == 1.0
    from estable.images import as_mask

    # colour that carries the mask wins over a uniform alpha
    grey = Image.fromarray(np.pad(np.full((8, 8), 255, np.uint8), 12), "L").convert("LA")
    assert float(mask_to_tensor(grey).sum()) == 64
    assert as_mask(Image.new("L", (4, 4), 255)).getextrema() == (255, 255)


def test_all_black_mask_stops_before_loading(run, tmp_path, monkeypatch):
    import estable.pipeline

    monkeypatch.setattr(estable.pipeline, "load_pipeline", lambda *a, **k: pytest.fail("model loaded"))
    Image.new("RGB", (64, 64), (90, 90, 90)).save(tmp_path / "i.png")
    Image.new("L", (64, 64), 0).save(tmp_path / "m.png")
    status, _, err = run("inpaint", "x", "--image", tmp_path / "i.png", "--mask", tmp_path / "m.png", *FAST,
                         "--out", tmp_path / "o.png")
    assert status == 2 and "the mask is all black: nothing to repaint" in err and err.count("\n") == 1


def test_pipeline_inpaint_refuses_an_empty_mask_and_notes_a_resize():
    from estable.params import GenerationParams
    from estable.pipeline import load_pipeline

    pipe = load_pipeline("default", device="cpu")
    image = Image.new("RGB", (70, 66), (120, 30, 30))
    with pytest.raises(EstableError, match="nothing to repaint"):
        pipe.inpaint(image, Image.new("L", image.size, 0), GenerationParams(prompt="x", steps=2))
    result = pipe.img2img(image, GenerationParams(prompt="x", steps=2, strength=1.0, seed=1))
    assert result[0].size == (64, 64)
    assert any("70x66" in w and "64x64" in w and "not a multiple of 8" in w for w in result.warnings), result.warnings


def test_from_png_refuses_a_changed_model(run, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from estable.pipeline import default_model_path

    src = default_model_path()
    model = tmp_path / "m.safetensors"
    with safe_open(str(src), "pt") as f:
        meta = f.metadata()
    tensors = load_file(str(src))
    save_file(tensors, str(model), metadata=meta)
    first = tmp_path / "first.png"
    assert run("generate", "x", "--model", model, *FAST, "--size", 64, "--out", first)[0] == 0
    save_file(tensors, str(model), metadata={**meta, "note": "changed"})  # same path, another file
    status, _, err = run("generate", "--from-png", first, "--out", tmp_path / "again.png")
    assert status == 2 and "has changed since the image was made" in err and "--allow-model-change" in err
    status, _, err = run("generate", "--from-png", first, "--out", tmp_path / "again.png", "--allow-model-change")
    assert status == 0 and "warning: the model at" in err


def test_resume_on_a_missing_run_folder_is_refused(run, tmp_path):
    status, _, err = run("train", "unet", "--config", "tiny-unet", "--run-dir", tmp_path / "typo", "--resume",
                         "--no-progress", "max_steps=1")
    assert status == 2 and "does not exist" in err
    assert not (tmp_path / "typo").exists()


def test_png_info_escapes_control_characters_and_caps_output(run, tmp_path):
    path = tmp_path / "evil.png"
    text = "a cube\x1b[2J\x1b]0;owned\x07\u202e\x9b31m" + "z" * 30_000 + "\nSteps: 1, Sampler: Euler, Seed: 1"
    write_png(path, Image.new("RGB", (8, 8)), parameters=text, record={"params": {"prompt": "\x1b[2J\x9b"}})
    status, out, err = run("png-info", path)
    assert status == 0, err
    for raw in ("\x1b", "\x07", "\u202e", "\x9b"):
        assert raw not in out
    assert "\\x1b[2J" in out and "\\u202e" in out and "\\x9b" in out
    assert len(out) < 25_000 and "more characters not shown" in out
    status, out, _ = run("png-info", path, "--full")
    assert len(out) > 30_000 and "\x1b" not in out


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bar_shows_before_the_first_step_and_warns_when_long(monkeypatch):
    term = _Terminal()
    monkeypatch.setattr(sys, "stderr", term)
    prog = cli_generate._progress("cpu")
    update = prog.__enter__()
    assert "step" in term.getvalue()  # drawn before any step finished
    prog.LONG_S = -1.0  # any run counts as long
    update(0, 50, None, None)
    update(1, 50, None, None)
    prog.__exit__(None, None, None)
    shown = term.getvalue()
    assert shown.count("will take about") == 1 and "x 50 steps" in shown and "GPU" in shown


def test_training_preprocess_scales_sixteen_bit_images():
    """The training loader's preprocessing (image folders, tar shards) reads 16-bit PNGs by value range too."""
    from estable.training.data import preprocess

    x = preprocess(Image.fromarray(_ramp16(32, 32)), 32)  # (3, 32, 32) in [-1, 1]
    row = x[0, 0].numpy()
    assert abs(row[0] + 1.0) < 0.02 and abs(row[-1] - 1.0) < 0.02
    assert np.abs(np.diff(row)).max() < 0.2 and float((x > 0.99).float().mean()) < 0.1  # a ramp, not white


def test_cli_says_once_how_the_input_was_resized(run, tmp_path):
    Image.new("RGB", (70, 66), (100, 20, 20)).save(tmp_path / "odd.png")
    status, out, err = run("img2img", "x", "--image", tmp_path / "odd.png", "--strength", 1, "--batch-count", 2,
                           *FAST, "--out", tmp_path / "o.png")
    assert status == 0, err
    assert len(out.split()) == 2 and Image.open(tmp_path / "o-1.png").size == (64, 64)
    assert err.count("resized") == 1 and "70x66" in err and "to 64x64" in err


def test_to_pil_rounds_to_the_nearest_level_and_clamps():
    """Decoded images to 8 bits: (x / 2 + 0.5) · 255 rounded half to even, values outside [-1, 1] clamped — the
    levels a NumPy conversion on the host gives, whatever device the arithmetic runs on."""
    import torch

    from estable.images import to_pil

    levels = torch.arange(256, dtype=torch.float32)
    half = (levels[:-1] + 0.5) / 255  # exactly between two levels, before the clamp
    x = torch.cat([levels / 255, half, torch.tensor([-0.5, 1.5])]) * 2 - 1  # (513,)
    img = x.reshape(1, 1, 1, -1).expand(2, 3, 4, -1).contiguous()  # (2, 3, 4, 513)
    want = np.rint((np.clip(x.numpy() / 2 + 0.5, 0, 1)) * 255).astype(np.uint8)
    out = to_pil(img)
    assert len(out) == 2 and out[0].size == (513, 4) and out[0].mode == "RGB"
    got = np.asarray(out[1])
    assert (got == want[None, :, None]).all()
    assert want[0] == 0 and want[255] == 255 and want[-2:].tolist() == [0, 255]


def test_an_input_image_sets_a_size_that_is_a_multiple_of_8_for_a_model_that_shrinks_by_4(tmp_path):
    """Without --size, img2img takes the input's size rounded down: to the model's factor alone it was 12x20 for a
    VAE that shrinks by 4, which the image's record then refused (every size is a multiple of 8)."""
    from estable.params import GenerationParams
    from estable.pipeline import load_pipeline
    from server_util import make_tiny_model

    pipe = load_pipeline(make_tiny_model(tmp_path / "tiny.safetensors"), device="cpu")
    assert pipe.factor == 4
    result = pipe.img2img(Image.new("RGB", (13, 22), (200, 40, 40)),
                          GenerationParams(prompt="x", steps=2, strength=0.5, seed=1))
    assert result.images[0].size == (8, 16)
