"""benchmarks/speed_side_by_side.py --smoke: every part of the GPU side-by-side script runs end to end on tiny CPU
networks and writes its tables (it measures nothing; about 3 minutes on the shared 2-core machine, so heavy)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("diffusers")

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.heavy
def test_side_by_side_smoke_writes_every_table(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "speed_side_by_side.py"), "--smoke", "--part",
                           "all", "--out", str(tmp_path)], env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads((tmp_path / "speed.json").read_text())
    for name in ("diffusers eager", "Estable eager", "Estable CUDA graphs", "Estable fastest", "diffusers compiled"):
        assert set(res["inference"][name]) == {"64x1", "64x2", "32x1"}, name
    # fp32 on the CPU: every path agrees with the fp32 reference far below fp16's error
    assert all(v < 1e-4 for v in res["fp16_error"].values()), res["fp16_error"]
    assert set(res["coldstart"]) == {"none (empty cache)", "warm (the cache the first process left)"}
    assert {"diffusers", "Estable", "Estable, channels_last"} <= set(res["training"])
    assert res["checkpointing"]["Estable"]["largest"] == 2
    assert set(res["builtin"]) == {"eager", "CUDA graphs", "fastest",
                                   "bulk generate --prompts (CUDA graphs, PNGs written)"}
    md = (tmp_path / "speed.md").read_text()
    assert "| Estable fastest |" in md and "Largest batch with gradient checkpointing" in md
    # a partial run's parts merge into the same tables
    out2 = tmp_path / "merged"
    assert subprocess.run([sys.executable, str(REPO / "benchmarks" / "speed_side_by_side.py"), "--report",
                           str(tmp_path), "--out", str(out2)], env=env, timeout=120).returncode == 0
    assert json.loads((out2 / "speed.json").read_text())["inference"].keys() == res["inference"].keys()
