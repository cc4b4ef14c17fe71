"""LoRAs at generation time: A1111's ``<lora:name:weight>`` prompt tags, ``--lora FILE[:WEIGHT]``, and the
``Lora hashes`` infotext entry.

**Prompt tags.** A1111's "extra networks" syntax is ``<TYPE:ARG1:ARG2:…>`` (``<(\\w+):([^>]+)>``). Every such tag
is cut out of the positive prompt, and nothing else is changed (the commas and spaces around it stay: CLIP's
tokenizer drops the spaces, and the commas are tokens A1111 encodes too). For ``lora`` (and its alias ``lyco``)
the arguments are, A1111's ``extra_networks_lora``:

    <lora:NAME>                     text encoder and U-Net multiplier 1
    <lora:NAME:W>                   both W
    <lora:NAME:W_TE:W_UNET>         separate multipliers
    <lora:NAME:te=W_TE:unet=W_UNET> the same by name (``dyn=`` is not supported)

A1111 parses tags in the positive prompt only: a tag in the negative prompt is not applied and stays in the
text that is encoded (:func:`negative_prompt_tags` finds them so that the CLI can warn). A LoRA changes the
model, so it acts on the conditional and the unconditional pass alike.

**Lookup.** A tag's NAME is a file stem under the LoRA folder (searched recursively, A1111's
``models/Lora``), or the ``ss_output_name`` alias kohya writes into the file's metadata. Only ``.safetensors``
LoRAs are read (pickles can run code).

**Applying.** :class:`LoRAStack` merges the requested LoRAs into the weights, W ← W + m·(α/r)·B·A for each
(A1111's default; the update is computed in float32 and rounded once to the weights' dtype), after keeping a
copy of every weight it touches; a different set of LoRAs on the next request first puts those copies back, so
the base weights never drift. The same set twice in a row costs nothing.

**Hashes.** A1111 writes ``Lora hashes: "name1: 0123456789ab, name2: …"``: for each LoRA the name it was
mentioned by (``:`` and ``,`` removed) and the first 12 hex digits of the file's "AddNet" hash, which is the
SHA-256 of the file's bytes after the safetensors header (kohya's ``sshs_model_hash`` metadata when present).
"""

from __future__ import annotations

import hashlib
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import EstableError

__all__ = [
    "LoRASpec",
    "LoRAStack",
    "NetworkTag",
    "addnet_hash",
    "find_lora",
    "list_loras",
    "lora_hashes_text",
    "negative_prompt_tags",
    "parse_lora_arg",
    "parse_prompt_networks",
    "resolve_prompt_loras",
]

# A1111 modules/extra_networks.py: re_extra_net
_EXTRA_NET = re.compile(r"<(\w+):([^>]+)>")
_LORA_KINDS = ("lora", "lyco")


@dataclass(frozen=True)
class NetworkTag:
    """One ``<lora:…>`` mention in a prompt."""

    name: str
    te: float  # text-encoder multiplier
    unet: float  # U-Net multiplier
    text: str  # the tag as written


def _number(value: str, tag: str) -> float:
    try:
        out = float(value)
    except ValueError:
        raise EstableError(f"{tag}: {value!r} is not a number; write e.g. <lora:name:0.8>") from None
    if not math.isfinite(out):
        raise EstableError(f"{tag}: the multiplier must be a finite number, not {value!r}")
    return out


def _lora_tag(args: str, tag: str) -> NetworkTag:
    positional: list[str] = []
    named: dict[str, str] = {}
    for item in args.split(":"):
        key, eq, value = item.partition("=")
        if eq:
            named[key.strip()] = value.strip()
        else:
            positional.append(item)
    if not positional or not positional[0].strip():
        raise EstableError(f"{tag}: no LoRA name; write <lora:NAME:WEIGHT>")
    unknown = sorted(set(named) - {"te", "unet"})
    if unknown:
        raise EstableError(f"{tag}: unsupported argument(s) {', '.join(unknown)}= (Estable reads te= and unet=)")
    te = _number(positional[1], tag) if len(positional) > 1 else 1.0
    te = _number(named["te"], tag) if "te" in named else te
    unet = _number(positional[2], tag) if len(positional) > 2 else te
    unet = _number(named["unet"], tag) if "unet" in named else unet
    if len(positional) > 3:
        raise EstableError(f"{tag}: too many arguments (the 4th, the 'dyn' rank limit, is not supported)")
    return NetworkTag(name=positional[0].strip(), te=te, unet=unet, text=tag)


def parse_prompt_networks(prompt: str) -> tuple[str, list[NetworkTag]]:
    """Cut every ``<TYPE:…>`` tag out of ``prompt``; return the text to encode and the LoRA tags in order.

    The text is the prompt with the tags removed and nothing else changed, as A1111 does. Tags of another type
    (``<hypernet:…>``) are an EstableError: Estable does not implement them, and ignoring them would give another
    image than the user expects. This is what the server calls with each request's prompt.
    """
    tags: list[NetworkTag] = []

    def found(m: re.Match[str]) -> str:
        kind = m.group(1)
        if kind.lower() not in _LORA_KINDS:
            raise EstableError(
                f"{m.group(0)}: extra network type {kind!r} is not supported; Estable reads <lora:NAME:WEIGHT> "
                "(textual-inversion embeddings are used by writing their name)"
            )
        tags.append(_lora_tag(m.group(2), m.group(0)))
        return ""

    return _EXTRA_NET.sub(found, prompt), tags


def negative_prompt_tags(negative_prompt: str) -> list[str]:
    """The ``<lora:…>`` tags written in a negative prompt (A1111 neither applies nor strips them)."""
    return [m.group(0) for m in _EXTRA_NET.finditer(negative_prompt) if m.group(1).lower() in _LORA_KINDS]


# ---------------------------------------------------------------------------------------------------- files


@dataclass
class LoRASpec:
    """A LoRA file to apply with its two multipliers; ``name`` is what the infotext calls it."""

    path: Path
    te: float = 1.0
    unet: float = 1.0
    name: str = ""
    source: str = "flag"  # "flag" (--lora) or "prompt" (a <lora:…> tag)
    _hash: str | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.path = Path(self.path)
        if not self.name:
            self.name = self.path.stem

    @property
    def short_hash(self) -> str:
        """A1111's 12-digit LoRA hash (:func:`addnet_hash`)."""
        if self._hash is None:
            self._hash = addnet_hash(self.path)[:12]
        return self._hash

    def key(self) -> tuple[Any, ...]:
        st = self.path.stat()
        return (str(self.path.resolve()), st.st_mtime_ns, st.st_size, self.te, self.unet)

    def to_record(self) -> dict[str, Any]:
        return {"name": self.name, "path": str(self.path.resolve()), "hash": self.short_hash, "te": self.te,
                "unet": self.unet, "source": self.source}


def parse_lora_arg(text: str) -> LoRASpec:
    """``--lora FILE[:WEIGHT]``: a trailing ``:number`` is the multiplier (of both networks), else 1."""
    path, sep, weight = text.rpartition(":")
    w = 1.0
    if sep and path:
        try:
            w = float(weight)
        except ValueError:  # no weight, unless the part before the colon names a file (a colon in a name is kept)
            if Path(path).expanduser().is_file() and not Path(text).expanduser().is_file():
                raise EstableError(f"--lora {text}: the weight {weight!r} is not a number (FILE:WEIGHT, e.g. "
                                   f"{path}:0.8)") from None
            path = text
        if not math.isfinite(w):
            raise EstableError(f"--lora {text}: the weight must be a finite number, not {weight.strip()!r}")
    else:
        path = text
    p = Path(path).expanduser()
    if not p.is_file():
        raise EstableError(f"--lora {text}: {p} is a folder, not a LoRA file" if p.is_dir() else
                           f"--lora {text}: no such file {p}")
    if p.suffix.lower() != ".safetensors":
        raise EstableError(f"--lora {text}: LoRAs are read from .safetensors files only (pickles can run code)")
    return LoRASpec(path=p, te=w, unet=w, source="flag")


def _safetensors_header_length(path: Path) -> int:
    with open(path, "rb") as f:
        head = f.read(8)
    if len(head) < 8:
        raise EstableError(f"{path} is not a safetensors file (too short)")
    return int.from_bytes(head, "little")


def addnet_hash(path: str | os.PathLike[str]) -> str:
    """The hash A1111 and kohya give a LoRA ``.safetensors``: SHA-256 of the bytes after the header (so that
    editing the metadata does not change it), or the file's ``sshs_model_hash`` metadata when it has one."""
    from .checkpoints.io import read_safetensors_header

    path = Path(path)
    _, metadata = read_safetensors_header(path)
    stored = metadata.get("sshs_model_hash", "")
    if re.fullmatch(r"[0-9a-fA-F]{12,64}", stored):
        return stored.lower()
    h = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(8 + _safetensors_header_length(path))
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def _alias(path: Path) -> str | None:
    from .checkpoints.io import read_safetensors_header

    try:
        return read_safetensors_header(path)[1].get("ss_output_name") or None
    except EstableError:
        return None


def list_loras(lora_dir: str | os.PathLike[str]) -> list[Path]:
    """The LoRA files a ``<lora:NAME>`` tag can name: every ``.safetensors`` under ``lora_dir``, sorted."""
    root = Path(lora_dir).expanduser()
    if not root.is_dir():
        raise EstableError(f"--lora-dir {root} is not a folder")
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() == ".safetensors")


def lora_alias(path: Path) -> str | None:
    """kohya's ``ss_output_name`` alias of a LoRA file (what A1111 lists as its alias), or None."""
    return _alias(path)


def find_lora(name: str, lora_dir: str | os.PathLike[str] | None) -> Path:
    """The ``.safetensors`` file a ``<lora:NAME>`` tag means: NAME as a file stem anywhere under ``lora_dir``
    (exact case first, then any case), else a file whose kohya ``ss_output_name`` alias is NAME."""
    if lora_dir is None:
        raise EstableError(f"the prompt uses <lora:{name}> but no LoRA folder was given (--lora-dir DIR)")
    root = Path(lora_dir).expanduser()
    files = list_loras(root)
    for same in (lambda p: p.stem == name, lambda p: p.stem.lower() == name.lower(), lambda p: _alias(p) == name):
        hits = [p for p in files if same(p)]
        if len(hits) == 1:
            return hits[0]
        if len(hits) > 1:
            raise EstableError(f"<lora:{name}> is ambiguous in {root}: {', '.join(str(p) for p in hits[:4])}")
    pickles = [p for p in root.rglob("*")  # no glob built from the tag: a name such as "../x" or "*" means nothing
               if p.stem == name and p.suffix.lower() in (".pt", ".ckpt", ".bin", ".pth")]
    if pickles:
        raise EstableError(f"<lora:{name}>: found {pickles[0]}, but LoRAs are read from .safetensors only")
    known = ", ".join(p.stem for p in files[:8]) or "none"
    raise EstableError(f"<lora:{name}>: no {name}.safetensors under {root} (LoRAs there: {known})")


def resolve_prompt_loras(prompt: str, lora_dir: str | os.PathLike[str] | None) -> tuple[str, list[LoRASpec]]:
    """The prompt's text to encode and a :class:`LoRASpec` per ``<lora:…>`` tag, looked up in ``lora_dir``."""
    text, tags = parse_prompt_networks(prompt)
    specs = [LoRASpec(path=find_lora(t.name, lora_dir), te=t.te, unet=t.unet, name=t.name, source="prompt")
             for t in tags]
    return text, specs


def lora_hashes_text(specs: Sequence[LoRASpec]) -> str | None:
    """The value of A1111's ``Lora hashes`` infotext entry, or None without LoRAs."""
    parts = [f"{s.name.replace(':', '').replace(',', '')}: {s.short_hash}" for s in specs]
    return ", ".join(parts) or None


# ------------------------------------------------------------------------------------------------- applying


class LoRAStack:
    """The LoRAs merged into one pipeline's U-Net and text encoder, with copies of the weights they changed."""

    def __init__(self, unet: nn.Module, text_encoder: nn.Module) -> None:
        self.unet = unet
        self.text_encoder = text_encoder
        self.active: list[LoRASpec] = []
        self._key: tuple[Any, ...] = ()
        self._saved: dict[int, tuple[nn.Parameter, torch.Tensor]] = {}  # id(weight) -> (weight, original on CPU)

    def restore(self) -> None:
        """Put every changed weight back as it was before the first LoRA."""
        with torch.no_grad():
            for weight, original in self._saved.values():
                weight.copy_(original.to(weight.device))
        self._saved.clear()
        self.active, self._key = [], ()

    def activate(self, specs: Sequence[LoRASpec]) -> bool:
        """Make ``specs`` (in order) the merged LoRAs; return whether the weights changed.

        A LoRA that does not fit the model (unknown modules, wrong shapes, another architecture) raises a
        CheckpointError naming its modules, and leaves the model with no LoRA merged.
        """
        from .checkpoints.lora_format import LoRAState, apply_lora, load_lora
        from .nn.lora import remove_lora

        key = tuple(s.key() for s in specs)
        if key == self._key:
            return False
        self.restore()
        if not specs:
            return True
        try:
            for spec in specs:
                state = load_lora(spec.path)
                for component, model, weight in (("unet", self.unet, spec.unet),
                                                  ("text_encoder", self.text_encoder, spec.te)):
                    part = getattr(state, component)
                    if not part:
                        continue
                    sub = LoRAState(**{component: part}, naming=state.naming, metadata=state.metadata,
                                    source=state.source)
                    applied = apply_lora(model if component == "unet" else None,
                                         model if component == "text_encoder" else None, sub, scale=weight)
                    for path, layer in applied.items():
                        w = layer.weight
                        if id(w) not in self._saved:
                            self._saved[id(w)] = (w, w.detach().to("cpu", copy=True))
                        layer.merge()
                        if not bool(torch.isfinite(w).all()) and bool(torch.isfinite(self._saved[id(w)][1]).all()):
                            raise EstableError(f"LoRA {spec.name} at weight {weight:g} makes the weights of {path} "
                                               "overflow to infinity or NaN; use a smaller weight")
                    remove_lora(model, merge=True)
        except BaseException:
            remove_lora(self.unet, merge=False)  # adapters applied but not merged yet, if any
            remove_lora(self.text_encoder, merge=False)
            self.restore()
            raise
        self.active, self._key = list(specs), key
        return True
