"""Issue 17, "files lost or left broken": outputs are checked before the work, never replace a file silently or an
input at all, a many-batch run keeps what it finished, `data shapes` never leaves half a folder, and `eval` checks
its output and inputs before computing. Runs the built-in default model at 64x64 with one or two steps."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from estable.pipeline import Pipeline

pytestmark = pytest.mark.usefixtures("one_thread")

FAST = ["--steps", "2", "--size", "64", "--seed", "3", "--device", "cpu"]



def _one_line_error(status: int, err: str, needle: str) -> None:
    assert status == 2, err
    assert err.startswith("estable: error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    assert needle in err, err


def test_out_never_replaces_an_input_or_an_existing_file(run, tmp_path, no_model):
    photo = tmp_path / "photo.png"
    Image.new("RGB", (64, 64), (200, 10, 10)).save(photo)
    before = photo.read_bytes()
    for extra in ([], ["--overwrite"]):  # not even with --overwrite
        status, _, err = run("img2img", "x", "--image", photo, "--out", photo, *FAST, *extra)
        _one_line_error(status, err, "is the input image")
    assert photo.read_bytes() == before

    notes = tmp_path / "notes.png"
    notes.write_text("my notes")
    status, _, err = run("generate", "x", "--out", notes, *FAST)
    _one_line_error(status, err, "already exists; pass --overwrite")
    assert notes.read_text() == "my notes"

    # --batch 3 --out b.png writes b-0, b-1, b-2: an existing b-1.png stops the run before anything is written
    (tmp_path / "b-1.png").write_text("keep")
    status, _, err = run("generate", "x", "--batch", 3, "--out", tmp_path / "b.png", *FAST)
    _one_line_error(status, err, "b-1.png already exists")
    assert (tmp_path / "b-1.png").read_text() == "keep" and not (tmp_path / "b-0.png").exists()


def test_overwrite_replaces_and_a_folder_keeps_numbering(run, tmp_path):
    notes = tmp_path / "notes.png"
    notes.write_text("old")
    status, out, err = run("generate", "x", "--out", notes, "--overwrite", *FAST)
    assert status == 0, err
    assert Image.open(notes).size == (64, 64)
    folder = tmp_path / "outs"
    for expected in ("00000-3.png", "00001-3.png"):  # the same seed twice: new numbers, nothing replaced
        status, out, err = run("generate", "x", "--out", folder, *FAST)
        assert status == 0 and Path(out.strip()).name == expected, err


@pytest.mark.parametrize("kind", ["folder", "readonly"])
def test_unwritable_out_is_found_before_the_model_loads(run, tmp_path, no_model, kind):
    if kind == "folder":
        target = tmp_path / "d.png"
        target.mkdir()
        needle = "is a folder"
    else:
        target = Path("/sys/estable-test.png")  # refused even to root, unlike a chmod 555 folder
        try:
            with open(target.parent / ".estable-probe", "xb"):
                pass
            pytest.skip("/sys is writable here")
        except OSError:
            pass
        needle = "cannot write into /sys"
    status, _, err = run("generate", "x", "--out", target, *FAST)
    _one_line_error(status, err, needle)


def test_batch_count_saves_each_batch_and_an_interrupt_keeps_them(run, tmp_path, monkeypatch):
    calls = {"n": 0}
    real_sample = Pipeline._sample

    def sample(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:  # Ctrl-C during the third batch
            raise KeyboardInterrupt
        return real_sample(self, *args, **kwargs)

    monkeypatch.setattr(Pipeline, "_sample", sample)
    folder = tmp_path / "F"
    status, out, err = run("generate", "x", "--batch-count", 5, "--out", folder, *FAST)
    assert status == 130
    kept = sorted(p.name for p in folder.glob("*.png"))
    assert kept == ["00000-3.png", "00001-4.png"], kept
    assert [Path(p).name for p in out.split()] == kept  # printed as they were written
    assert "interrupted after 2 of 5 images" in err
    assert not [p for p in folder.iterdir() if p.name.startswith(".")]  # no temporary files left


# ------------------------------------------------------------------------------------------- data shapes


def _rows(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]


def test_data_shapes_refuses_a_used_folder_appends_or_overwrites(run, tmp_path):
    out = tmp_path / "ds"
    assert run("data", "shapes", out, "--count", 3, "--size", 32)[0] == 0
    first = (out / "00000001.png").read_bytes()
    status, _, err = run("data", "shapes", out, "--count", 2, "--size", 32)
    _one_line_error(status, err, "--overwrite")
    assert len(_rows(out)) == 3 and (out / "00000001.png").read_bytes() == first

    status, _, err = run("data", "shapes", out, "--count", 2, "--size", 32, "--append")
    assert status == 0, err
    rows = _rows(out)
    assert [r["file_name"] for r in rows] == [f"{i:08d}.png" for i in range(5)]
    assert (out / "00000001.png").read_bytes() == first
    assert len({r["text"] + json.dumps(r["attributes"]) for r in rows}) == 5  # new scenes, not repeats
    assert json.loads((out / "shapes_world.json").read_text())["count"] == 5

    status, _, err = run("data", "shapes", out, "--count", 2, "--size", 32, "--overwrite")
    assert status == 0, err
    assert sorted(p.name for p in out.glob("*.png")) == ["00000000.png", "00000001.png"] and len(_rows(out)) == 2


def test_data_shapes_interrupted_leaves_complete_files_in_step_with_metadata(run, tmp_path, monkeypatch):
    from estable.training import shapes

    real_save = Image.Image.save
    saved = {"n": 0}

    def save(self, fp, *args, **kwargs):  # Ctrl-C in the middle of writing the fourth PNG
        if isinstance(fp, (str, os.PathLike)) and Path(fp).parent.name == "ds":
            saved["n"] += 1
            if saved["n"] == 4:
                Path(fp).write_bytes(b"")
                raise KeyboardInterrupt
        return real_save(self, fp, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", save)
    assert shapes  # the writer under test
    out = tmp_path / "ds"
    status, _, err = run("data", "shapes", out, "--count", 6, "--size", 32)
    assert status == 130, err
    assert "holds 3 complete images" in err
    pngs = sorted(out.glob("*.png"))
    assert [p.name for p in pngs] == [f"{i:08d}.png" for i in range(3)]
    assert all(p.stat().st_size > 0 for p in pngs)
    assert [r["file_name"] for r in _rows(out)] == [p.name for p in pngs]
    assert not [p for p in out.iterdir() if p.name.startswith(".")]
    monkeypatch.setattr(Image.Image, "save", real_save)
    status, _, err = run("data", "shapes", out, "--count", 3, "--size", 32, "--append")  # finish the job
    assert status == 0, err
    assert [r["file_name"] for r in _rows(out)] == [f"{i:08d}.png" for i in range(6)]
    assert json.loads((out / "shapes_world.json").read_text())["count"] == 6


# ------------------------------------------------------------------------------------------------- eval


def test_eval_checks_out_and_fake_before_computing(run, tmp_path, monkeypatch):
    import estable.evaluation.fid as fid

    def no_features(*a, **k):
        raise AssertionError("features were computed before the inputs and output were checked")

    monkeypatch.setattr(fid, "extract_features", no_features)
    existing = tmp_path / "r.json"
    existing.write_text('{"keep": 1}')
    status, _, err = run("eval", "fid", "--real", "shapes:8", "--fake", "shapes:8", "--out", existing)
    _one_line_error(status, err, "already exists")
    assert existing.read_text() == '{"keep": 1}'
    status, _, err = run("eval", "fid", "--real", "shapes:8", "--fake", tmp_path / "absent")
    _one_line_error(status, err, "neither a folder")
    status, _, err = run("eval", "fid", "--real", "shapes:8", "--fake", "shapes:8", "--out", tmp_path)
    _one_line_error(status, err, "is a folder")
    fake = tmp_path / "fake"
    fake.mkdir()
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(fake / "a.png")
    (fake / "b.png").write_text("not an image")
    status, _, err = run("eval", "fid", "--real", "shapes:8", "--fake", fake)
    _one_line_error(status, err, "not readable images, e.g. b.png")
    status, _, err = run("eval", "vae", "--out", existing, "--count", 1)
    _one_line_error(status, err, "already exists")


def test_library_save_result_follows_the_same_rules(tmp_path):
    """Pipeline users (the server) get the same guarantees through save_result."""
    from estable.errors import EstableError
    from estable.pipeline import GenerationResult, save_result

    images = [Image.new("RGB", (8, 8), (k * 40, 0, 0)) for k in range(2)]
    records = [{"params": {"seed": s}} for s in (5, 6)]
    result = GenerationResult(images, [5, 6], ["a\nSteps: 1, Sampler: Euler, Seed: 5"] * 2, records, None)
    (tmp_path / "x-1.png").write_text("keep")
    with pytest.raises(EstableError, match="x-1.png already exists"):
        save_result(result, tmp_path / "x.png")
    assert (tmp_path / "x-1.png").read_text() == "keep" and not (tmp_path / "x-0.png").exists()
    assert [p.name for p in save_result(result, tmp_path / "x.png", overwrite=True)] == ["x-0.png", "x-1.png"]
    with pytest.raises(EstableError, match="input image"):
        save_result(result, tmp_path / "x.png", overwrite=True, inputs=[tmp_path / "x-0.png"])
    assert [p.name for p in save_result(result, tmp_path / "f")] == ["00000-5.png", "00001-6.png"]
    assert [p.name for p in save_result(result, tmp_path / "f", start=7)] == ["00007-5.png", "00008-6.png"]
