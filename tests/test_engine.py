"""Rollout engine: exact NFE (observed calls and closed forms), log-prob parity, determinism, noise sharing."""

import pytest
import torch

from bench.engine.rollout import RolloutEngine
from bench.types import PromptBatch, RolloutPlan

PROMPTS = PromptBatch(("a red circle on the left", "a small blue square", "a large green triangle"))


class CountingPolicy:
    """Wraps a Policy and counts the rows it is called with (the observed NFE)."""

    def __init__(self, policy):
        self._p = policy
        self.rows = 0
        self.calls = 0

    def predict(self, x, t, cond):
        self.rows += x.shape[0]
        self.calls += 1
        return self._p.predict(x, t, cond)

    def __getattr__(self, name):
        return getattr(self._p, name)


def tree_plan(T, s0, d, k, guidance=1.0, G=1):
    modes = ["ode"] * T
    branch = [1] * T
    for i in range(s0, s0 + d):
        modes[i], branch[i] = "sde", k
    return RolloutPlan(T, tuple(modes), tuple(branch), trees_per_prompt=G, guidance=guidance)


def tree_nfe_closed_form(T, s0, d, k):
    # TreeGRPO (arXiv 2512.08153) cost per tree: s0 shared prefix steps + sum_{j<d} k^j window nodes +
    # (T - s0 - d) k^d post-window ODE evaluations
    return s0 + sum(k**j for j in range(d)) + (T - s0 - d) * k**d


@pytest.mark.parametrize("guidance", [1.0, 4.5])
@pytest.mark.parametrize("T,s0,d,k", [(6, 0, 2, 2), (6, 2, 3, 3), (5, 1, 1, 4)])
def test_tree_nfe_exact(tiny_flow_policy, guidance, T, s0, d, k):
    pol = CountingPolicy(tiny_flow_policy)
    eng = RolloutEngine(pol, max_micro_batch=7, seed=0)
    plan = tree_plan(T, s0, d, k, guidance)
    r = eng.run(plan, PROMPTS, 0)
    cfg = 2 if guidance > 1 else 1
    expected = len(PROMPTS) * tree_nfe_closed_form(T, s0, d, k) * cfg
    assert r.nfe == pol.rows == eng.nfe_rollout == expected
    assert r.num_leaves == len(PROMPTS) * k**d
    # calls are chunked to at most max_micro_batch rows
    assert pol.calls >= -(-expected // 7)


@pytest.mark.parametrize("guidance", [1.0, 3.0])
def test_chain_nfe_exact_and_update_nfe(tiny_flow_policy, guidance):
    pol = CountingPolicy(tiny_flow_policy)
    eng = RolloutEngine(pol, max_micro_batch=64, seed=0)
    T, G = 4, 3
    plan = RolloutPlan(T, ("sde",) * T, (1,) * T, trees_per_prompt=G, guidance=guidance)
    r = eng.run(plan, PROMPTS, 0)
    cfg = 2 if guidance > 1 else 1
    assert r.nfe == pol.rows == len(PROMPTS) * G * T * cfg
    pol.rows = 0
    nodes = torch.nonzero(r.trainable).flatten()[:5]
    eng.logp(r, nodes)
    assert eng.nfe_update == pol.rows == 5 * cfg  # chains: one parent per edge


def test_logp_equals_sampling_logp_and_one_eval_per_parent(tiny_flow_policy):
    pol = CountingPolicy(tiny_flow_policy)
    eng = RolloutEngine(pol, max_micro_batch=16, seed=3)
    r = eng.run(tree_plan(5, 1, 2, 3, guidance=2.0), PROMPTS, 0)
    nodes = torch.nonzero(r.trainable).flatten()
    pol.rows = 0
    ev = eng.logp(r, nodes)
    assert ev.log_prob.requires_grad
    assert torch.allclose(ev.log_prob.detach(), r.logp_old[nodes], atol=1e-5)
    parents = torch.unique(r.parent[nodes])
    assert pol.rows == 2 * parents.numel()  # k children share one guided evaluation


def test_logp_parity_ddim(tiny_eps_policy):
    eng = RolloutEngine(tiny_eps_policy, max_micro_batch=16, seed=1)
    plan = RolloutPlan(4, ("sde",) * 4, (1,) * 4, trees_per_prompt=2, noise_level=1.0, guidance=2.0)
    r = eng.run(plan, PROMPTS, 0)
    nodes = torch.nonzero(r.trainable).flatten()
    ev = eng.logp(r, nodes)
    assert torch.allclose(ev.log_prob.detach(), r.logp_old[nodes], atol=1e-5)
    assert r.images.shape == (len(PROMPTS) * 2, 3, 16, 16)


def test_determinism_independent_of_micro_batch(tiny_flow_policy):
    plan = tree_plan(5, 1, 2, 2, guidance=2.0, G=2)
    a = RolloutEngine(tiny_flow_policy, max_micro_batch=3, seed=7).run(plan, PROMPTS, 4)
    b = RolloutEngine(tiny_flow_policy, max_micro_batch=64, seed=7).run(plan, PROMPTS, 4)
    c = RolloutEngine(tiny_flow_policy, max_micro_batch=64, seed=7).run(plan, PROMPTS, 5)
    assert torch.allclose(a.images, b.images, atol=1e-5)
    assert torch.allclose(a.logp_old.nan_to_num(), b.logp_old.nan_to_num(), atol=1e-5)
    assert not torch.allclose(a.images, c.images)  # another iteration draws other noise


def test_shared_initial_noise_and_tree_structure(tiny_flow_policy):
    eng = RolloutEngine(tiny_flow_policy, max_micro_batch=64, seed=0)
    plan = RolloutPlan(3, ("sde",) * 3, (1, 2, 1), trees_per_prompt=2, shared_noise=True)
    r = eng.run(plan, PROMPTS, 0)
    roots = torch.nonzero(r.parent < 0).flatten()
    assert roots.numel() == 6
    lat = r.latents[roots]
    assert torch.equal(lat[0], lat[1]) and not torch.equal(lat[0], lat[2])
    # leaves of one prompt are contiguous and every leaf is at level T
    assert r.level[r.leaves].eq(3).all()
    assert r.leaf_prompts().tolist() == [0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2]
    # branching edges at step 1 are SDE and trainable, with finite sampling log-probs
    lvl2 = torch.nonzero(r.level == 2).flatten()
    assert r.trainable[lvl2].all() and torch.isfinite(r.logp_old[lvl2]).all()


def test_ode_edges_have_no_logp_and_cannot_be_recomputed(tiny_flow_policy):
    eng = RolloutEngine(tiny_flow_policy, max_micro_batch=64, seed=0)
    r = eng.run(tree_plan(4, 1, 1, 2), PROMPTS, 0)
    ode_nodes = torch.nonzero(~r.trainable & (r.parent >= 0)).flatten()
    assert torch.isnan(r.logp_old[ode_nodes]).all()
    with pytest.raises(ValueError, match="SDE"):
        eng.logp(r, ode_nodes[:1])


def test_dpm2_plan_runs_on_custom_sigmas(tiny_flow_policy):
    from bench.engine.sde import flow_sigmas

    eng = RolloutEngine(tiny_flow_policy, max_micro_batch=64, seed=0)
    sig = tuple(float(s) for s in flow_sigmas(5))
    plan = RolloutPlan(5, ("ode", "sde", "dpm2", "dpm2", "dpm2"), (1, 2, 1, 1, 1), sigmas=sig)
    r = eng.run(plan, PROMPTS, 0)
    assert r.images.shape[0] == 6 and torch.isfinite(r.images).all()
    assert r.nfe == 3 * (1 + 1 + 2 * 3)


@pytest.mark.parametrize("fixture", ["tiny_flow_policy", "tiny_eps_policy"])
def test_final_image_x0_decodes_the_last_data_prediction(request, fixture):
    pol = request.getfixturevalue(fixture)
    base = RolloutPlan(4, ("sde",) * 4, (1,) * 4, trees_per_prompt=2)
    import dataclasses

    sample = RolloutEngine(pol, seed=5).run(base, PROMPTS, 0)
    x0 = RolloutEngine(pol, seed=5).run(dataclasses.replace(base, final_image="x0"), PROMPTS, 0)
    assert torch.equal(sample.latents, x0.latents)  # same trajectory, only the decoded latent differs
    assert torch.allclose(sample.images, pol.decode(sample.latents[sample.leaves]).cpu())
    assert not torch.allclose(sample.images, x0.images)
    # the data prediction of the last evaluation, recomputed from the stored parent latents
    par = sample.parent[sample.leaves]
    xp = sample.latents[par]
    out = pol.predict(xp, sample.timesteps[-1].expand(len(par)), pol.encode_prompts(PROMPTS.prompts).take(
        sample.prompt[par]))
    lv = sample.sigmas[-2]
    ref = xp - lv * out if pol.prediction == "flow" else (xp - torch.sqrt(1 - lv) * out) / torch.sqrt(lv)
    assert torch.allclose(x0.images, pol.decode(ref).cpu(), atol=1e-5)


def test_ode_last_step_makes_sample_and_x0_identical(tiny_flow_policy):
    import dataclasses

    base = RolloutPlan(4, ("sde", "sde", "ode", "ode"), (1,) * 4, trees_per_prompt=2)
    a = RolloutEngine(tiny_flow_policy, seed=5).run(base, PROMPTS, 0)
    b = RolloutEngine(tiny_flow_policy, seed=5).run(dataclasses.replace(base, final_image="x0"), PROMPTS, 0)
    assert torch.allclose(a.images, b.images, atol=1e-6)
