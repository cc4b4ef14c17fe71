"""From a request to :class:`~estable.control.ControlUnit`\\ s: which ControlNet file, which picture and how its
control image is made, the weight and the part of the schedule. The CLI (``--control``/``--controlnet``) and the
server (A1111's ControlNet extension arguments, Estable's ``control`` list) both describe units as
:class:`ControlSpec` and turn them into units with :func:`load_control_units`.
"""

from __future__ import annotations

import collections
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

__all__ = ["BUILTIN_CONTROLNET", "ControlNetCache", "ControlSpec", "load_control_units", "resolve_controlnet"]

# The built-in model's Canny-edges ControlNet (recipes/default/controlnet.json), shipped beside it; named "default".
BUILTIN_CONTROLNET = Path(__file__).resolve().parent.parent / "assets" / "controlnet_canny.safetensors"


def resolve_controlnet(name: str | Path) -> Path:
    """``"default"`` → the built-in model's ControlNet (Canny edges); anything else is a path, returned as given."""
    return BUILTIN_CONTROLNET if str(name) == "default" else Path(name)


@dataclass(frozen=True)
class ControlSpec:
    """One ControlNet unit as asked for: ``image`` is the picture the control image is made from (a file, or an
    image already decoded), ``kind`` how (:data:`estable.control.preprocess.CONTROL_TYPES`), ``options`` the
    maker's options (canny: low, high, sigma; …)."""

    kind: str
    image: Path | Image.Image
    scale: float
    controlnet: Path
    start: float = 0.0
    end: float = 1.0
    guess_mode: bool = False
    options: dict[str, float] = field(default_factory=dict, compare=False, hash=False)


class ControlNetCache:
    """ControlNets loaded for one pipeline (its U-Net, dtype and device), by file, with their SHA-256; a file that
    changed on disk is read again (its old weights dropped). At most ``capacity`` are kept, the least recently used
    leaving first (an SD 1.5 ControlNet holds about 0.7 GB in fp16). Make a new one (or :meth:`clear` it) when the
    pipeline changes."""

    def __init__(self, capacity: int = 4) -> None:
        self.capacity = max(1, capacity)
        self._nets: collections.OrderedDict[tuple[str, int, int], tuple[Any, str | None]] = collections.OrderedDict()

    def clear(self) -> None:
        self._nets.clear()

    def get(self, path: Path, pipe: Any, *, allow_pickle: bool = False) -> tuple[Any, str | None]:
        """(LoadedControlNet, SHA-256 of its weights file or None for a folder we could not hash)."""
        from ..checkpoints.controlnet_format import load_controlnet
        from ..checkpoints.io import cached_sha256

        st = path.stat()
        key = (str(path.resolve()), st.st_mtime_ns, st.st_size)
        if key in self._nets:
            self._nets.move_to_end(key)
            return self._nets[key]
        for old in [k for k in self._nets if k[0] == key[0]]:  # the same file, changed on disk
            del self._nets[old]
        loaded = load_controlnet(path, base=pipe.config.unet, allow_pickle=allow_pickle, dtype=pipe.dtype,
                                 device=pipe.device)
        weights = path / "diffusion_pytorch_model.safetensors" if path.is_dir() else path
        self._nets[key] = (loaded, cached_sha256(weights) if weights.is_file() else None)
        while len(self._nets) > self.capacity:
            self._nets.popitem(last=False)
        return self._nets[key]


def load_control_units(specs: Sequence[ControlSpec], pipe: Any, *, allow_pickle: bool = False,
                       cache: ControlNetCache | None = None) -> list[Any]:
    """Load each spec's ControlNet for ``pipe`` (through ``cache`` when given) and make each control image."""
    from ..images import load_image
    from . import ControlUnit
    from .preprocess import make_control_image

    cache = cache if cache is not None else ControlNetCache()
    units = []
    for spec in specs:
        loaded, sha = cache.get(spec.controlnet, pipe, allow_pickle=allow_pickle)
        picture = spec.image if isinstance(spec.image, Image.Image) else load_image(spec.image)
        units.append(ControlUnit(
            net=loaded.model, image=make_control_image(spec.kind, picture, **spec.options), scale=spec.scale,
            start=spec.start, end=spec.end, guess_mode=spec.guess_mode, kind=spec.kind, name=loaded.name,
            sha256=sha, source=str(Path(spec.controlnet).resolve()),
            image_source=None if isinstance(spec.image, Image.Image) else str(Path(spec.image).resolve()),
        ))
    return units
