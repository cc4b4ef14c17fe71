"""GenerationParams: every parameter of one generation request.

The CLI, the HTTP server and the PNG metadata all speak this one dataclass, so an image's record is enough to
reproduce it. It imports no torch, so the CLI can parse and validate before loading anything heavy.
"""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass
from typing import Any

from .errors import EstableError

MAX_SIDE = 2048  # pixels; larger requests are refused rather than exhausting memory
MAX_BATCH = 16
HIRES_UPSCALERS = ("latent", "pixel")


def hires_side(side: int, scale: float) -> int:
    """The second pass's side for a first-pass side: int(side × scale) rounded down to a multiple of 8 (A1111)."""
    return max(8, int(side * float(scale)) // 8 * 8)


_INT_FIELDS = ("steps", "seed", "batch_size", "batch_count", "hires_steps")
_NUMBER_FIELDS = ("cfg_scale", "cfg_start", "strength", "eta", "hires_scale", "hires_strength")


def _check_types(p: GenerationParams) -> None:
    """Types first, so that a tampered record (``"cfg_scale": "abc"``, ``"steps": true``) is a clear error rather
    than a crash, or a value silently read as 1 or as on."""
    for name in _INT_FIELDS:
        v = getattr(p, name)
        if isinstance(v, bool) or not isinstance(v, int):
            raise EstableError(f"{name.replace('_', ' ')} must be a whole number, not {v!r}")
    for name in _NUMBER_FIELDS:
        v = getattr(p, name)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v != v:
            raise EstableError(f"{name.replace('_', ' ')} must be a number, not {v!r}")
    for name in ("width", "height", "clip_skip"):
        v = getattr(p, name)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int)):
            raise EstableError(f"{name.replace('_', ' ')} must be a whole number, not {v!r}")
    for name in ("weighting", "complete_prompt", "tile_vae"):
        if not isinstance(getattr(p, name), bool):
            raise EstableError(f"{name.replace('_', ' ')} must be true or false, not {getattr(p, name)!r}")
    if not isinstance(p.sampler, str):
        raise EstableError(f"sampler must be a name, not {p.sampler!r}")


@dataclass
class GenerationParams:
    prompt: str = ""
    negative_prompt: str = ""
    sampler: str = "dpmpp_2m_karras"
    steps: int = 25
    cfg_scale: float = 7.0
    # Guidance only from this fraction of the noise schedule on (a guidance interval, Kynkäänniemi et al. 2024;
    # ComfyUI's "start percent"): while the timestep is above (1 - cfg_start) x the model's training timesteps
    # (1000), the prompt's output alone is used, without the negative / unconditional one. 0 = guided everywhere.
    cfg_start: float = 0.0
    seed: int = -1  # -1: a random seed, resolved (and recorded) before generation
    width: int | None = None  # None: the model's native size
    height: int | None = None
    batch_size: int = 1  # images denoised together
    batch_count: int = 1  # batches run one after another; image k of the run uses seed + k
    clip_skip: int | None = None  # None: the model's default (1 for SD 1.x, 2 for SD 2.x)
    strength: float = 0.75  # img2img / inpaint: how much of the schedule is re-run
    eta: float = 0.0  # DDIM stochasticity
    weighting: bool = True  # A1111 (word:1.2) syntax; off = the prompt is taken literally
    # Two-pass "hires fix" of txt2img (A1111's enable_hr): > 1 upscales the first pass by this factor (hr_scale)
    # and re-runs the last hires_strength of a schedule on it (denoising_strength); estable.hires
    hires_scale: float = 1.0
    hires_strength: float = 0.7
    hires_upscaler: str = "latent"  # "latent" (bilinear latents, A1111's "Latent") or "pixel" (Lanczos)
    hires_steps: int = 0  # steps of the second pass's schedule (hr_second_pass_steps); 0 = steps
    tile_vae: bool = False  # decode / encode in blended tiles (estable.tiled_vae): large images in less memory
    # txt2img: let the model's file complete the prompt (ModelConfig.prompt_completion, estable.prompt_completion);
    # off = the prompt is drawn as written. Models that name no completion ignore it.
    complete_prompt: bool = True

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise EstableError with a message a user can act on."""
        if not isinstance(self.prompt, str) or not isinstance(self.negative_prompt, str):
            raise EstableError("prompt and negative prompt must be text")
        _check_types(self)
        for name in ("width", "height"):
            v = getattr(self, name)
            if v is None:
                continue
            if not isinstance(v, int) or v <= 0:
                raise EstableError(f"{name} must be a positive whole number of pixels, not {v!r}")
            if v > MAX_SIDE:
                raise EstableError(f"{name} {v} is larger than the maximum {MAX_SIDE}")
            if v % 8:
                raise EstableError(
                    f"{name} {v} is not a multiple of 8 (the autoencoder downsamples by 8): try {max(8, v // 8 * 8)}"
                )
        if not isinstance(self.steps, int) or not 1 <= self.steps <= 1000:
            raise EstableError(f"steps must be between 1 and 1000, not {self.steps!r}")
        if not 0.0 <= float(self.cfg_scale) <= 100.0:
            raise EstableError(f"cfg scale must be between 0 and 100, not {self.cfg_scale!r}")
        if not 0.0 <= float(self.cfg_start) < 1.0:
            raise EstableError(f"cfg start must be in [0, 1) (a fraction of the noise schedule), not "
                               f"{self.cfg_start!r}")
        if not 1 <= self.batch_size <= MAX_BATCH or not 1 <= self.batch_count <= 1000:
            raise EstableError(f"batch size must be 1..{MAX_BATCH} and batch count 1..1000")
        if not 0.0 < float(self.strength) <= 1.0:
            raise EstableError(f"strength must be in (0, 1], not {self.strength!r}")
        if not 0.0 <= float(self.eta) <= 1.0:
            raise EstableError(f"eta must be in [0, 1], not {self.eta!r}")
        if self.clip_skip is not None and not 1 <= self.clip_skip <= 12:
            raise EstableError(f"clip skip must be between 1 and 12, not {self.clip_skip!r}")
        self._validate_hires()
        if not isinstance(self.seed, int) or not -1 <= self.seed < 2**63:
            raise EstableError(f"seed must be -1 (random) or a non-negative integer, not {self.seed!r}")
        count = self.batch_size * self.batch_count
        if self.seed != -1 and self.seed + count - 1 >= 2**63:
            raise EstableError(
                f"seed {self.seed} is too large for {count} images: image k uses seed + k and seeds stop at "
                f"2^63 - 1; use a seed of at most {2**63 - count}"
            )

    def _validate_hires(self) -> None:
        if not 1.0 <= float(self.hires_scale) <= 4.0:
            raise EstableError(f"hires scale must be between 1 (off) and 4, not {self.hires_scale!r}")
        if not 0.0 < float(self.hires_strength) <= 1.0:
            raise EstableError(f"hires strength must be in (0, 1], not {self.hires_strength!r}")
        if self.hires_upscaler not in HIRES_UPSCALERS:
            raise EstableError(f"hires upscaler must be one of {', '.join(HIRES_UPSCALERS)}, not "
                               f"{self.hires_upscaler!r}")
        if not isinstance(self.hires_steps, int) or not 0 <= self.hires_steps <= 1000:
            raise EstableError(f"hires steps must be between 0 (= steps) and 1000, not {self.hires_steps!r}")
        for name in ("width", "height"):
            v = getattr(self, name)
            if v is not None and self.hires_scale > 1 and hires_side(v, self.hires_scale) > MAX_SIDE:
                raise EstableError(f"{name} {v} × hires scale {self.hires_scale:g} is larger than the maximum "
                                   f"{MAX_SIDE}")

    def check_runs_a_step(self, mode: str) -> None:
        """Refuse (EstableError) a strength that leaves no step of the schedule to run: img2img and inpaint run
        the last ``int(steps × strength)`` steps, the hires fix's second pass the last ``int(hires steps ×
        hires strength)``."""
        if mode != "txt2img" and min(int(self.steps * self.strength), self.steps) < 1:
            raise EstableError(f"strength {self.strength} with {self.steps} steps leaves no step to run; raise the "
                               "strength or the steps")
        steps = self.hires_steps or self.steps
        if mode == "txt2img" and self.hires_scale > 1 and min(int(steps * float(self.hires_strength)), steps) < 1:
            raise EstableError(f"hires strength {self.hires_strength} with {steps} steps leaves no step to run; "
                               "raise the strength or the steps")

    def resolved(self) -> GenerationParams:
        """A copy with a concrete seed (a random one replaces -1)."""
        if self.seed != -1:
            return dataclasses.replace(self)
        return dataclasses.replace(self, seed=random.SystemRandom().randrange(2**32))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GenerationParams:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise EstableError(f"unknown generation parameter(s): {', '.join(unknown)}")
        return cls(**data)
