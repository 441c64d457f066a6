"""Parity of AWM and ReFL / DRaFT-K with their references.

Every expected number was printed once by ``tests/parity_reference_awm_refl.py`` (independent numpy
transcriptions of scxue/advantage_weighted_matching ``scripts/train_sd3_awm.py``, THUDM/ImageReward
``ImageReward/ReFL.py`` with diffusers' ``DDPMScheduler.step``, and DRaFT-K's equations, gradients derived
by hand) and pasted here as literals. treebench computes its numbers through its own algorithms and engine:
the real ``update`` on a toy denoiser whose one trainable parameter is the slope A, so the gradient of the
whole update (its one optimizer step, no clipping) is compared with the transcription's dloss/dA.
"""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch
from parity_reference import MODEL_A, MODEL_A_REF, MODEL_B, noise, sd3_scheduler_sigmas
from parity_reference_awm_refl import (
    AWM_ADVANTAGES,
    AWM_FRACTION,
    AWM_LEAF_ORDER,
    AWM_T,
    AWM_U,
    MODEL_A_EMA,
    REFL_ORDER,
    REFL_STOPS,
    REFL_W_SEED,
)
from test_parity import SD3_T10, ToyPolicy, close

from algorithms.awm import AWM, AWMConfig, train_step_indices
from algorithms.refl import ReFL, ReFLConfig
from bench.engine import sde
from bench.engine.rollout import RolloutEngine
from bench.model.policy import Conditioning
from bench.model.snapshots import PREFIX
from bench.types import Advantages, PromptBatch, Rollout, RolloutPlan, SamplerSpec, TrainSpec

#: a gradient of ~1e-6 (ReFL's loss scale 1e-3) needs a relative tolerance, not TOL's absolute floor
GRAD_TOL = {"rtol": 2e-4, "atol": 1e-12}


class SlopePolicy(ToyPolicy):
    """The toy denoiser A x + B t / 1000 with A a trainable parameter; pixel-space decode (x + 1) / 2
    clamped to [0, 1] (``Policy.decode`` without a VAE), with gradients when asked."""

    def __init__(self, prediction: str = "flow"):
        super().__init__(prediction)
        self.a = torch.nn.Parameter(torch.tensor(MODEL_A, dtype=torch.float32))

    def predict(self, x, t, cond):
        return self.a * x.float() + MODEL_B * (t.float().reshape(-1, 1, 1, 1) / 1000.0)

    def decode(self, latents, grad=False):
        with torch.set_grad_enabled(grad):
            return ((latents.float() + 1) / 2).clamp(0, 1)

    def named_trainable_parameters(self):
        return {"a": self.a}

    def trainable_parameters(self):
        return [self.a]

    @contextlib.contextmanager
    def reference(self):
        raise AssertionError("AWM's KL reference is the snapshot 'initial', not the LoRA base")
        yield


def chain_rollout(latents_by_level, T, prompts, sigmas, timesteps, G):
    """A chain rollout record: C chains whose node at level j holds latents_by_level[j][c]."""
    C = latents_by_level[0].shape[0]
    lat = torch.cat([torch.as_tensor(x, dtype=torch.float32) for x in latents_by_level])
    ids = torch.arange(C * (T + 1))
    level = ids // C
    parent = torch.where(level > 0, ids - C, torch.full_like(ids, -1))
    chain = ids % C
    batch = PromptBatch(tuple(prompts))
    plan = RolloutPlan(num_steps=T, modes=("ode",) * T, branch=(1,) * T, trees_per_prompt=G)
    return Rollout(latents=lat, parent=parent, level=level, prompt=chain // G, tree=chain,
                   logp_old=torch.full((ids.numel(),), float("nan")), trainable=torch.zeros(ids.numel(), dtype=torch.bool),
                   leaves=ids[-C:], images=torch.zeros(C, 3, 2, 2), sigmas=torch.as_tensor(sigmas, dtype=torch.float32),
                   timesteps=torch.as_tensor(timesteps, dtype=torch.float32), nfe=0, plan=plan, iteration=0,
                   conditioning=Conditioning({"e": torch.zeros(len(prompts), 1)}), batch=batch)


class GradCapture(torch.optim.SGD):
    """SGD that records the gradient it steps with (read before the step: float32 differences of A would lose
    the small gradients' digits)."""

    def step(self, closure=None):
        self.grads = [p.grad.detach().double().clone() for p in self.param_groups[0]["params"]]
        return super().step(closure)


def sgd_gradient(policy, run_update):
    """dloss/dA of an update (one optimizer step, no clipping) and the update's stats."""
    opt = GradCapture([policy.a], lr=1.0)
    stats = run_update(opt)
    return float(opt.grads[0]), stats


# ---- AWM: the timestep draw ---------------------------------------------------------------------------
AWM_STEPS_T14 = {"discrete": [[0, 3, 5, 7, 8, 11], [1, 2, 4, 6, 9, 10]],
                 "discrete_wo_init": [[1, 3, 5, 7, 8, 11], [1, 2, 4, 6, 9, 10]],
                 "discrete_with_init": [[0, 1, 4, 6, 8, 9], [0, 2, 3, 5, 7, 10]]}


@pytest.mark.parametrize("time_type", sorted(AWM_STEPS_T14))
def test_awm_timestep_strata(time_type):
    u = torch.tensor([[0.10, 0.55, 0.99, 0.50, 0.00, 0.70], [0.95, 0.25, 0.40, 0.33, 0.66, 0.05]])
    n = 5 if time_type == "discrete_with_init" else 6
    got = train_step_indices(14, 0.9, 6, time_type, u[:, :n])
    assert got.tolist() == AWM_STEPS_T14[time_type]


# ---- AWM: the whole update (loss, KL terms, gradient, EMA policy) ----------------------------------------
AWM_EXPECTED = {  # (weighting, kl_weight, kl_ema_weight, time_type): steps, terms, [loss, kl_ref, mean w, dloss/dA], ema
    ("ghuber", "uniform", "uniform", "discrete"): (
        [[0, 4, 8], [1, 3, 8], [2, 3, 7], [0, 4, 6], [2, 4, 6], [0, 5, 7]],
        [1.00107380e+00, 1.00046859e+00, 1.00025405e+00, -3.99026300e-01, -3.99338734e-01, -3.99574247e-01,
         5.27800002e-04, 4.21469768e-04, 9.12850532e-05, 2.00895130e-01, 2.00287957e-01, 2.00468714e-01,
         -9.99083271e-01, -9.98935300e-01, -9.99643991e-01, -5.93619894e-02, -5.92808707e-02, -5.99097240e-02],
        [-0.04275920, 0.00630913, 3.50393384, -0.16195764], -0.33817432),
    ("uniform", "elbo", "uniform", "discrete_wo_init"): (
        [[1, 4, 8], [2, 3, 8], [2, 3, 7], [1, 4, 6], [2, 4, 6], [1, 5, 7]],
        [1.00098306e+00, 1.00046483e+00, 1.00025314e+00, -3.99038643e-01, -3.99344034e-01, -3.99566529e-01,
         5.22245770e-04, 4.18794206e-04, 9.14602034e-05, 2.00803631e-01, 2.00285328e-01, 2.00477210e-01,
         -9.99092370e-01, -9.98943833e-01, -9.99645266e-01, -5.93683218e-02, -5.92874353e-02, -5.99095508e-02],
        [-0.04277202, 0.00260782, 2.52883769, 0.01104935], -0.51100830),
    ("huber", "uniform", "elbo", "discrete_with_init"): (
        [[0, 1, 7], [0, 3, 5], [0, 4, 6], [0, 2, 7], [0, 4, 6], [0, 1, 8]],
        [1.00002264e+00, 1.00007141e+00, 1.00034253e+00, -3.99979473e-01, -3.99951181e-01, -3.99649361e-01,
         1.11265307e-05, 4.56425651e-05, 3.41091997e-04, 2.00020527e-01, 2.00051381e-01, 2.00153415e-01,
         -9.99977363e-01, -9.99703310e-01, -9.99758705e-01, -5.99858041e-02, -5.98363240e-02, -5.98735793e-02],
        [-0.04320307, 0.00690608, 1.24055150, -0.04464016], -0.45537448),
    ("t2", "elbo", "elbo", "discrete"): (
        [[0, 4, 8], [1, 3, 8], [2, 3, 7], [0, 4, 6], [2, 4, 6], [0, 5, 7]],
        [1.00001096e+00, 1.00012682e+00, 1.00017128e+00, -3.99990064e-01, -3.99821031e-01, -3.98871975e-01,
         5.38571431e-06, 1.77993670e-04, 1.07223713e-04, 2.00037930e-01, 2.00048753e-01, 2.01241848e-01,
         -9.99911253e-01, -9.99711843e-01, -9.99759979e-01, -5.99382355e-02, -5.98782475e-02, -5.98939615e-02],
        [-0.04310269, 0.00253455, 1.46050643, 0.06693161], -0.56683468),
}


@pytest.mark.parametrize("case", list(AWM_EXPECTED))
def test_awm_update_matches_the_released_training_loop(case, monkeypatch):
    weighting, kl_weight, kl_ema_weight, time_type = case
    steps, terms, (loss, kl_ref, mean_w, grad), ema_after = AWM_EXPECTED[case]
    k = 3
    got_steps = train_step_indices(AWM_T, AWM_FRACTION, k, time_type,
                                   torch.tensor(AWM_U)[:, :k - 1 if time_type == "discrete_with_init" else k])
    assert got_steps.tolist() == steps
    cfg = AWMConfig(group_size=3, train_timesteps=k, timestep_fraction=AWM_FRACTION, time_type=time_type,
                    weighting=weighting, beta=1e-3, kl_weight=kl_weight, ema_beta=1.0, kl_ema_weight=kl_ema_weight)
    algo = AWM(cfg, SamplerSpec(steps=AWM_T, guidance=1.0, noise_level=0.7), TrainSpec(micro_batch=4, optimizer_steps=1,
                                                                       max_grad_norm=0.0))
    order = torch.tensor(AWM_LEAF_ORDER)
    # the fixed inputs of the transcription: image order, each image's steps, eps_j = noise(40 + j)
    monkeypatch.setattr(algo, "terms", lambda r: (order.repeat_interleave(k), got_steps[order].flatten()))
    monkeypatch.setattr(algo, "term_noise", lambda r, ids, shape: torch.cat(
        [torch.from_numpy(noise(40 + int(j), 1)) for j in ids]))
    policy = SlopePolicy()
    eng = RolloutEngine(policy)
    eng.snapshots.declare(algo)
    assert eng.snapshots.names == ("initial", "ema")
    eng.snapshots.load_state_dict({f"{PREFIX}initial/a": torch.tensor(MODEL_A_REF),
                                   f"{PREFIX}ema/a": torch.tensor(MODEL_A_EMA)})
    x0 = noise(30, 6)
    roll = chain_rollout([np.zeros_like(x0)] * AWM_T + [x0], AWM_T, ["p", "q"], SD3_T10,
                         np.asarray(SD3_T10[:-1]) * 1000, 3)
    adv = Advantages(edge=torch.zeros(roll.num_nodes), leaf=torch.tensor(AWM_ADVANTAGES))
    g, st = sgd_gradient(policy, lambda opt: algo.update(policy, eng, opt, roll, adv))
    close([st.loss, st.kl, st.metrics["awm/matching_loss"]], [loss, kl_ref, mean_w])
    np.testing.assert_allclose(g, grad, **GRAD_TOL)
    assert st.edges == 18 and st.nfe == 18 * 3 and st.micro_batches == 5  # 18 terms in micro-batches of 4
    # the EMA policy after the epoch: min(0.3, 0.001 * 1) ema + (1 - d) theta
    close([float(eng.snapshots.state_dict()[f"{PREFIX}ema/a"])], [ema_after])
    assert st.metrics["awm/ema_decay"] == pytest.approx(0.001)
    # the per-term values, through the module's pure functions on the same inputs
    from algorithms.awm import kl_term, matching_log_prob, policy_terms, scaled_advantages

    sig = torch.tensor(SD3_T10, dtype=torch.float64)
    t = sig[got_steps[order].flatten()]
    x0r = torch.from_numpy(x0).double()[order.repeat_interleave(k)]
    eps = torch.cat([torch.from_numpy(noise(40 + j, 1)) for j in range(18)]).double()
    tt = t.reshape(-1, 1, 1, 1)
    xt = (1 - tt) * x0r + tt * eps
    v = MODEL_A * xt + MODEL_B * tt
    mse = ((v - (eps - x0r)) ** 2).mean(dim=(1, 2, 3))
    lp = matching_log_prob(mse, t, weighting)
    a = scaled_advantages(torch.tensor(AWM_ADVANTAGES), 5.0, 1.0)[order.repeat_interleave(k)]
    per = (policy_terms(lp, lp, a, 1.0) + 1e-3 * kl_term(v, MODEL_A_REF * xt + MODEL_B * tt, t, kl_weight)
           + kl_term(v, MODEL_A_EMA * xt + MODEL_B * tt, t, kl_ema_weight))
    close(per, terms)


# ---- ReFL: the DDPM ancestral step of its no-grad loop is the engine's SDE step on epsilon models ---------
DDPM_MEANS = [0.92317538, -1.78835374, 0.40376127, 1.61572754, 0.87895767, -1.59181456, 0.33690143, 1.60169932,
              0.83254703, -1.40753775, 0.27615841, 1.57439852, 0.80923003, -1.41970099, 0.29053147, 1.50082811]
DDPM_STDS = [0.49853800, 0.41110202, 0.26489635, 0.03984246]


def test_refl_ddpm_step_is_ddim_eta_one():
    levels, ts = ToyPolicy("epsilon").ddim_alpha_bars(40)
    assert ts[:3].tolist() == [976.0, 951.0, 926.0]  # DDPMScheduler.set_timesteps(40): 25 (39 - i) + 1
    x = torch.from_numpy(noise(70, 1))
    e = torch.from_numpy(noise(71, 1))
    means, stds = [], []
    for i in (0, 10, 25, 38):
        st = sde.ddim_step(e, x, levels[i], levels[i + 1], 1.0, prev_sample=x)
        means.append(st.mean)
        stds.append(float(st.std))
    close(torch.cat(means), DDPM_MEANS)
    close(stds, DDPM_STDS)


# ---- ReFL and DRaFT-K: the whole update (stop step, gradient steps, decode, reward, loss) -----------------
class WeightedPixels:
    """A toy differentiable reward: r = sum(W image), W = noise(REFL_W_SEED)."""

    name = "weighted_pixels"
    version = "1"
    differentiable = True

    def score_grad(self, images, prompts, meta):
        return (images * torch.from_numpy(noise(REFL_W_SEED, 1))).sum(dim=(1, 2, 3))


REFL_EXPECTED = {  # margin: (r in training order, [loss, dloss/dA])
    2.0: ([-1.18611425, -1.02903434, 0.00000000, -0.83655010], [2.76292467e-03, -2.68543684e-06]),
    -0.9: ([-1.18611425, -1.02903434, 0.00000000, -0.83655010], [1.03787148e-04, -4.33801325e-06]),
}
DRAFT_EXPECTED = {  # K: (r in training order, [loss, dloss/dA])
    1: ([1.34107619, -1.02187502, -1.02187503, -0.83926978], [0.38548591, -0.00098214]),
    2: ([-0.27846701, 0.00000000, -0.02089998, -1.14700778], [0.36159369, 0.02119686]),
}


def _direct_update(policy, algo, roll, monkeypatch, m):
    monkeypatch.setattr(algo, "stops", lambda r: (torch.tensor(REFL_ORDER), torch.tensor(m)))
    eng = RolloutEngine(policy)
    eng.attach_reward(WeightedPixels())
    adv = algo.advantages(roll.batch, roll, None)
    g, st = sgd_gradient(policy, lambda opt: algo.update(policy, eng, opt, roll, adv))
    return g, st, eng


@pytest.mark.parametrize("margin", list(REFL_EXPECTED))
def test_refl_update_matches_the_released_gradient_step(margin, monkeypatch):
    r, (loss, grad) = REFL_EXPECTED[margin]
    T = 4
    policy = SlopePolicy("epsilon")
    levels, ts = policy.ddim_alpha_bars(T)
    roll = chain_rollout([noise(50 + j, 4) for j in range(T + 1)], T, ["a", "b", "c", "d"], levels, ts, 1)
    algo = ReFL(ReFLConfig(margin=margin, loss="hinge", loss_scale=1e-3, stop_steps=(1, 3)),
                SamplerSpec(steps=T, guidance=1.0, prediction="epsilon", noise_level=1.0), TrainSpec(micro_batch=3))
    g, st, eng = _direct_update(policy, algo, roll, monkeypatch, REFL_STOPS)
    close([st.loss, st.metrics["refl/trained_reward"]], [loss, float(np.mean(r))])
    np.testing.assert_allclose(g, grad, **GRAD_TOL)
    assert st.nfe == 4 and st.edges == 4 and st.micro_batches == 2
    kinds = [(c.kind, c.rows, c.grad) for c in eng.recorder.drain() if c.kind != "optimizer_step"]
    assert kinds == [("forward_backward", 3, True), ("reward_backward", 3, True), ("forward_backward", 1, True),
                     ("reward_backward", 1, True)]  # pixel space: no VAE decode to trace
    active = sum(v < margin for v in r) / 4
    assert st.metrics["refl/hinge_active_frac"] == pytest.approx(active)


@pytest.mark.parametrize("K", list(DRAFT_EXPECTED))
def test_draft_k_update_matches_the_paper_equations(K, monkeypatch):
    r, (loss, grad) = DRAFT_EXPECTED[K]
    T = 4
    sigmas = sd3_scheduler_sigmas(T)
    policy = SlopePolicy("flow")
    roll = chain_rollout([noise(50 + j, 4) for j in range(T + 1)], T, ["a", "b", "c", "d"], sigmas, sigmas[:-1] * 1000,
                         1)
    algo = ReFL(ReFLConfig(grad_steps=K, stop_steps=(-K, -K), solver="ode", loss="negative", loss_scale=1.0),
                SamplerSpec(steps=T, guidance=1.0, noise_level=0.7), TrainSpec(micro_batch=64))
    assert algo.stop_range() == (T - K, T - K)
    g, st, _ = _direct_update(policy, algo, roll, monkeypatch, [T - K] * 4)
    close([st.loss, st.metrics["refl/trained_reward"]], [loss, float(np.mean(r))])
    np.testing.assert_allclose(g, grad, **GRAD_TOL)
    assert st.nfe == 4 * K
