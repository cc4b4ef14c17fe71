"""Run a worker script under torchrun with 2 CPU processes (gloo), as a user would launch distributed training."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_workers(tmp_path: Path, worker_source: str, *args: str, nproc: int = 2) -> None:
    """Write ``worker_source`` to ``tmp_path/worker.py`` and run it with ``args`` on ``nproc`` ranks; one thread
    each; fails the test with the workers' output when torchrun does not exit 0."""
    script = tmp_path / "worker.py"
    script.write_text(worker_source)
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(REPO / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           str(script), *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
