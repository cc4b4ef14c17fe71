"""The job store: every job and its images, kept across restarts.

``DATA_DIR/jobs.sqlite3`` holds one row per job (state, mode, parameters as JSON, progress, error, times) and one
row per image; the images are PNG files in ``DATA_DIR/images/`` named by their id, written by the library's
:func:`~estable.provenance.infotext.write_png` (so each carries its A1111 ``parameters`` text and Estable record).
On opening, jobs left queued or running by a previous process are marked ``interrupted``: a restart loses nothing
that finished and never pretends that unfinished work is still going. One connection, guarded by a lock, serves
the worker thread and the request handlers (every statement is short).
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
import uuid
from collections.abc import Collection
from pathlib import Path
from typing import Any

from PIL import Image

from ..errors import EstableError
from ..provenance.infotext import write_png

__all__ = ["FINAL_STATES", "JobStore"]

FINAL_STATES = ("done", "failed", "cancelled", "interrupted")
STATES = ("queued", "running", *FINAL_STATES)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT UNIQUE NOT NULL,
    state TEXT NOT NULL,
    mode TEXT NOT NULL,
    origin TEXT NOT NULL,
    model TEXT,
    params TEXT NOT NULL,
    step INTEGER NOT NULL DEFAULT 0,
    steps INTEGER NOT NULL DEFAULT 0,
    error TEXT,
    created REAL NOT NULL,
    finished REAL
);
CREATE TABLE IF NOT EXISTS images (
    id TEXT PRIMARY KEY,
    job_id TEXT NOT NULL REFERENCES jobs(id) ON DELETE CASCADE,
    idx INTEGER NOT NULL,
    seed INTEGER NOT NULL,
    infotext TEXT NOT NULL,
    file TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS images_job ON images(job_id);
"""


def new_id() -> str:
    return uuid.uuid4().hex


class JobStore:
    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.images_dir = self.root / "images"
        try:
            self.images_dir.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(self.root / "jobs.sqlite3", check_same_thread=False, isolation_level=None)
        except (OSError, sqlite3.Error) as exc:
            raise EstableError(f"cannot open the job store in {self.root}: {exc}") from None
        self._lock = threading.Lock()
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA foreign_keys=ON")
            self._db.executescript(_SCHEMA)
            self.recovered = self._db.execute(
                "UPDATE jobs SET state='interrupted', error=COALESCE(error, 'the server stopped before the job "
                "finished'), finished=? WHERE state IN ('queued', 'running')", (time.time(),)).rowcount

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # -- jobs ----------------------------------------------------------------------------------------------
    def add_job(self, job_id: str, *, mode: str, origin: str, model: str | None, params: dict[str, Any],
                steps: int, created: float) -> None:
        with self._lock:
            self._db.execute(
                "INSERT INTO jobs (id, state, mode, origin, model, params, steps, created) "
                "VALUES (?, 'queued', ?, ?, ?, ?, ?, ?)",
                (job_id, mode, origin, model, json.dumps(params), steps, created))

    def update_job(self, job_id: str, **fields: Any) -> None:
        allowed = {"state", "model", "params", "step", "steps", "error", "finished"}
        if not fields or set(fields) - allowed:
            raise ValueError(f"cannot update {sorted(set(fields) - allowed)}")
        if "params" in fields:
            fields["params"] = json.dumps(fields["params"])
        cols = ", ".join(f"{k}=?" for k in fields)
        with self._lock:
            self._db.execute(f"UPDATE jobs SET {cols} WHERE id=?", (*fields.values(), job_id))

    def get_job(self, job_id: str) -> dict[str, Any] | None:
        with self._lock:
            row = self._db.execute("SELECT * FROM jobs WHERE id=?", (job_id,)).fetchone()
            return self._job(row) if row else None

    def list_jobs(self, limit: int, offset: int) -> tuple[list[dict[str, Any]], int]:
        """Jobs newest first, and how many there are in all."""
        with self._lock:
            total = self._db.execute("SELECT COUNT(*) FROM jobs").fetchone()[0]
            rows = self._db.execute("SELECT * FROM jobs ORDER BY seq DESC LIMIT ? OFFSET ?",
                                    (limit, offset)).fetchall()
            return [self._job(r) for r in rows], total

    def count_by_state(self) -> dict[str, int]:
        with self._lock:
            rows = self._db.execute("SELECT state, COUNT(*) FROM jobs GROUP BY state").fetchall()
        counts = dict.fromkeys(STATES, 0)
        counts.update({s: n for s, n in rows})
        return counts

    def delete_job(self, job_id: str) -> bool:
        """Delete a job, its image rows and its files. False if there was no such job."""
        with self._lock:
            files = [r[0] for r in self._db.execute("SELECT file FROM images WHERE job_id=?", (job_id,))]
            n = self._db.execute("DELETE FROM jobs WHERE id=?", (job_id,)).rowcount
        for name in files:
            (self.images_dir / name).unlink(missing_ok=True)
        return n > 0

    def prune(self, keep: int, spare: Collection[str] = ()) -> int:
        """Delete every finished job (and its images) but the ``keep`` newest and those in ``spare``; returns how many
        went."""
        with self._lock:
            ids = [r[0] for r in self._db.execute(
                f"SELECT id FROM jobs WHERE state IN ({', '.join('?' * len(FINAL_STATES))}) ORDER BY seq DESC "
                "LIMIT -1 OFFSET ?", (*FINAL_STATES, keep))]
        return sum(self.delete_job(job_id) for job_id in ids if job_id not in spare)

    def _job(self, row: sqlite3.Row | tuple) -> dict[str, Any]:
        cols = ("seq", "id", "state", "mode", "origin", "model", "params", "step", "steps", "error", "created",
                "finished")
        job = dict(zip(cols, row))
        job["params"] = json.loads(job["params"])
        job["images"] = [
            {"id": i, "url": f"/v1/images/{i}.png", "seed": seed, "infotext": text}
            for i, seed, text in self._db.execute(
                "SELECT id, seed, infotext FROM images WHERE job_id=? ORDER BY idx", (job["id"],))
        ]
        return job

    # -- images --------------------------------------------------------------------------------------------
    def add_image(self, job_id: str, index: int, seed: int, image: Image.Image, infotext: str,
                  record: dict[str, Any]) -> dict[str, Any]:
        """Write one image (PNG with its infotext and record) and its row; returns its public description."""
        image_id = new_id()
        name = f"{image_id}.png"
        path = write_png(self.images_dir / name, image, parameters=infotext, record=record)
        try:
            with self._lock:
                self._db.execute("INSERT INTO images (id, job_id, idx, seed, infotext, file) "
                                 "VALUES (?, ?, ?, ?, ?, ?)", (image_id, job_id, index, seed, infotext, name))
        except BaseException:
            path.unlink(missing_ok=True)  # no file without its row
            raise
        return {"id": image_id, "url": f"/v1/images/{image_id}.png", "seed": seed, "infotext": infotext}

    def image_path(self, image_id: str) -> Path | None:
        with self._lock:
            row = self._db.execute("SELECT file FROM images WHERE id=?", (image_id,)).fetchone()
        if row is None:
            return None
        path = self.images_dir / row[0]
        return path if path.is_file() else None
