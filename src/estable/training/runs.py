"""Run folders, JSONL logs and atomic, resumable checkpoints.

Layout of ``runs/NAME/``::

    config.json                 the resolved training config (itself a valid --config file)
    log.jsonl                   one JSON object per line: {"type": "train"|"val"|"sample", "step": …, …}
    tensorboard/                TensorBoard events (only when torch.utils.tensorboard imports)
    samples/step_0000500.png    sample grids
    checkpoints/latest          the name of the newest complete checkpoint (one line)
    checkpoints/step_0000500/   model.safetensors, ema.safetensors, (other networks).safetensors, state.pt

``state.pt`` is a ``torch.save`` of plain containers of tensors, numbers and strings (optimizer, LR schedule,
GradScaler, RNG states, data position, step), read back with ``torch.load(weights_only=True)``: no code runs.

Atomicity: a checkpoint is written into a temporary folder next to its final place (every file fsynced), the
folder is fsynced and renamed into place, and only then is ``latest`` replaced (temporary file + fsync +
rename). A process killed at any moment leaves either the previous state (``latest`` pointing at the previous,
intact checkpoint, plus a stray ``.tmp-*`` folder that the next save removes) or the new one.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from estable.checkpoints.io import atomic_write_text, fsync_path, read_safetensors, write_safetensors
from estable.errors import CheckpointError, EstableError
from estable.training.ema import strip_wrappers

CHECKPOINT_FORMAT = "estable-train"
CHECKPOINT_FORMAT_VERSION = 1
STATE_FILE = "state.pt"
LATEST = "latest"
# Test hook: "STEP:SECONDS" makes the save of checkpoint STEP pause SECONDS after each file it writes, so a test
# can kill the process in the middle of a save. Has no effect unless set.
PAUSE_ENV = "ESTABLE_TEST_SAVE_PAUSE"


def step_name(step: int) -> str:
    return f"step_{step:07d}"


def clean_state_dict(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Keys without ``_orig_mod.``/``module.`` wrapper parts; values detached on the CPU."""
    return {strip_wrappers(k): v.detach().cpu() for k, v in sd.items()}


def _test_pause(step: int) -> float:
    value = os.environ.get(PAUSE_ENV)
    if not value:
        return 0.0
    at, _, seconds = value.partition(":")
    return float(seconds) if int(at) == step else 0.0


# ---------------------------------------------------------------------------------------------------------
# RNG state capture (python, numpy, torch CPU, CUDA) as weights_only-loadable plain data
# ---------------------------------------------------------------------------------------------------------


def capture_rng_state() -> dict[str, Any]:
    version, mt, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": {"version": int(version), "state": torch.tensor(mt, dtype=torch.int64), "gauss": gauss},
        "numpy": {"name": str(name), "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((py["version"], tuple(int(x) for x in py["state"].tolist()), py["gauss"]))
    npst = state["numpy"]
    np.random.set_state((npst["name"], npst["keys"].numpy().astype(np.uint32), npst["pos"], npst["has_gauss"],
                         npst["cached"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = state["cuda"]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)


# ---------------------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------------------


@dataclass
class Checkpoint:
    """A loaded checkpoint: ``tensors[name]`` for each ``name.safetensors``, their metadata, and state.pt."""

    path: Path
    step: int
    tensors: dict[str, dict[str, torch.Tensor]]
    metadata: dict[str, dict[str, str]]
    state: dict[str, Any]


def save_checkpoint(
    checkpoints_dir: str | Path,
    step: int,
    tensors: dict[str, dict[str, torch.Tensor]],
    state: dict[str, Any],
    metadata: dict[str, str] | None = None,
    keep: int | None = None,
) -> Path:
    """Write ``checkpoints_dir/step_XXXXXXX/`` atomically and point ``latest`` at it; keep the newest ``keep``.

    tensors: ``{"model": state_dict, "ema": state_dict, …}``, each written as ``NAME.safetensors`` (wrapper
    prefixes removed) with ``metadata`` (strings) in its header. state: plain data for ``state.pt``.
    """
    root = Path(checkpoints_dir)
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".tmp-*"):  # left by a save that was killed
        shutil.rmtree(stale, ignore_errors=True)
    final = root / step_name(step)
    tmp = root / f".tmp-{step_name(step)}-{os.getpid()}"
    tmp.mkdir()
    pause = _test_pause(step)
    meta = {"format": CHECKPOINT_FORMAT, "format_version": str(CHECKPOINT_FORMAT_VERSION), "step": str(step),
            **(metadata or {})}
    try:
        for name, sd in tensors.items():
            write_safetensors(tmp / f"{name}.safetensors", clean_state_dict(sd), meta)
            if pause:
                time.sleep(pause)
        with open(tmp / STATE_FILE, "wb") as f:
            torch.save({**state, "step": step, "format_version": CHECKPOINT_FORMAT_VERSION}, f)
            f.flush()
            os.fsync(f.fileno())
        if pause:
            time.sleep(pause)
        fsync_path(tmp)
        if final.exists():  # the same step saved again (e.g. after a resume): swap the old one out first
            old = root / f".tmp-old-{step_name(step)}-{os.getpid()}"
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        fsync_path(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    atomic_write_text(root / LATEST, final.name + "\n")
    if keep is not None:
        prune_checkpoints(root, keep)
    return final


def list_checkpoints(checkpoints_dir: str | Path) -> list[Path]:
    """Complete checkpoint folders (``step_*`` with a state.pt), oldest first."""
    root = Path(checkpoints_dir)
    if not root.is_dir():
        return []
    # step_ and digits only: a folder the user set aside (step_0000500.bad, a copy) is none of them
    found = [p for p in root.glob("step_*") if re.fullmatch(r"step_\d+", p.name) and p.is_dir()
             and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(p.name.split("_")[1]))


def prune_checkpoints(checkpoints_dir: str | Path, keep: int) -> None:
    """Delete all but the newest ``keep`` checkpoints (never the one ``latest`` names)."""
    latest = latest_checkpoint(checkpoints_dir)
    for p in list_checkpoints(checkpoints_dir)[:-keep] if keep > 0 else []:
        if latest is None or p.resolve() != latest.resolve():
            shutil.rmtree(p, ignore_errors=True)


def latest_checkpoint(checkpoints_dir: str | Path) -> Path | None:
    """The checkpoint ``latest`` names, else the newest complete one, else None."""
    root = Path(checkpoints_dir)
    pointer = root / LATEST
    if pointer.is_file():
        target = root / pointer.read_text(encoding="utf-8", errors="replace").strip()  # damaged: no such folder
        if target.is_dir() and (target / STATE_FILE).is_file():
            return target
    found = list_checkpoints(root)
    return found[-1] if found else None


def load_checkpoint(path: str | Path, *, map_location: str | torch.device = "cpu") -> Checkpoint:
    """Read a checkpoint folder: every ``*.safetensors`` (validated) and ``state.pt`` (weights_only)."""
    path = Path(path)
    if not (path / STATE_FILE).is_file():
        raise CheckpointError(f"{path} is not a training checkpoint (no {STATE_FILE})")
    tensors: dict[str, dict[str, torch.Tensor]] = {}
    metadata: dict[str, dict[str, str]] = {}
    for f in sorted(path.glob("*.safetensors")):
        tensors[f.stem], metadata[f.stem] = read_safetensors(f)
    try:
        state = torch.load(path / STATE_FILE, map_location=map_location, weights_only=True)
    except Exception as exc:
        # the first line of torch's reason; an EOFError (an empty file) has none
        reason = (str(exc).strip().splitlines() or [f"{type(exc).__name__}, the file is empty or truncated"])[0]
        raise CheckpointError(f"{path / STATE_FILE} cannot be read: {reason}") from None
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        raise CheckpointError(f"{path / STATE_FILE} is damaged: it holds no training state")
    if state.get("format_version") != CHECKPOINT_FORMAT_VERSION:
        raise CheckpointError(f"{path}: checkpoint format {state.get('format_version')!r} is not supported")
    return Checkpoint(path, int(state["step"]), tensors, metadata, state)


# ---------------------------------------------------------------------------------------------------------
# Run folder
# ---------------------------------------------------------------------------------------------------------


def read_run_config(path: str | Path) -> dict[str, Any]:
    """A run's ``config.json`` as a dict; EstableError when it cannot be read or is not a JSON object."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise EstableError(f"cannot read {path}: {exc.strerror or exc}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise EstableError(f"{path} is damaged (not valid JSON: {exc}); pass --config to give the config") from None
    if not isinstance(data, dict):
        raise EstableError(f"{path} is damaged (not a JSON object); pass --config to give the config")
    return data


class Run:
    """A run folder. Only the main process writes (``is_main``); on other ranks the writers are no-ops."""

    def __init__(self, root: str | Path, *, is_main: bool = True, tensorboard: bool = True) -> None:
        self.root = Path(root)
        self.is_main = is_main
        self.samples_dir = self.root / "samples"
        self.checkpoints_dir = self.root / "checkpoints"
        self.log_path = self.root / "log.jsonl"
        self._tb: Any = None
        if is_main:
            if self.root.exists() and not self.root.is_dir():
                raise EstableError(f"the run folder {self.root} is a file; choose another --run-dir")
            for d in (self.root, self.samples_dir, self.checkpoints_dir):
                try:
                    d.mkdir(parents=True, exist_ok=True)
                except OSError as exc:
                    raise EstableError(f"cannot create the run folder {d}: {exc.strerror or exc}") from None
            if tensorboard:
                try:
                    from torch.utils.tensorboard import SummaryWriter
                except ImportError:  # tensorboard not installed: JSONL only
                    SummaryWriter = None  # noqa: N806
                if SummaryWriter is not None:
                    self._tb = SummaryWriter(str(self.root / "tensorboard"))

    # -- config ---------------------------------------------------------------------------------------------
    def write_config(self, config: dict[str, Any]) -> None:
        if self.is_main:
            atomic_write_text(self.root / "config.json", json.dumps(config, indent=2, sort_keys=True) + "\n")

    def read_config(self) -> dict[str, Any]:
        path = self.root / "config.json"
        if not path.is_file():
            raise EstableError(f"{self.root} has no config.json; is it a run folder?")
        return read_run_config(path)

    # -- logging ---------------------------------------------------------------------------------------------
    def log(self, record: dict[str, Any]) -> None:
        """Append one JSON line (and TensorBoard scalars for the numeric fields)."""
        if not self.is_main:
            return
        with open(self.log_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")
        if self._tb is not None and "step" in record:
            kind = record.get("type", "train")
            for k, v in record.items():
                if k not in ("step", "type") and isinstance(v, (int, float)) and not isinstance(v, bool):
                    self._tb.add_scalar(f"{kind}/{k}", v, record["step"])

    def read_log(self) -> list[dict[str, Any]]:
        """The log's records. A damaged last line (a run killed while appending it) is dropped; a damaged line
        before it is an EstableError."""
        if not self.log_path.is_file():
            return []
        lines = [line for line in self.log_path.read_text(encoding="utf-8", errors="replace").splitlines()
                 if line.strip()]
        records = []
        for k, line in enumerate(lines):
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                record = None
            if not isinstance(record, dict):
                if k == len(lines) - 1:
                    break
                raise EstableError(f"{self.log_path} is damaged at line {k + 1} (not a JSON object); move the "
                                   "file aside to go on without the log")
            records.append(record)
        return records

    def truncate_log(self, step: int) -> None:
        """On resume: drop records past ``step`` that a killed run wrote after its last checkpoint."""
        if not self.is_main or not self.log_path.is_file():
            return
        kept = [r for r in self.read_log() if int(r.get("step", 0)) <= step]
        atomic_write_text(self.log_path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in kept))

    # -- samples and checkpoints -------------------------------------------------------------------------------
    def save_image(self, image: Image.Image, step: int) -> Path:
        path = self.samples_dir / f"{step_name(step)}.png"
        if self.is_main:
            tmp = path.with_suffix(".tmp.png")
            image.save(tmp)
            os.replace(tmp, path)
        return path

    def latest_checkpoint(self) -> Path | None:
        return latest_checkpoint(self.checkpoints_dir)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None

    def remove_if_unused(self) -> None:
        """Remove the folder when it holds nothing a user could want: no files outside ``tensorboard/`` (for a run
        whose set-up failed right after this folder was made for it)."""
        self.close()
        if not self.is_main or not self.root.is_dir():
            return
        tb = self.root / "tensorboard"
        if any(f.is_file() and tb not in f.parents for f in self.root.rglob("*")):
            return
        shutil.rmtree(self.root, ignore_errors=True)


def make_grid(images: list[Image.Image], columns: int | None = None, pad: int = 2) -> Image.Image:
    """Tile equally sized images into one (row-major, ``columns`` per row, ``pad`` pixels of grey between)."""
    if not images:
        raise ValueError("make_grid needs at least one image")
    w, h = images[0].size
    cols = columns or len(images)
    rows = (len(images) + cols - 1) // cols
    grid = Image.new("RGB", (cols * w + (cols + 1) * pad, rows * h + (rows + 1) * pad), (128, 128, 128))
    for i, im in enumerate(images):
        r, c = divmod(i, cols)
        grid.paste(im.convert("RGB"), (pad + c * (w + pad), pad + r * (h + pad)))
    return grid


__all__ = [
    "CHECKPOINT_FORMAT",
    "Checkpoint",
    "Run",
    "capture_rng_state",
    "clean_state_dict",
    "latest_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "make_grid",
    "prune_checkpoints",
    "restore_rng_state",
    "save_checkpoint",
    "step_name",
]
