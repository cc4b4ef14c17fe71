"""Tree-Ring watermarks (Wen, Kirchenbauer, Geiping & Goldstein 2023, "Tree-Ring Watermarks: Fingerprints for
Diffusion Images that are Invisible and Robust", arXiv 2305.20030), "rings" variant.

**Writing** (paper sec. 3.1–3.2). In the centred 2-D Fourier transform F = fftshift(fft2(z_T)) of the last
latent channel of the initial noise z_T (h × w), every coefficient within radius r of the centre,
|u|² + |v|² ≤ r², is replaced by the key: one value per ring j = ⌈|u, v|⌉ (the centre joins ring 1), so the
pattern is invariant to rotations of the image. The rest of the noise is the seed's, untouched, so the same
seed gives the same image every time. Each ring value is real: a ring is point-symmetric, and a real noise
tensor needs F(−k) = conj F(k), so a constant ring value must be real (the authors' complex ring values are
made real by taking the real part of the inverse transform anyway). Ring values are drawn once from a fixed
Estable generator with the spread of the coefficients they replace (E|F|² = h·w for unit noise). The key is
Estable's and public: the mark says "made by Estable with Tree-Ring on", not by whom.

Defaults follow the paper's published runs, scaled to the latent size: channel 3 (the last), radius
10 · min(h, w) / 64 (10 for SD's 64 × 64 latents, 5 for the built-in model's 32 × 32).

**Reading** (sec. 3.3). The image is encoded by the VAE (posterior mean), inverted to z_T by deterministic
DDIM with the empty prompt and no guidance (the generation prompt is unknown to the verifier), and the
inverted channel's Fourier coefficients y inside the mask are compared with the key k. Under the null
hypothesis (no mark), y is Gaussian with variance σ² per real component; the paper's statistic
η = Σ |k_i − y_i|² / σ² then follows a non-central χ² with λ = Σ |k_i|² / σ² and one degree of freedom per
component, and the p-value is P(χ²(df, λ) ≤ η): small when y is unusually close to the key. σ² is estimated
from y itself, as in the paper. We count each conjugate pair once (the other half of the mask is a copy),
leave out the centre (its variance differs), and normalise by the variance per real component (the paper
writes σ² per complex coefficient); this keeps the null distribution exact for Gaussian y.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image

if TYPE_CHECKING:
    from estable.pipeline import Pipeline

__all__ = [
    "TreeRingFinding",
    "detect",
    "inject",
    "invert",
    "key_and_mask",
    "ncx2_cdf",
    "p_value",
    "settings_record",
]

KEY_SEED = 0x7EE_51_AB1E  # the fixed generator of Estable's public ring key
CHANNEL = 2  # see the module docstring: the built-in model keeps this channel through its VAE
INVERSION_STEPS = 50  # DDIM steps of the inversion (the paper's test_num_inference_steps)
DETECT_P = 1e-3  # a p-value below this reports a Tree-Ring mark


def radius_for(h: int, w: int) -> int:
    return max(2, round(10 * min(h, w) / 64))


def settings_record() -> dict[str, Any]:
    """The Tree-Ring settings stored in a record (Estable's public ring key; no per-user ring keys)."""
    return {"variant": "rings", "channel": CHANNEL, "radius": "max(2, round(10 * min(h, w) / 64)) latent cells",
            "key_seed": KEY_SEED, "inversion": "DDIM, empty prompt, no guidance"}


def key_and_mask(h: int, w: int, radius: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The centred (fftshift-ed) key, (h, w) complex128, and the boolean mask of the rings, (h, w)."""
    r = radius_for(h, w) if radius is None else radius
    if not 1 <= r < min(h, w) // 2:
        raise ValueError(f"a ring radius of {r} does not fit {h}x{w} latents")
    yy = torch.arange(h, dtype=torch.float64)[:, None] - h // 2
    xx = torch.arange(w, dtype=torch.float64)[None, :] - w // 2
    dist = (yy**2 + xx**2).sqrt()
    mask = dist <= r
    ring = dist.ceil().clamp(min=1).long()  # 1..r inside the mask
    gen = torch.Generator().manual_seed(KEY_SEED)
    values = torch.randn(r + 1, generator=gen, dtype=torch.float64) * math.sqrt(h * w)  # real: see above
    key = torch.zeros(h, w, dtype=torch.complex128)
    key[mask] = values[ring[mask]].to(torch.complex128)
    return key, mask


def inject(noise: torch.Tensor) -> torch.Tensor:
    """``noise`` (B, C, h, w) with the ring key written into the Fourier transform of its last channel."""
    h, w = noise.shape[-2:]
    key, mask = key_and_mask(h, w)
    out = noise.clone()
    ch = out[:, CHANNEL].to(torch.float64)  # (B, h, w)
    f = torch.fft.fftshift(torch.fft.fft2(ch), dim=(-2, -1))
    f[:, mask] = key[mask]
    back = torch.fft.ifft2(torch.fft.ifftshift(f, dim=(-2, -1)))
    # the imaginary part is rounding only: the key is Hermitian-symmetric (real rings, point-symmetric mask)
    out[:, CHANNEL] = back.real.to(noise.dtype)
    return out


# ------------------------------------------------------------------------------------------------ statistics


def ncx2_cdf(x: float, df: int, nc: float) -> float:
    """P(X ≤ x) for X ~ non-central χ² with ``df`` degrees of freedom and non-centrality ``nc``: the Poisson
    mixture Σ_i Pois(i; nc/2) · P(χ²(df + 2i) ≤ x), summed around its largest terms in float64."""
    if x <= 0:
        return 0.0
    half = nc / 2.0
    centre = int(half)
    span = int(12 * math.sqrt(half + 1) + 20)
    i = torch.arange(max(0, centre - span), centre + span + 1, dtype=torch.float64)
    log_pois = i * math.log(half) - half - torch.lgamma(i + 1) if half > 0 else torch.where(
        i == 0, torch.tensor(0.0, dtype=torch.float64), torch.tensor(-math.inf, dtype=torch.float64))
    cdf = torch.special.gammainc((df + 2 * i) / 2.0, torch.tensor(x / 2.0, dtype=torch.float64))
    return float((log_pois.exp() * cdf).sum().clamp(0.0, 1.0))


def _components(f: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The independent real components of centred Fourier coefficients inside ``mask``: one of each conjugate
    pair (the half-plane v > 0, or v = 0 and u > 0 around the centre), real and imaginary parts."""
    h, w = mask.shape
    yy = torch.arange(h)[:, None] - h // 2
    xx = torch.arange(w)[None, :] - w // 2
    half = mask & ((yy > 0) | ((yy == 0) & (xx > 0)))
    vals = f[..., half]
    return torch.cat([vals.real, vals.imag], dim=-1)


def p_value(inverted: torch.Tensor) -> tuple[float, float]:
    """(p-value, η) of the test on one inverted latent (C, h, w): small p = close to Estable's ring key."""
    h, w = inverted.shape[-2:]
    key, mask = key_and_mask(h, w)
    f = torch.fft.fftshift(torch.fft.fft2(inverted[CHANNEL].detach().to("cpu", torch.float64)), dim=(-2, -1))
    y = _components(f, mask)
    k = _components(key, mask)
    var = float((y**2).mean())  # σ² per real component, estimated from y (the paper's estimate)
    if var <= 0:
        return 1.0, 0.0
    eta = float(((k - y) ** 2).sum()) / var
    lam = float((k**2).sum()) / var
    return ncx2_cdf(eta, y.numel(), lam), eta


# ------------------------------------------------------------------------------------------------ inversion


def invert(pipe: Pipeline, image: Image.Image, steps: int = INVERSION_STEPS) -> torch.Tensor:
    """DDIM inversion of ``image`` to the model's initial noise: (C, h, w) float32, in VP form (unit scale).

    z0 = scaling factor · the VAE posterior mean; then, over the model's DDIM timesteps in ascending order,
    the deterministic DDIM update (Song et al. 2021, eq. 12 with η = 0) run backwards, with ε evaluated at the
    current level (the approximation every DDIM inversion makes). Empty prompt, no guidance.
    """
    from estable.images import to_tensor
    from estable.sampling import schedules as S
    from estable.sampling.samplers import vp_denoiser

    f = pipe.factor
    width, height = image.width // f * f, image.height // f * f
    if not width or not height:
        raise ValueError(f"the image ({image.width}x{image.height}) is too small for the Tree-Ring test: it needs at "
                         f"least {f}x{f} pixels")
    if (width, height) != image.size:
        image = image.crop((0, 0, width, height))
    schedule = pipe.config.schedule
    if schedule.timestep_spacing is None:  # DDIM's spacing when the model names none (diffusers' default)
        schedule = dataclasses.replace(schedule, timestep_spacing="leading")
    ts = np.sort(S.spaced_timesteps(schedule, steps, variant="single"))  # ascending
    sigmas = S.sigmas_at(schedule, ts)
    clip_skip = pipe.config.clip_skip
    with torch.inference_mode():
        uncond, _ = pipe.encode_prompts("", "", clip_skip=clip_skip)  # (1, L, D)
        vae_dtype = next(pipe.vae.parameters()).dtype
        post = pipe.vae.encode(to_tensor(image.convert("RGB")).to(pipe.device, vae_dtype))
        z = post.mean.float() * pipe.config.vae.scaling_factor  # (1, C, h, w)
        table = {float(s): float(t) for s, t in zip(sigmas, ts)}

        def model(x_t: torch.Tensor, t: float) -> torch.Tensor:
            return pipe.unet_forward(x_t.to(pipe.dtype), t, uncond).float()

        denoise = vp_denoiser(model, schedule.prediction_type, lambda s: table[float(s)])
        x = S.ve_from_vp(z, float(sigmas[0]))  # x̃ at the first (lowest) level
        for i in range(len(ts) - 1):
            s, s_next = float(sigmas[i]), float(sigmas[i + 1])
            x0 = denoise(x, s)
            eps = (x - x0) / s
            x = x0 + s_next * eps  # DDIM (η = 0) in VE form, one level up
        return S.vp_from_ve(x, float(sigmas[-1]))[0]


@dataclass
class TreeRingFinding:
    found: bool
    p_value: float
    statistic: float
    model: str  # the model the image was inverted with
    steps: int
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def detect(pipe: Pipeline, image: Image.Image, *, steps: int = INVERSION_STEPS,
           threshold: float = DETECT_P) -> TreeRingFinding:
    """Invert ``image`` with ``pipe``'s model and test for Estable's ring key."""
    p, eta = p_value(invert(pipe, image, steps))
    return TreeRingFinding(p < threshold, p, eta, pipe.model_name, steps)
