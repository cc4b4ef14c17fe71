"""Bad input to training runs gets a clear one-line error and loses nothing: a damaged newest checkpoint (the error
names the one before it, which a resume then uses once the damaged one is set aside), a checkpoint without its model
file, a run of another trainer, --until or max_steps below the run's step, --data against a data.source override, a
log left by a run killed before its first checkpoint, and train export of a run without checkpoints."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch

from cli_util import run_cli as _run
from estable.training.config import load_config
from estable.training.runs import latest_checkpoint, list_checkpoints, save_checkpoint
from estable.training.unet_trainer import UNetTrainer

QUIET = ["log_every=1", "val_every=0", "sample_every=0", "tensorboard=false", "device=cpu"]

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def made(tmp_path_factory) -> Path:
    """A tiny U-Net run stopped at step 2 of 4 with a checkpoint at steps 1 and 2."""
    root = tmp_path_factory.mktemp("made") / "run"
    trainer = UNetTrainer(load_config("unet", "tiny-unet", [*QUIET, "max_steps=4", "save_every=1"]), root,
                          progress=False)
    trainer.train(until=2)
    trainer.close()
    return root


@pytest.fixture
def run(made, tmp_path) -> Path:
    return Path(shutil.copytree(made, tmp_path / "run"))


def _files(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:1000])


def _corrupt_header(path: Path) -> None:
    with open(path, "r+b") as f:
        f.write(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header}")


@pytest.mark.parametrize("name, damage, words", [
    ("model.safetensors", _truncate, "is truncated"),
    ("model.safetensors", lambda p: p.write_bytes(b""), "is truncated: 0 bytes"),
    ("ema.safetensors", _corrupt_header, "header is corrupt"),
    ("state.pt", lambda p: p.write_bytes(b""), "the file is empty or truncated"),  # was "cannot be read: " and no more
    ("state.pt", lambda p: torch.save([1, 2], p), "holds no training state"),  # was a traceback
])
def test_a_damaged_newest_checkpoint_names_the_one_before(run, capsys, name, damage, words):
    damage(run / "checkpoints" / "step_0000002" / name)
    before = _files(run)
    code, err = _run(capsys, "train", "unet", "--run-dir", run, "--resume", "--no-progress")
    assert code == 2 and words in err, err
    assert "to resume from the checkpoint before it, step_0000001, move step_0000002 out of" in err
    assert _files(run) == before  # nothing written, nothing removed


def test_a_damaged_checkpoint_set_aside_in_its_folder_resumes_from_the_one_before(run, capsys):
    ckpts = run / "checkpoints"
    _truncate(ckpts / "step_0000002" / "model.safetensors")
    (ckpts / "step_0000002").rename(ckpts / "step_0000002.bad")  # was a ValueError from int("0000002.bad")
    assert latest_checkpoint(ckpts) == ckpts / "step_0000001"
    code, err = _run(capsys, "train", "unet", "--run-dir", run, "--resume", "--no-progress", "--until", "2")
    assert code == 0, err
    assert [p.name for p in list_checkpoints(ckpts)] == ["step_0000001", "step_0000002"]
    assert (ckpts / "step_0000002.bad" / "model.safetensors").is_file()  # the user's folder is left alone


def test_checkpoint_pointer_and_names_that_are_not_ours(tmp_path):
    root = tmp_path / "ck"
    save_checkpoint(root, 1, {"model": {"w": torch.zeros(2)}}, {})
    (root / "step_0000001 copy").mkdir()
    (root / "step_0000001 copy" / "state.pt").write_bytes(b"x")
    assert list_checkpoints(root) == [root / "step_0000001"]
    (root / "latest").write_bytes(b"\xff\xfestep\n")  # a damaged pointer: the newest complete checkpoint
    assert latest_checkpoint(root) == root / "step_0000001"


def test_a_checkpoint_without_its_model_file(run, capsys):
    (run / "checkpoints" / "step_0000002" / "model.safetensors").unlink()  # was a KeyError traceback
    code, err = _run(capsys, "train", "unet", "--run-dir", run, "--resume", "--no-progress")
    assert code == 2 and "step_0000002 has no model.safetensors" in err


def test_a_changed_model_shape_names_the_tensors(run, capsys):
    before = _files(run)
    code, err = _run(capsys, "train", "unet", "--run-dir", run, "--resume", "--no-progress",
                     "model.block_channels=[32,32]")
    assert code == 2 and "does not fit the configured unet" in err
    assert "Unexpected key(s) in state_dict" in err or "size mismatch" in err  # not "… for UNet:" and nothing more
    assert _files(run) == before


def test_a_run_of_another_trainer(run, tmp_path, capsys):
    code, err = _run(capsys, "train", "vae", "--run-dir", run, "--resume", "--no-progress")
    assert code == 2 and f"{run} is a unet run; continue it with `estable train unet`" in err
    vae = tmp_path / "vae"
    (vae / "checkpoints").mkdir(parents=True)
    (vae / "config.json").write_text(load_config("vae", "tiny-vae").to_json())
    code, err = _run(capsys, "train", "unet", "--run-dir", run, "--resume", "--config", vae / "config.json")
    assert code == 2 and "config.json' is for the vae trainer, not unet" in err  # was a list of unknown keys
    code, err = _run(capsys, "train", "export", vae, tmp_path / "m.safetensors")
    assert code == 2 and "is for the vae trainer, not unet" in err


@pytest.mark.parametrize("args, words", [(["--until", "1"], "--until 1 is below the step the run is at (2)"),
                                         (["max_steps=1"], "max_steps=1 is below the step the run is at (2)")])
def test_a_stop_below_the_runs_step(run, capsys, args, words):
    before = _files(run)  # was "stopped at step 2", nothing trained, config.json rewritten with max_steps=1
    code, err = _run(capsys, "train", "unet", "--run-dir", run, "--resume", "--no-progress", *args)
    assert code == 2 and words in err
    assert _files(run) == before


def test_data_and_a_data_source_override(capsys):
    for override in ("data.source=shapes", 'data={"source": "shapes"}'):
        code, err = _run(capsys, "train", "unet", "--config", "tiny-unet", "--data", "/x/images", override,
                         "--print-config")
        assert code == 2 and "--data and a data.source override" in err  # was: --data won, whatever the order


def test_a_run_killed_before_its_first_checkpoint_starts_its_log_again(tmp_path, capsys):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.json").write_text(load_config("unet", "tiny-unet", [*QUIET, "max_steps=4"]).to_json())
    (run / "log.jsonl").write_text("".join(json.dumps({"type": "train", "step": s}) + "\n" for s in (1, 2, 3)))
    code, err = _run(capsys, "train", "unet", "--run-dir", run, "--resume", "--no-progress", "--until", "1")
    assert code == 0, err
    steps = [json.loads(line)["step"] for line in (run / "log.jsonl").read_text().splitlines()]
    assert steps == [1]  # was [1, 2, 3, 1]: the killed run's records, then this run's


def test_export_of_a_run_without_checkpoints(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(load_config("unet", "tiny-unet").to_json())
    code, err = _run(capsys, "train", "export", run, tmp_path / "m.safetensors")
    assert code == 2 and "is a training run without checkpoints" in err  # was "not a diffusers pipeline"
    assert not (tmp_path / "m.safetensors").exists()
