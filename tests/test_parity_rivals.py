"""Parity of the rival algorithms (Flow-GRPO and its Fast variant) with their reference trainers.

As in ``tests/test_parity.py``: every expected number was printed once by ``tests/parity_reference.py``
(an independent numpy transcription of the reference code, file and function named there) and pasted
here as a literal; treebench computes its numbers through its own engine and algorithms on the same
toy denoiser and fixed noises.
"""

from __future__ import annotations

import contextlib

import torch
from parity_reference import FLOW_GRPO_PROMPTS, FLOW_GRPO_REWARDS, MODEL_A, MODEL_A_REF, MODEL_B
from test_parity import BATCH, ToyPolicy, close, fixed_noise  # noqa: F401 (fixed_noise is a fixture)

from algorithms.common import gaussian_mean_kl, kl_std
from algorithms.flowgrpo import FlowGRPO, FlowGRPOConfig, flow_grpo_advantages
from bench.rollout import RolloutEngine
from bench.types import SamplerSpec, TrainSpec


class ToyPolicyWithReference(ToyPolicy):
    """The toy denoiser with a frozen reference of another slope (the KL term's ``policy.reference()``)."""

    def __init__(self):
        super().__init__("flow")
        self.a = MODEL_A

    def predict(self, x, t, cond):
        return self.a * x.float() + MODEL_B * (t.float().reshape(-1, 1, 1, 1) / 1000.0)

    @contextlib.contextmanager
    def reference(self):
        self.a = MODEL_A_REF
        try:
            yield
        finally:
            self.a = MODEL_A


# ---- Flow-GRPO: PerPromptStatTracker advantages ----------------------------------------------------------
FLOW_GRPO_ADV_GLOBAL = [-1.30685488, -0.84012099, -0.18669355, 0.93346777, 0.84012099, 1.49354843, 0.09334678,
                        -1.02681455]
FLOW_GRPO_ADV_PROMPT = [-1.13549469, -0.99993334, -0.16221353, 1.16239531, 0.99993334, 1.29770821, 0.11623953,
                        -1.27863484]


def test_flowgrpo_advantages_global_and_per_prompt_std():
    ids = {p: i for i, p in enumerate(sorted(set(FLOW_GRPO_PROMPTS)))}
    groups = torch.tensor([ids[p] for p in FLOW_GRPO_PROMPTS])
    scores = torch.tensor(FLOW_GRPO_REWARDS)
    close(flow_grpo_advantages(scores, groups, global_std=True), FLOW_GRPO_ADV_GLOBAL)
    close(flow_grpo_advantages(scores, groups, global_std=False), FLOW_GRPO_ADV_PROMPT)


# ---- Flow-GRPO-Fast: SDE window, ODE elsewhere; the KL divisor -----------------------------------------
FAST_FINAL = [1.07084727, -1.11538541, -0.52295338, -0.03650219, 1.00968216, -1.63030281, -0.58411848,
              0.00831359]
FAST_LOGP = [-1.26691948, -0.95522346, -1.20191950, -0.66022342]
FAST_KL = [1.47867111e-05, 2.72926434e-05, 1.70285502e-05, 1.01424116e-04]


def test_flowgrpo_fast_window_trajectory_and_kl(fixed_noise):
    sp = SamplerSpec(steps=6, guidance=1.0, noise_level=0.7, shift=3.0)
    cfg = FlowGRPOConfig(group_size=2, sde_window_size=2, sde_window_range=(1, 3), beta=0.04)
    algo = FlowGRPO(cfg, sp, TrainSpec())
    plan = algo.plan(0)
    assert plan.modes == ("ode", "sde", "sde", "ode", "ode", "ode") and plan.final_image == "sample"
    policy = ToyPolicyWithReference()
    eng = RolloutEngine(policy)
    roll = eng.run(plan, BATCH, 0)
    close(roll.images, FAST_FINAL)
    edges = torch.stack([torch.nonzero(roll.level == i + 1).flatten() for i in (1, 2)], dim=1)  # [G, w]
    close(roll.logp_old[edges], FAST_LOGP)
    flat = edges.flatten()
    assert sorted(algo._trained_edges(roll).tolist()) == sorted(flat.tolist())  # exactly the window is trained
    ev = eng.logp(roll, flat)
    ref = eng.logp(roll, flat, reference=True)
    kl = gaussian_mean_kl(ev.mean.detach(), ref.mean, kl_std(roll, flat, ev.std.detach(), "noise_scale"))
    close(kl, FAST_KL)
    exact = gaussian_mean_kl(ev.mean.detach(), ref.mean, kl_std(roll, flat, ev.std.detach(), "step_std"))
    assert bool((exact > kl).all())  # the transition std is smaller than the code's noise scale
