"""The two-pass "hires fix" of txt2img (A1111's ``enable_hr``): compose at the model's size, finish larger.

A model trained at one resolution repeats its composition (two heads, tiled scenes) when asked for a much larger
image directly. The hires fix (A1111; the same idea as SDEdit, Meng et al. 2022) generates at the requested size,
upscales the result by ``hires_scale`` and re-runs the last ``hires_strength`` of a ``hires_steps`` schedule on
it, img2img style, with the same prompts:

    pass 1   z₁ = sample(noise(seed), W × H)                                    as plain txt2img
    upscale  "latent": z₂⁰ = bilinear(z₁) to (W₂/8 × H₂/8)                      A1111's "Latent" upscaler
             "pixel":  z₂⁰ = s · E(Lanczos(D(z₁ / s)) to W₂ × H₂)               E: posterior mean; s: scaling factor
    pass 2   entered at t_start = steps₂ − int(steps₂ · strength):  x = z₂⁰ + σ_start · ε,  ε from the seed again
             (A1111 draws the second pass's noise from a fresh generator of the same seed, at the new shape)

with W₂ = int(W · scale) rounded down to a multiple of 8 (:func:`estable.params.hires_side`). The infotext
records it as A1111 does: ``Size`` is the first pass's, plus ``Hires upscale``, ``Hires upscaler``, ``Hires
steps`` (when set) and the second pass's ``Denoising strength``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from .errors import EstableError
from .images import to_pil, to_tensor
from .params import GenerationParams, hires_side
from .sampling.samplers import SamplerSpec, make_sigmas

if TYPE_CHECKING:
    from .pipeline import Pipeline

_UPSCALER_NAMES = {"latent": "Latent", "pixel": "Lanczos"}


def hires_steps(params: GenerationParams) -> int:
    """Network evaluations' worth of steps the second pass runs (0 when the hires fix is off)."""
    if float(params.hires_scale) <= 1.0:
        return 0
    steps = params.hires_steps or params.steps
    return steps - max(steps - min(int(steps * float(params.hires_strength)), steps), 0)


def hires_infotext(params: GenerationParams, mode: str) -> dict[str, Any]:
    """A1111's infotext fields for the hires fix (empty when it is off)."""
    if mode != "txt2img" or float(params.hires_scale) <= 1.0:
        return {}
    scale = float(params.hires_scale)
    return {
        "Hires upscale": int(scale) if scale.is_integer() else scale,
        "Hires steps": params.hires_steps or None,
        "Hires upscaler": _UPSCALER_NAMES[params.hires_upscaler],
    }


def upscale_latents(pipe: Pipeline, z: torch.Tensor, params: GenerationParams, width: int,
                    height: int) -> torch.Tensor:
    """Scaled latents (B, C, h, w) → (B, C, H₂/8, W₂/8) by the chosen upscaler (float32)."""
    f = pipe.factor
    if params.hires_upscaler == "latent":
        return F.interpolate(z.float(), size=(height // f, width // f), mode="bilinear", align_corners=False)
    images, _note = pipe._decode(z, tile=params.tile_vae)  # (B, 3, h·f, w·f) in [-1, 1]
    from PIL import Image

    big = [im.resize((width, height), Image.Resampling.LANCZOS) for im in to_pil(images)]
    vae_dtype = next(pipe.vae.parameters()).dtype
    parts = []
    with torch.inference_mode():
        for im in big:
            x = to_tensor(im).to(pipe.device, vae_dtype)  # (1, 3, H₂, W₂)
            if params.tile_vae:
                from .tiled_vae import tiled_encode

                posterior = tiled_encode(pipe.vae, x)
            else:
                posterior = pipe.vae.encode(x)
            parts.append(posterior.mean.float())
    return torch.cat(parts) * pipe.config.vae.scaling_factor


def run_hires(
    pipe: Pipeline,
    z: torch.Tensor,
    params: GenerationParams,
    spec: SamplerSpec,
    seeds: Sequence[int],
    cond: torch.Tensor,
    uncond: torch.Tensor,
    width: int,
    height: int,
    callback: Callable[[int, int, torch.Tensor, torch.Tensor], None],
    control: Sequence[Any] | None = None,
) -> torch.Tensor:
    """The second pass on first-pass latents ``z`` made at width × height; returns the large latents.

    ``control`` (ControlNet units) guides the second pass too, its images resized to the larger size, as A1111's
    ControlNet extension does by default ("Both" passes); each unit's start/end fractions apply to this pass's
    own schedule."""
    from .pipeline import _slice_plan

    w2, h2 = hires_side(width, params.hires_scale), hires_side(height, params.hires_scale)
    steps = params.hires_steps or params.steps
    try:
        plan = make_sigmas(spec, pipe.config.schedule, steps)
    except ValueError as exc:
        raise EstableError(str(exc)) from None
    params.check_runs_a_step("txt2img")
    t_start = steps - min(int(steps * float(params.hires_strength)), steps)
    z_up = upscale_latents(pipe, z, params, w2, h2).to(pipe.device)
    return pipe._sample("img2img", params, spec, _slice_plan(plan, t_start), seeds, cond, uncond, None, None,
                        w2, h2, callback, control, init_latents=z_up)
