"""Samplers: parity with diffusers' scheduler loops, convergence order, sample statistics, registry.

PARITY drives diffusers' schedulers exactly as its pipelines do (set_timesteps, latents = randn(CPU generator) ×
init_noise_sigma, scale_model_input, step(..., generator=the same generator)) with a fake deterministic network,
and our sampler with :func:`vp_denoiser` over the same network and ``plan.timestep``; the decoded latent is
``plan.final_latents(x)``. Everything in float32. Maximum abs difference seen (diffusers 0.42.1, torch 2.13 CPU):
≤ 1.3e-5 on latents of magnitude ≤ 4 for every sampler, spacing and step count, except Heun's 2-step runs
(one huge step from σ = 14.6 to 0.03, latents ~22), 5.1e-5; the test allows 1e-4.

ORDER uses Gaussian data x0 ~ N(μ, s²), whose exact denoiser is D(x, σ) = (s² x + σ² μ) / (s² + σ²) and whose
probability-flow ODE has the closed form x(σ) - μ ∝ sqrt(s² + σ²).
"""

from __future__ import annotations

import inspect
import math

import numpy as np
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    LCMScheduler,
    PNDMScheduler,
    UniPCMultistepScheduler,
)

from estable.config import ScheduleConfig
from estable.sampling import samplers as P
from estable.sampling import schedules as S

SHAPE = (2, 4, 6, 6)
SEED = 1234

# our name -> (diffusers class, its extra config, step() options, our options, spacings to test)
# The first spacing is the one diffusers uses for SD 1.5 (its scheduler config names none: DDIM/PNDM/DDPM/LCM
# default to "leading", Euler/Heun/DPM/UniPC to "linspace"); DDIM and PLMS are compared where diffusers steps
# to the next listed timestep ("leading", "trailing" with N | T; see make_sigmas).
CASES = {
    "ddim": (DDIMScheduler, dict(set_alpha_to_one=False, clip_sample=False), {}, {}, ("leading", "trailing")),
    "ddim_eta": (
        DDIMScheduler,
        dict(set_alpha_to_one=False, clip_sample=False),
        {"eta": 0.7},
        {"eta": 0.7},
        ("leading", "trailing"),
    ),
    "plms": (PNDMScheduler, dict(set_alpha_to_one=False, skip_prk_steps=True), {}, {}, ("leading", "trailing")),
    "ddpm": (DDPMScheduler, dict(clip_sample=False), {}, {}, ("leading", "linspace", "trailing")),
    "euler": (EulerDiscreteScheduler, {}, {}, {}, ("linspace", "leading", "trailing")),
    "euler_a": (EulerAncestralDiscreteScheduler, {}, {}, {}, ("linspace", "leading", "trailing")),
    "heun": (HeunDiscreteScheduler, {}, {}, {}, ("linspace", "leading", "trailing")),
    "dpmpp_2m": (DPMSolverMultistepScheduler, {}, {}, {}, ("linspace", "leading", "trailing")),
    "dpmpp_2m_karras": (DPMSolverMultistepScheduler, dict(use_karras_sigmas=True), {}, {}, ("linspace",)),
    "dpmpp_2m_sde": (
        DPMSolverMultistepScheduler,
        dict(algorithm_type="sde-dpmsolver++"),
        {},
        {},
        ("linspace", "leading", "trailing"),
    ),
    "dpmpp_2m_sde_karras": (
        DPMSolverMultistepScheduler,
        dict(algorithm_type="sde-dpmsolver++", use_karras_sigmas=True),
        {},
        {},
        ("linspace",),
    ),
    "unipc": (UniPCMultistepScheduler, {}, {}, {}, ("linspace", "leading", "trailing")),
    "lcm": (LCMScheduler, dict(set_alpha_to_one=False), {}, {}, ("leading",)),
}
STEPS = (1, 2, 5, 20)


_ALPHAS_CUMPROD = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear").alphas_cumprod


def fake_net(x_in: torch.Tensor, t: float | torch.Tensor, prediction_type: str = "epsilon") -> torch.Tensor:
    """A smooth, nonlinear, timestep-dependent stand-in for the U-Net. For ε it is the exact ε of unit Gaussian
    data, sqrt(1 - ᾱ_t) x_t, plus a nonlinear term, so that latents stay of SD's magnitude (a few units); for v
    (whose exact value for unit Gaussian data is 0) the nonlinear term alone."""
    t = float(t)
    wiggle = torch.tanh(1.5 * x_in + 0.2) * (1 + t / 1000) + 0.2 * math.sin(t / 50)
    if prediction_type == "v_prediction":
        return 0.3 * wiggle
    abar = float(np.interp(t, np.arange(1000), _ALPHAS_CUMPROD.numpy()))
    return math.sqrt(1 - abar) * x_in + 0.1 * wiggle


def _net(prediction_type: str):
    return lambda x_in, t: fake_net(x_in, t, prediction_type)


def _schedule(prediction_type: str, spacing: str) -> ScheduleConfig:
    # SD's training schedule: scaled_linear 0.00085 -> 0.012, 1000 steps, steps_offset 1
    return ScheduleConfig(prediction_type=prediction_type, timestep_spacing=spacing)


def run_diffusers(case: str, cfg: ScheduleConfig, steps: int) -> torch.Tensor:
    cls, extra_cfg, step_opts, _, _ = CASES[case]
    sched = cls(
        num_train_timesteps=cfg.num_train_timesteps,
        beta_start=cfg.beta_start,
        beta_end=cfg.beta_end,
        beta_schedule=cfg.beta_schedule,
        prediction_type=cfg.prediction_type,
        timestep_spacing=cfg.timestep_spacing,
        steps_offset=cfg.steps_offset,
        **({"rescale_betas_zero_snr": True} if cfg.rescale_betas_zero_snr else {}),
        **extra_cfg,
    )
    sched.set_timesteps(steps)
    gen = torch.Generator("cpu").manual_seed(SEED)
    latents = torch.randn(SHAPE, generator=gen) * sched.init_noise_sigma
    kwargs = dict(step_opts)
    if "generator" in inspect.signature(sched.step).parameters:  # as the pipelines' prepare_extra_step_kwargs
        kwargs["generator"] = gen
    for t in sched.timesteps:
        model_in = sched.scale_model_input(latents, t)
        latents = sched.step(fake_net(model_in, t, cfg.prediction_type), t, latents, **kwargs).prev_sample
    return latents


def run_ours(case: str, cfg: ScheduleConfig, steps: int) -> torch.Tensor:
    spec = P.get_sampler(case.removesuffix("_eta"))
    plan = P.make_sigmas(spec, cfg, steps)
    gen = torch.Generator("cpu").manual_seed(SEED)
    x = plan.initial_latents(torch.randn(SHAPE, generator=gen))
    denoise = P.vp_denoiser(_net(cfg.prediction_type), cfg.prediction_type, plan.timestep)
    x = spec.fn(denoise, x, plan.sigmas, generator=gen, **plan.options, **CASES[case][3])
    return plan.final_latents(x)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("case", list(CASES))
def test_parity_with_diffusers(case, prediction_type):
    worst = 0.0
    for spacing in CASES[case][4]:
        cfg = _schedule(prediction_type, spacing)
        for steps in STEPS:
            ref = run_diffusers(case, cfg, steps)
            ours = run_ours(case, cfg, steps)
            assert ours.dtype == torch.float32 and ours.shape == ref.shape
            err = float((ours - ref).abs().max())
            assert err < 1e-4, (case, prediction_type, spacing, steps, err)
            worst = max(worst, err)
    assert worst > 0 or case == "lcm"  # float64 schedules vs float32 ones: not bit-identical, but close


# Samplers whose diffusers scheduler has rescale_betas_zero_snr (PNDM and Heun do not: no oracle for plms/heun).
ZERO_SNR_CASES = ["euler", "euler_a", "dpmpp_2m", "dpmpp_2m_karras", "dpmpp_2m_sde", "unipc", "ddim", "ddim_eta",
                  "ddpm", "lcm"]


@pytest.mark.parametrize("case", ZERO_SNR_CASES)
def test_zero_terminal_snr_parity_with_diffusers(case):
    """A v-model on a zero-terminal-SNR schedule (Lin et al. 2024). diffusers' σ-based schedulers clamp ᾱ_T to 2⁻²⁴,
    so sampling starts at σ ≈ 4096, and ours takes the same path; its DDIM, DDPM and LCM step from ᾱ_T = 0 exactly,
    where ours starts from the same clamped σ (x_T = 4096·ε, fed to the model as x_T / sqrt(1 + σ²))."""
    # Latents start at 4096·ε in float32 (|x_T| up to 12,407 here, where float32's spacing is 9.8e-4), and the first
    # step cancels them down to a few units, so either side carries about one spacing of |x_T|: 9.7e-4 seen (Euler,
    # linspace, 2 steps, on an AVX-512 CPU; 2.2e-4 on another machine). The clamped start against diffusers' exact
    # ᾱ_T = 0 start of DDIM, DDPM and LCM adds up to 9.4e-4 (DDPM, 2 steps). Bound: two spacings' worth of |x_T|.
    start = torch.randn(SHAPE, generator=torch.Generator("cpu").manual_seed(SEED)).abs().max() * 4096
    bound = 2 * torch.finfo(torch.float32).eps * float(start)
    for spacing in [s for s in ("trailing", "linspace", "leading") if s in CASES[case][4]]:
        cfg = ScheduleConfig(prediction_type="v_prediction", timestep_spacing=spacing, rescale_betas_zero_snr=True)
        if spacing != "leading":  # leading spacing never reaches t = T - 1
            assert float(P.make_sigmas(P.get_sampler(case.removesuffix("_eta")), cfg, 5).sigmas[0]) == \
                pytest.approx(4096.0, rel=1e-3)
        for steps in (2, 5, 20):
            ref = run_diffusers(case, cfg, steps)
            ours = run_ours(case, cfg, steps)
            err = float((ours - ref).abs().max())
            assert err < bound, (case, spacing, steps, err, bound)


def test_final_latents_rule_for_ddim():
    """DDIM with set_alpha_to_one=False ends at σ = σ(ᾱ_0) ≈ 0.029: decode x / sqrt(1 + σ²), as diffusers does."""
    cfg = _schedule("epsilon", "leading")
    plan = P.make_sigmas("ddim", cfg, 10)
    assert float(plan.sigmas[-1]) > 0.02
    gen = torch.Generator().manual_seed(SEED)
    x = plan.initial_latents(torch.randn(SHAPE, generator=gen))
    x = P.sample_ddim(P.vp_denoiser(fake_net, "epsilon", plan.timestep), x, plan.sigmas)
    ref = run_diffusers("ddim", cfg, 10)
    err_decoded = float((plan.final_latents(x) - ref).abs().max())
    err_raw = float((x - ref).abs().max())
    assert err_decoded < 1e-4
    assert err_raw > 20 * err_decoded  # the rescale by 1/sqrt(1 + σ²) = 1 - 4.3e-4 matters
    # a plan ending at σ = 0 leaves x unchanged
    plan0 = P.make_sigmas("euler", cfg, 10)
    assert torch.equal(plan0.final_latents(x), x)


def test_batch_of_generators_matches_diffusers_per_item_seeds():
    cfg = _schedule("epsilon", "linspace")
    sched = EulerAncestralDiscreteScheduler(
        beta_start=cfg.beta_start, beta_end=cfg.beta_end, beta_schedule=cfg.beta_schedule, timestep_spacing="linspace"
    )
    sched.set_timesteps(6)
    gens = [torch.Generator().manual_seed(s) for s in (5, 6)]
    from diffusers.utils.torch_utils import randn_tensor

    latents = randn_tensor(SHAPE, generator=gens) * sched.init_noise_sigma
    for t in sched.timesteps:
        latents = sched.step(fake_net(sched.scale_model_input(latents, t), t), t, latents, generator=gens).prev_sample
    plan = P.make_sigmas("euler_a", cfg, 6)
    gens = [torch.Generator().manual_seed(s) for s in (5, 6)]
    x = plan.initial_latents(P.randn_like(torch.empty(SHAPE), gens))
    x = P.sample_euler_ancestral(P.vp_denoiser(fake_net, "epsilon", plan.timestep), x, plan.sigmas, generator=gens)
    assert float((x - latents).abs().max()) < 1e-4
    with pytest.raises(ValueError, match="generators"):
        P.randn_like(torch.empty(3, 2), [torch.Generator()] * 2)


def test_no_generator_means_seed_zero():
    plan = P.make_sigmas("euler_a", ScheduleConfig(), 5)
    den = P.vp_denoiser(fake_net, "epsilon", plan.timestep)
    x = plan.initial_latents(torch.ones(1, 4, 3, 3))
    a = P.sample_euler_ancestral(den, x, plan.sigmas)
    b = P.sample_euler_ancestral(den, x, plan.sigmas)
    c = P.sample_euler_ancestral(den, x, plan.sigmas, generator=torch.Generator().manual_seed(P.DEFAULT_SEED))
    d = P.sample_euler_ancestral(den, x, plan.sigmas, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and torch.equal(a, c) and not torch.equal(a, d)


@pytest.mark.parametrize("name", [s.name for s in P.list_samplers()])
def test_callback_and_denoiser_calls(name):
    cfg = ScheduleConfig()
    plan = P.make_sigmas(name, cfg, 6)
    spec = P.get_sampler(name)
    seen_sigmas: list[float] = []
    steps: list[tuple[int, int]] = []

    def denoise(x, sigma):
        assert isinstance(sigma, float)
        seen_sigmas.append(sigma)
        return P.vp_denoiser(fake_net, "epsilon", plan.timestep)(x, sigma)

    def callback(i, total, x, denoised):
        assert x.shape == denoised.shape == SHAPE
        steps.append((i, total))

    x = plan.initial_latents(torch.randn(SHAPE, generator=torch.Generator().manual_seed(0)))
    spec.fn(denoise, x, plan.sigmas, callback=callback, **plan.options)
    assert steps == [(i, 6) for i in range(6)]
    expected_calls = {"heun": 11, "plms": 7}.get(name, 6)  # Heun 2N - 1, PLMS N + 1 (its Heun-type start)
    assert len(seen_sigmas) == expected_calls
    # every model call is at a level of the plan, so plan.timestep finds the scheduler's own timestep
    assert all(any(s == float(v) for v in plan.sigmas[:-1]) for s in seen_sigmas)


def test_plan_timestep_lookup_and_fallback():
    cfg = ScheduleConfig()
    plan = P.make_sigmas("dpmpp_2m_karras", cfg, 10)
    # the Karras levels carry DPM-Solver's rounded timesteps, not the fractional log-σ interpolation
    s = float(plan.sigmas[3])
    assert plan.timestep(s) == float(plan.timesteps[3]) == round(S.sigma_to_timestep(cfg, s))
    assert plan.timestep(torch.tensor(s)) == float(plan.timesteps[3])
    assert plan.timestep(1.234) == pytest.approx(S.sigma_to_timestep(cfg, 1.234))


# --- registry -------------------------------------------------------------------------------------------------------


def test_registry_names_and_labels():
    names = [s.name for s in P.list_samplers()]
    assert sorted(names) == sorted(
        [
            "ddpm",
            "ddim",
            "plms",
            "euler",
            "euler_a",
            "heun",
            "dpmpp_2m",
            "dpmpp_2m_karras",
            "dpmpp_2m_sde",
            "dpmpp_2m_sde_karras",
            "unipc",
            "lcm",
        ]
    )
    a1111 = {
        "Euler a": "euler_a",
        "Euler": "euler",
        "Heun": "heun",
        "DDIM": "ddim",
        "PLMS": "plms",
        "DPM++ 2M": "dpmpp_2m",
        "DPM++ 2M Karras": "dpmpp_2m_karras",
        "DPM++ 2M SDE": "dpmpp_2m_sde",
        "DPM++ 2M SDE Karras": "dpmpp_2m_sde_karras",
        "UniPC": "unipc",
        "LCM": "lcm",
        "DDPM": "ddpm",
    }
    for label, name in a1111.items():
        assert P.get_sampler(label).name == name
        assert P.get_sampler(label.upper()).name == name
        assert P.get_sampler(label.lower()).name == name
        assert P.get_sampler(name).label == label
    assert P.get_sampler("pndm").name == "plms"
    assert P.get_sampler("dpmpp_2m_karras").karras and not P.get_sampler("dpmpp_2m").karras
    assert P.get_sampler("DPM++ 2M Karras").fn is P.sample_dpmpp_2m
    with pytest.raises(ValueError, match="unknown sampler 'k_lms'.*euler_a.*'DPM\\+\\+ 2M Karras'"):
        P.get_sampler("k_lms")


def test_bad_inputs_are_value_errors():
    with pytest.raises(ValueError, match="Karras"):
        P.make_sigmas("ddim", ScheduleConfig(), 10, karras=True)
    with pytest.raises(ValueError, match="non-increasing"):
        P.sample_euler(lambda x, s: x, torch.zeros(2), [1.0, 2.0, 0.0])
    with pytest.raises(ValueError, match="positive"):
        P.sample_euler(lambda x, s: x, torch.zeros(2), [1.0, 0.0, 0.0])
    with pytest.raises(ValueError, match="timesteps"):
        P.sample_lcm(lambda x, s: x, torch.zeros(2), [1.0, 0.0])
    with pytest.raises(ValueError, match="eta"):
        P.sample_ddim(lambda x, s: x, torch.zeros(2), [1.0, 0.0], eta=-1)
    with pytest.raises(ValueError, match="timestep_spacing"):
        P.make_sigmas("euler", ScheduleConfig(), 10, timestep_spacing="uniform")  # type: ignore[arg-type]


# --- convergence order on Gaussian data -----------------------------------------------------------------------------

MU, S_DATA = 0.3, 0.5


def gaussian_denoiser(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """E[x0 | x̃] for x0 ~ N(μ, s²), x̃ = x0 + σ ε."""
    return (S_DATA**2 * x + sigma**2 * MU) / (S_DATA**2 + sigma**2)


def ode_solution(x: torch.Tensor, sigma_from: float, sigma_to: float) -> torch.Tensor:
    """dx̃/dσ = (x̃ - D)/σ = (x̃ - μ) σ / (s² + σ²)  =>  x̃(σ) - μ ∝ sqrt(s² + σ²)."""
    return MU + (x - MU) * math.sqrt(S_DATA**2 + sigma_to**2) / math.sqrt(S_DATA**2 + sigma_from**2)


def _karras_grid(n: int) -> torch.Tensor:
    return S.karras_sigmas(0.1, 10.0, n + 1)  # n steps, ending at σ = 0.1 (> 0: no special last step)


def _uniform_grid(n: int) -> torch.Tensor:
    return torch.linspace(10.0, 0.1, n + 1, dtype=torch.float64)


@pytest.mark.parametrize(
    "name, order, grid",
    [
        ("euler", 1, _karras_grid),
        ("ddim", 1, _karras_grid),
        ("heun", 2, _karras_grid),
        ("dpmpp_2m", 2, _karras_grid),
        # UniPC-2 with diffusers' lower_order_final: the last step is a first-order predictor, so global order 2
        ("unipc", 2, _karras_grid),
        # PLMS: 4th-order Adams–Bashforth after a 2nd-order start whose O(h³) error bounds it at 3; its fixed
        # coefficients assume equal steps, so it is measured on a grid uniform in σ
        ("plms", 3, _uniform_grid),
    ],
)
def test_convergence_order(name, order, grid):
    fn = P.get_sampler(name).fn
    gen = torch.Generator().manual_seed(0)
    x_start = MU + math.sqrt(S_DATA**2 + 100.0) * torch.randn(4096, dtype=torch.float64, generator=gen)
    ns = np.array([64, 128, 256, 512])
    errors = []
    for n in ns:
        sigmas = grid(int(n))
        out = fn(gaussian_denoiser, x_start, sigmas)
        exact = ode_solution(x_start, float(sigmas[0]), float(sigmas[-1]))
        errors.append(float((out - exact).pow(2).mean().sqrt()))
    slope = -np.polyfit(np.log(ns), np.log(errors), 1)[0]
    assert slope >= order - 0.3, (name, slope, errors)
    assert errors[-1] < 1e-2


@pytest.mark.parametrize("name", ["euler_a", "ddpm", "ddim_eta1", "dpmpp_2m_sde", "dpmpp_2m_sde_karras"])
def test_stochastic_samplers_statistics_approach_the_data(name):
    spec = P.get_sampler(name.removesuffix("_eta1"))
    opts = {"eta": 1.0} if name == "ddim_eta1" else {}
    std_errors = []
    for steps in (10, 160):
        plan = P.make_sigmas(spec, ScheduleConfig(), steps)
        gen = torch.Generator().manual_seed(7)
        s0 = float(plan.sigmas[0])
        x = MU + math.sqrt(S_DATA**2 + s0**2) * torch.randn(1 << 14, dtype=torch.float64, generator=gen)
        out = plan.final_latents(spec.fn(gaussian_denoiser, x, plan.sigmas, generator=gen, **opts))
        assert abs(float(out.mean()) - MU) < 0.01  # standard error ≈ 0.004
        std_errors.append(abs(float(out.std()) - S_DATA))
    # first-order bias of the ancestral discretisation shrinks with the step count
    assert std_errors[1] < 0.03 and std_errors[1] < 0.5 * std_errors[0], std_errors


@pytest.mark.parametrize("steps", [1, 4])
def test_lcm_with_an_exact_consistency_function_samples_the_data(steps):
    """For Gaussian data the consistency function is the ODE map to σ = 0: f(x̃, σ) = μ + (x̃ - μ) s / sqrt(s² + σ²);
    multistep consistency sampling with it draws exact samples at any step count."""

    def consistency(x, sigma):
        return ode_solution(x, sigma, 0.0)

    plan = P.make_sigmas("lcm", ScheduleConfig(), steps)
    gen = torch.Generator().manual_seed(3)
    s0 = float(plan.sigmas[0])
    x = MU + math.sqrt(S_DATA**2 + s0**2) * torch.randn(1 << 14, dtype=torch.float64, generator=gen)
    out = P.sample_lcm(consistency, x, plan.sigmas, generator=gen, **plan.options)
    assert abs(float(out.mean()) - MU) < 0.01
    assert abs(float(out.std()) - S_DATA) < 0.01


def test_plms_v_models_combine_v_like_diffusers():
    """diffusers' PNDMScheduler combines raw v outputs across steps; make_sigmas asks for that on v schedules.
    Combining ε instead (the PNDM paper's form) is a different sampler: the results differ visibly."""
    cfg = _schedule("v_prediction", "leading")
    plan = P.make_sigmas("plms", cfg, 20)
    assert plan.options == {"combine": "v"}
    assert P.make_sigmas("plms", _schedule("epsilon", "leading"), 20).options == {}
    ref = run_diffusers("plms", cfg, 20)
    denoise = P.vp_denoiser(_net("v_prediction"), "v_prediction", plan.timestep)
    x = plan.initial_latents(torch.randn(SHAPE, generator=torch.Generator().manual_seed(SEED)))
    eps_combined = plan.final_latents(P.sample_plms(denoise, x, plan.sigmas, combine="eps"))
    v_combined = plan.final_latents(P.sample_plms(denoise, x, plan.sigmas, combine="v"))
    assert float((v_combined - ref).abs().max()) < 1e-4
    assert float((eps_combined - ref).abs().max()) > 1e-2
