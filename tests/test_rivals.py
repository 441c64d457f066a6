"""The rival algorithms (Flow-GRPO, Flow-GRPO-Fast, BranchGRPO) on the tiny flow model: closed-form NFE with and
without CFG (the KL's reference evaluations included), the window schedule, pruning and the configuration
errors. The contract, sign (tests/test_algorithms.py) and runner smoke tests pick them up from the registry."""

from __future__ import annotations

import pytest
import torch
from test_algorithms import P, iterate, make

from bench.model.models import load_policy
from bench.model.policy import ModelOptions

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def lora_policy(tiny_flow_dir):
    """The tiny flow model under LoRA: its base is the frozen reference of the KL term."""
    return load_policy(tiny_flow_dir, options=ModelOptions(lora_rank=4))


@pytest.mark.parametrize("guidance,beta", [(1.0, 0.0), (3.0, 0.0), (1.0, 0.04), (3.0, 0.04)])
def test_nfe_flowgrpo(lora_policy, guidance, beta):
    c = 2 if guidance > 1 else 1
    G, T = 3, 5
    algo = make("flowgrpo", {"group_size": G, "beta": beta}, steps=T, guidance=guidance)
    eng, roll, _, st, trained = iterate(algo, lora_policy)
    n_train = int(T * 0.99)  # the first 4 of 5 steps
    assert algo.plan(0).modes == ("sde",) * T
    assert eng.nfe_rollout == roll.nfe == P * G * T * c
    # one (guided) evaluation per trained edge, and one more of the reference when the KL is on
    assert eng.nfe_update == st.nfe == P * G * n_train * c * (2 if beta > 0 else 1)
    # the spy sees the reference's evaluations too: the same edges a second time when the KL is on
    assert trained.numel() == P * G * n_train * (2 if beta > 0 else 1)
    assert st.edges == torch.unique(trained).numel() == P * G * n_train
    assert int(roll.level[trained].max()) == n_train  # the last step's edge is not trained
    assert st.kl == pytest.approx(0.0, abs=1e-9)  # LoRA starts at its base: policy = reference


@pytest.mark.parametrize("guidance", [1.0, 3.0])
def test_nfe_flowgrpo_fast(flow_policy, guidance):
    c = 2 if guidance > 1 else 1
    G, T, w = 2, 6, 2
    algo = make("flowgrpo", {"group_size": G, "beta": 0.0, "sde_window_size": w}, steps=T, guidance=guidance)
    starts = {int(algo.plan(i).info["flowgrpo/window_start"]) for i in range(40)}
    assert starts == {0, 1}  # uniform over [0, T // 2 - w]
    for it in range(2):
        plan = algo.plan(it)
        s0 = int(plan.info["flowgrpo/window_start"])
        assert plan.modes == tuple("sde" if s0 <= i < s0 + w else "ode" for i in range(T))
        eng, roll, _, st, trained = iterate(algo, flow_policy, iteration=it)
        assert eng.nfe_rollout == P * G * T * c and eng.nfe_update == P * G * w * c
        assert sorted(set((roll.level[trained] - 1).tolist())) == [s0, s0 + 1]


@pytest.mark.parametrize("over,key", [
    ({"group_size": 1}, "algo.group_size"),
    ({"timestep_fraction": 0.0}, "algo.timestep_fraction"),
    ({"kl_divisor": "sqrt"}, "algo.kl_divisor"),
    ({"sde_window_size": -1}, "algo.sde_window_size"),
    ({"sde_window_range": (3, 1)}, "algo.sde_window_range"),
    ({"cfg_grad": "uncond"}, "algo.cfg_grad"),
    ({"beta": -0.1}, "algo.beta"),
])
def test_flowgrpo_invalid_config_names_the_key(over, key):
    from algorithms.flowgrpo import FlowGRPOConfig

    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        FlowGRPOConfig(**over)


def test_flowgrpo_window_must_fit_and_ema_is_off_by_default():
    with pytest.raises(ValueError, match=r"algo\.sde_window_size"):
        make("flowgrpo", {"sde_window_size": 3}, steps=4)  # range (0, 2) cannot hold 3 steps
    with pytest.raises(ValueError, match=r"algo\.timestep_fraction"):
        make("flowgrpo", {"timestep_fraction": 0.1}, steps=5)
    with pytest.raises(ValueError, match="flow"):
        make("flowgrpo", prediction="epsilon")
    plain, ema = make("flowgrpo"), make("flowgrpo", {"ema": True})  # the EMA itself: tests/test_ema.py
    assert (plain.snapshots, plain.eval_weights) == ((), "current")
    assert (ema.snapshots, ema.eval_weights) == (("eval_ema",), "eval_ema")


def test_rivals_cite_their_paper_and_have_paper_presets():
    from bench.registry import algorithm_class

    for name, presets in {"flowgrpo": ("flowgrpo-paper", "flowgrpo-fast"), "branchgrpo": ("branchgrpo-code",)}.items():
        cls = algorithm_class(name)
        doc = __import__(cls.__module__, fromlist=["_"]).__doc__
        assert "arXiv" in doc and "Implementation details" in doc
        assert set(presets) <= set(cls.PRESETS)
    fast = algorithm_class("flowgrpo").PRESETS["flowgrpo-fast"]
    assert fast["algo.sde_window_size"] == 2 and algorithm_class("flowgrpo").PRESETS["flowgrpo-paper"]["algo.beta"] == 0.04
    # config/grpo.py::pickscore_sd3_fast on config/base.py (flow_grpo 54809b5): noise 0.8, clip 1e-5, the
    # base window range (0, 10), CFG 4.5 with both branches differentiated (train_sd3_fast.py), EMA
    got = tuple(fast[k] for k in ("sampler.noise_level", "algo.clip_range", "algo.sde_window_range",
                                  "sampler.guidance", "algo.cfg_grad", "algo.beta", "algo.group_size", "algo.ema"))
    assert got == (0.8, 1e-5, [0, 10], 4.5, "both", 0.0, 24, True)


# ---- BranchGRPO ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("guidance", [1.0, 3.0])
def test_nfe_branchgrpo(flow_policy, guidance):
    c = 2 if guidance > 1 else 1
    T = 5
    algo = make("branchgrpo", {"split_rounds": 2}, steps=T, guidance=guidance)  # splits at 0 and 2
    plan = algo.plan(0)
    assert plan.branch == (2, 1, 2, 1, 1) and plan.modes == ("sde",) * T and plan.trees_per_prompt == 1
    per_tree = 1 + 2 + 2 + 4 + 4  # nodes evaluated at levels 0..T-1
    eng, roll, _, st, trained = iterate(algo, flow_policy)
    edges = 2 + 2 + 4 + 4 + 4
    assert eng.nfe_rollout == P * per_tree * c and roll.num_leaves == P * 4
    # every edge is trained, one (guided) forward per edge (train_one_step_tree), a step every 12 edges
    assert st.edges == trained.numel() == P * edges
    assert eng.nfe_update == P * edges * c and st.optimizer_steps == -(-P * edges // 12)
    shared = make("branchgrpo", {"split_rounds": 2, "update": "shared_parent"}, steps=T, guidance=guidance)
    eng, roll, _, st, trained = iterate(shared, flow_policy)
    # the two children of a split share their parent's evaluation
    assert st.edges == P * edges and eng.nfe_update == P * per_tree * c and st.optimizer_steps == 1


def test_branchgrpo_depth_and_width_pruning(flow_policy):
    T = 5
    algo = make("branchgrpo", {"split_rounds": 2, "depth_pruning": (4, 5)}, steps=T)
    eng, roll, adv, st, trained = iterate(algo, flow_policy)
    assert sorted(set(roll.level[trained].tolist())) == [1, 2, 3]
    assert st.metrics["branchgrpo/pruned_edges"] == P * 8 and st.metrics["branchgrpo/trained_edges"] == P * 8
    slide = make("branchgrpo", {"split_rounds": 2, "depth_pruning": (4, 5), "depth_pruning_slide": True,
                                "depth_pruning_slide_interval": 2}, steps=T)
    # stop depth = the last split point (2): shift by one every 2 iterations, at most 4 - 2 = 2
    assert [sorted(slide.pruned_depths(i)) for i in (0, 1, 2, 4, 100)] == [[4, 5], [4, 5], [3, 4], [2, 3], [2, 3]]
    # width pruning acts on the edges after the last split (steps 3, 4: levels 4, 5): 4 chains x 2 per tree
    per_branch = make("branchgrpo", {"split_rounds": 2, "width_pruning": "per_branch"}, steps=T)
    _, roll, adv, st, trained = iterate(per_branch, flow_policy)
    late = trained[roll.level[trained] >= 4]
    assert late.numel() == P * 4 and trained.numel() - late.numel() == P * 8  # 1 of 2 per chain kept
    for e in late.tolist():  # the kept edge of each chain has the larger advantage of its two
        sib = [n for n in torch.nonzero(roll.leaf_of_node() == roll.leaf_of_node()[e]).flatten().tolist()
               if int(roll.level[n]) in (4, 5)]
        assert float(adv.edge[e]) == max(float(adv.edge[n]) for n in sib)
    glob = make("branchgrpo", {"split_rounds": 2, "width_pruning": "global", "width_pruning_ratio": 0.25}, steps=T)
    _, roll, adv, st, trained = iterate(glob, flow_policy)
    late = trained[roll.level[trained] >= 4]
    all_late = torch.nonzero((roll.level >= 4) & (roll.parent >= 0)).flatten()
    assert late.numel() == int(all_late.numel() * 0.25)  # the best and the worst halves of 25 %
    ranked = sorted(adv.edge[all_late].tolist())
    n = late.numel()
    assert sorted(adv.edge[late].tolist()) == ranked[:n - n // 2] + ranked[len(ranked) - n // 2:]


@pytest.mark.parametrize("over,key", [
    ({"k": 1}, "algo.k"),
    ({"split_rounds": 0}, "algo.split_rounds"),
    ({"split_noise_scale": 0.0}, "algo.split_noise_scale"),
    ({"split_logp": "scaled"}, "algo.split_logp"),
    ({"width_pruning": "mode1"}, "algo.width_pruning"),
    ({"width_pruning_ratio": 0.0}, "algo.width_pruning_ratio"),
    ({"depth_pruning_slide_interval": 0}, "algo.depth_pruning_slide_interval"),
    ({"update": "per_parent"}, "algo.update"),
    ({"grad_accum": 0}, "algo.grad_accum"),
])
def test_branchgrpo_invalid_config_names_the_key(over, key):
    from algorithms.branchgrpo import BranchGRPOConfig

    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        BranchGRPOConfig(**over)


def test_branchgrpo_sampler_checks_and_unimplemented_mix():
    with pytest.raises(ValueError, match=r"algo\.split_points"):
        make("branchgrpo", {"split_points": (0, 5)}, steps=5)
    with pytest.raises(ValueError, match=r"algo\.split_rounds"):
        make("branchgrpo", {"split_rounds": 6}, steps=5)
    from algorithms.branchgrpo import BranchGRPOConfig

    with pytest.raises(NotImplementedError, match="mix"):
        BranchGRPOConfig(mix_ode_sde=True)


def test_split_noise_defaults_leave_other_plans_unchanged(flow_policy):
    from bench.types import RolloutPlan

    plan = make("treegrpo", steps=5).plan(0)
    assert plan.split_noise_scale == 1.0 and plan.split_logp_std == "step"
    with pytest.raises(ValueError, match="split_noise_scale"):
        RolloutPlan(num_steps=1, modes=("sde",), branch=(2,), split_noise_scale=0.0)
