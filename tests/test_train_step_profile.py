"""benchmarks/train_step_profile.py on the CPU: a tiny U-Net run warms up, is profiled, and the report adds up."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import train_step_profile  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = ["device=cpu", "precision=fp32", "data.num_workers=0", "data.size=64", "data.shapes_length=32", "batch_size=2",
        "model.block_channels=[8,16,24]", "model.head_channels=8", "model.sample_size=8", "max_steps=20"]


def run(monkeypatch, *argv: str) -> None:
    monkeypatch.setattr(sys, "argv", ["train_step_profile.py", *argv])
    train_step_profile.main()


def test_profiles_the_steps_after_the_warm_up(tmp_path, monkeypatch, capsys):
    config = str(Path(__file__).resolve().parents[1] / "recipes" / "default" / "unet_wide.json")
    run(monkeypatch, config, *TINY, "--run-dir", str(tmp_path / "run"), "--warm", "2", "--steps", "3",
        "--out", str(tmp_path / "out"))
    report = json.loads((tmp_path / "out" / "train_profile.json").read_text())
    assert report["steps"] == 3 and report["device"] == "cpu" and report["gpu_busy_share"] is None
    assert report["wall_ms_per_step"] > 0 and report["host_ops"]
    assert sum(r["self_cpu_ms_per_step"] for r in report["host_ops"]) <= report["wall_ms_per_step"]
    assert "ms a step" in capsys.readouterr().out
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert max(r["step"] for r in log if r.get("type") == "train") == 5  # 2 warm + 3 profiled
    with pytest.raises(SystemExit, match="no room"):  # the run is at step 5 of 20 now
        run(monkeypatch, config, *TINY, "--run-dir", str(tmp_path / "run"), "--warm", "10", "--steps", "10")
