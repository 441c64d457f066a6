"""Step math: known answers, parity with diffusers, limits, and the Gaussian log-density."""

import math

import pytest
import torch

from bench.engine import sde


def test_flow_ode_step_known_answer():
    v = torch.tensor([[2.0, -1.0]])
    x = torch.tensor([[1.0, 0.5]])
    out = sde.flow_ode_step(v, x, 0.8, 0.6)  # x + (0.6 - 0.8) v
    assert torch.allclose(out.prev_sample, torch.tensor([[0.6, 0.7]]))
    assert torch.isnan(out.log_prob).all() and (out.std == 0).all()


def test_flow_sde_step_known_answer_scalars():
    # sigma 0.5 -> 0.25, a = 0.7: std_dev_t = 0.7 sqrt(0.5/0.5) = 0.7, dt = -0.25
    # mean = x (1 + 0.49/(2*0.5) * -0.25) + v (1 + 0.49*0.5/(2*0.5)) * -0.25
    x, v = torch.tensor([[1.0]]), torch.tensor([[2.0]])
    out = sde.flow_sde_step(v, x, 0.5, 0.25, 0.7, prev_sample=torch.tensor([[0.0]]))
    mean = 1.0 * (1 - 0.49 * 0.25) + 2.0 * (1 + 0.245) * -0.25
    std = 0.7 * math.sqrt(0.25)
    assert out.mean.item() == pytest.approx(mean, abs=1e-6)
    assert out.std.item() == pytest.approx(std, abs=1e-6)
    lp = -((0.0 - mean) ** 2) / (2 * std**2) - math.log(std) - math.log(math.sqrt(2 * math.pi))
    assert out.log_prob.item() == pytest.approx(lp, abs=1e-5)


def test_flow_sde_substitutes_next_sigma_at_one():
    # at sigma = 1 Flow-GRPO uses sqrt(1 / (1 - sigma_next)) in the noise scale
    x, v = torch.zeros(1, 1), torch.ones(1, 1)
    out = sde.flow_sde_step(v, x, 1.0, 0.9, 0.7, prev_sample=torch.zeros(1, 1))
    std_dev_t = 0.7 * math.sqrt(1.0 / (1 - 0.9))
    assert out.std.item() == pytest.approx(std_dev_t * math.sqrt(0.1), rel=1e-5)
    assert torch.isfinite(out.log_prob).all()


def test_dance_sde_step_known_answer():
    # sigma 0.5 -> 0.25, eta 0.3: x0 = x - 0.5 v; score = -(x - 0.5 x0)/0.25; mean = x - 0.25 v + 0.045*0.25*score
    x, v = torch.tensor([[1.0]]), torch.tensor([[2.0]])
    out = sde.dance_sde_step(v, x, 0.5, 0.25, 0.3, prev_sample=torch.tensor([[0.3]]))
    x0 = 1.0 - 0.5 * 2.0
    score = -(1.0 - x0 * 0.5) / 0.25
    mean = 1.0 - 0.25 * 2.0 + (-0.5 * 0.09 * score) * -0.25
    assert out.mean.item() == pytest.approx(mean, abs=1e-6)
    assert out.std.item() == pytest.approx(0.3 * 0.5, abs=1e-6)


def test_cps_step_known_answer_scalars():
    # sigma 0.5 -> 0.25, a = 0.5: std = 0.25 sin(pi / 4); x0 = x - 0.5 v, x1 = x + 0.5 v
    x, v = torch.tensor([[1.0]]), torch.tensor([[2.0]])
    out = sde.cps_sde_step(v, x, 0.5, 0.25, 0.5, prev_sample=torch.tensor([[0.3]]))
    std = 0.25 * math.sin(math.pi / 4)
    mean = (1.0 - 0.5 * 2.0) * 0.75 + (1.0 + 0.5 * 2.0) * math.sqrt(0.25**2 - std**2)
    assert out.std.item() == pytest.approx(std, abs=1e-7)
    assert out.mean.item() == pytest.approx(mean, abs=1e-6)
    # the released log-prob keeps only -(x - mean)^2: no 1 / (2 std^2), no log std, no log sqrt(2 pi)
    assert out.log_prob.item() == pytest.approx(-((0.3 - mean) ** 2), abs=1e-6)


def test_cps_preserves_the_coefficients_and_ends_deterministic():
    # with the exact velocity of a single data point x0 (v = eps - x0) the sampled latent stays on
    # (1 - sigma') x0 + sigma' * (unit-variance noise): the mean's noise part and the fresh noise add in quadrature
    g = torch.Generator().manual_seed(4)
    x0, eps = torch.randn(1, 50000, generator=g), torch.randn(1, 50000, generator=g)
    x = 0.4 * x0 + 0.6 * eps
    out = sde.cps_sde_step(eps - x0, x, 0.6, 0.3, 0.7, generator=g)
    resid = out.prev_sample - 0.7 * x0
    assert float(resid.std()) == pytest.approx(0.3, rel=0.02)
    last = sde.cps_sde_step(eps - x0, x, 0.6, 0.0, 0.7, generator=g)
    assert torch.allclose(last.prev_sample, x0, atol=1e-5)
    assert float(last.std) == 0.0 and float(last.log_prob) == 0.0


def test_cps_at_zero_noise_is_the_euler_step():
    g = torch.Generator().manual_seed(5)
    x, v = torch.randn(2, 3, 4, 4, generator=g), torch.randn(2, 3, 4, 4, generator=g)
    ode = sde.flow_ode_step(v, x, 0.7, 0.45).prev_sample
    assert torch.allclose(sde.cps_sde_step(v, x, 0.7, 0.45, 0.0, generator=g).prev_sample, ode, atol=1e-6)


@pytest.mark.parametrize("fn", [sde.flow_sde_step, sde.dance_sde_step])
def test_sde_mean_tends_to_ode_as_eta_to_zero(fn):
    g = torch.Generator().manual_seed(0)
    x, v = torch.randn(3, 4, 5, 5, generator=g), torch.randn(3, 4, 5, 5, generator=g)
    ode = sde.flow_ode_step(v, x, 0.6, 0.45).prev_sample
    errs = [(fn(v, x, 0.6, 0.45, eta).mean - ode).abs().max().item() for eta in (0.5, 0.05, 0.005)]
    assert errs[0] > errs[1] > errs[2] and errs[2] < 1e-4


@pytest.mark.parametrize("fn", [sde.flow_sde_step, sde.dance_sde_step])
def test_log_prob_matches_torch_normal(fn):
    g = torch.Generator().manual_seed(1)
    x, v = torch.randn(4, 3, 6, 6, generator=g), torch.randn(4, 3, 6, 6, generator=g)
    out = fn(v, x, 0.7, 0.5, 0.7, generator=g)
    ref = torch.distributions.Normal(out.mean, out.std.view(-1, 1, 1, 1)).log_prob(out.prev_sample).mean(dim=(1, 2, 3))
    assert torch.allclose(out.log_prob, ref, atol=1e-5)
    again = fn(v, x, 0.7, 0.5, 0.7, prev_sample=out.prev_sample)
    assert torch.allclose(again.log_prob, out.log_prob, atol=1e-6)


def test_flow_ode_equals_diffusers_scheduler_step():
    from diffusers import FlowMatchEulerDiscreteScheduler

    sigmas = sde.flow_sigmas(8, shift=3.0)
    sch = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)
    sch.set_timesteps(sigmas=sigmas[:-1].numpy())
    assert torch.allclose(sch.sigmas.float(), sigmas, atol=1e-6)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 3, 4, 4, generator=g)
    for i, t in enumerate(sch.timesteps):
        v = torch.randn(2, 3, 4, 4, generator=g)
        ref = sch.step(v, t, x, return_dict=False)[0]
        ours = sde.flow_ode_step(v, x, sigmas[i], sigmas[i + 1]).prev_sample
        assert torch.allclose(ours, ref, atol=1e-6)
        x = ref


def test_ddim_eta0_equals_diffusers_ddim():
    from diffusers import DDIMScheduler

    sch = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                        set_alpha_to_one=False, steps_offset=1)
    sch.set_timesteps(5)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 4, 4, generator=g)
    for t in sch.timesteps:
        eps = torch.randn(2, 3, 4, 4, generator=g)
        prev_t = int(t) - 1000 // 5
        ab = sch.alphas_cumprod[int(t)]
        abp = sch.alphas_cumprod[prev_t] if prev_t >= 0 else sch.final_alpha_cumprod
        ref = sch.step(eps, t, x, eta=0.0, return_dict=False)[0]
        ours = sde.ddim_step(eps, x, ab, abp, eta=0.0).prev_sample
        assert torch.allclose(ours, ref, atol=1e-5)
        x = ref


def test_ddim_eta1_known_answer_and_log_prob():
    # ab_t = 0.5, ab_prev = 0.8, eps = 1, x = 1: x0 = (1 - sqrt(.5)) / sqrt(.5)
    x, e = torch.tensor([[1.0]]), torch.tensor([[1.0]])
    out = sde.ddim_step(e, x, 0.5, 0.8, eta=1.0, prev_sample=torch.tensor([[0.5]]))
    x0 = (1 - math.sqrt(0.5)) / math.sqrt(0.5)
    var = (1 - 0.8) / (1 - 0.5) * (1 - 0.5 / 0.8)
    mean = math.sqrt(0.8) * x0 + math.sqrt(1 - 0.8 - var) * 1.0
    assert out.std.item() == pytest.approx(math.sqrt(var), abs=1e-6)
    assert out.mean.item() == pytest.approx(mean, abs=1e-6)
    lp = torch.distributions.Normal(mean, math.sqrt(var)).log_prob(torch.tensor(0.5)).item()
    assert out.log_prob.item() == pytest.approx(lp, abs=1e-5)


def test_dpm_first_order_is_euler_and_second_order_is_more_accurate():
    # Gaussian data N(0, c^2): the exact velocity is known and the probability-flow ODE maps x_1 to c x_1.
    c = 0.3

    def velocity(x, s):
        x0_hat = (1 - s) * c**2 * x / ((1 - s) ** 2 * c**2 + s**2)
        return (x - x0_hat) / s

    x1 = torch.tensor([[1.0]])
    sig = sde.flow_sigmas(6, shift=1.0)
    # first order == Euler
    x = torch.tensor([[0.7]])
    d = sde.flow_dpm2_step(velocity(x, 0.6), x, 0.6, 0.4)
    assert torch.allclose(d.prev_sample, sde.flow_ode_step(velocity(x, 0.6), x, 0.6, 0.4).prev_sample, atol=1e-6)

    def integrate(second_order):
        x, prev, sp = x1.clone(), None, None
        x = sde.flow_ode_step(velocity(x, 1.0 - 1e-6), x, sig[0], sig[1]).prev_sample  # first step from sigma=1
        for i in range(1, 6):
            s, sn = float(sig[i]), float(sig[i + 1])
            out = sde.flow_dpm2_step(velocity(x, s), x, s, sn, prev_x0=prev if second_order else None,
                                     sigma_prev=sp if second_order else None)
            prev, sp, x = out.x0, s, out.prev_sample
        return x

    exact = c * x1
    assert (integrate(True) - exact).abs().item() < (integrate(False) - exact).abs().item()


def test_time_shift_and_schedule():
    s = sde.flow_sigmas(4, shift=3.0)
    assert s[0].item() == pytest.approx(1.0) and s[-1].item() == 0.0
    assert s[2].item() == pytest.approx(3 * 0.5 / (1 + 2 * 0.5))
    assert (s[1:] < s[:-1]).all()


def test_scheduler_schedule_is_diffusers_set_timesteps():
    from diffusers import FlowMatchEulerDiscreteScheduler

    for cfg in ({"shift": 3.0}, {"shift": 1.0}, {"shift": 3.0, "num_train_timesteps": 1000}):
        ref = FlowMatchEulerDiscreteScheduler.from_config(cfg)
        ref.set_timesteps(10)
        fs = sde.flow_schedule("scheduler", 10, cfg["shift"], cfg)
        assert torch.equal(fs.sigmas, ref.sigmas.float()) and torch.allclose(fs.timesteps, ref.timesteps.float())
    # SD3 at T = 10 ends with a tiny step (0.0089 -> 0), the FLUX-style linspace with a large one (0.25 -> 0)
    assert sde.flow_schedule("scheduler", 10, 3.0, {"shift": 3.0}).sigmas[-2].item() == pytest.approx(0.008929, abs=1e-6)
    assert sde.flow_schedule("linspace", 10, 3.0).sigmas[-2].item() == pytest.approx(0.25, abs=1e-6)


def test_scheduler_schedule_rejects_dynamic_shifting_and_unknown_kinds():
    with pytest.raises(ValueError, match="dynamic"):
        sde.flow_schedule("scheduler", 4, 1.0, {"use_dynamic_shifting": True})
    with pytest.raises(ValueError, match="unknown flow schedule"):
        sde.flow_schedule("karras", 4)


def test_linspace_timesteps_are_quantised_like_the_flux_trainers():
    fs = sde.flow_schedule("linspace", 16, 3.0)
    assert torch.equal(fs.timesteps, torch.floor(fs.sigmas[:-1] * 1000))
    assert fs.timesteps[2].item() == 954.0  # sigma 0.95454544: the transformer sees 0.954, not 0.9545


def test_inverse_time_shift():
    t = torch.linspace(0, 1, 11, dtype=torch.float64)
    assert torch.allclose(sde.inverse_time_shift(sde.time_shift(t, 3.0), 3.0), t, atol=1e-12)


def test_flow_sde_std_clamp():
    x, v = torch.ones(1, 1, 2, 2), torch.zeros(1, 1, 2, 2)
    free = sde.flow_sde_step(v, x, 0.005, 0.0, 0.7, prev_sample=x)
    lo = sde.flow_sde_step(v, x, 0.005, 0.0, 0.7, prev_sample=x, log_std_range=(-5.0, 2.0))
    assert free.std.item() < math.exp(-5) and lo.std.item() == pytest.approx(math.exp(-5), rel=1e-6)
    hi = sde.flow_sde_step(v, x, 0.9, 0.1, 50.0, prev_sample=x, log_std_range=(-5.0, 2.0))
    assert hi.std.item() == pytest.approx(math.exp(2.0), rel=1e-6)
