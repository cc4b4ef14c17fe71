"""Noise schedules: betas, ᾱ, training sigmas, inference timestep spacings, Karras sigmas, parametrisations.

Everything here is computed in float64 (numpy for the integer timestep arithmetic, so that rounding follows
the same rules as the reference implementations; torch float64 tensors for the tables returned).

Glossary (Ho et al. 2020, "DDPM"; Karras et al. 2022, "EDM"):
  t            discrete training timestep, 0 ≤ t < T (T = ``num_train_timesteps``)
  beta_t       variance of the forward step q(x_t | x_{t-1}) = N(sqrt(1-β_t) x_{t-1}, β_t I)
  alpha_bar_t  ᾱ_t = Π_{s≤t} (1 - β_s), so q(x_t | x_0) = N(sqrt(ᾱ_t) x_0, (1 - ᾱ_t) I)      (DDPM eq. 4)
  VP variable  x_t = sqrt(ᾱ) x0 + sqrt(1 - ᾱ) ε: what the U-Net sees ("variance preserving")
  VE variable  x̃ = x_t / sqrt(ᾱ) = x0 + σ ε with σ = sqrt((1 - ᾱ) / ᾱ): what the samplers integrate
               (the "variance exploding" / k-diffusion form, EDM sec. 2 and table 1)
  ε, v, x0     the three things a network can predict; v = sqrt(ᾱ) ε - sqrt(1 - ᾱ) x0 (Salimans & Ho 2022, sec. 4)

Conversions between the two variables only need σ: sqrt(ᾱ) = 1 / sqrt(1 + σ²), sqrt(1 - ᾱ) = σ / sqrt(1 + σ²).
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
import torch

from estable.config import ScheduleConfig

Spacing = Literal["single", "multistep"]

# ---------------------------------------------------------------------------------------------------------------
# Training schedule
# ---------------------------------------------------------------------------------------------------------------


def _cosine_alpha_bar(u: float) -> float:
    # Nichol & Dhariwal 2021, eq. 17: f(t) = cos²(((t/T + s) / (1 + s)) · π/2) with offset s = 0.008.
    return math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2


def betas(schedule: ScheduleConfig) -> torch.Tensor:
    """β_1..β_T of the training schedule, float64, shape (T,)."""
    n = schedule.num_train_timesteps
    if schedule.beta_schedule == "linear":
        # Ho et al. 2020, sec. 4: β increasing linearly from beta_start to beta_end.
        b = np.linspace(schedule.beta_start, schedule.beta_end, n, dtype=np.float64)
    elif schedule.beta_schedule == "scaled_linear":
        # Latent diffusion (Rombach et al. 2022, the "linear" schedule of its code): linear in sqrt(β).
        b = np.linspace(math.sqrt(schedule.beta_start), math.sqrt(schedule.beta_end), n, dtype=np.float64) ** 2
    elif schedule.beta_schedule == "squaredcos_cap_v2":
        # Nichol & Dhariwal 2021, eq. 17 and the text after it: β_t = 1 - ᾱ_t / ᾱ_{t-1}, clipped to ≤ 0.999
        # to avoid the singularity at the end of the diffusion process.
        b = np.array(
            [min(1.0 - _cosine_alpha_bar((i + 1) / n) / _cosine_alpha_bar(i / n), 0.999) for i in range(n)],
            dtype=np.float64,
        )
    else:  # ScheduleConfig validates, this guards against a config built around its checks
        raise ValueError(f"unsupported beta_schedule {schedule.beta_schedule!r}")
    if schedule.rescale_betas_zero_snr:
        b = _zero_terminal_snr(b)
    return torch.from_numpy(b)


def _zero_terminal_snr(b: np.ndarray) -> np.ndarray:
    """Lin et al. 2024, algorithm 1: shift √ᾱ_t so its last value is 0, scale it so its first is unchanged, and
    turn it back into betas (β_T becomes 1: the last step destroys all signal)."""
    root = np.sqrt(np.cumprod(1.0 - b))
    first, last = root[0], root[-1]
    root = (root - last) * first / (first - last)
    ab = root ** 2
    alphas = np.concatenate([ab[:1], ab[1:] / ab[:-1]])
    return 1.0 - alphas


#: Where a zero-terminal-SNR schedule's last ᾱ is clamped for sampling, so that σ_max is finite (≈ 4096): the
#: float16 smallest subnormal, the value diffusers' Euler, Euler a, DPM-Solver and UniPC schedulers use.
ZERO_SNR_CLAMP = 2.0 ** -24


def alphas_cumprod(schedule: ScheduleConfig) -> torch.Tensor:
    """ᾱ_t = Π_{s≤t} (1 - β_s) (Ho et al. 2020, notation before eq. 4), float64, shape (T,). The training
    table: with ``rescale_betas_zero_snr`` its last entry is exactly 0."""
    return torch.cumprod(1.0 - betas(schedule), dim=0)


def training_sigmas(schedule: ScheduleConfig) -> torch.Tensor:
    """σ_t = sqrt((1 - ᾱ_t) / ᾱ_t) for t = 0..T-1 (EDM table 1, "VP" row), float64, increasing in t; a zero
    terminal ᾱ is clamped to :data:`ZERO_SNR_CLAMP` so every sampler starts from a finite σ."""
    ac = alphas_cumprod(schedule)
    if schedule.rescale_betas_zero_snr:
        ac[-1] = ZERO_SNR_CLAMP
    return ((1.0 - ac) / ac).sqrt()


def sigma_from_alpha_bar(alpha_bar: float) -> float:
    """σ = sqrt((1 - ᾱ) / ᾱ)."""
    return math.sqrt((1.0 - alpha_bar) / alpha_bar)


def alpha_bar_from_sigma(sigma: float) -> float:
    """ᾱ = 1 / (1 + σ²), the inverse of :func:`sigma_from_alpha_bar`."""
    return 1.0 / (1.0 + sigma * sigma)


def final_sigma_ddim(schedule: ScheduleConfig, set_alpha_to_one: bool = False) -> float:
    """Where DDIM and PNDM end (Song et al. 2021, eq. 12 with the last "previous" ᾱ).

    With ``set_alpha_to_one`` the last step goes to ᾱ = 1 (σ = 0, a clean sample); without it (SD 1.x and 2.x
    ship this) it goes to ᾱ_0 of the table, i.e. σ = sqrt(β_0 / (1 - β_0)) ≈ 0.029 for SD, not 0.
    """
    if set_alpha_to_one:
        return 0.0
    return sigma_from_alpha_bar(float(alphas_cumprod(schedule)[0]))


# ---------------------------------------------------------------------------------------------------------------
# Inference timesteps
# ---------------------------------------------------------------------------------------------------------------


def spaced_timesteps(
    schedule: ScheduleConfig, steps: int, *, variant: Spacing = "single", discrete: bool = True
) -> np.ndarray:
    """The N inference timesteps, descending, float64, with diffusers' spacing rules.

    ``timestep_spacing`` (Lin et al. 2024, "Common diffusion noise schedules and sample steps are flawed",
    table 2) picks how N timesteps are spread over 0..T-1:
      linspace  evenly from 0 to T-1, both ends included;
      leading   k·⌊T/N⌋ for k = 0..N-1, plus ``steps_offset`` (SD: 1, giving 1, 51, ..., 951 for N = 20);
      trailing  round(T - k·T/N) - 1 for k = 0..N-1 (starts at T-1).
    ``variant="single"`` is the rule of DDIM, DDPM, PNDM, Euler and Heun. ``variant="multistep"`` is the one of
    the multistep solvers (DPM-Solver, UniPC): linspace and leading space N + 1 points (leading uses ⌊T/(N+1)⌋)
    and drop the last one. ``discrete=False`` keeps linspace's fractional timesteps (Euler and Heun do);
    otherwise they are rounded to integers.
    """
    if steps < 1:
        raise ValueError(f"the number of sampling steps must be at least 1, not {steps}")
    n_train = schedule.num_train_timesteps
    if steps > n_train:
        raise ValueError(f"{steps} sampling steps is more than the {n_train} training timesteps of this model")
    spacing = schedule.timestep_spacing
    points = steps + 1 if variant == "multistep" else steps
    if spacing == "linspace":
        t = np.linspace(0, n_train - 1, points, dtype=np.float64)
        if discrete or variant == "multistep":
            t = t.round()
        t = t[::-1]
    elif spacing == "leading":
        ratio = n_train // points
        t = (np.arange(0, points) * ratio).round()[::-1].astype(np.float64) + schedule.steps_offset
    elif spacing == "trailing":
        ratio = n_train / steps
        t = np.arange(n_train, 0, -ratio).round().astype(np.float64) - 1
        return t.copy()
    else:
        raise ValueError(f"unsupported timestep_spacing {spacing!r}")
    if variant == "multistep":
        t = t[:-1]
    return t.copy()


def lcm_timesteps(schedule: ScheduleConfig, steps: int, original_steps: int = 50) -> np.ndarray:
    """Timesteps of a Latent Consistency Model (Luo et al. 2023, sec. 4.3: the skipping-step schedule).

    The model was distilled on ``original_steps`` evenly spaced timesteps k·(T/original) - 1 (19, 39, ..., 999
    for T = 1000, 50); N of them are picked at evenly spaced indices from the top. ``timestep_spacing`` and
    ``steps_offset`` play no part.
    """
    n_train = schedule.num_train_timesteps
    if not 1 <= original_steps <= n_train:
        raise ValueError(f"LCM original_steps must be in 1..{n_train}, not {original_steps}")
    k = n_train // original_steps
    origin = (np.arange(1, original_steps + 1) * k - 1)[::-1]
    if not 1 <= steps <= len(origin):
        raise ValueError(f"LCM sampling needs 1..{len(origin)} steps for this model, not {steps}")
    idx = np.floor(np.linspace(0, len(origin), num=steps, endpoint=False)).astype(np.int64)
    return origin[idx].astype(np.float64)


def sigmas_at(schedule: ScheduleConfig, timesteps: np.ndarray | torch.Tensor) -> torch.Tensor:
    """σ at (possibly fractional) timesteps, interpolating σ_t linearly between integer t (as np.interp)."""
    table = training_sigmas(schedule).numpy()
    t = np.asarray(timesteps, dtype=np.float64)
    return torch.from_numpy(np.interp(t, np.arange(len(table), dtype=np.float64), table))


def karras_sigmas(sigma_min: float, sigma_max: float, steps: int, rho: float = 7.0) -> torch.Tensor:
    """Karras et al. 2022, eq. 5: σ_i = (σ_max^(1/ρ) + i/(N-1) · (σ_min^(1/ρ) - σ_max^(1/ρ)))^ρ, i = 0..N-1.

    N values from σ_max down to σ_min, float64; ρ = 7 as in the paper. The trailing 0 is the caller's business.
    """
    if steps < 1:
        raise ValueError(f"the number of sampling steps must be at least 1, not {steps}")
    ramp = np.linspace(0, 1, steps, dtype=np.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return torch.from_numpy((hi + ramp * (lo - hi)) ** rho)


def sigma_to_timestep(schedule: ScheduleConfig, sigma: float | torch.Tensor) -> float | torch.Tensor:
    """The (fractional) training timestep of a noise level: linear interpolation in log σ between the two
    neighbouring entries of the training table, clamped to [0, T-1] (the rule diffusers and k-diffusion use
    to feed Karras sigmas to a discrete-time model). Returns a float for a float, float64 tensor for a tensor.
    """
    log_table = training_sigmas(schedule).log()  # (T,), increasing
    s = torch.as_tensor(sigma, dtype=torch.float64)
    log_s = s.clamp(min=1e-10).log()
    # index of the last table entry ≤ log σ, kept one short of the end so that [low, low + 1] is a valid pair
    low = (log_s.reshape(-1, 1) >= log_table.reshape(1, -1)).sum(dim=1).sub(1).clamp(0, len(log_table) - 2)
    lo, hi = log_table[low], log_table[low + 1]
    w = ((lo - log_s.reshape(-1)) / (lo - hi)).clamp(0, 1)
    t = ((1 - w) * low + w * (low + 1)).reshape(s.shape)
    if isinstance(sigma, torch.Tensor):
        return t
    return float(t)


# ---------------------------------------------------------------------------------------------------------------
# Parametrisations. VP: x_t = a·x0 + b·ε with a = sqrt(ᾱ), b = sqrt(1 - ᾱ). VE: x̃ = x0 + σ·ε.
# ---------------------------------------------------------------------------------------------------------------


def vp_from_ve(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """x_t = x̃ · sqrt(ᾱ) = x̃ / sqrt(1 + σ²): the U-Net's input for the sampler's variable."""
    return x / math.sqrt(1.0 + sigma * sigma)


def ve_from_vp(x_t: torch.Tensor, sigma: float) -> torch.Tensor:
    """x̃ = x_t / sqrt(ᾱ) = x_t · sqrt(1 + σ²)."""
    return x_t * math.sqrt(1.0 + sigma * sigma)


def add_noise(x0: torch.Tensor, noise: torch.Tensor, alpha_bar: float | torch.Tensor) -> torch.Tensor:
    """Forward process q(x_t | x0): x_t = sqrt(ᾱ) x0 + sqrt(1 - ᾱ) ε (Ho et al. 2020, eq. 4)."""
    return alpha_bar**0.5 * x0 + (1 - alpha_bar) ** 0.5 * noise


def velocity(x0: torch.Tensor, noise: torch.Tensor, alpha_bar: float | torch.Tensor) -> torch.Tensor:
    """The v-prediction target v = sqrt(ᾱ) ε - sqrt(1 - ᾱ) x0 (Salimans & Ho 2022, sec. 4 and appendix D)."""
    return alpha_bar**0.5 * noise - (1 - alpha_bar) ** 0.5 * x0


def x0_from_eps_vp(x_t: torch.Tensor, eps: torch.Tensor, alpha_bar: float | torch.Tensor) -> torch.Tensor:
    """x0 = (x_t - sqrt(1 - ᾱ) ε) / sqrt(ᾱ) (Ho et al. 2020, eq. 4 solved for x0; DDIM eq. 12 "predicted x0")."""
    return (x_t - (1 - alpha_bar) ** 0.5 * eps) / alpha_bar**0.5


def x0_from_v_vp(x_t: torch.Tensor, v: torch.Tensor, alpha_bar: float | torch.Tensor) -> torch.Tensor:
    """x0 = sqrt(ᾱ) x_t - sqrt(1 - ᾱ) v (Salimans & Ho 2022, sec. 4: x̂ = α_t z_t - σ_t v̂)."""
    return alpha_bar**0.5 * x_t - (1 - alpha_bar) ** 0.5 * v


def eps_from_v_vp(x_t: torch.Tensor, v: torch.Tensor, alpha_bar: float | torch.Tensor) -> torch.Tensor:
    """ε = sqrt(1 - ᾱ) x_t + sqrt(ᾱ) v (Salimans & Ho 2022, sec. 4, with α² + σ² = 1)."""
    return (1 - alpha_bar) ** 0.5 * x_t + alpha_bar**0.5 * v


def x0_from_eps(x: torch.Tensor, eps: torch.Tensor, sigma: float) -> torch.Tensor:
    """VE form: x0 = x̃ - σ ε."""
    return x - sigma * eps


def eps_from_x0(x: torch.Tensor, x0: torch.Tensor, sigma: float) -> torch.Tensor:
    """VE form: ε = (x̃ - x0) / σ, the slope dx̃/dσ of the probability-flow ODE (EDM eq. 4 with σ(t) = t)."""
    return (x - x0) / sigma


def x0_from_v(x: torch.Tensor, v: torch.Tensor, sigma: float) -> torch.Tensor:
    """VE form of :func:`x0_from_v_vp`: x0 = x̃ / (1 + σ²) - σ / sqrt(1 + σ²) · v (x_t = x̃ / sqrt(1 + σ²))."""
    return x / (1.0 + sigma * sigma) - sigma / math.sqrt(1.0 + sigma * sigma) * v


def v_from_x0(x: torch.Tensor, x0: torch.Tensor, sigma: float) -> torch.Tensor:
    """VE form of v: v = sqrt(ᾱ) (ε - σ x0) with ε = (x̃ - x0) / σ and sqrt(ᾱ) = 1 / sqrt(1 + σ²)."""
    return (eps_from_x0(x, x0, sigma) - sigma * x0) / math.sqrt(1.0 + sigma * sigma)


def eps_from_v(x: torch.Tensor, v: torch.Tensor, sigma: float) -> torch.Tensor:
    """VE form of :func:`eps_from_v_vp`: ε = sqrt(ᾱ) v + σ ᾱ x̃."""
    a2 = 1.0 / (1.0 + sigma * sigma)
    return math.sqrt(a2) * v + sigma * a2 * x


def to_x0(
    model_output: torch.Tensor,
    x: torch.Tensor,
    sigma: float,
    prediction_type: Literal["epsilon", "v_prediction"],
) -> torch.Tensor:
    """x0 from a network output evaluated at the VP input x̃ / sqrt(1 + σ²); ``x`` is the VE variable x̃."""
    if prediction_type == "epsilon":
        return x0_from_eps(x, model_output, sigma)
    if prediction_type == "v_prediction":
        return x0_from_v(x, model_output, sigma)
    raise ValueError(f"unsupported prediction_type {prediction_type!r}; use 'epsilon' or 'v_prediction'")
