"""Known-answer tests for algorithms/common.py (hand-computed numbers; the trees and reward sets are small
enough to check on paper: population/unbiased std, softmax weights and PPO clipping written out in the comments)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from algorithms.common import (
    PerPromptStatTracker,
    chain_edge_advantages,
    chain_step_edges,
    gaussian_mean_kl,
    group_normalize,
    node_depth,
    ppo_clip_loss,
    ppo_update,
    progressive_window_start,
    random_step_subset,
    tree_backup,
    weighted_advantage_sum,
)
from bench.engine.rollout import EdgeEval
from bench.types import Rollout, RolloutPlan, TrainSpec

NAN = float("nan")
ATOL = 1e-5


def close(a, b, atol=ATOL):
    a = torch.as_tensor(a, dtype=torch.float64)
    b = torch.as_tensor(b, dtype=torch.float64)
    return torch.allclose(a, b, atol=atol, equal_nan=True)


# ---- group normalisation (DanceGRPO/MixGRPO train_one_step) -----------------------------------------------
def test_group_normalize_unbiased_and_population():
    r = torch.tensor([1.0, 3.0, 2.0, 6.0])
    g = torch.zeros(4, dtype=torch.long)
    assert close(group_normalize(r, g, unbiased=True, eps=1e-8), [-0.9258201, 0.0, -0.4629100, 1.3887301])
    assert close(group_normalize(r, g, unbiased=False, eps=1e-8), [-1.0690450, 0.0, -0.5345225, 1.6035675])


def test_group_normalize_several_interleaved_groups_and_singleton():
    # prompt 0: [1, 3, 2, 6], prompt 1: [0.2, 0.1, 0.4, 0.3], interleaved; prompt 2: one sample -> 0
    r = torch.tensor([1.0, 0.2, 3.0, 0.1, 2.0, 0.4, 6.0, 0.3, 9.0])
    g = torch.tensor([0, 1, 0, 1, 0, 1, 0, 1, 2])
    a = group_normalize(r, g, unbiased=True, eps=1e-8)
    assert close(a[g == 0], [-0.9258201, 0.0, -0.4629100, 1.3887301])
    assert close(a[g == 1], [-0.3872983, -1.1618949, 1.1618949, 0.3872983])
    assert a[8] == 0.0


def test_group_normalize_constant_group_is_zero():
    a = group_normalize(torch.full((4,), 2.5), torch.zeros(4, dtype=torch.long), unbiased=True, eps=1e-8)
    assert torch.equal(a, torch.zeros(4))


def test_weighted_advantage_sum_mixgrpo_example():
    g = torch.zeros(4, dtype=torch.long)
    a1 = group_normalize(torch.tensor([1.0, 3.0, 2.0, 6.0]), g, unbiased=True, eps=1e-8)
    a2 = group_normalize(torch.tensor([0.2, 0.1, 0.4, 0.3]), g, unbiased=True, eps=1e-8)
    out = weighted_advantage_sum({"hps": a1, "pick": a2}, {"hps": 1.0, "pick": 1.0})
    assert close(out, [-0.6565592, -0.5809475, 0.3494924, 0.8880142])
    # weights are normalised: (2, 2) is the same as (1, 1); (3, 1) -> 0.75 / 0.25
    assert close(weighted_advantage_sum({"hps": a1, "pick": a2}, {"hps": 2.0, "pick": 2.0}), out)
    assert close(weighted_advantage_sum({"hps": a1, "pick": a2}, {"hps": 3.0, "pick": 1.0}), 0.75 * a1 + 0.25 * a2)
    with pytest.raises(ValueError, match="no weight"):
        weighted_advantage_sum({"hps": a1}, {})


# ---- DDPO per-prompt stat tracker (ddpo-pytorch stat_tracking.py) -----------------------------------------
def test_stat_tracker_ddpo_example():
    t = PerPromptStatTracker(buffer_size=4, min_count=3)
    a = t.update(["cat", "cat", "dog", "dog"], torch.tensor([1.0, 3.0, 5.0, 9.0]))
    assert close(a, [-1.1832156, -0.5070924, 0.1690308, 1.5212771])
    a = t.update(["cat", "cat"], torch.tensor([2.0, 6.0]))
    assert close(a, [-0.5345222, 1.6035666])
    a = t.update(["cat"], torch.tensor([4.0]))
    assert close(a, [0.1690308])
    assert list(t.buffers["cat"]) == [3.0, 2.0, 6.0, 4.0]
    assert list(t.buffers["dog"]) == [5.0, 9.0]


def test_stat_tracker_mixed_batch_uses_batch_stats_only_for_short_buffers():
    t = PerPromptStatTracker(buffer_size=4, min_count=3)
    t.update(["cat", "cat", "cat"], torch.tensor([1.0, 2.0, 3.0]))
    # batch: cat gets 5 -> buffer [1, 2, 3, 5] (mean 2.75, std 1.4790199); dog [4] < 3 -> batch [5, 4]
    a = t.update(["cat", "dog"], torch.tensor([5.0, 4.0]))
    assert close(a, [(5 - 2.75) / (1.4790199 + 1e-6), (4 - 4.5) / (0.5 + 1e-6)])


def test_stat_tracker_state_dict_round_trip_through_json():
    t = PerPromptStatTracker(buffer_size=4, min_count=3)
    t.update(["cat", "cat", "dog", "dog"], torch.tensor([1.0, 3.0, 5.0, 9.0]))
    state = json.loads(json.dumps(t.state_dict()))
    u = PerPromptStatTracker(buffer_size=99, min_count=99)
    u.load_state_dict(state)
    assert (u.buffer_size, u.min_count) == (4, 3)
    nxt = (["cat", "cat", "dog"], torch.tensor([2.0, 6.0, 1.0]))
    assert torch.equal(t.update(*nxt), u.update(*nxt))
    assert u.buffers["cat"].maxlen == 4


def test_stat_tracker_rejects_bad_input():
    with pytest.raises(ValueError):
        PerPromptStatTracker(buffer_size=0)
    with pytest.raises(ValueError, match="prompts"):
        PerPromptStatTracker(2, 2).update(["a"], torch.tensor([1.0, 2.0]))


# ---- tree backup (TreeGRPO update_advantages, extended) ---------------------------------------------------
def _tree_81(offset: int = 0):
    """The k = 2, d = 2 reference tree (leaf rewards [1, 3, 2, 6]) with ODE pass-through links before the
    window and after it:

        r0 -ODE-> R -> A, B (edge log-probs -1.2, -1.0) -> A1, A2, B1, B2 (-1, -2, -0.5, -1.5)
        each of A1..B2 -ODE-> its leaf (leaf rewards [1, 3, 2, 6] -> population-normalised)
    Node ids: r0 0, R 1, A 2, B 3, A1 4, A2 5, B1 6, B2 7, leaves 8..11 (+ offset)."""
    parent = [-1, 0, 1, 1, 2, 2, 3, 3, 4, 5, 6, 7]
    logp = [NAN, NAN, -1.2, -1.0, -1.0, -2.0, -0.5, -1.5, NAN, NAN, NAN, NAN]
    leaf_adv = [-1.0690450, 0.0, -0.5345225, 1.6035675]
    values = [NAN] * 8 + leaf_adv
    parent = [p + offset if p >= 0 else -1 for p in parent]
    return parent, values, logp


LEAF_81 = [-1.0690450, 0.0, -0.5345225, 1.6035675]


@pytest.mark.parametrize("weighting,a_ra,a_rb,v_r", [
    ("uniform", -0.5345225, 0.5345225, 0.0),
    ("softmax_logprob", -0.7815345, 0.0404985, -0.3295528),
])
def test_tree_backup_81_with_ode_pass_through(weighting, a_ra, a_rb, v_r):
    parent, values, logp = _tree_81()
    a = tree_backup(torch.tensor(parent), torch.tensor(values), torch.tensor(logp), weighting)
    assert math.isnan(float(a[0]))  # root
    assert close(a[1], v_r)  # ODE link r0 -> R carries V(R)
    assert close(a[2:4], [a_ra, a_rb])
    assert close(a[4:8], LEAF_81)  # leaf-level edges, same under any weighting
    assert close(a[8:12], LEAF_81)  # post-window ODE links pass leaf values through


def test_tree_backup_unequal_depths_and_single_child_sde_link():
    # root -> X (leaf), root -> Y; Y -> Z (single-child SDE link, log-prob -3) -> Z1, Z2
    parent = torch.tensor([-1, 0, 0, 2, 3, 3])
    logp = torch.tensor([NAN, -0.7, -0.2, -3.0, 0.0, math.log(3.0)])
    values = torch.tensor([NAN, 2.0, NAN, NAN, 1.0, 4.0])
    u = tree_backup(parent, values, logp, "uniform")
    assert close(u, [NAN, 2.0, 2.5, 2.5, 1.0, 4.0])
    s = tree_backup(parent, values, logp, "softmax_logprob")
    # softmax([0, ln 3]) = [0.25, 0.75] -> V(Z) = 0.25 + 3 = 3.25, passed through Y -> Z and root -> Y
    assert close(s, [NAN, 2.0, 3.25, 3.25, 1.0, 4.0])


def test_tree_backup_forest_of_two_prompts_in_shuffled_node_order():
    # prompt 0: the k = 2, d = 2 reference tree (12 nodes); prompt 1: root -> X (leaf), root -> Y -> Y1, Y2
    p0, v0, l0 = _tree_81()
    parent = p0 + [-1, 12, 12, 14, 14]
    logp = l0 + [NAN, -0.3, -0.3, 0.0, math.log(3.0)]
    prompt = torch.tensor([0] * 12 + [1] * 5)
    is_leaf = torch.tensor([False] * 8 + [True] * 4 + [False, True, False, True, True])
    raw = torch.tensor([NAN] * 8 + [1.0, 3.0, 2.0, 6.0] + [NAN, 4.0, NAN, 3.0, 8.0])
    # per-prompt population normalisation of the leaf rewards, all prompts in one call
    values = torch.full((17,), NAN)
    values[is_leaf] = group_normalize(raw[is_leaf], prompt[is_leaf], unbiased=False, eps=1e-8)
    # prompt 1 leaves [4, 3, 8]: mean 5, std sqrt(14/3) -> [-0.4629100, -0.9258201, 1.3887301]
    assert close(values[[13, 15, 16]], [-0.4629100, -0.9258201, 1.3887301])
    # shuffle node ids to check the function does not rely on parents preceding children
    perm = torch.randperm(17, generator=torch.Generator().manual_seed(3))
    inv = torch.argsort(perm)
    par = torch.tensor(parent)
    par_s = torch.where(par[perm] >= 0, inv[par[perm].clamp_min(0)], torch.tensor(-1))
    for weighting, v_y in (("uniform", 0.2314550), ("softmax_logprob", 0.8100926)):
        a = tree_backup(par_s, values[perm], torch.tensor(logp)[perm], weighting)[inv]
        assert close(a[13:17], [-0.4629100, v_y, -0.9258201, 1.3887301])
        assert close(a[4:8], LEAF_81)
    assert close(tree_backup(par_s, values[perm], torch.tensor(logp)[perm], "softmax_logprob")[inv][2:4],
                 [-0.7815345, 0.0404985])


def test_tree_backup_chain_forest_broadcasts_leaf_values():
    # two 3-step chains: every edge carries its leaf's value (what chain algorithms do)
    parent = torch.tensor([-1, -1, 0, 1, 2, 3, 4, 5])
    values = torch.tensor([NAN] * 6 + [0.5, -0.5])
    a = tree_backup(parent, values, torch.full((8,), -1.0), "softmax_logprob")
    assert close(a, [NAN, NAN, 0.5, -0.5, 0.5, -0.5, 0.5, -0.5])


def test_tree_backup_errors():
    parent = torch.tensor([-1, 0, 0])
    with pytest.raises(ValueError, match="weighting"):
        tree_backup(parent, torch.zeros(3), torch.zeros(3), "mean")
    with pytest.raises(ValueError, match="log-prob"):
        tree_backup(parent, torch.tensor([NAN, 1.0, 2.0]), torch.tensor([NAN, NAN, -1.0]), "softmax_logprob")
    with pytest.raises(ValueError, match="entries"):
        tree_backup(parent, torch.zeros(2), torch.zeros(3), "uniform")


def test_node_depth():
    assert node_depth(torch.tensor([-1, 0, 1, 1, -1, 4])).tolist() == [0, 1, 2, 2, 0, 1]
    with pytest.raises(ValueError, match="cycle"):
        node_depth(torch.tensor([1, 0]))


# ---- PPO surrogate and KL (clip range 1e-4, A = 1.5) ------------------------------------------------------
@pytest.mark.parametrize("delta,loss,has_grad", [
    (0.0, -1.5, True),
    (5e-5, -1.5000750, True),
    (2e-4, -1.50015, False),   # ratio 1.0002 clipped at 1 + eps: no gradient
    (-2e-4, -1.4997000, True),  # unclipped branch is the max: gradient flows
])
def test_ppo_clip_loss_known_answers(delta, loss, has_grad):
    new = torch.tensor([-1.0 + delta], dtype=torch.float64, requires_grad=True)
    t = ppo_clip_loss(new, torch.tensor([-1.0], dtype=torch.float64), torch.tensor([1.5], dtype=torch.float64),
                      clip_range=1e-4, adv_clip_max=5.0)
    assert close(t.loss, [loss], atol=1e-7)
    t.loss.sum().backward()
    assert (abs(float(new.grad)) > 0) == has_grad
    assert bool(t.clipped[0]) == (abs(math.exp(delta) - 1) > 1e-4)


def test_ppo_clip_loss_negative_advantage_and_clamp():
    old = torch.tensor([-1.0, -1.0], dtype=torch.float64)
    new = torch.tensor([-1.0 - 2e-4, -1.0], dtype=torch.float64)
    t = ppo_clip_loss(new, old, torch.tensor([-1.5, 7.0], dtype=torch.float64), clip_range=1e-4, adv_clip_max=5.0)
    # A < 0, ratio 0.9998: max(1.5 * 0.9998, 1.5 * 0.9999) = 1.499850 (clipped); A = 7 clamped to 5
    assert close(t.loss, [1.49985, -5.0], atol=1e-7)


def test_gaussian_mean_kl():
    mean = torch.tensor([[1.0, 2.0], [0.0, 0.0]])
    ref = torch.zeros(2, 2)
    # ((1 + 4) / 2) / (2 * 0.25) = 5 ; 0
    assert close(gaussian_mean_kl(mean, ref, torch.tensor([0.5, 0.5])), [5.0, 0.0])


# ---- chains, windows, step subsets ------------------------------------------------------------------------
def _chain_rollout(trainable_steps=(0, 1, 2)) -> Rollout:
    """Two 3-step chains built level by level (ids: roots 0, 1; level 1: 2, 3; level 2: 4, 5; leaves 6, 7)."""
    T = 3
    parent = torch.tensor([-1, -1, 0, 1, 2, 3, 4, 5])
    level = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    modes = tuple("sde" if i in trainable_steps else "ode" for i in range(T))
    trainable = torch.tensor([False, False] + [modes[int(lv) - 1] == "sde" for lv in level[2:]])
    logp = torch.where(trainable, torch.full((8,), -1.0), torch.full((8,), NAN))
    plan = RolloutPlan(num_steps=T, modes=modes, branch=(1,) * T, trees_per_prompt=2)
    return Rollout(latents=None, parent=parent, level=level, prompt=torch.zeros(8, dtype=torch.long),
                   tree=torch.tensor([0, 1] * 4), logp_old=logp, trainable=trainable, leaves=torch.tensor([6, 7]),
                   images=torch.zeros(2, 3, 4, 4), sigmas=torch.linspace(1, 0, T + 1), timesteps=torch.zeros(T),
                   nfe=0, plan=plan)


def test_chain_edge_advantages_and_step_edges():
    r = _chain_rollout()
    a = chain_edge_advantages(r, torch.tensor([0.5, -2.0]))
    assert close(a, [NAN, NAN, 0.5, -2.0, 0.5, -2.0, 0.5, -2.0])
    assert chain_step_edges(r).tolist() == [[2, 4, 6], [3, 5, 7]]


def test_progressive_window_start():
    seq = [progressive_window_start(i, 25, 1, 3, True) for i in (0, 24, 25, 50, 99, 100, 125)]
    assert seq == [0, 0, 1, 2, 3, 0, 1]
    assert [progressive_window_start(i, 25, 1, 3, False) for i in (99, 100, 1000)] == [3, 3, 3]
    assert [progressive_window_start(i, 1, 2, 5, True) for i in range(5)] == [0, 2, 4, 0, 2]
    assert [progressive_window_start(i, 1, 0, 5, True) for i in range(3)] == [0, 0, 0]
    with pytest.raises(ValueError):
        progressive_window_start(0, 0, 1, 3, True)


def test_random_step_subset():
    s = random_step_subset(50, 6, 4, torch.Generator().manual_seed(0))
    assert s.shape == (50, 4)
    assert all(len(set(row)) == 4 and max(row) < 6 for row in s.tolist())
    assert len({tuple(row) for row in s.tolist()}) > 10  # independent per chain
    assert torch.equal(s, random_step_subset(50, 6, 4, torch.Generator().manual_seed(0)))
    full = random_step_subset(3, 5, 5, torch.Generator().manual_seed(1))
    assert all(sorted(row) == list(range(5)) for row in full.tolist())


# ---- ppo_update on a fake engine (one scalar parameter; exact gradients) ----------------------------------
class _FakePolicy:
    def __init__(self):
        self.theta = torch.nn.Parameter(torch.zeros(()))

    def trainable_parameters(self):
        return [self.theta]


class _FakeEngine:
    """log-prob of edge n = logp_old[n] + theta * c[n]; counts evaluations like the real engine."""

    def __init__(self, policy, rollout, c):
        self.policy, self.c, self.calls, self.nfe_update = policy, c, [], 0

    def logp(self, rollout, nodes, reference=False):
        nodes = torch.as_tensor(nodes)
        self.calls.append(nodes.tolist())
        self.nfe_update += int(torch.unique(rollout.parent[nodes]).numel())
        lp = rollout.logp_old[nodes] + self.policy.theta * self.c[nodes]
        return EdgeEval(log_prob=lp, mean=torch.zeros(len(nodes), 1), std=torch.ones(len(nodes)))


def _tree_rollout() -> Rollout:
    """One k=2, d=2 tree: root 0 -> 1, 2; 1 -> 3, 4; 2 -> 5, 6 (all SDE)."""
    parent = torch.tensor([-1, 0, 0, 1, 1, 2, 2])
    level = torch.tensor([0, 1, 1, 2, 2, 2, 2])
    plan = RolloutPlan(num_steps=2, modes=("sde", "sde"), branch=(2, 2))
    tr = parent >= 0
    return Rollout(latents=None, parent=parent, level=level, prompt=torch.zeros(7, dtype=torch.long),
                   tree=torch.zeros(7, dtype=torch.long), logp_old=torch.where(tr, -1.0, NAN), trainable=tr,
                   leaves=torch.tensor([3, 4, 5, 6]), images=torch.zeros(4, 3, 4, 4), sigmas=torch.linspace(1, 0, 3),
                   timesteps=torch.zeros(2), nfe=0, plan=plan)


@pytest.mark.parametrize("reduction,denom", [("mean", 6.0), ("sum_children", 3.0)])
def test_ppo_update_known_gradient_and_amortised_evaluations(reduction, denom):
    r = _tree_rollout()
    c = torch.tensor([0.0, 1.0, 2.0, 1.0, -1.0, 3.0, 0.5])
    adv = torch.tensor([NAN, 1.0, -1.0, 2.0, 0.5, -3.0, 9.0])  # 9 is clamped to 5
    pol = _FakePolicy()
    eng = _FakeEngine(pol, r, c)
    opt = torch.optim.SGD([pol.theta], lr=1.0)
    edges = torch.tensor([5, 6, 1, 2, 3, 4])
    st = ppo_update(pol, eng, opt, r, edges, adv[edges], train=TrainSpec(micro_batch=64, optimizer_steps=1,
                                                                         max_grad_norm=0.0),
                    clip_range=1e-4, adv_clip_max=5.0, reduction=reduction)
    a = adv.clamp(-5, 5)
    # at theta = 0 the ratio is 1: loss = -sum(A) / denom, d loss / d theta = -sum(A c) / denom
    g = -float((a[1:] * c[1:]).sum()) / denom
    assert close(pol.theta.detach(), -g, atol=1e-6)
    assert close(st.grad_norm, abs(g), atol=1e-6)
    assert close(st.loss, -float(a[1:].sum()) / 6)  # logged loss: mean over edge terms
    assert (st.edges, st.optimizer_steps, st.micro_batches, st.first_ratio) == (6, 1, 1, 1.0)
    assert eng.nfe_update == 3  # one evaluation per distinct parent (0, 1, 2) for its 2 children
    assert eng.calls == [[5, 6, 1, 2, 3, 4]]  # parents in first-appearance order, children together


def test_ppo_update_splits_parents_into_optimizer_steps_and_micro_batches():
    r = _tree_rollout()
    c = torch.ones(7)
    pol = _FakePolicy()
    eng = _FakeEngine(pol, r, c)
    opt = torch.optim.SGD([pol.theta], lr=0.0)
    edges = torch.tensor([3, 4, 5, 6, 1, 2])
    st = ppo_update(pol, eng, opt, r, edges, torch.ones(6), train=TrainSpec(micro_batch=1, optimizer_steps=2),
                    clip_range=1e-4, adv_clip_max=5.0)
    assert st.optimizer_steps == 2 and st.micro_batches == 3 and st.edges == 6
    assert eng.calls == [[3, 4], [5, 6], [1, 2]]  # a parent's children never split across calls
