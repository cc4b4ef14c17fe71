"""Schedules against diffusers' schedulers: betas, ᾱ, timesteps, sigmas, Karras sigmas, σ → t, parametrisations.

Precision: diffusers builds betas and ᾱ in float32 (``torch.cumprod`` of float32), ours are float64. Where a
quantity is derived from ᾱ (σ_t = sqrt((1 - ᾱ)/ᾱ) loses digits where 1 - ᾱ or ᾱ is small), the exact comparison
uses the reference scheduler with its ᾱ recomputed in float64 from its own float32 betas ("upcast"), which leaves
only the float32 rounding of the betas and of the final sigmas (≤ 1e-6 relative for linear and scaled_linear).
The squaredcos_cap_v2 betas reach 0.999, where a float32 β fixes 1 - β to only ~5 digits, so there the
tolerance is 1e-4. Separate tests compare with diffusers' own float32 numbers at the float32 tolerance.
"""

from __future__ import annotations

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
from estable.sampling import schedules as S
from estable.sampling.samplers import make_sigmas

STEPS = (1, 4, 20, 25, 50)
SPACINGS = ("leading", "trailing", "linspace")
BETAS = {
    "scaled_linear": (0.00085, 0.012),
    "linear": (0.0001, 0.02),
    "squaredcos_cap_v2": (0.0001, 0.02),
}


def _cfg(beta_schedule: str = "scaled_linear", spacing: str = "leading", offset: int = 1) -> ScheduleConfig:
    start, end = BETAS[beta_schedule]
    return ScheduleConfig(
        beta_start=start, beta_end=end, beta_schedule=beta_schedule, timestep_spacing=spacing, steps_offset=offset
    )


def _ref(cls, cfg: ScheduleConfig, upcast: bool = True, **kw):
    sched = cls(
        num_train_timesteps=cfg.num_train_timesteps,
        beta_start=cfg.beta_start,
        beta_end=cfg.beta_end,
        beta_schedule=cfg.beta_schedule,
        prediction_type=cfg.prediction_type,
        timestep_spacing=cfg.timestep_spacing,
        steps_offset=cfg.steps_offset,
        **kw,
    )
    if upcast:
        sched.alphas_cumprod = torch.cumprod(1.0 - sched.betas.double(), dim=0)
    return sched


def _rel(ours: torch.Tensor, ref: torch.Tensor) -> float:
    ours, ref = torch.as_tensor(ours, dtype=torch.float64), torch.as_tensor(ref, dtype=torch.float64)
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    return float(((ours - ref).abs() / ref.abs().clamp(min=1e-30)).max()) if ours.numel() else 0.0


def _tol(cfg: ScheduleConfig) -> float:
    return 1e-4 if cfg.beta_schedule == "squaredcos_cap_v2" else 1e-6


def _cases():
    for bs in BETAS:
        for spacing in SPACINGS:
            yield _cfg(bs, spacing)


# --- training schedule --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("beta_schedule", list(BETAS))
def test_betas_and_alphas_cumprod_match_diffusers(beta_schedule):
    cfg = _cfg(beta_schedule)
    ref = _ref(DDIMScheduler, cfg, upcast=False)
    assert S.betas(cfg).dtype == torch.float64
    # betas: diffusers' float32 values, float32 rounding only
    assert _rel(S.betas(cfg), ref.betas) < 1e-6
    # ᾱ against diffusers' float32 cumprod: float32 accumulation over 1000 factors (worst at the tail, where
    # the cosine schedule's ᾱ is ~1e-9)
    assert _rel(S.alphas_cumprod(cfg), ref.alphas_cumprod) < (5e-5 if beta_schedule == "squaredcos_cap_v2" else 2e-6)
    # ᾱ against the float64 product of diffusers' float32 betas: only the betas' rounding remains
    ac64 = torch.cumprod(1 - ref.betas.double(), 0)
    assert _rel(S.alphas_cumprod(cfg), ac64) < _tol(cfg)
    # σ_t = sqrt((1 - ᾱ)/ᾱ), exact against float64, and at float32 accuracy against diffusers' float32 table
    assert _rel(S.training_sigmas(cfg), ((1 - ac64) / ac64).sqrt()) < _tol(cfg)
    euler = _ref(EulerDiscreteScheduler, cfg, upcast=False)  # its sigmas table is float32
    assert _rel(S.training_sigmas(cfg).flip(0), euler.sigmas[:-1]) < 5e-4


def test_zero_terminal_snr_rescale_matches_diffusers():
    """Lin et al. 2024, algorithm 1: ᾱ_T = 0, ᾱ_0 unchanged, the same table as diffusers' rescale_betas_zero_snr."""
    cfg = ScheduleConfig(rescale_betas_zero_snr=True, prediction_type="v_prediction")
    ac, plain = S.alphas_cumprod(cfg), S.alphas_cumprod(ScheduleConfig())
    assert float(ac[-1]) == 0.0 and float(S.betas(cfg)[-1]) == pytest.approx(1.0)
    assert float(ac[0]) == pytest.approx(float(plain[0]), rel=1e-12)
    assert bool((ac[1:] < ac[:-1]).all())
    ref = _ref(DDIMScheduler, cfg, upcast=False, rescale_betas_zero_snr=True)
    assert float((ac - ref.alphas_cumprod.double()).abs().max()) < 1e-6
    # sampling starts from a finite σ: ᾱ_T clamped to 2⁻²⁴ as diffusers' Euler/DPM/UniPC schedulers do
    sig = S.training_sigmas(cfg)
    assert float(sig[-1]) == pytest.approx(math.sqrt((1 - 2**-24) / 2**-24))
    assert torch.equal(sig[:-1], ((1 - ac[:-1]) / ac[:-1]).sqrt())


def test_cosine_betas_follow_nichol_dhariwal_eq17():
    cfg = _cfg("squaredcos_cap_v2")
    b = S.betas(cfg)
    assert float(b.max()) == pytest.approx(0.999)  # the cap
    f = lambda t: math.cos((t / 1000 + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    ac = S.alphas_cumprod(cfg)
    # away from the cap, ᾱ_t = f(t + 1) / f(0) (the table's index t is step t + 1 of the paper)
    for t in (0, 10, 500, 900):
        assert float(ac[t]) == pytest.approx(f(t + 1) / f(0), rel=1e-12)


# --- timesteps and sigmas per scheduler ---------------------------------------------------------------------------


def _check_discrete(name: str, cls, cfg: ScheduleConfig, steps: int, **kw):
    """DDIM / DDPM / LCM-like schedulers: integer timesteps; σ = σ(ᾱ[t])."""
    ref = _ref(cls, cfg, **kw)
    ref.set_timesteps(steps)
    plan = make_sigmas(name, cfg, steps)
    t_ref = ref.timesteps.double()
    if cls is PNDMScheduler and steps > 1:
        # PLMS with skip_prk_steps evaluates t_1 twice: [t0, t1, t1, t2, ...]
        t_ref = torch.cat([t_ref[:1], t_ref[2:]])
    assert torch.equal(plan.timesteps, t_ref), (name, cfg, steps)
    ac = ref.alphas_cumprod
    sig_ref = ((1 - ac[ref.timesteps]) / ac[ref.timesteps]).sqrt()
    if cls is PNDMScheduler and steps > 1:
        sig_ref = torch.cat([sig_ref[:1], sig_ref[2:]])
    assert _rel(plan.sigmas[:-1], sig_ref) < _tol(cfg)
    return plan, ref


@pytest.mark.parametrize("steps", STEPS)
def test_ddim_pndm_ddpm_timesteps_and_sigmas(steps):
    for cfg in _cases():
        plan, ref = _check_discrete("ddim", DDIMScheduler, cfg, steps, set_alpha_to_one=False, clip_sample=False)
        # set_alpha_to_one=False: the last step goes to ᾱ_0 of the table, σ ≈ 0.029 for SD, not 0
        fa = float(1 - ref.betas[0].double())  # final_alpha_cumprod = ᾱ_0, here in float64
        assert float(plan.sigmas[-1]) == pytest.approx(math.sqrt((1 - fa) / fa), rel=_tol(cfg))
        assert plan.init_noise_sigma == pytest.approx(math.sqrt(1 + float(plan.sigmas[0]) ** 2), rel=1e-12)
        plan1 = make_sigmas("ddim", cfg, steps, set_alpha_to_one=True)
        assert float(plan1.sigmas[-1]) == 0.0
        plan, _ = _check_discrete("plms", PNDMScheduler, cfg, steps, set_alpha_to_one=False, skip_prk_steps=True)
        assert float(plan.sigmas[-1]) == pytest.approx(math.sqrt((1 - fa) / fa), rel=_tol(cfg))
        plan, _ = _check_discrete("ddpm", DDPMScheduler, cfg, steps, clip_sample=False)
        assert float(plan.sigmas[-1]) == 0.0


def test_sd15_ddim_final_sigma_value():
    plan = make_sigmas("ddim", ScheduleConfig(), 20)
    assert plan.timesteps[:3].tolist() == [951.0, 901.0, 851.0] and plan.timesteps[-1] == 1.0
    assert float(plan.sigmas[-1]) == pytest.approx(math.sqrt(0.00085 / (1 - 0.00085)), rel=1e-12)


@pytest.mark.parametrize("steps", [*STEPS, 2, 8])
def test_lcm_timesteps(steps):
    cfg = _cfg("scaled_linear", "leading")
    ref = _ref(LCMScheduler, cfg)
    ref.set_timesteps(steps)
    plan = make_sigmas("lcm", cfg, steps)
    assert torch.equal(plan.timesteps, ref.timesteps.double())
    assert torch.equal(plan.options["timesteps"], plan.timesteps)
    ac = ref.alphas_cumprod[ref.timesteps]
    assert _rel(plan.sigmas[:-1], ((1 - ac) / ac).sqrt()) < 1e-6
    assert float(plan.sigmas[-1]) == 0.0


@pytest.mark.parametrize("karras", [False, True])
@pytest.mark.parametrize("steps", STEPS)
def test_euler_heun_sigmas_timesteps_init(steps, karras):
    for cfg in _cases():
        for name, cls in (("euler", EulerDiscreteScheduler), ("heun", HeunDiscreteScheduler)):
            ref = _ref(cls, cfg, use_karras_sigmas=karras)
            ref.set_timesteps(steps)
            plan = make_sigmas(name, cfg, steps, karras=karras)
            sig_ref, t_ref = ref.sigmas.double(), ref.timesteps.double()
            if cls is HeunDiscreteScheduler:  # [σ0, σ1, σ1, ..., σ_{N-1}, σ_{N-1}, 0] -> unique levels
                sig_ref = torch.cat([sig_ref[:1], sig_ref[1::2]])
                t_ref = torch.cat([t_ref[:1], t_ref[1::2]])
            assert _rel(plan.sigmas[:-1], sig_ref[:-1]) < _tol(cfg), (name, cfg, steps)
            assert float(plan.sigmas[-1]) == float(sig_ref[-1]) == 0.0
            # timesteps: fractional for linspace and Karras, compared in float32 (diffusers stores them so)
            assert torch.allclose(plan.timesteps, t_ref, rtol=0, atol=2e-3), (name, cfg, steps)
            assert plan.init_noise_sigma == pytest.approx(float(ref.init_noise_sigma), rel=_tol(cfg))
        if not karras:
            ref = _ref(EulerAncestralDiscreteScheduler, cfg)
            ref.set_timesteps(steps)
            plan = make_sigmas("euler_a", cfg, steps)
            assert _rel(plan.sigmas[:-1], ref.sigmas[:-1]) < _tol(cfg)
            assert plan.init_noise_sigma == pytest.approx(float(ref.init_noise_sigma), rel=_tol(cfg))


@pytest.mark.parametrize("karras", [False, True])
@pytest.mark.parametrize("steps", STEPS)
def test_dpm_unipc_sigmas_timesteps(steps, karras):
    for cfg in _cases():
        for name, cls in (("dpmpp_2m", DPMSolverMultistepScheduler), ("unipc", UniPCMultistepScheduler)):
            ref = _ref(cls, cfg, use_karras_sigmas=karras)
            ref.set_timesteps(steps)
            plan = make_sigmas(name, cfg, steps, karras=karras)
            assert plan.sigmas.shape == ref.sigmas.shape
            assert _rel(plan.sigmas[:-1], ref.sigmas[:-1]) < _tol(cfg), (name, cfg, steps)
            assert float(plan.sigmas[-1]) == float(ref.sigmas[-1]) == 0.0
            if karras and name == "dpmpp_2m" and cfg.beta_schedule == "squaredcos_cap_v2":
                # DPM-Solver keeps the Karras timesteps fractional for cosine betas (diffusers stores int64)
                assert torch.equal(plan.timesteps.floor(), ref.timesteps.double())
            else:
                assert torch.equal(plan.timesteps, ref.timesteps.double()), (name, cfg, steps)
            assert plan.init_noise_sigma == pytest.approx(math.sqrt(1 + float(plan.sigmas[0]) ** 2))


def test_karras_sigmas_eq5():
    s = S.karras_sigmas(0.03, 14.6, 10)
    assert s.dtype == torch.float64 and len(s) == 10
    assert float(s[0]) == pytest.approx(14.6) and float(s[-1]) == pytest.approx(0.03)
    # eq. 5: σ^(1/ρ) is linear in the step index
    r = s ** (1 / 7)
    assert torch.allclose(r[1:] - r[:-1], (r[1] - r[0]).expand(9), rtol=1e-12)


def test_dpm_karras_sd15_values():
    # "DPM++ 2M Karras" at 20 steps on SD 1.5: Karras sigmas over the whole table, integer timesteps
    plan = make_sigmas("DPM++ 2M Karras", ScheduleConfig(), 20)
    table = S.training_sigmas(ScheduleConfig())
    assert float(plan.sigmas[0]) == pytest.approx(float(table[-1]))
    assert float(plan.sigmas[-2]) == pytest.approx(float(table[0]))
    assert plan.timesteps[0] == 999 and plan.timesteps[-1] == 0
    assert torch.equal(plan.timesteps, plan.timesteps.round())


def test_default_spacing_follows_diffusers_from_config_of_sd15():
    """SD 1.5's scheduler config names no spacing; diffusers' Euler/DPM then use their own default, linspace."""
    sd15 = dict(
        beta_end=0.012,
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        clip_sample=False,
        num_train_timesteps=1000,
        set_alpha_to_one=False,
        skip_prk_steps=True,
        steps_offset=1,
    )
    cfg = ScheduleConfig()
    for name, cls in (
        ("euler", EulerDiscreteScheduler),
        ("dpmpp_2m", DPMSolverMultistepScheduler),
        ("unipc", UniPCMultistepScheduler),
        ("ddim", DDIMScheduler),
        ("plms", PNDMScheduler),
    ):
        ref = cls.from_config(PNDMScheduler.from_config(sd15).config)
        ref.set_timesteps(25)
        plan = make_sigmas(name, cfg, 25, timestep_spacing="default")
        t_ref = ref.timesteps.double()
        if cls is PNDMScheduler:
            t_ref = torch.cat([t_ref[:1], t_ref[2:]])
        assert torch.allclose(plan.timesteps, t_ref, atol=2e-3), name


# --- σ → t and parametrisations -----------------------------------------------------------------------------------


@pytest.mark.parametrize("beta_schedule", list(BETAS))
def test_sigma_to_timestep_matches_diffusers(beta_schedule):
    cfg = _cfg(beta_schedule)
    ref = _ref(EulerDiscreteScheduler, cfg)
    log_sigmas = np.log(((1 - ref.alphas_cumprod) / ref.alphas_cumprod).sqrt().numpy())
    table = S.training_sigmas(cfg)
    gen = torch.Generator().manual_seed(0)
    # inside the table's range, outside it on both sides, and exactly on table entries
    sig = torch.cat(
        [
            torch.exp(torch.empty(200, dtype=torch.float64).uniform_(-4.5, 3.5, generator=gen)),
            torch.tensor([1e-4, 1e-12, 0.0, 500.0], dtype=torch.float64),
            table[::97],
        ]
    )
    ours = S.sigma_to_timestep(cfg, sig)
    # the algorithm, on the same (float64) table: exact
    same_table = np.array([ref._sigma_to_t(np.array(s), table.log().numpy()) for s in sig.numpy()])
    assert torch.allclose(ours, torch.from_numpy(same_table), rtol=0, atol=1e-9)
    # against diffusers' table built from float32 betas: ≤ 1e-4 timestep (2.6e-5 seen for scaled_linear)
    theirs = np.array([ref._sigma_to_t(np.array(s), log_sigmas) for s in sig.numpy()])
    assert torch.allclose(ours, torch.from_numpy(theirs), rtol=0, atol=1e-4)
    assert S.sigma_to_timestep(cfg, float(table[123])) == pytest.approx(123, abs=1e-9)


def test_parametrisations_round_trip_and_match_diffusers():
    gen = torch.Generator().manual_seed(1)
    x0 = torch.randn(3, 4, 5, 5, dtype=torch.float64, generator=gen)
    eps = torch.randn(3, 4, 5, 5, dtype=torch.float64, generator=gen)
    cfg = ScheduleConfig()
    ref = _ref(DDPMScheduler, cfg)
    for t in (0, 10, 500, 999):
        ab = float(S.alphas_cumprod(cfg)[t])
        sigma = S.sigma_from_alpha_bar(ab)
        assert S.alpha_bar_from_sigma(sigma) == pytest.approx(ab, rel=1e-12)
        x_t = S.add_noise(x0, eps, ab)
        v = S.velocity(x0, eps, ab)
        tt = torch.tensor([t])
        assert torch.allclose(x_t, ref.add_noise(x0, eps, tt), atol=1e-12)
        assert torch.allclose(v, ref.get_velocity(x0, eps, tt), atol=1e-12)
        # VP conversions
        assert torch.allclose(S.x0_from_eps_vp(x_t, eps, ab), x0, atol=1e-9)
        assert torch.allclose(S.x0_from_v_vp(x_t, v, ab), x0, atol=1e-9)
        assert torch.allclose(S.eps_from_v_vp(x_t, v, ab), eps, atol=1e-9)
        # VE variable x̃ = x_t / sqrt(ᾱ) = x0 + σ ε
        xt = S.ve_from_vp(x_t, sigma)
        assert torch.allclose(xt, x0 + sigma * eps, atol=1e-9)
        assert torch.allclose(S.vp_from_ve(xt, sigma), x_t, atol=1e-12)
        assert torch.allclose(S.x0_from_eps(xt, eps, sigma), x0, atol=1e-9)
        assert torch.allclose(S.eps_from_x0(xt, x0, sigma), eps, atol=1e-6)
        assert torch.allclose(S.x0_from_v(xt, v, sigma), x0, atol=1e-9)
        assert torch.allclose(S.v_from_x0(xt, x0, sigma), v, atol=1e-6)
        assert torch.allclose(S.eps_from_v(xt, v, sigma), eps, atol=1e-9)
        assert torch.allclose(S.to_x0(v, xt, sigma, "v_prediction"), x0, atol=1e-9)
        assert torch.allclose(S.to_x0(eps, xt, sigma, "epsilon"), x0, atol=1e-9)
    with pytest.raises(ValueError, match="prediction_type"):
        S.to_x0(eps, x0, 1.0, "sample")  # type: ignore[arg-type]


def test_bad_step_counts_are_value_errors():
    with pytest.raises(ValueError, match="at least 1"):
        S.spaced_timesteps(ScheduleConfig(), 0)
    with pytest.raises(ValueError, match="training timesteps"):
        make_sigmas("euler", ScheduleConfig(), 1001)
    with pytest.raises(ValueError, match="LCM"):
        make_sigmas("lcm", ScheduleConfig(), 51)
