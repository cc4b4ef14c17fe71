"""The models a server may load: the built-in one, the one given with --model, and those in --models-dir.

Requests name a model (A1111's ``sd_model_checkpoint``); the name is looked up in this list and nowhere else, so a
request can never make the server open a path of its choosing. A model is a ``.safetensors`` file or a diffusers
folder (one with ``model_index.json``) directly inside the models folder.
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass
from pathlib import Path

from ..errors import EstableError

__all__ = ["ModelCatalog", "ModelEntry", "ModelNameError"]

_TITLE_HASH = re.compile(r"^(.*?)\s*\[[0-9a-fA-F]{8,64}\]$")  # "name.safetensors [6ce0161689]" (A1111 title)


class ModelNameError(EstableError):
    """A requested model is not one of the server's models (→ 400)."""


@dataclass(frozen=True)
class ModelEntry:
    name: str  # what clients call it: the file's stem or the folder's name ("default" for the built-in model)
    path: Path
    filename: str  # the file or folder name, A1111's title without the hash

    def title(self, short_hash: str | None) -> str:
        return f"{self.filename} [{short_hash}]" if short_hash else self.filename


class ModelCatalog:
    def __init__(self, models_dir: Path | None, initial: str):
        self.models_dir = Path(models_dir).resolve() if models_dir is not None else None
        self._lock = threading.Lock()
        self._hashes: dict[tuple[str, int, int], str] = {}  # (path, size, mtime_ns) -> sha256
        self._entries: list[ModelEntry] = []
        self.refresh()
        self.initial = self._initial_entry(initial)

    # -- listing -------------------------------------------------------------------------------------------
    def refresh(self) -> list[ModelEntry]:
        """Scan the models folder again (A1111's refresh-checkpoints)."""
        entries: list[ModelEntry] = []
        from ..pipeline import DEFAULT_MODEL_PATH

        builtin = Path(DEFAULT_MODEL_PATH)
        if builtin.is_file():
            entries.append(ModelEntry("default", builtin, builtin.name))
        if self.models_dir is not None and self.models_dir.is_dir():
            for p in sorted(self.models_dir.iterdir()):
                if p.name.startswith("."):
                    continue
                if (p.is_file() and p.suffix.lower() == ".safetensors") or (p.is_dir()
                                                                          and (p / "model_index.json").is_file()):
                    name = p.stem if p.is_file() else p.name
                    if all(e.name != name for e in entries):
                        entries.append(ModelEntry(name, p, p.name))
        with self._lock:
            extra = [e for e in self._entries if e.name not in {x.name for x in entries} and e.path.exists()
                     and not self._inside(e.path)]
            self._entries = entries + extra
            return list(self._entries)

    def entries(self) -> list[ModelEntry]:
        with self._lock:
            return list(self._entries)

    def _inside(self, path: Path) -> bool:
        return self.models_dir is not None and path.resolve().parent == self.models_dir

    def _initial_entry(self, source: str) -> ModelEntry:
        """The model given with --model: a name from the list, or any path the operator chose."""
        try:
            return self.resolve(source)
        except ModelNameError:
            pass
        path = Path(source)
        if not path.exists():
            raise EstableError(f"--model {source}: no such file or folder, and no model of that name"
                               + (f" in {self.models_dir}" if self.models_dir else ""))
        name = path.stem if path.is_file() else path.name
        entry = ModelEntry(name, path.resolve(), path.name)
        with self._lock:
            self._entries = [e for e in self._entries if e.name != name] + [entry]
        return entry

    # -- lookup --------------------------------------------------------------------------------------------
    def resolve(self, name: str) -> ModelEntry:
        """The entry called ``name`` (its name, file name, or A1111 title "file [hash]"); ModelNameError otherwise."""
        if not isinstance(name, str) or not name.strip():
            raise ModelNameError("the model name is empty")
        text = name.strip()
        m = _TITLE_HASH.match(text)
        if m:
            text = m.group(1)
        if "/" in text or "\\" in text or text in (".", "..") or "\x00" in text:
            raise ModelNameError(f"model {name!r} is not a model name: models are chosen by name from the models "
                                 "folder only, never by path")
        for e in self.entries():
            if text in (e.name, e.filename):
                return e
        names = ", ".join(e.name for e in self.entries()) or "none"
        raise ModelNameError(f"unknown model {name!r}; available: {names}")

    # -- hashes --------------------------------------------------------------------------------------------
    def known_sha256(self, entry: ModelEntry) -> str | None:
        """The entry's SHA-256 if it has been computed (by :meth:`remember`), else None (never hashed on a request)."""
        key = self._key(entry.path)
        with self._lock:
            return self._hashes.get(key) if key else None

    def remember(self, entry: ModelEntry, sha256: str | None) -> None:
        key = self._key(entry.path)
        if key and sha256:
            with self._lock:
                self._hashes[key] = sha256

    @staticmethod
    def _key(path: Path) -> tuple[str, int, int] | None:
        try:
            st = path.stat()
        except OSError:
            return None
        return str(path), st.st_size, st.st_mtime_ns
