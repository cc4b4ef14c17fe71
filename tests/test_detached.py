"""recipes/detached.sh: long work started detached on a fresh machine's folder, polled, its files copied out."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "recipes" / "detached.sh"


def run(cwd: Path, *args: str, out: Path | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "OUT"}
    if out is not None:
        env["OUT"] = str(out)
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=60)


def test_start_on_a_fresh_folder_then_poll_until_it_ends_and_copy(tmp_path):
    assert not (tmp_path / "runs").exists()  # as on a fresh machine
    job = ["bash", "-c", "sleep 1; mkdir -p runs/o; echo made > runs/o/a.txt; echo b > runs/o/m.part-aa; "
           "echo said"]
    started = run(tmp_path, "start", "j", "--", *job)
    assert started.returncode == 0 and "j: started" in started.stdout
    again = run(tmp_path, "start", "j", "--", *job)  # every poll call may carry the start: it runs once
    assert again.returncode == 0 and "started before" in again.stdout
    out = tmp_path / "out"
    # a pattern is expanded after the wait (the files are made by then), not by the shell that read the line
    polled = run(tmp_path, "poll", "j", "30", "runs/o/a.txt", "runs/o/missing.txt", "runs/o/*.part-*", out=out)
    assert polled.returncode == 0, polled.stdout + polled.stderr
    assert "j: ended, status 0" in polled.stdout and "said" in polled.stdout
    assert (out / "a.txt").read_text() == "made\n" and "missing.txt: not there" in polled.stderr
    assert (out / "m.part-aa").read_text() == "b\n" and "part-*" not in polled.stderr
    assert (tmp_path / "runs" / "detached" / "j" / "rc").read_text().strip() == "0"


def test_a_failure_is_the_polls_status_and_a_running_job_is_left_running(tmp_path):
    run(tmp_path, "start", "bad", "--", "bash", "-c", "exit 3")
    assert run(tmp_path, "poll", "bad", "30").returncode == 3
    run(tmp_path, "start", "long", "--", "sleep", "30")
    try:
        polled = run(tmp_path, "poll", "long", "1")
        assert polled.returncode == 0 and "long: running" in polled.stdout
        assert run(tmp_path, "state", "long").stdout.strip() == "long: running"
    finally:
        os.killpg(int((tmp_path / "runs" / "detached" / "long" / "pid").read_text()), signal.SIGKILL)
    polled = run(tmp_path, "poll", "long", "5")
    assert polled.returncode == 1 and "gone without a status" in polled.stdout


def test_bad_calls_are_refused(tmp_path):
    assert run(tmp_path, "start", "x").returncode == 2  # no command
    assert run(tmp_path, "start", "../x", "--", "true").returncode == 2
    assert run(tmp_path, "poll", "x", "soon").returncode == 2
    assert run(tmp_path, "state", "x").stdout.strip() == "x: not started"
    assert run(tmp_path, "frob", "x").returncode == 2
