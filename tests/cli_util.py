"""Shared by the CLI hardening tests. Not a test module itself."""

from __future__ import annotations

from estable.cli import main


def run_cli(capsys, *argv) -> tuple[int, str]:
    """``estable ARGV`` through ``estable.cli.main``: (status, stderr); an error (status 2) must be one line
    ``estable: error: …`` without a traceback."""
    capsys.readouterr()
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    if code == 2:
        assert err.startswith("estable: error:") and "Traceback" not in err and err.count("\n") == 1, err
    return code, err
