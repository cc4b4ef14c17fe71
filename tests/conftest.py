"""Shared fixtures."""

import atexit
import os
import shutil
import tempfile

import pytest
import torch

# Large checkpoints' hashes are remembered in ~/.cache/estable; the suite keeps its own (estable.checkpoints.io),
# made by the first process that imports this file (xdist's workers and the tests' subprocesses inherit it) and
# removed when that process ends.
if "ESTABLE_HASH_CACHE" not in os.environ:
    _hashes = tempfile.mkdtemp(prefix="estable-test-hashes-")
    atexit.register(shutil.rmtree, _hashes, ignore_errors=True)
    os.environ["ESTABLE_HASH_CACHE"] = os.path.join(_hashes, "sha256.json")


@pytest.fixture(scope="module")
def one_thread():
    """Tiny networks run fastest on one thread, and OpenMP threads spin badly on the shared 2-core machine
    (measured for the CLIP test: 6 s with one thread, 35 s with two while other jobs ran). Modules opt in with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``; tests may also request it by name."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def run(capsys):
    """``run(*argv) -> (status, stdout, stderr)`` through the real ``estable.cli.main``."""
    import estable.cli as cli

    def call(*argv) -> tuple[int, str, str]:
        capsys.readouterr()
        try:
            status = cli.main([str(a) for a in argv])
        except SystemExit as exc:  # argparse (--help, usage errors)
            status = int(exc.code or 0)
        out, err = capsys.readouterr()
        return status, out, err

    return call


@pytest.fixture
def no_model(monkeypatch):
    """Fail the test if the model is loaded: the checks under test must come first."""
    import estable.pipeline

    def refuse(*a, **k):
        raise AssertionError("the model was loaded before the input was checked")

    monkeypatch.setattr(estable.pipeline, "load_pipeline", refuse)
