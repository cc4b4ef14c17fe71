"""ControlNet guidance inside the sampler loop (Zhang et al. 2023, sec. 3.2–3.4), step for step as diffusers'
``StableDiffusionControlNetPipeline`` (and its Img2Img / Inpaint variants) does it:

* **Control image**: resized to the generation size (Lanczos, only when the size differs), RGB in [0, 1]
  (not [-1, 1]), one copy per image of the batch; under classifier-free guidance the same image goes with
  the unconditional and the conditional half.
* **Weight** ``scale`` multiplies every residual. **Guess mode** runs the ControlNet on the conditional half
  only (the unconditional half gets zero residuals) and weights its residuals from 0.1 (first skip) to 1
  (mid block) on top, so the control image, not the prompt, carries the structure (sec. 4, "guess mode").
* **Start / end**: network evaluation i of n (n = the sampler's evaluations over the run: 2N − 1 for Heun,
  N + 1 for PLMS, N for the others) is controlled unless i/n < start or (i+1)/n > end.
* **Several ControlNets**: their residuals are summed, in the order given.

The residuals are added to the U-Net's skips and mid-block output (:meth:`estable.models.unet.UNet.forward`).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..errors import EstableError

__all__ = ["ControlRun", "ControlUnit", "check_units", "control_infotext", "control_record", "count_evaluations"]


@dataclass
class ControlUnit:
    """One ControlNet with its control image and settings."""

    net: Any  # estable.models.controlnet.ControlNet
    image: Image.Image  # the control image itself (edges, scribble, segmentation, …), not the photo it came from
    scale: float = 1.0
    start: float = 0.0  # fraction of the schedule where control begins
    end: float = 1.0  # ... and where it ends
    guess_mode: bool = False
    kind: str = "none"  # how the control image was made (canny, scribble, seg, none): for the record
    name: str = ""  # the ControlNet's name (file stem) for the infotext
    sha256: str | None = None
    source: str | None = None  # the ControlNet's path
    image_source: str | None = None  # the image's path

    def validate(self) -> None:
        if not 0.0 <= float(self.scale) <= 10.0:
            raise EstableError(f"control weight must be between 0 and 10, not {self.scale!r}")
        if not 0.0 <= float(self.start) < float(self.end) <= 1.0:
            raise EstableError(
                f"control start/end must satisfy 0 ≤ start < end ≤ 1, got start={self.start}, end={self.end}")


def check_units(units: Sequence[ControlUnit], unet: Any, *, dtype: torch.dtype | None = None,
                device: torch.device | None = None) -> None:
    """EstableError for a unit whose settings are out of range, whose ControlNet does not fit ``unet`` (a
    UNetConfig) or whose weights are not in the pipeline's dtype / on its device."""
    from ..checkpoints.controlnet_format import check_matches_unet

    for k, u in enumerate(units):
        u.validate()
        where = f"ControlNet {k} ({u.name or 'unnamed'})"
        check_matches_unet(u.net.config, unet, where)
        p = next(u.net.parameters())
        if (dtype is not None and p.dtype != dtype) or (device is not None and p.device.type != device.type):
            raise EstableError(
                f"{where} holds {str(p.dtype).removeprefix('torch.')} weights on {p.device.type}, but the pipeline "
                f"runs {str(dtype).removeprefix('torch.')} on {device}; load it with load_controlnet(..., "
                "dtype=pipe.dtype, device=pipe.device)")


def control_tensor(image: Image.Image, width: int, height: int, channels: int = 3) -> torch.Tensor:
    """(1, C, H, W) float32 in [0, 1]: the control image at the generation size (Lanczos resize only when the size
    differs, as diffusers' control image processor), RGB (or grey for one-channel ControlNets)."""
    if image.size != (width, height):
        image = image.resize((width, height), Image.Resampling.LANCZOS)
    arr = np.asarray(image.convert("RGB" if channels == 3 else "L"), dtype=np.float32) / 255.0
    t = torch.from_numpy(arr)
    return (t.permute(2, 0, 1) if t.ndim == 3 else t[None]).unsqueeze(0)


def count_evaluations(sampler: Callable[..., torch.Tensor], sigmas: torch.Tensor, options: dict[str, Any]) -> int:
    """How many times ``sampler`` calls the network over ``sigmas``: the sampler run on a one-element tensor with a
    denoiser that only counts (the samplers are pure functions, so nothing else is touched)."""
    calls = 0

    def counting(x: torch.Tensor, sigma: float) -> torch.Tensor:
        nonlocal calls
        calls += 1
        return torch.zeros_like(x)

    sampler(counting, torch.zeros(1, 1, 1, 1), sigmas, generator=[torch.Generator().manual_seed(0)], **options)
    return calls


class ControlRun:
    """The units of one batch: ``run(inp, t, context)`` → ``{"down_residuals", "mid_residual"}`` for the U-Net
    (empty when no unit is active at this evaluation). ``inp`` is the U-Net's latent input, (2B or B, 4, h, w) with
    the unconditional half first under guidance; the call counter gives the evaluation index."""

    def __init__(self, units: Sequence[ControlUnit], *, latent_size: Sequence[int], batch: int, guided: bool,
                 evaluations: int, device: torch.device, dtype: torch.dtype) -> None:
        h, w = latent_size
        self.units = list(units)
        self.guided = guided
        self.batch = batch
        self.evaluations = max(evaluations, 1)
        self.calls = 0
        self.images = []
        for u in self.units:
            f = u.net.config.hint_factor  # control-image pixels per latent cell (8 for SD)
            channels = u.net.config.conditioning_channels
            if channels not in (1, 3):  # control_tensor makes grey or RGB images only
                which = f"ControlNet {u.name}" if u.name else "ControlNet"
                raise EstableError(f"the {which} reads {channels}-channel control images; Estable makes grey "
                                   "(1-channel) or RGB (3-channel) ones")
            img = control_tensor(u.image, w * f, h * f, u.net.config.conditioning_channels)
            img = img.repeat_interleave(batch, dim=0).to(device=device, dtype=dtype)  # (B, C, H, W)
            if guided and not u.guess_mode:
                img = torch.cat([img, img])  # (2B, C, H, W): uncond half, cond half
            self.images.append(img)

    def active(self, unit: ControlUnit, i: int) -> bool:
        n = self.evaluations
        return not (i / n < unit.start or (i + 1) / n > unit.end)

    def __call__(self, inp: torch.Tensor, t: float, context: torch.Tensor) -> dict[str, Any]:
        i = self.calls
        self.calls += 1
        down: list[torch.Tensor] | None = None
        mid: torch.Tensor | None = None
        for unit, image in zip(self.units, self.images):
            if not self.active(unit, i) or unit.scale == 0:
                continue  # diffusers runs it with weight 0: zero residuals, the same sums
            x, ctx = inp, context
            if unit.guess_mode and self.guided:
                x, ctx = inp[self.batch:], context[self.batch:]  # the conditional half
            d, m = unit.net(x, t, ctx, image, scale=float(unit.scale), guess_mode=unit.guess_mode)
            if unit.guess_mode and self.guided:
                d = [torch.cat([torch.zeros_like(r), r]) for r in d]
                m = torch.cat([torch.zeros_like(m), m])
            if down is None:
                down, mid = d, m
            else:
                down = [a + b for a, b in zip(down, d)]
                mid = mid + m
        if down is None:
            return {}
        return {"down_residuals": down, "mid_residual": mid}


def _num(v: float) -> float | int:
    v = float(v)
    return int(v) if v.is_integer() else v


def control_infotext(infotext: str, units: Sequence[ControlUnit]) -> str:
    """``infotext`` with A1111's ControlNet extension fields appended to its parameters line:
    ``ControlNet 0: "Module: canny, Model: name [hash], Weight: 1, Guidance Start: 0, Guidance End: 1"`` (hash: the
    first 8 hex digits of the file's SHA-256, as the extension writes it; ``Guess Mode: True`` is Estable's)."""
    parts = []
    for k, u in enumerate(units):
        model = f"{u.name} [{u.sha256[:8]}]" if u.sha256 else u.name
        value = (f"Module: {u.kind}, Model: {model}, Weight: {_num(u.scale)}, Guidance Start: {_num(u.start)}, "
                 f"Guidance End: {_num(u.end)}" + (", Guess Mode: True" if u.guess_mode else ""))
        parts.append(f"ControlNet {k}: {json.dumps(value, ensure_ascii=False)}")
    return infotext + (", " + ", ".join(parts) if parts else "")


def control_record(units: Sequence[ControlUnit]) -> list[dict[str, Any]]:
    """What the Estable record keeps of each unit: enough to find the same files and settings again."""
    return [
        {"type": u.kind, "image": u.image_source, "model": {"name": u.name, "source": u.source, "sha256": u.sha256},
         "scale": float(u.scale), "start": float(u.start), "end": float(u.end), "guess_mode": bool(u.guess_mode)}
        for u in units
    ]
