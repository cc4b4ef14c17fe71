"""Samplers: pure functions over one denoiser, plus the sigma plans and the name registry.

Every sampler has the signature

    sample_xxx(denoise, x, sigmas, *, generator=None, callback=None, **options) -> x

* ``denoise(x, sigma) -> x0`` is the adapter that hides the network: it scales x to the network's VP input
  x / sqrt(1 + σ²), picks the discrete timestep (``SigmaPlan.timestep(sigma)``), applies guidance and turns ε or v
  into x0 (see :func:`vp_denoiser`). ``sigma`` is a Python float, always one of the values of ``sigmas``.
* ``x`` is the VE ("k-diffusion") variable x̃ = x0 + σ ε at ``sigmas[0]``; ``sigmas`` is non-increasing, all
  positive except possibly the last. The initial x is ``noise * plan.init_noise_sigma`` (not always
  ``noise * sigmas[0]``: each reference scheduler has its own rule, see :func:`make_sigmas`).
* The return value is x̃ at ``sigmas[-1]``. **Decoding rule**: the latent to decode is
  ``x / sqrt(1 + sigmas[-1]**2)`` (= ``plan.final_latents(x)``), the VP variable at the last noise level. That is x
  itself whenever the last sigma is 0 (every sampler here except DDIM and PLMS with ``set_alpha_to_one=False``,
  which end at ᾱ_0 of the table, σ ≈ 0.029 for SD, exactly as the reference schedulers do).
* ``callback(step, total, x, denoised)`` is called once per step, after the step, with the new x and the x0
  estimate the step used.
* Random numbers (ancestral, SDE, DDPM, LCM steps) come from ``torch.randn(x.shape, generator=generator)`` on the
  generator's device, then moved to x's device (a list of generators draws one batch item from each), in the order
  and shapes diffusers' schedulers draw them, so that a given generator reproduces diffusers' samples. A step whose
  target sigma is 0 is deterministic and draws nothing. With ``generator=None`` a CPU generator seeded with 0 is
  created for the call, so results are always deterministic.

Every update is written for the VE variable; the comments give the equivalence with the VP form of the paper.
λ = -log σ is the half log-SNR of DPM-Solver (λ_t = log(α_t / σ_t) in VP notation).
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch

from estable.config import ScheduleConfig
from estable.sampling import schedules as S

Denoiser = Callable[[torch.Tensor, float], torch.Tensor]
Callback = Callable[[int, int, torch.Tensor, torch.Tensor], None]
Generator = torch.Generator | Sequence[torch.Generator] | None

DEFAULT_SEED = 0  # seed of the generator a sampler creates when it is given none


# ---------------------------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------------------------


def _sigma_list(sigmas: torch.Tensor | Sequence[float]) -> list[float]:
    s = [float(v) for v in (sigmas.tolist() if isinstance(sigmas, torch.Tensor) else sigmas)]
    if len(s) < 2:
        raise ValueError("a sampler needs at least two sigmas (the start and the end of one step)")
    if any(b > a for a, b in zip(s, s[1:])):
        raise ValueError("sigmas must be non-increasing (from the noisiest level down)")
    if min(s[:-1]) <= 0 or s[-1] < 0:
        raise ValueError("sigmas must be positive, except the last, which may be 0")
    return s


def _generator(generator: Generator) -> torch.Generator | Sequence[torch.Generator]:
    if generator is None:
        return torch.Generator("cpu").manual_seed(DEFAULT_SEED)
    return generator


def randn_like(x: torch.Tensor, generator: Generator, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Standard normal noise of x's shape, drawn as diffusers' ``randn_tensor`` draws it.

    Drawn on the generator's device (a CPU generator gives the same numbers whatever device x is on) and moved to
    x's device; a list of generators draws item b of the batch from generator b, with shape (1, ...).
    """
    dtype = x.dtype if dtype is None else dtype
    gen = _generator(generator)
    if isinstance(gen, Sequence):
        if len(gen) == 1:
            gen = gen[0]
        else:
            if len(gen) != x.shape[0]:
                raise ValueError(f"got {len(gen)} generators for a batch of {x.shape[0]}; give one per item")
            parts = [torch.randn((1, *x.shape[1:]), generator=g, device=g.device, dtype=dtype) for g in gen]
            return torch.cat(parts).to(x.device)
    return torch.randn(x.shape, generator=gen, device=gen.device, dtype=dtype).to(x.device)


def _ancestral_sigmas(sigma: float, sigma_next: float, eta: float) -> tuple[float, float]:
    """Split a step σ → σ_next into a deterministic part down to σ_down and fresh noise of std σ_up.

    σ_up = η · sqrt(σ_next² (σ² - σ_next²) / σ²) and σ_down = sqrt(σ_next² - σ_up²). With η = 1 this is the DDPM
    posterior (Ho et al. 2020, eq. 7) and with η ∈ [0, 1] the DDIM family (Song et al. 2021, eq. 16), both
    rewritten for x̃ = x_t / sqrt(ᾱ): σ_up = σ_t(η) / sqrt(ᾱ_prev).
    """
    if sigma_next == 0.0 or eta == 0.0:
        return sigma_next, 0.0
    up = min(sigma_next, eta * math.sqrt(sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2))
    return math.sqrt(sigma_next**2 - up**2), up


def _ancestral_loop(
    denoise: Denoiser, x: torch.Tensor, s: list[float], eta: float, generator: Generator, callback: Callback | None
) -> torch.Tensor:
    gen = _generator(generator) if eta > 0 else None
    n = len(s) - 1
    for i in range(n):
        denoised = denoise(x, s[i])
        down, up = _ancestral_sigmas(s[i], s[i + 1], eta)
        d = (x - denoised) / s[i]  # dx̃/dσ of the probability-flow ODE (Karras et al. 2022, eq. 4)
        x = x + d * (down - s[i])  # deterministic DDIM / Euler move to σ_down
        if eta > 0 and s[i + 1] > 0:
            x = x + randn_like(x, gen) * up  # fresh noise brings the level from σ_down to σ_next
        if callback is not None:
            callback(i, n, x, denoised)
    return x


# ---------------------------------------------------------------------------------------------------------------
# Samplers
# ---------------------------------------------------------------------------------------------------------------


def sample_euler(
    denoise: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor | Sequence[float],
    *,
    generator: Generator = None,
    callback: Callback | None = None,
) -> torch.Tensor:
    """Euler's method on the probability-flow ODE dx̃/dσ = (x̃ - D(x̃, σ)) / σ (Karras et al. 2022, eq. 4 and
    algorithm 1 without its second-order correction). As EulerDiscreteScheduler."""
    del generator  # deterministic
    return _ancestral_loop(denoise, x, _sigma_list(sigmas), 0.0, None, callback)


def sample_ddim(
    denoise: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor | Sequence[float],
    *,
    generator: Generator = None,
    callback: Callback | None = None,
    eta: float = 0.0,
) -> torch.Tensor:
    """DDIM (Song et al. 2021, eq. 12 with σ_t(η) of eq. 16). As DDIMScheduler.

    With η = 0 the DDIM update sqrt(ᾱ_prev) x0 + sqrt(1 - ᾱ_prev) ε is, divided by sqrt(ᾱ_prev), exactly an Euler step
    of the VE ODE (Karras et al. 2022, sec. 3); with η > 0 fresh noise is added (η = 1: DDPM's posterior variance).
    """
    if eta < 0:
        raise ValueError(f"DDIM eta must be ≥ 0, not {eta}")
    return _ancestral_loop(denoise, x, _sigma_list(sigmas), float(eta), generator, callback)


def sample_euler_ancestral(
    denoise: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor | Sequence[float],
    *,
    generator: Generator = None,
    callback: Callback | None = None,
    eta: float = 1.0,
) -> torch.Tensor:
    """Euler ancestral ("Euler a"): an Euler step down to σ_down, then noise of std σ_up (k-diffusion's
    sample_euler_ancestral; EulerAncestralDiscreteScheduler). One draw per step."""
    return _ancestral_loop(denoise, x, _sigma_list(sigmas), float(eta), generator, callback)


def sample_ddpm(
    denoise: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor | Sequence[float],
    *,
    generator: Generator = None,
    callback: Callback | None = None,
) -> torch.Tensor:
    """Ancestral sampling from the DDPM posterior q(x_prev | x_t, x0) with x0 = D(x_t) and the "fixed small"
    variance β̃ (Ho et al. 2020, eqs. 6-7), as DDPMScheduler over a spaced subsequence of timesteps. In x̃ this is
    the η = 1 ancestral step (the DDIM paper shows η = 1 recovers DDPM, Song et al. 2021, sec. 4.1)."""
    return _ancestral_loop(denoise, x, _sigma_list(sigmas), 1.0, generator, callback)


def sample_heun(
    denoise: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor | Sequence[float],
    *,
    generator: Generator = None,
    callback: Callback | None = None,
) -> torch.Tensor:
    """Heun's second-order method (Karras et al. 2022, algorithm 1, deterministic): an Euler predictor and a
    trapezoidal corrector, except for the last step into σ = 0, which is plain Euler. 2N - 1 denoiser calls.
    As HeunDiscreteScheduler."""
    del generator
    s = _sigma_list(sigmas)
    n = len(s) - 1
    for i in range(n):
        denoised = denoise(x, s[i])
        d = (x - denoised) / s[i]
        dt = s[i + 1] - s[i]
        if s[i + 1] == 0:
            x = x + d * dt
        else:
            x_pred = x + d * dt
            d_next = (x_pred - denoise(x_pred, s[i + 1])) / s[i + 1]
            x = x + (d + d_next) / 2 * dt
        if callback is not None:
            callback(i, n, x, denoised)
    return x


def sample_plms(
    denoise: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor | Sequence[float],
    *,
    generator: Generator = None,
    callback: Callback | None = None,
    combine: Literal["eps", "v"] = "eps",
) -> torch.Tensor:
    """Pseudo linear multistep (Liu et al. 2022, "PNDM", sec. 3.3 and eq. 12), as PNDMScheduler with
    ``skip_prk_steps=True`` (what SD ships): the transfer step φ is DDIM (PNDM eq. 9, which in x̃ is
    x̃_next = x̃ + (σ_next - σ) ε); ε is a linear multistep combination of past network outputs: the first step is
    a second-order Heun step (predictor + average of the two outputs, N + 1 calls in all), then
    Adams–Bashforth of order 2, 3 and 4 on the stored outputs.

    ``combine="eps"`` combines ε (PNDM's formulation and the original LDM sampler). ``combine="v"`` combines the raw
    v outputs and converts the combination to ε at the current sample, as diffusers' PNDMScheduler does for
    v-prediction models; :func:`make_sigmas` picks it for v schedules so that results match diffusers.
    """
    del generator
    if combine not in ("eps", "v"):
        raise ValueError(f"PLMS combine must be 'eps' or 'v', not {combine!r}")
    s = _sigma_list(sigmas)
    n = len(s) - 1

    def output(x_: torch.Tensor, x0: torch.Tensor, sigma: float) -> torch.Tensor:
        return S.eps_from_x0(x_, x0, sigma) if combine == "eps" else S.v_from_x0(x_, x0, sigma)

    def eps(out: torch.Tensor, x_: torch.Tensor, sigma: float) -> torch.Tensor:
        return out if combine == "eps" else S.eps_from_v(x_, out, sigma)

    history: list[torch.Tensor] = []  # network outputs of the previous steps, most recent last
    for i in range(n):
        denoised = denoise(x, s[i])
        out = output(x, denoised, s[i])
        dt = s[i + 1] - s[i]
        if i == 0 and n > 1:
            # start-up (diffusers' counters 0 and 1): predictor to σ_1, then the average of both outputs
            x_pred = x + dt * eps(out, x, s[i])
            out_pred = output(x_pred, denoise(x_pred, s[i + 1]), s[i + 1])
            x = x + dt * eps((out + out_pred) / 2, x, s[i])
            history.append(out)
        else:
            history = [*history[-3:], out]
            e = history
            if len(e) == 1:
                comb = e[-1]
            elif len(e) == 2:
                comb = (3 * e[-1] - e[-2]) / 2  # Adams–Bashforth 2
            elif len(e) == 3:
                comb = (23 * e[-1] - 16 * e[-2] + 5 * e[-3]) / 12  # Adams–Bashforth 3
            else:
                comb = (55 * e[-1] - 59 * e[-2] + 37 * e[-3] - 9 * e[-4]) / 24  # Adams–Bashforth 4 (PNDM eq. 12)
            x = x + dt * eps(comb, x, s[i])
        if callback is not None:
            callback(i, n, x, denoised)
    return x


def sample_dpmpp_2m(
    denoise: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor | Sequence[float],
    *,
    generator: Generator = None,
    callback: Callback | None = None,
) -> torch.Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, "DPM-Solver++", algorithm 2, midpoint form of diffusers and k-diffusion).

    With h = λ_next - λ = log(σ / σ_next) the data-prediction update, divided by α_next, is
        x̃_next = (σ_next / σ) x̃ - expm1(-h) · D̂,   D̂ = (1 + 1/(2r)) D_i - 1/(2r) D_{i-1},  r = h_{i-1} / h,
    first order (D̂ = D_i) at the first step, and the step into σ = 0 gives D_i itself ("lower order final",
    diffusers' ``final_sigmas_type="zero"``). As DPMSolverMultistepScheduler(solver_order=2).
    """
    del generator
    return _dpmpp_2m(denoise, x, _sigma_list(sigmas), None, callback)


def sample_dpmpp_2m_sde(
    denoise: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor | Sequence[float],
    *,
    generator: Generator = None,
    callback: Callback | None = None,
) -> torch.Tensor:
    """SDE-DPM-Solver++(2M) (Lu et al. 2022, "DPM-Solver++", appendix, eq. for the SDE solver; midpoint form):
        x̃_next = (σ_next / σ) e^{-h} x̃ + (1 - e^{-2h}) D̂ + σ_next sqrt(1 - e^{-2h}) z,
        D̂ = D_i + 1/(2r) (D_i - D_{i-1})  (first order at the first step, D_i at the step into σ = 0).
    As DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++"); the noise z is drawn in float32."""
    return _dpmpp_2m(denoise, x, _sigma_list(sigmas), _generator(generator), callback)


def _dpmpp_2m(
    denoise: Denoiser,
    x: torch.Tensor,
    s: list[float],
    sde_generator: torch.Generator | Sequence[torch.Generator] | None,
    callback: Callback | None,
) -> torch.Tensor:
    n = len(s) - 1
    old: torch.Tensor | None = None
    h_last = 0.0
    for i in range(n):
        denoised = denoise(x, s[i])
        if s[i + 1] == 0:
            x = denoised  # first-order step to σ = 0: the exponential integrator returns D exactly
        else:
            h = math.log(s[i] / s[i + 1])
            if old is None:
                d_hat = denoised
            else:
                r = h_last / h
                d_hat = denoised + (denoised - old) / (2 * r)  # = (1 + 1/2r) D_i - 1/2r D_{i-1}
            if sde_generator is None:
                x = (s[i + 1] / s[i]) * x - math.expm1(-h) * d_hat
            else:
                e2 = -math.expm1(-2 * h)  # 1 - e^{-2h}
                noise = randn_like(x, sde_generator, dtype=torch.float32).to(x.dtype)
                x = (s[i + 1] / s[i] * math.exp(-h)) * x + e2 * d_hat + s[i + 1] * math.sqrt(e2) * noise
            h_last = h
        old = denoised
        if callback is not None:
            callback(i, n, x, denoised)
    return x


def _unipc_coefficients(h: float, rks: list[float], order: int) -> tuple[np.ndarray, np.ndarray, float, float]:
    """R, b, hφ_1 and B(h) of UniPC (Zhao et al. 2023, algorithms 1-2 with B(h) = e^{-h} - 1, "bh2"), for the
    data-prediction form (hh = -h). R[k] = r^k over the ratios r (with a final 1), b[k] = k!·φ_{k+1}(hh)·hh / B(h).
    """
    hh = -h
    h_phi_1 = math.expm1(hh)  # hφ_1(hh) = e^{hh} - 1
    h_phi_k = h_phi_1 / hh - 1.0
    b_h = math.expm1(hh)  # B(h) of the "bh2" variant
    r_all = np.array([*rks, 1.0], dtype=np.float64)
    rows, b = [], []
    factorial = 1.0
    for k in range(1, order + 1):
        rows.append(r_all ** (k - 1))
        b.append(h_phi_k * factorial / b_h)
        factorial *= k + 1
        h_phi_k = h_phi_k / hh - 1.0 / factorial
    return np.stack(rows), np.array(b), h_phi_1, b_h


def sample_unipc(
    denoise: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor | Sequence[float],
    *,
    generator: Generator = None,
    callback: Callback | None = None,
    order: int = 2,
) -> torch.Tensor:
    """UniPC (Zhao et al. 2023): the multistep predictor UniP-p followed, at the next step, by the corrector UniC
    that reuses the network output already computed there (no extra call), in data-prediction form with
    B(h) = e^{-h} - 1 ("bh2"). As UniPCMultistepScheduler's defaults (solver_order=2, predict_x0=True,
    solver_type="bh2", lower_order_final=True, corrector on every step): warm-up at order 1, the order capped by
    the steps left, the step into σ = 0 returns D. In x̃ each VP update is divided by α_next.
    """
    del generator
    if order not in (1, 2, 3):
        raise ValueError(f"UniPC order must be 1, 2 or 3, not {order}")
    s = _sigma_list(sigmas)
    n = len(s) - 1
    lam = [(-math.log(v) if v > 0 else math.inf) for v in s]  # λ = -log σ
    history: list[torch.Tensor] = []  # x0 predictions, most recent last
    x_last: torch.Tensor | None = None
    this_order = 1
    for i in range(n):
        denoised = denoise(x, s[i])
        if i > 0 and x_last is not None:
            # UniC-p: correct x_i using D(x_i) and the history, going again from x_{i-1} (Zhao et al., alg. 1)
            h = lam[i] - lam[i - 1]
            m0 = history[-1]
            rks = [(lam[i - 1 - k] - lam[i - 1]) / h for k in range(1, this_order)]
            d1s = [(history[-(k + 1)] - m0) / rk for k, rk in zip(range(1, this_order), rks)]
            R, b, h_phi_1, b_h = _unipc_coefficients(h, rks, this_order)
            rhos = np.array([0.5]) if this_order == 1 else np.linalg.solve(R, b)
            corr = sum((float(r) * d for r, d in zip(rhos[:-1], d1s)), torch.zeros_like(x))
            x = (s[i] / s[i - 1]) * x_last - h_phi_1 * m0 - b_h * (corr + float(rhos[-1]) * (denoised - m0))
        history = [*history[-(order - 1) :], denoised] if order > 1 else [denoised]
        this_order = min(order, n - i, len(history))
        x_last = x
        if s[i + 1] == 0:
            x = denoised  # first-order step into σ = 0 returns the data prediction
        else:
            # UniP-p: predictor from σ_i to σ_{i+1} (Zhao et al., alg. 2)
            h = lam[i + 1] - lam[i]
            m0 = history[-1]
            rks = [(lam[i - k] - lam[i]) / h for k in range(1, this_order)]
            d1s = [(history[-(k + 1)] - m0) / rk for k, rk in zip(range(1, this_order), rks)]
            R, b, h_phi_1, b_h = _unipc_coefficients(h, rks, this_order)
            if this_order == 1:
                pred = torch.zeros_like(x)
            else:
                rhos_p = np.array([0.5]) if this_order == 2 else np.linalg.solve(R[:-1, :-1], b[:-1])
                pred = sum((float(r) * d for r, d in zip(rhos_p, d1s)), torch.zeros_like(x))
            x = (s[i + 1] / s[i]) * x - h_phi_1 * m0 - b_h * pred
        if callback is not None:
            callback(i, n, x, denoised)
    return x


def lcm_boundary_scalings(
    timestep: float, timestep_scaling: float = 10.0, sigma_data: float = 0.5
) -> tuple[float, float]:
    """c_skip, c_out of a consistency model at discrete timestep t (Song et al. 2023, "Consistency Models",
    appendix C, σ_data = 0.5, with the time scaled as in the LCM release, τ = 10 t (Luo et al. 2023)):
    c_skip = σ_data² / (τ² + σ_data²), c_out = τ / sqrt(τ² + σ_data²)."""
    tau = timestep * timestep_scaling
    return sigma_data**2 / (tau**2 + sigma_data**2), tau / math.sqrt(tau**2 + sigma_data**2)


def sample_lcm(
    denoise: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor | Sequence[float],
    *,
    generator: Generator = None,
    callback: Callback | None = None,
    timesteps: torch.Tensor | Sequence[float] | None = None,
    timestep_scaling: float = 10.0,
) -> torch.Tensor:
    """Multistep latent-consistency sampling (Luo et al. 2023, "LCM", algorithm 3; Song et al. 2023,
    algorithm 1), as LCMScheduler: at each step the consistency function
        f(x_t, t) = c_skip(t) x_t + c_out(t) x0(x_t, t)        (x_t the VP variable, x0 from the denoiser)
    is the sample's estimate; unless it is the last step, it is re-noised with fresh noise to the next level:
    x̃_next = f + σ_next z. ``timesteps`` (the discrete t of each sigma, given by :func:`make_sigmas`) is needed
    for c_skip and c_out.
    """
    s = _sigma_list(sigmas)
    n = len(s) - 1
    if timesteps is None:
        raise ValueError("sample_lcm needs timesteps= (one per step); make_sigmas('lcm', ...).options gives them")
    ts = [float(t) for t in (timesteps.tolist() if isinstance(timesteps, torch.Tensor) else timesteps)]
    if len(ts) < n:
        raise ValueError(f"sample_lcm got {len(ts)} timesteps for {n} steps")
    gen = _generator(generator)
    for i in range(n):
        x0 = denoise(x, s[i])
        c_skip, c_out = lcm_boundary_scalings(ts[i], timestep_scaling)
        denoised = c_out * x0 + c_skip * S.vp_from_ve(x, s[i])
        x = denoised + randn_like(x, gen) * s[i + 1] if s[i + 1] > 0 else denoised
        if callback is not None:
            callback(i, n, x, denoised)
    return x


# ---------------------------------------------------------------------------------------------------------------
# Sigma plans: the exact sigma / timestep sequence each reference scheduler uses
# ---------------------------------------------------------------------------------------------------------------

Rule = Literal["ddim", "ddpm", "euler", "dpm", "unipc", "lcm"]


@dataclass(frozen=True, eq=False)
class SigmaPlan:
    """What a sampler needs besides the denoiser, for one sampler, schedule and step count.

    sigmas            (N + 1,) float64, the noise levels in x̃ the sampler visits, ending at 0 or at σ of ᾱ_0
    timesteps         (N,) float64, the model's timestep at sigmas[i] (integers for discrete schedulers,
                      fractional for Euler/Heun with linspace spacing or Karras sigmas)
    init_noise_sigma  x̃ at sigmas[0] is unit noise times this (the reference scheduler's init_noise_sigma in x̃)
    options           keyword options the sampler needs (e.g. LCM's timesteps); pass them with ``**plan.options``
    """

    sampler: str
    schedule: ScheduleConfig
    sigmas: torch.Tensor
    timesteps: torch.Tensor
    init_noise_sigma: float
    options: Mapping[str, Any] = field(default_factory=dict)

    @property
    def steps(self) -> int:
        return len(self.sigmas) - 1

    def timestep(self, sigma: float | torch.Tensor) -> float:
        """The model timestep for a sigma of this plan (falls back to :func:`sigma_to_timestep` for others)."""
        value = float(sigma)
        table = self.sigmas[: self.steps]
        i = int(torch.argmin((table - value).abs()))
        if abs(float(table[i]) - value) <= 1e-6 * max(value, 1e-12):
            return float(self.timesteps[i])
        return float(S.sigma_to_timestep(self.schedule, value))

    def initial_latents(self, noise: torch.Tensor) -> torch.Tensor:
        """x̃ at sigmas[0] from unit Gaussian noise."""
        return noise * self.init_noise_sigma

    def final_latents(self, x: torch.Tensor) -> torch.Tensor:
        """The latent to decode from a sampler's result: the VP variable x̃ / sqrt(1 + σ_last²)."""
        return S.vp_from_ve(x, float(self.sigmas[-1]))


def _vp_init(sigmas: torch.Tensor) -> float:
    # Schedulers working in VP (DDIM, PNDM, DDPM, LCM, DPM-Solver, UniPC) start from x_T = unit noise, so
    # x̃_T = noise · sqrt(1 + σ_T²).
    return math.sqrt(1.0 + float(sigmas[0]) ** 2)


# The spacing each diffusers scheduler uses when the model's scheduler config does not name one (SD 1.x's does
# not: diffusers then gives DDIM / PNDM / DDPM "leading" and Euler / Heun / DPM-Solver / UniPC "linspace").
DEFAULT_SPACING: dict[str, str] = {
    "ddim": "leading",
    "ddpm": "leading",
    "lcm": "leading",
    "euler": "linspace",
    "dpm": "linspace",
    "unipc": "linspace",
}


def _plan_sigmas(
    rule: Rule, schedule: ScheduleConfig, steps: int, karras: bool, set_alpha_to_one: bool, lcm_original_steps: int
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(sigmas (N+1,), timesteps (N,), init_noise_sigma) as the diffusers scheduler of ``rule`` computes them."""
    if rule in ("ddim", "ddpm"):
        # DDIMScheduler / PNDMScheduler / DDPMScheduler: integer timesteps, σ from the table at each.
        t = torch.from_numpy(S.spaced_timesteps(schedule, steps, variant="single", discrete=True))
        last = S.final_sigma_ddim(schedule, set_alpha_to_one) if rule == "ddim" else 0.0
        sig = torch.cat([S.sigmas_at(schedule, t), torch.tensor([last], dtype=torch.float64)])
        return sig, t, _vp_init(sig)
    if rule == "lcm":
        t = torch.from_numpy(S.lcm_timesteps(schedule, steps, lcm_original_steps))
        sig = torch.cat([S.sigmas_at(schedule, t), torch.zeros(1, dtype=torch.float64)])
        return sig, t, _vp_init(sig)
    if rule == "euler":
        # EulerDiscreteScheduler / HeunDiscreteScheduler / EulerAncestralDiscreteScheduler: timesteps may be
        # fractional (linspace), σ interpolated linearly between table entries; Karras sigmas span the
        # *inference* sigmas' range and their timesteps are the unrounded log-σ interpolation.
        t = torch.from_numpy(S.spaced_timesteps(schedule, steps, variant="single", discrete=False))
        sig = S.sigmas_at(schedule, t)
        if karras:
            sig = S.karras_sigmas(float(sig[-1]), float(sig[0]), steps)
            t = S.sigma_to_timestep(schedule, sig)
        sig = torch.cat([sig, torch.zeros(1, dtype=torch.float64)])
        smax = float(sig.max())
        # diffusers: init_noise_sigma = σ_max for linspace / trailing, sqrt(σ_max² + 1) for leading
        init = smax if schedule.timestep_spacing in ("linspace", "trailing") else math.sqrt(smax**2 + 1)
        return sig, t, init
    # DPMSolverMultistepScheduler / UniPCMultistepScheduler: N + 1 point spacing; Karras sigmas span the whole
    # training table, their timesteps are rounded to integers (DPM-Solver keeps them fractional for cosine betas).
    t = torch.from_numpy(S.spaced_timesteps(schedule, steps, variant="multistep"))
    sig = S.sigmas_at(schedule, t)
    if karras:
        table = S.training_sigmas(schedule)
        sig = S.karras_sigmas(float(table[0]), float(table[-1]), steps)
        t = S.sigma_to_timestep(schedule, sig)
        if rule == "unipc" or schedule.beta_schedule != "squaredcos_cap_v2":
            t = t.round()
    sig = torch.cat([sig, torch.zeros(1, dtype=torch.float64)])
    return sig, t, _vp_init(sig)


# ---------------------------------------------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------------------------------------------

SamplerFn = Callable[..., torch.Tensor]


@dataclass(frozen=True)
class SamplerSpec:
    """A named sampler: the function, the rule that builds its sigmas, and its default for Karras sigmas."""

    name: str  # our name, e.g. "dpmpp_2m_karras"
    label: str  # A1111's name, e.g. "DPM++ 2M Karras"
    fn: SamplerFn
    rule: Rule
    karras: bool = False
    stochastic: bool = False
    aliases: tuple[str, ...] = ()

    @property
    def karras_allowed(self) -> bool:
        return self.rule in ("euler", "dpm", "unipc")


_SPECS: tuple[SamplerSpec, ...] = (
    SamplerSpec("euler_a", "Euler a", sample_euler_ancestral, "euler", stochastic=True, aliases=("euler_ancestral",)),
    SamplerSpec("euler", "Euler", sample_euler, "euler"),
    SamplerSpec("heun", "Heun", sample_heun, "euler"),
    SamplerSpec("dpmpp_2m", "DPM++ 2M", sample_dpmpp_2m, "dpm"),
    SamplerSpec("dpmpp_2m_karras", "DPM++ 2M Karras", sample_dpmpp_2m, "dpm", karras=True),
    SamplerSpec("dpmpp_2m_sde", "DPM++ 2M SDE", sample_dpmpp_2m_sde, "dpm", stochastic=True),
    SamplerSpec("dpmpp_2m_sde_karras", "DPM++ 2M SDE Karras", sample_dpmpp_2m_sde, "dpm", karras=True, stochastic=True),
    SamplerSpec("unipc", "UniPC", sample_unipc, "unipc"),
    SamplerSpec("ddim", "DDIM", sample_ddim, "ddim"),
    SamplerSpec("plms", "PLMS", sample_plms, "ddim", aliases=("pndm",)),
    SamplerSpec("lcm", "LCM", sample_lcm, "lcm", stochastic=True),
    SamplerSpec("ddpm", "DDPM", sample_ddpm, "ddpm", stochastic=True),
)


def _key(name: str) -> str:
    # "DPM++ 2M Karras" -> "dpmpp_2m_karras", "Euler a" -> "euler_a": A1111 labels fold onto our names
    return re.sub(r"[^a-z0-9]+", "_", name.strip().lower().replace("++", "pp")).strip("_")


_BY_KEY: dict[str, SamplerSpec] = {}
for _spec in _SPECS:
    for _n in (_spec.name, _spec.label, *_spec.aliases):
        _BY_KEY[_key(_n)] = _spec


def list_samplers() -> list[SamplerSpec]:
    """All samplers, in the order a user interface should list them."""
    return list(_SPECS)


def get_sampler(name: str | SamplerSpec) -> SamplerSpec:
    """The sampler for one of our names or A1111's labels (case-insensitive); ValueError lists the valid ones."""
    if isinstance(name, SamplerSpec):
        return name
    spec = _BY_KEY.get(_key(str(name)))
    if spec is None:
        valid = ", ".join(f"{s.name} ({s.label!r})" for s in _SPECS)
        raise ValueError(f"unknown sampler {name!r}; choose one of: {valid}")
    return spec


def make_sigmas(
    name: str | SamplerSpec,
    schedule: ScheduleConfig,
    steps: int,
    *,
    karras: bool | None = None,
    timestep_spacing: Literal["leading", "trailing", "linspace", "default"] | None = None,
    set_alpha_to_one: bool | None = None,
    lcm_original_steps: int = 50,
) -> SigmaPlan:
    """The sigma and timestep sequence of a sampler, exactly as its diffusers scheduler computes them for
    ``steps`` inference steps from ``schedule`` (its ``timestep_spacing`` and ``steps_offset`` included).

    karras             use Karras sigmas (None: the sampler's default, True for the "... Karras" names); allowed
                       for Euler, Euler a, Heun, DPM++ and UniPC
    timestep_spacing   overrides ``schedule.timestep_spacing``; "default" (or a schedule whose spacing is None)
                       takes the scheduler's own default, :data:`DEFAULT_SPACING`: what diffusers does for a model
                       whose scheduler config names no spacing, e.g. ``EulerDiscreteScheduler.from_config`` of
                       SD 1.5's config uses "linspace" although SD 1.5's own PNDM uses "leading"
    set_alpha_to_one   DDIM / PLMS: end at ᾱ = 1 (σ = 0) instead of ᾱ_0 of the table (SD 1.x and 2.x: False);
                       None: the schedule's ``set_alpha_to_one`` if it has one, else False
    lcm_original_steps LCM: the number of timesteps the model was distilled on (50 for the published LCMs)

    One known difference: diffusers' DDIMScheduler and PNDMScheduler step from t to t - ⌊T/N⌋ and then treat
    the result as lying at the next listed timestep; with "linspace" spacing (or "trailing" when N does not
    divide T) these differ, and the reference mixes noise levels. Estable always steps to the next listed level,
    so DDIM / PLMS match diffusers for "leading" spacing (what SD ships) and "trailing" with N dividing T.
    """
    spec = get_sampler(name)
    spacing = timestep_spacing if timestep_spacing is not None else getattr(schedule, "timestep_spacing", None)
    if spacing in (None, "default"):
        spacing = DEFAULT_SPACING[spec.rule]
    if spacing not in ("leading", "trailing", "linspace"):
        raise ValueError(
            f"unsupported timestep_spacing {spacing!r}; use 'leading', 'trailing', 'linspace' or 'default'"
        )
    if spacing != schedule.timestep_spacing:
        schedule = dataclasses.replace(schedule, timestep_spacing=spacing)
    use_karras = spec.karras if karras is None else bool(karras)
    if use_karras and not spec.karras_allowed:
        raise ValueError(f"sampler {spec.label!r} works on its discrete timesteps and cannot use Karras sigmas")
    if set_alpha_to_one is None:
        set_alpha_to_one = bool(getattr(schedule, "set_alpha_to_one", False))
    sig, t, init = _plan_sigmas(spec.rule, schedule, int(steps), use_karras, set_alpha_to_one, lcm_original_steps)
    options: dict[str, Any] = {}
    if spec.rule == "lcm":
        options["timesteps"] = t
    if spec.fn is sample_plms and schedule.prediction_type == "v_prediction":
        options["combine"] = "v"  # diffusers' PNDMScheduler combines raw v outputs
    return SigmaPlan(spec.name, schedule, sig, t, init, options)


def vp_denoiser(
    model: Callable[[torch.Tensor, float], torch.Tensor],
    prediction_type: Literal["epsilon", "v_prediction"],
    timestep: Callable[[float], float],
) -> Denoiser:
    """The standard adapter: ``model(x_t, t)`` (VP input, discrete or fractional timestep) predicting ε or v,
    turned into ``denoise(x̃, σ) -> x0``. ``timestep`` is usually ``plan.timestep``. Guidance belongs in ``model``.
    """

    def denoise(x: torch.Tensor, sigma: float) -> torch.Tensor:
        out = model(S.vp_from_ve(x, sigma), timestep(sigma))
        return S.to_x0(out, x, sigma, prediction_type)

    return denoise
