"""Issue 17, "tracebacks instead of a one-line error": every case listed there ends with `estable: error: …` on one
line and status 2, and the checks that can come before loading a model do."""

from __future__ import annotations

import json
import struct
import warnings
import zlib
from pathlib import Path

import pytest
from PIL import Image

import estable.cli as cli
from estable.provenance.infotext import read_png_metadata, write_png


def bomb_png(path: Path, side: int = 100_000) -> Path:
    """A valid PNG whose header claims side x side pixels (10^10 by default) and holds a parameters chunk."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    text = b"parameters\0a cube\nSteps: 1, Sampler: Euler, Seed: 1"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"tEXt", text)
                     + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b""))
    return path


@pytest.fixture(scope="module")
def made(tmp_path_factory) -> Path:
    """A PNG made by Estable (the default model, 64x64, one step) whose record the tampering tests edit."""
    folder = tmp_path_factory.mktemp("made")
    out = folder / "made.png"
    assert cli.main(["generate", "a red cube", "--steps", "2", "--size", "64", "--seed", "1", "--device", "cpu",
                     "--out", str(out)]) == 0
    return out


def _tampered(made: Path, tmp: Path, path: tuple[str, ...], value) -> Path:
    text, record = read_png_metadata(made)
    d = record
    for key in path[:-1]:
        d = d[key]
    d[path[-1]] = value
    out = tmp / f"tampered-{'-'.join(path)}.png"
    write_png(out, Image.open(made), parameters=text, record=record)
    return out



def _one_line_error(status: int, err: str, needle: str) -> None:
    assert status == 2, err
    assert err.startswith("estable: error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    assert needle in err, err


@pytest.mark.parametrize(("path", "value", "needle"), [
    (("params", "cfg_scale"), "abc", "cfg scale must be a number, not 'abc'"),
    (("params", "strength"), "x", "strength must be a number"),
    (("params", "steps"), True, "steps must be a whole number, not True"),  # was read as 1 step
    (("params", "weighting"), "no", "weighting must be true or false"),  # was read as on
    (("params", "eta"), None, "eta must be a number"),
    (("params", "tile_vae"), "yes", "tile vae must be true or false"),  # was read as on
    (("params", "hires_scale"), "2", "hires scale must be a number, not '2'"),  # was read as 2
    (("params", "hires_steps"), 2.5, "hires steps must be a whole number"),
    (("model",), "abc", "'model' must be an object"),
    (("model", "source"), 5, "model.source must be text, not 5"),
])
def test_tampered_record_fields_are_one_line_errors(run, made, tmp_path, no_model, path, value, needle):
    status, _, err = run("generate", "--from-png", _tampered(made, tmp_path, path, value), "--out", tmp_path / "o.png")
    _one_line_error(status, err, needle)


@pytest.mark.parametrize("side", [100_000, 10_000])  # Pillow: an error past 179 Mpx, a warning from 89 Mpx
def test_decompression_bomb_header_is_a_one_line_error(run, tmp_path, no_model, side):
    bomb = bomb_png(tmp_path / "bomb.png", side)
    for argv in (["png-info", bomb], ["generate", "--from-png", bomb, "--out", tmp_path / "o.png"],
                 ["img2img", "x", "--image", bomb, "--out", tmp_path / "o.png"]):
        with warnings.catch_warnings(record=True) as shown:
            warnings.simplefilter("always")
            status, _, err = run(*argv)
        _one_line_error(status, err, "bomb.png")
        assert not [w for w in shown if issubclass(w.category, Image.DecompressionBombWarning)]  # printed 2 lines


@pytest.mark.parametrize(("argv", "needle"), [
    (["train", "unet", "--config", "tiny-unet", "--print-config", "device=tpu"], "device must be auto, cpu"),
    (["train", "unet", "--config", "tiny-unet", "--run-dir", "{tmp}/r", "device=tpu", "max_steps=1"],
     "device must be auto, cpu"),
    (["data", "shapes", "{tmp}/ds", "--count", "1", "--size", "100000"], "from 8 to 2048"),
    (["data", "shapes", "{tmp}/ds", "--count", "10000000000"], "from 0 to 100,000,000"),
    (["data", "shapes", "{tmp}/ds", "--count", "50000000", "--size", "2048"], "GiB free"),
    (["eval", "vae", "--size", "100000"], "--size 100000 is out of range"),
    (["eval", "fid", "--real", "shapes:4", "--fake", "shapes:4", "--size", "100000"], "out of range"),
    (["generate", "x", "--seed", str(2**63 - 2), "--batch", "3", "--out", "{tmp}/s.png"],
     f"seed {2**63 - 2} is too large for 3 images"),
    (["generate", "x", "--size", "99999x8", "--out", "{tmp}/s.png"], "larger than the maximum 2048"),
])
def test_bounds_are_one_line_errors(run, tmp_path, no_model, argv, needle):
    status, _, err = run(*[a.format(tmp=tmp_path) for a in argv])
    _one_line_error(status, err, needle)
    assert "99992" not in err  # never a suggestion beyond the 2048 limit
    assert not (tmp_path / "ds").exists() or not list((tmp_path / "ds").glob("*.png"))


def test_params_from_a_record_keep_their_types():
    from estable.errors import EstableError
    from estable.params import GenerationParams

    GenerationParams(cfg_scale=7, steps=3, strength=1)  # ints where floats are expected are fine
    for bad in ({"steps": 2.0}, {"batch_size": True}, {"width": "64"}, {"clip_skip": 1.5}, {"sampler": 3},
                {"cfg_scale": float("nan")}):
        with pytest.raises(EstableError):
            GenerationParams(**bad)
    assert json.dumps(GenerationParams(seed=2**63 - 1).to_dict())  # the largest seed, one image
