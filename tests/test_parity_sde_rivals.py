"""Parity of the CPS sampler, GRPO-Guard's loss and Flow-DPPO's masked loss with their released code.

As in ``tests/test_parity.py``: every expected number was printed once by
``tests/parity_reference_sde_rivals.py`` (an independent numpy transcription of flow_grpo's
``sde_step_with_logprob(sde_type='cps')`` and ``scripts/train_sd3_GRPO_Guard.py``, and of UniRL's
``unirl/algorithms/flowdppo.py``; commits named there) and pasted here as a literal. treebench computes
its numbers through its own engine and algorithms on the same toy denoiser and fixed noises; an
"update" is simulated by changing the toy denoiser's slope to ``MODEL_A_NEW``.
"""

from __future__ import annotations

import pytest
import torch
from parity_reference import MODEL_A
from parity_reference_sde_rivals import (
    DPPO_ADV,
    DPPO_GROUPS,
    DPPO_REWARDS,
    GUARD_ADV,
    GUARD_CLIP,
    MODEL_A_NEW,
)
from test_parity import BATCH, ToyPolicy, close

from algorithms.common import chain_step_edges, guard_surrogate
from algorithms.flowdppo import FlowDPPO, FlowDPPOConfig, code_sigma_t, flowdppo_advantages, flowdppo_loss
from algorithms.flowgrpo import FlowGRPO, FlowGRPOConfig
from bench.engine.rollout import RolloutEngine
from bench.types import SamplerSpec, TrainSpec


class SlopePolicy(ToyPolicy):
    """The toy denoiser with a settable slope: ``a = MODEL_A_NEW`` stands for the updated policy."""

    def __init__(self):
        super().__init__("flow")
        self.a = MODEL_A

    def predict(self, x, t, cond):
        from parity_reference import MODEL_B

        return self.a * x.float() + MODEL_B * (t.float().reshape(-1, 1, 1, 1) / 1000.0)


def _steps(rollout, steps):
    """[C, len(steps)] node ids of the edges produced by ``steps`` of every chain (chains in root order)."""
    return chain_step_edges(rollout)[:, list(steps)]


# ---- CPS: the sampler and its constant-free log-prob (flow_grpo sde_type='cps') -------------------------
CPS_FINAL = [0.21419460, 0.36658079, -1.05458848, 0.89722296, -0.18012096, -0.40056039, 0.79917523, -0.62199405]
CPS_LOGP = [-9.09955960e-01, -7.09716752e-01, -2.98966156e-01, -1.25044406e-01, -8.43650241e-05, 0.00000000e+00,
            -8.09706594e-01, -3.51825375e-01, -4.24208750e-01, -1.85876826e-01, -7.71543382e-05, 0.00000000e+00]
CPS_LOGP_NEW = [-9.16357480e-01, -7.11393081e-01, -3.03840209e-01, -1.25552778e-01, -5.50383550e-04,
                -1.49151303e-07, -8.09810644e-01, -3.58550794e-01, -4.31302502e-01, -1.89026964e-01,
                -2.49830203e-04, -8.66444067e-08]


def test_cps_trajectory_and_log_probs(fixed_noise):
    sp = SamplerSpec(steps=6, guidance=1.0, noise_level=0.8, sde_type="cps")
    algo = FlowGRPO(FlowGRPOConfig(group_size=2, timestep_fraction=1.0), sp, TrainSpec())
    plan = algo.plan(0)
    assert plan.sde_type == "cps" and plan.modes == ("sde",) * 6
    policy = SlopePolicy()
    eng = RolloutEngine(policy)
    roll = eng.run(plan, BATCH, 0)
    close(roll.images, CPS_FINAL)
    edges = _steps(roll, range(6))
    close(roll.logp_old[edges], CPS_LOGP)  # the last step: std 0, log-prob exactly 0
    flat = edges.flatten()
    assert torch.allclose(eng.logp(roll, flat).log_prob.detach(), roll.logp_old[flat], atol=1e-6)
    policy.a = MODEL_A_NEW
    close(eng.logp(roll, flat).log_prob.detach(), CPS_LOGP_NEW)


# ---- GRPO-Guard: RatioNorm and gradient reweighting (flow_grpo scripts/train_sd3_GRPO_Guard.py) ----------
GUARD_RATIO = [0.99327731, 0.99346410, 0.99172059, 0.99991462, 0.98685933, 0.98018924]
GUARD_LOSS = [-9.07372249, -5.05398130, -2.17327888, 5.62114164, 3.12434245, 1.34587059]


def test_grpo_guard_ratio_and_reweighted_loss(fixed_noise):
    sp = SamplerSpec(steps=4, guidance=1.0, noise_level=0.7)
    cfg = FlowGRPOConfig(group_size=2, guard=True, clip_range=GUARD_CLIP, timestep_fraction=0.99)
    algo = FlowGRPO(cfg, sp, TrainSpec())
    plan = algo.plan(0)
    assert plan.keep_means and plan.sde_type == "flow_grpo"
    policy = SlopePolicy()
    eng = RolloutEngine(policy)
    roll = eng.run(plan, BATCH, 0)
    edges = _steps(roll, range(3))  # int(4 * 0.99) = 3 trained steps
    flat = edges.flatten()
    # the stored sampling-time means are the step means of the rollout's weights
    assert torch.allclose(roll.means[flat], eng.logp(roll, flat).mean.detach(), atol=1e-6)
    assert bool(torch.isnan(roll.means[roll.parent < 0]).all())
    policy.a = MODEL_A_NEW
    ev = eng.logp(roll, flat)
    adv = torch.tensor(GUARD_ADV).repeat_interleave(3)
    terms = guard_surrogate(roll, GUARD_CLIP, 5.0)(ev, flat, roll.logp_old[flat], adv)
    close(terms.ratio, GUARD_RATIO)
    close(terms.loss.detach(), GUARD_LOSS)


def test_grpo_guard_needs_the_flow_grpo_sde():
    for sde, err in (("cps", NotImplementedError), ("dance", NotImplementedError)):
        with pytest.raises(err, match=r"algo\.guard"):
            FlowGRPO(FlowGRPOConfig(guard=True), SamplerSpec(steps=10, guidance=1.0, noise_level=0.7, sde_type=sde),
                     TrainSpec())


# ---- Flow-DPPO: the KL-ADV masked loss (UniRL unirl/algorithms/flowdppo.py) -------------------------------
DPPO_FINAL = [1.07084727, -1.11538541, -0.52295338, -0.03650219, 1.00968216, -1.63030281, -0.58411848,
              0.00831359, -2.17791910, 1.54094898, -1.09903585, -0.05285161, 0.53958033, -1.64665227,
              2.07221587, -0.56776908]
DPPO_RATIO = [0.99178699, 0.99399136, 0.99984575, 0.98669966, 1.00436471, 0.99196019, 0.99982580, 0.99390942]
DPPO_KL = [5.09792768e-05, 6.52428365e-05, 5.87083339e-05, 2.42453503e-04, 3.87641372e-05, 2.62672911e-04,
           5.58117087e-05, 2.39736566e-04]
DPPO_KL_NO_COEF = [3.14180044e-05, 2.17733333e-05, 3.61813429e-05, 8.09134182e-05, 2.38899394e-05,
                   8.76611922e-05, 3.43961826e-05, 8.00067015e-05]
DPPO_MASK_LOSS = {  # (threshold, kl_sigma) -> (masked, loss per edge), chains x steps
    (1e-4, "code"): ([0, 0, 0, 1, 0, 0, 0, 1],
                     [-1.19014439, -1.19278964, 0.69989203, 0.0, -0.40174588, -0.39678408, 1.09980838, 0.0]),
    (3e-5, "code"): ([0, 0, 1, 1, 1, 0, 1, 1],
                     [-1.19014439, -1.19278964, 0.0, 0.0, 0.0, -0.39678408, 0.0, 0.0]),
    (5e-5, "none"): ([0, 0, 0, 1, 0, 0, 0, 1],
                     [-1.19014439, -1.19278964, 0.69989203, 0.0, -0.40174588, -0.39678408, 1.09980838, 0.0]),
}


@pytest.mark.parametrize("thr,kl_sigma", list(DPPO_MASK_LOSS))
def test_flowdppo_masked_loss(fixed_noise, thr, kl_sigma):
    sp = SamplerSpec(steps=6, guidance=1.0, noise_level=0.7)
    cfg = FlowDPPOConfig(group_size=4, num_sde_steps=2, sde_range=(0.0, 0.5), kl_threshold=thr, kl_sigma=kl_sigma)
    algo = FlowDPPO(cfg, sp, TrainSpec())
    plan = algo.plan(0)
    # numpy.random.default_rng(0).choice([0, 1, 2], 2, replace=False), sorted: the reference's draw
    assert plan.modes == ("ode", "sde", "sde", "ode", "ode", "ode") and not plan.keep_means
    policy = SlopePolicy()
    eng = RolloutEngine(policy)
    roll = eng.run(plan, BATCH, 0)
    close(roll.images, DPPO_FINAL)
    flat = _steps(roll, (1, 2)).flatten()
    mean_old, nfe = algo._anchor(eng, roll, flat)  # the no-gradient replay at the pre-update weights
    assert nfe == flat.numel()
    policy.a = MODEL_A_NEW
    ev = eng.logp(roll, flat)
    adv = torch.tensor(DPPO_ADV).repeat_interleave(2)
    t = flowdppo_loss(ev.log_prob, roll.logp_old[flat], ev.mean, mean_old[flat], adv,
                      algo._sigma_t(roll, flat, ev.std), thr)
    close(t.ratio, DPPO_RATIO)
    close(t.kl, DPPO_KL if kl_sigma == "code" else DPPO_KL_NO_COEF)
    masked, loss = DPPO_MASK_LOSS[(thr, kl_sigma)]
    assert t.masked.int().tolist() == masked
    close(t.loss.detach(), loss)
    # the mask is a hard gate: d loss / d logp_new = -A r on kept edges, exactly 0 on masked ones
    lp = ev.log_prob.detach().clone().requires_grad_(True)
    again = flowdppo_loss(lp, roll.logp_old[flat], ev.mean.detach(), mean_old[flat], adv,
                          algo._sigma_t(roll, flat, ev.std), thr)
    again.loss.sum().backward()
    want = torch.where(torch.tensor(masked, dtype=torch.bool), 0.0, -adv * torch.tensor(DPPO_RATIO))
    close(lp.grad, want)


def test_flowdppo_code_sigma_clamps_the_first_step():
    # UniRL: sqrt(s / (1 - min(s, 0.99))) eta sqrt(s - s_next): at s = 1 the denominator is 0.01, not 1 - sigma_1
    got = code_sigma_t(torch.tensor([1.0, 0.5]), torch.tensor([0.96, 0.25]), 0.7)
    close(got, [10.0 * 0.7 * 0.2, 1.0 * 0.7 * 0.5])


DPPO_ADV_GLOBAL = [-0.61871850, 1.50260186, 0.08838827, -0.97227198, 0.26516503, 0.26516503, -1.50260210,
                   0.97227180]
DPPO_ADV_GROUP = [-0.65275341, 1.58525801, 0.09325039, -1.02575541, 0.29002085, 0.29002085, -1.64345193,
                  1.06340992]


def test_flowdppo_advantages_global_and_per_group_std():
    r, g = torch.tensor(DPPO_REWARDS), torch.tensor(DPPO_GROUPS)
    close(flowdppo_advantages(r, g, global_std=True), DPPO_ADV_GLOBAL)
    close(flowdppo_advantages(r, g, global_std=False), DPPO_ADV_GROUP)
