"""Textual-inversion embeddings (Gal et al. 2022, "An Image is Worth One Word", arXiv 2208.01618): learned input
vectors for the text encoder, used by writing their name in a prompt or a negative prompt.

File formats read (all hold n ≥ 1 vectors of the text encoder's width d, shape (n, d)):

* A1111 / the original textual_inversion code, ``.pt``: ``{"string_to_param": {"*": (n, d)}, "name": …,
  "string_to_token": …, "step": …}`` (read through the safe loader, so only with ``allow_pickle``).
* kohya's sd-scripts, ``.safetensors``: ``{"emb_params": (n, d)}``.
* diffusers, ``learned_embeds.safetensors`` / ``learned_embeds.bin``: ``{TOKEN: (d,) or (n, d)}``, one entry.

**Names.** As in A1111 an embedding is called by its file's stem (``shinyred.pt`` → ``shinyred``); diffusers'
files (whose stem is ``learned_embeds``) are called by the token stored in them. Matching is A1111's: the name
is tokenized, and wherever that token sequence occurs in a prompt segment's tokens it is replaced by the n
vectors. Each vector gets a token id past the vocabulary (``vocab_size + k``) that
:class:`~estable.models.text.TextEmbeddings` maps to it, so the vectors then take the place of token embeddings
before the position embedding is added: what diffusers' ``load_textual_inversion`` (new tokens in the
tokenizer, new rows in the embedding matrix) computes as well.

Difference from A1111, in long prompts only: A1111 moves an embedding that would straddle a 75-token chunk
boundary whole into the next chunk; here its vectors can be split across the two chunks.

**Hashes.** A1111 writes ``TI hashes: "name: 0123456789ab, …"``, the first 12 hex digits of each used file's
SHA-256.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .errors import CheckpointError, EstableError

__all__ = ["Embedding", "EmbeddingLibrary", "load_embedding", "save_embedding", "ti_hashes_text"]

EMBEDDING_SUFFIXES = (".safetensors", ".pt", ".bin")
DIFFUSERS_STEMS = ("learned_embeds",)


@dataclass
class Embedding:
    """n learned vectors (n, d) called ``name`` in prompts."""

    name: str
    vectors: Tensor  # (n, d) float32
    path: Path | None = None
    _hash: str | None = field(default=None, repr=False)
    # what A1111 files record about their training (shown by the server's /sdapi/v1/embeddings); None if absent
    step: int | None = None
    checkpoint: str | None = None  # the checkpoint's hash
    checkpoint_name: str | None = None

    @property
    def width(self) -> int:
        return int(self.vectors.shape[1])

    @property
    def short_hash(self) -> str:
        if self._hash is None:
            from .checkpoints.io import sha256_file

            self._hash = sha256_file(self.path)[:12] if self.path is not None else ""
        return self._hash


def _vectors(t: object, what: str, source: str) -> Tensor:
    if not isinstance(t, Tensor) or t.ndim not in (1, 2) or not t.is_floating_point():
        raise CheckpointError(f"{source}: {what} should be a float tensor of shape (n, width) or (width,)")
    t = t.detach().to("cpu", torch.float32)
    return t[None] if t.ndim == 1 else t


def embedding_from_object(obj: object, source: str, name: str | None) -> Embedding:
    """Parse a loaded embedding file's content (see the module docstring); ``name`` None takes the token stored in
    a diffusers file."""
    if not isinstance(obj, Mapping) or not obj:
        raise CheckpointError(f"{source} holds no embedding")
    if "string_to_param" in obj:
        params = obj["string_to_param"]
        params = getattr(params, "_parameters", params)  # an nn.ParameterDict in the oldest files
        if not isinstance(params, Mapping) or len(params) != 1:
            raise CheckpointError(f"{source}: string_to_param should hold exactly one entry")
        vec = _vectors(next(iter(params.values())), "string_to_param", source)
        token = None
    elif "emb_params" in obj:
        vec, token = _vectors(obj["emb_params"], "emb_params", source), None
    elif "clip_l" in obj or "clip_g" in obj:
        raise CheckpointError(f"{source} is an SDXL embedding (clip_l / clip_g); Estable reads SD 1.x/2.x ones")
    else:
        tensors = {k: v for k, v in obj.items() if isinstance(v, Tensor)}
        if len(tensors) != 1:
            raise CheckpointError(
                f"{source}: not an embedding file: expected string_to_param (A1111), emb_params (kohya) or one "
                f"TOKEN → vectors entry (diffusers), found {', '.join(sorted(map(str, obj))[:5])}"
            )
        token, t = next(iter(tensors.items()))
        vec = _vectors(t, repr(token), source)
    if vec.shape[0] < 1 or not bool(torch.isfinite(vec).all()):
        raise CheckpointError(f"{source}: the embedding's vectors are empty or not finite")
    emb = Embedding(name=name or token or Path(source).stem, vectors=vec)
    step = obj.get("step")
    emb.step = int(step) if isinstance(step, int) and not isinstance(step, bool) else None
    for attr, key in (("checkpoint", "sd_checkpoint"), ("checkpoint_name", "sd_checkpoint_name")):
        value = obj.get(key)
        setattr(emb, attr, value if isinstance(value, str) else None)
    return emb


def load_embedding(path: str | os.PathLike[str], *, allow_pickle: bool = False) -> Embedding:
    """Read one embedding file; it is named by its stem, or by its token for diffusers' ``learned_embeds.*``."""
    from .checkpoints.io import load_pickle_object, read_safetensors

    path = Path(path)
    if path.suffix.lower() == ".safetensors":
        obj: object = read_safetensors(path)[0]
    elif path.suffix.lower() in (".pt", ".bin"):
        obj = load_pickle_object(path, allow_pickle=allow_pickle)
    else:
        raise CheckpointError(f"{path}: embeddings are .safetensors, .pt or .bin files")
    name = None if path.stem in DIFFUSERS_STEMS else path.stem
    emb = embedding_from_object(obj, path.name, name)
    emb.path = path
    return emb


def save_embedding(path: str | os.PathLike[str], vectors: Tensor, *, metadata: Mapping[str, str] | None = None) -> Path:
    """Write (n, d) vectors as kohya's ``emb_params`` ``.safetensors`` (what A1111 and diffusers read too)."""
    from .checkpoints.io import write_safetensors

    path = Path(path)
    write_safetensors(path, {"emb_params": vectors.detach().to("cpu", torch.float32).contiguous()},
                      dict(metadata or {}))
    return path


def ti_hashes_text(embeddings: Sequence[Embedding]) -> str | None:
    """The value of A1111's ``TI hashes`` infotext entry, or None when no embedding was used."""
    parts = [f"{e.name.replace(':', '').replace(',', '')}: {e.short_hash}" for e in embeddings if e.short_hash]
    return ", ".join(parts) or None


class EmbeddingLibrary:
    """The embeddings a pipeline can use: every file in a folder (recursively), plus any added by hand.

    Files are indexed by name when the library is made and read the first time a prompt uses them.
    """

    def __init__(self, folder: str | os.PathLike[str] | None = None, *, allow_pickle: bool = False) -> None:
        self.allow_pickle = allow_pickle
        self._files: dict[str, Path] = {}
        self._loaded: dict[str, Embedding] = {}
        self.shadowed: dict[str, list[Path]] = {}  # a name several files have -> them, the one used (found first) first
        if folder is not None:
            root = Path(folder).expanduser()
            if not root.is_dir():
                raise EstableError(f"--embeddings-dir {root} is not a folder")
            for p in sorted(root.rglob("*")):
                if p.is_file() and p.suffix.lower() in EMBEDDING_SUFFIXES:
                    if p.stem in DIFFUSERS_STEMS:
                        self.add(load_embedding(p, allow_pickle=allow_pickle))
                    elif p.stem in self._files:
                        self.shadowed.setdefault(p.stem, [self._files[p.stem]]).append(p)
                    else:
                        self._files[p.stem] = p

    def shadowed_notes(self) -> list[str]:
        """One line per name that several files have: which file is used and which are not."""
        return [f"embedding {name!r} is {used}; {', '.join(map(str, others))} of the same name not used"
                for name, (used, *others) in self.shadowed.items()]

    def add(self, embedding: Embedding) -> None:
        self._loaded[embedding.name] = embedding
        self._files.pop(embedding.name, None)

    @property
    def names(self) -> list[str]:
        return sorted({*self._files, *self._loaded})

    def get(self, name: str) -> Embedding:
        if name not in self._loaded:
            emb = load_embedding(self._files[name], allow_pickle=self.allow_pickle)  # a file that fails stays listed
            self._loaded[name] = emb
            self._files.pop(name, None)  # another thread may have read it meanwhile
        return self._loaded[name]

    def load_all(self) -> tuple[list[Embedding], dict[str, str]]:
        """Every embedding of the library read now: (the ones that load, {name: why not} for the others)."""
        loaded, failed = [], {}
        for name in self.names:
            try:
                loaded.append(self.get(name))
            except EstableError as exc:
                failed[name] = str(exc)
        return loaded, failed

    def session(self, encode: Callable[[str], list[int]], vocab_size: int, width: int) -> EmbeddingSession:
        return EmbeddingSession(self, encode, vocab_size, width)


class EmbeddingSession:
    """One prompt encoding: a tokenizer function that puts embeddings in, and the vectors their ids stand for."""

    def __init__(self, library: EmbeddingLibrary, encode: Callable[[str], list[int]], vocab_size: int,
                 width: int) -> None:
        self.library = library
        self._encode = encode
        self.vocab_size = vocab_size
        self.width = width
        # first token id → [(name's token ids, name)], longest names first (A1111's ids_lookup)
        self._lookup: dict[int, list[tuple[list[int], str]]] = {}
        for name in library.names:
            ids = list(encode(name))
            if ids:
                self._lookup.setdefault(ids[0], []).append((ids, name))
        for entries in self._lookup.values():
            entries.sort(key=lambda e: -len(e[0]))
        self.used: list[Embedding] = []
        self._first_id: dict[str, int] = {}
        self._vectors: list[Tensor] = []

    def _ids_for(self, name: str) -> list[int]:
        if name not in self._first_id:
            emb = self.library.get(name)
            if emb.width != self.width:
                raise EstableError(
                    f"embedding {name!r} ({emb.path}) has vectors of width {emb.width}, but this text encoder's "
                    f"width is {self.width}: it was made for another model (SD 1.x: 768, SD 2.x: 1024)"
                )
            self._first_id[name] = self.vocab_size + sum(v.shape[0] for v in self._vectors)
            self._vectors.append(emb.vectors)
            self.used.append(emb)
        n = self.library.get(name).vectors.shape[0]
        return list(range(self._first_id[name], self._first_id[name] + n))

    def encode(self, text: str) -> list[int]:
        """``text``'s token ids with every embedding name replaced by its vectors' ids."""
        ids = list(self._encode(text))
        if not self._lookup:
            return ids
        out: list[int] = []
        i = 0
        while i < len(ids):
            for name_ids, name in self._lookup.get(ids[i], ()):
                if ids[i:i + len(name_ids)] == name_ids:
                    out.extend(self._ids_for(name))
                    i += len(name_ids)
                    break
            else:
                out.append(ids[i])
                i += 1
        return out

    @property
    def table(self) -> Tensor | None:
        """(K, d): the vectors of ids vocab_size … vocab_size + K − 1, or None when no embedding was used."""
        return torch.cat(self._vectors) if self._vectors else None

    @contextlib.contextmanager
    def installed(self, text_encoder: nn.Module) -> Iterator[None]:
        """Give the text encoder the used vectors for the duration of the block."""
        embeddings: Any = text_encoder.text_model.embeddings
        previous = embeddings.extra_tokens
        embeddings.extra_tokens = self.table
        try:
            yield
        finally:
            embeddings.extra_tokens = previous
