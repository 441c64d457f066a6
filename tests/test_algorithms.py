"""The four benchmarked algorithms on the tiny models: closed-form NFE, log-prob consistency, update
sign, schedules, config validation, state round trips, and contract tests over the registry."""

from __future__ import annotations

import copy
import dataclasses
import inspect
import json
import math

import pytest
import torch

from bench.config import DEFAULTS
from bench.engine import sde
from bench.engine.rollout import RolloutEngine
from bench.model.models import load_policy
from bench.protocols import Algorithm
from bench.registry import ALGORITHMS, algorithm_class
from bench.types import PromptBatch, RewardOutput, RolloutPlan, SamplerSpec, TrainSpec

PAPER_ALGOS = ("ddpo", "dancegrpo", "mixgrpo", "treegrpo")
#: small settings that keep one iteration well under a second on the tiny model
SMALL = {"ddpo": {"group_size": 2}, "dancegrpo": {"group_size": 3},
         "mixgrpo": {"group_size": 3, "window": 2, "shift_interval": 1},
         "treegrpo": {"k": 2, "d": 2}, "flowgrpo": {"group_size": 3},
         "branchgrpo": {"split_rounds": 2}, "diffusionnft": {"group_size": 3},
         "awm": {"group_size": 3, "train_timesteps": 3}, "refl": {"group_size": 2},
         "flowdppo": {"group_size": 3, "num_sde_steps": 2}}
#: algorithms whose update recomputes log-probs (the others declare ``likelihood_free``)
LIKELIHOOD = [n for n in sorted(ALGORITHMS) if not getattr(algorithm_class(n), "likelihood_free", False)]
BATCH = PromptBatch(("a red circle", "a blue square"))
P = len(BATCH)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def eps_policy(tiny_eps_dir):
    return load_policy(tiny_eps_dir)


def make(name, over=None, *, steps=5, guidance=1.0, prediction="flow", noise=None, seed=0, train=None):
    cls = algorithm_class(name)
    cfg = cls.Config(**{**SMALL.get(name, {}), **(over or {})})
    noise = noise if noise is not None else (1.0 if prediction == "epsilon" else 0.7)
    sp = SamplerSpec(steps=steps, guidance=guidance, noise_level=noise, prediction=prediction)
    return cls(cfg, sp, train or TrainSpec(micro_batch=64, optimizer_steps=1, max_grad_norm=0.0), seed)


def brightness(rollout) -> RewardOutput:
    return RewardOutput(rollout.images.mean(dim=(1, 2, 3)))


class SpyEngine:
    """Passes through to the real engine and records the edges the update asks log-probs for."""

    def __init__(self, engine):
        self.engine, self.nodes = engine, []

    def __getattr__(self, name):  # predict, snapshots, ...: the real engine's
        return getattr(self.engine, name)

    def logp(self, rollout, nodes, **kw):
        self.nodes.append(torch.as_tensor(nodes).clone())
        return self.engine.logp(rollout, nodes, **kw)


def iterate(algo, policy, iteration=0, lr=0.0):
    """One plan -> rollout -> advantages -> update cycle; returns (engine, rollout, adv, stats, trained)."""
    eng = RolloutEngine(policy, max_micro_batch=64, seed=0)
    eng.snapshots.declare(algo)
    plan = algo.plan(iteration)
    roll = eng.run(plan, BATCH, iteration)
    adv = algo.advantages(BATCH, roll, brightness(roll))
    spy = SpyEngine(eng)
    opt = torch.optim.SGD(policy.trainable_parameters(), lr=lr)
    stats = algo.update(policy, spy, opt, roll, adv)
    trained = torch.cat(spy.nodes) if spy.nodes else torch.empty(0, dtype=torch.long)
    return eng, roll, adv, stats, trained


# ---- closed-form NFE ---------------------------------------------------------------------------------
@pytest.mark.parametrize("guidance,frac", [(1.0, 1.0), (3.0, 0.6)])
def test_nfe_ddpo(flow_policy, guidance, frac):
    c = 2 if guidance > 1 else 1
    G, T = 2, 5
    algo = make("ddpo", {"timestep_fraction": frac}, steps=T, guidance=guidance)
    eng, roll, _, st, trained = iterate(algo, flow_policy)
    assert eng.nfe_rollout == roll.nfe == P * G * T * c
    assert eng.nfe_update == P * G * int(T * frac) * c  # int(5 * 0.6) = 3 steps per chain
    assert st.edges == trained.numel() == P * G * int(T * frac)
    assert roll.num_leaves == P * G
    per_chain = torch.bincount(roll.tree[trained], minlength=P * G)
    assert per_chain.tolist() == [int(T * frac)] * (P * G)


@pytest.mark.parametrize("guidance", [1.0, 3.0])
def test_nfe_ddpo_on_epsilon_model(eps_policy, guidance):
    c = 2 if guidance > 1 else 1
    algo = make("ddpo", steps=3, guidance=guidance, prediction="epsilon")
    plan = algo.plan(0)
    assert plan.modes == ("sde",) * 3 and plan.noise_level == 1.0 and not plan.shared_noise
    eng, roll, _, st, trained = iterate(algo, eps_policy)
    assert eng.nfe_rollout == P * 2 * 3 * c and eng.nfe_update == P * 2 * 3 * c
    assert bool(torch.isfinite(roll.logp_old[trained]).all())


@pytest.mark.parametrize("guidance", [1.0, 3.0])
def test_nfe_dancegrpo(flow_policy, guidance):
    c = 2 if guidance > 1 else 1
    G, T = 3, 5
    algo = make("dancegrpo", steps=T, guidance=guidance)
    eng, roll, _, st, trained = iterate(algo, flow_policy)
    n_train = int((T - 1) * 0.6)  # 2 of the first 4 steps
    assert eng.nfe_rollout == P * G * T * c
    assert eng.nfe_update == P * G * n_train * c
    assert st.edges == P * G * n_train
    assert int(roll.level[trained].max()) <= T - 1  # the edge into level T (last step) is never trained


@pytest.mark.parametrize("guidance", [1.0, 3.0])
def test_nfe_mixgrpo(flow_policy, guidance):
    c = 2 if guidance > 1 else 1
    G, T = 3, 5
    algo = make("mixgrpo", steps=T, guidance=guidance)  # w = 2, shift every iteration, window ends < T - 2
    for it, (start, size) in enumerate([(0, 2), (1, 2), (2, 1), (0, 2)]):  # roll back after start 2
        plan = algo.plan(it)
        assert (plan.info["mixgrpo/window_start"], plan.info["mixgrpo/window_size"]) == (start, size)
        assert plan.modes == tuple("sde" if start <= i < start + size else "ode" for i in range(T))
    for it, size in ((0, 2), (2, 1)):
        eng, roll, _, st, trained = iterate(algo, flow_policy, iteration=it)
        assert eng.nfe_rollout == P * G * T * c
        assert eng.nfe_update == P * G * size * c and st.edges == P * G * size


@pytest.mark.parametrize("guidance", [1.0, 3.0])
def test_nfe_mixgrpo_flash(flow_policy, guidance):
    c = 2 if guidance > 1 else 1
    G, T = 3, 6
    algo = make("mixgrpo", {"flash": True, "window": 2}, steps=T, guidance=guidance)
    plan = algo.plan(0)
    # window [0, 2): last = 1; num_post = max(int((6 - 1) * 0.4), 2) = 2 -> 1 + 2 = 3 steps
    assert plan.num_steps == 3 and plan.modes == ("sde", "sde", "dpm2")
    eng, roll, _, st, trained = iterate(algo, flow_policy)
    assert eng.nfe_rollout == P * G * 3 * c
    assert eng.nfe_update == P * G * 2 * c
    assert roll.images.shape[0] == P * G and bool(torch.isfinite(roll.images).all())


def _tree_rollout_evals(T, s0, k, d):
    return s0 + sum(k**j for j in range(d)) + (T - s0 - d) * k**d


@pytest.mark.parametrize("guidance", [1.0, 3.0])
def test_nfe_treegrpo(flow_policy, guidance):
    c = 2 if guidance > 1 else 1
    T, k, d = 4, 2, 2
    algo = make("treegrpo", {"trees_per_prompt": 2}, steps=T, guidance=guidance)
    seen = set()
    for it in range(2):
        eng, roll, _, st, trained = iterate(algo, flow_policy, iteration=it)
        s0 = int(roll.plan.info["treegrpo/window_start"])
        seen.add(s0)
        trees = P * 2
        assert eng.nfe_rollout == trees * c * _tree_rollout_evals(T, s0, k, d)
        assert eng.nfe_update == trees * c * (k**d - 1) // (k - 1)
        assert st.edges == trees * k * (k**d - 1) // (k - 1)
        assert roll.num_leaves == trees * k**d
    assert seen <= {0, 1}  # random window ends before the last step: s0 <= T - W - 1


def test_treegrpo_paper_shape_arithmetic():
    # k = 3, d = 3, T = 10: per tree s0 + 13 + (7 - s0) * 27 evaluations (s0 = 3 -> 124), 13 in the update
    algo = make("treegrpo", {"k": 3, "d": 3}, steps=10, guidance=4.5)
    for it in range(5):
        plan = algo.plan(it)
        s0 = int(plan.info["treegrpo/window_start"])
        assert plan.evaluations_per_tree() == _tree_rollout_evals(10, s0, 3, 3)
        assert plan.leaves_per_tree == 27
    assert _tree_rollout_evals(10, 3, 3, 3) == 124 and _tree_rollout_evals(10, 0, 2, 4) == 111


def test_treegrpo_window_longer_than_depth(flow_policy):
    # W = 3, d = 2, k = 2, branching first: SDE levels hold 1, 2, 4 nodes -> 7 update evaluations per tree
    algo = make("treegrpo", {"window": 3}, steps=5)
    eng, roll, adv, st, trained = iterate(algo, flow_policy)
    s0 = int(roll.plan.info["treegrpo/window_start"])
    assert roll.plan.branch[s0:s0 + 3] == (2, 2, 1)
    assert eng.nfe_update == P * 7 and st.edges == P * (2 + 4 + 4)
    last = make("treegrpo", {"window": 3, "branch_at": "last"}, steps=5).plan(0)
    s0 = int(last.info["treegrpo/window_start"])
    assert last.branch[s0:s0 + 3] == (1, 2, 2) and last.modes[s0:s0 + 3] == ("sde",) * 3


# ---- log-probs, advantages, update direction ---------------------------------------------------------
@pytest.mark.parametrize("name", LIKELIHOOD)
def test_logp_equals_logp_old_before_any_update(flow_policy, name):
    algo = make(name, steps=4, guidance=3.0)
    eng = RolloutEngine(flow_policy, max_micro_batch=64, seed=0)
    roll = eng.run(algo.plan(0), BATCH, 0)
    nodes = torch.nonzero(roll.trainable).flatten()
    ev = eng.logp(roll, nodes)
    assert torch.allclose(ev.log_prob.detach(), roll.logp_old[nodes], atol=1e-5)


def test_logp_equals_logp_old_ddpo_epsilon(eps_policy):
    algo = make("ddpo", prediction="epsilon", steps=3)
    eng = RolloutEngine(eps_policy, max_micro_batch=64, seed=0)
    roll = eng.run(algo.plan(0), BATCH, 0)
    nodes = torch.nonzero(roll.trainable).flatten()
    assert torch.allclose(eng.logp(roll, nodes).log_prob.detach(), roll.logp_old[nodes], atol=1e-5)


@pytest.mark.parametrize("name", PAPER_ALGOS)
def test_advantages_are_per_edge_and_finite_on_trained_edges(flow_policy, name):
    algo = make(name, steps=4)
    eng, roll, adv, st, trained = iterate(algo, flow_policy)
    assert adv.edge.shape == (roll.num_nodes,) and adv.leaf.shape == (roll.num_leaves,)
    assert bool(torch.isfinite(adv.edge[trained]).all())
    assert bool(torch.isnan(adv.edge[roll.parent < 0]).all())
    assert bool(roll.trainable[trained].all())
    assert abs(st.first_ratio - 1.0) < 1e-4


@pytest.mark.parametrize("name", LIKELIHOOD)
def test_update_moves_logp_in_the_direction_of_the_advantage(flow_policy, name):
    saved = copy.deepcopy(flow_policy.denoiser.state_dict())
    try:
        # a wide clip range where the algorithm clips, so one step's direction is visible (Flow-DPPO has no clip)
        wide = {"clip_range": 10.0} if "clip_range" in {f.name for f in dataclasses.fields(algorithm_class(name).Config)} else {}
        algo = make(name, wide, steps=4)
        eng = RolloutEngine(flow_policy, max_micro_batch=64, seed=0)
        roll = eng.run(algo.plan(0), BATCH, 0)
        adv = algo.advantages(BATCH, roll, brightness(roll))
        spy = SpyEngine(eng)
        opt = torch.optim.SGD(flow_policy.trainable_parameters(), lr=0.05)
        algo.update(flow_policy, spy, opt, roll, adv)
        trained = torch.cat(spy.nodes)
        with torch.no_grad():
            new = eng.logp(roll, trained).log_prob
        delta = new - roll.logp_old[trained]
        a = adv.edge[trained].clamp(-5, 5)
        pos, neg = a > 0.1, a < -0.1
        assert pos.any() and neg.any()
        assert float((a * delta).sum()) > 0
        assert float(delta[pos].mean()) > 0 > float(delta[neg].mean())
    finally:
        flow_policy.denoiser.load_state_dict(saved)


def test_treegrpo_advantages_match_tree_backup_by_hand(flow_policy):
    # uniform weights: an edge's advantage is the mean normalised reward of the leaves below it
    algo = make("treegrpo", {"weighting": "uniform"})
    eng = RolloutEngine(flow_policy, max_micro_batch=64, seed=0)
    roll = eng.run(algo.plan(0), BATCH, 0)
    rew = brightness(roll)
    adv = algo.advantages(BATCH, roll, rew)
    leaf_of = {int(n): i for i, n in enumerate(roll.leaves)}
    for n in torch.nonzero(roll.trainable).flatten().tolist():
        below = []
        stack = [n]
        while stack:
            u = stack.pop()
            kids = torch.nonzero(roll.parent == u).flatten().tolist()
            if not kids:
                below.append(adv.leaf[leaf_of[u]])
            stack += kids
        assert math.isclose(float(adv.edge[n]), float(torch.stack(below).mean()), abs_tol=1e-5)
    # per-prompt population normalisation over all leaves of the prompt
    for p in range(P):
        m = roll.leaf_prompts() == p
        r = rew.scores[m]
        assert torch.allclose(adv.leaf[m], (r - r.mean()) / (r.std(unbiased=False) + 1e-8), atol=1e-5)


def test_dancegrpo_group_shares_initial_noise_and_uses_unbiased_std(flow_policy):
    algo = make("dancegrpo")
    eng = RolloutEngine(flow_policy, max_micro_batch=64, seed=0)
    roll = eng.run(algo.plan(0), BATCH, 0)
    roots = roll.latents[roll.parent < 0]
    assert torch.equal(roots[0], roots[1]) and torch.equal(roots[0], roots[2]) and not torch.equal(roots[0], roots[3])
    rew = brightness(roll)
    adv = algo.advantages(BATCH, roll, rew)
    r = rew.scores[:3]
    assert torch.allclose(adv.leaf[:3], (r - r.mean()) / (r.std(unbiased=True) + 1e-8), atol=1e-5)


def test_ddpo_state_dict_carries_the_tracker(flow_policy):
    algo = make("ddpo", {"buffer_size": 4, "min_count": 4})
    eng = RolloutEngine(flow_policy, max_micro_batch=64, seed=0)
    roll = eng.run(algo.plan(0), BATCH, 0)
    rew = brightness(roll)
    algo.advantages(BATCH, roll, rew)
    state = json.loads(json.dumps(algo.state_dict()))
    fresh = make("ddpo", {"buffer_size": 4, "min_count": 4})
    fresh.load_state_dict(state)
    a1 = algo.advantages(BATCH, roll, rew)  # second time: buffers hold 4 >= min_count -> per-prompt stats
    a2 = fresh.advantages(BATCH, roll, rew)
    assert torch.equal(a1.leaf, a2.leaf)
    assert a1.metrics["ddpo/tracked_prompt_frac"] == 1.0
    for p in range(P):  # per-prompt buffer = this prompt's 2 rewards twice: population stats of those
        m = roll.leaf_prompts() == p
        r = rew.scores[m]
        assert torch.allclose(a1.leaf[m], (r - r.mean()) / (r.std(unbiased=False) + 1e-6), atol=1e-4)


# ---- schedules -----------------------------------------------------------------------------------------
def test_mixgrpo_default_progressive_schedule_and_state():
    algo = make("mixgrpo", {"group_size": 12, "window": 4, "shift_interval": 25}, steps=10)
    starts = [algo.plan(i).info["mixgrpo/window_start"] for i in (0, 24, 25, 50, 175, 199, 200)]
    assert starts == [0, 0, 1, 2, 7, 7, 0]  # last start T - 3 = 7 (window [7, 8)), then roll back
    assert algo.plan(175).info["mixgrpo/window_size"] == 1
    # plan is pure: planning other iterations first changes nothing, so a resumed run needs no state
    first = algo.plan(60)
    assert (first.info["mixgrpo/window_start"], first.info["mixgrpo/window_size"]) == (2, 4)
    state = json.loads(json.dumps(algo.state_dict()))
    other = make("mixgrpo", {"group_size": 12, "window": 4, "shift_interval": 25}, steps=10)
    other.plan(199)
    other.load_state_dict(state)
    assert other.plan(60) == first and other.plan(61).info == algo.plan(61).info


def test_mixgrpo_flash_schedule_matches_the_paper_example():
    algo = make("mixgrpo", {"flash": True, "window": 4, "shift_interval": 20}, steps=25)
    algo.sampler = dataclasses.replace(algo.sampler, shift=3.0, schedule="linspace")
    plan = algo.plan(0)
    # window [0, 4): 4 SDE steps then int(22 * 0.4) - 1 = 7 DPM-Solver++ steps instead of 21 Euler steps
    assert plan.num_steps == 11 and plan.modes == ("sde",) * 4 + ("dpm2",) * 7
    full = sde.flow_sigmas(25, 3.0)
    assert torch.allclose(torch.tensor(plan.sigmas[:5]), full[:5], atol=1e-6)
    assert plan.sigmas[-1] == 0.0 and all(a > b for a, b in zip(plan.sigmas, plan.sigmas[1:]))
    plan = algo.plan(60)  # window [3, 7): last 6, num_post = int(19 * 0.4) = 7 -> 6 + 7 = 13 steps
    assert plan.modes == ("ode",) * 3 + ("sde",) * 4 + ("dpm2",) * 6


def test_treegrpo_window_modes():
    rnd = make("treegrpo", {"k": 2, "d": 4, "window": 4}, steps=10)
    starts = {rnd.plan(i).info["treegrpo/window_start"] for i in range(40)}
    assert starts <= set(range(6)) and len(starts) >= 4  # T - W - 1 = 5
    assert rnd.plan(7).info == make("treegrpo", {"k": 2, "d": 4, "window": 4}, steps=10).plan(7).info
    assert rnd.plan(7).info != make("treegrpo", {"k": 2, "d": 4, "window": 4}, steps=10, seed=5).plan(7).info \
        or rnd.plan(8).info != make("treegrpo", {"k": 2, "d": 4, "window": 4}, steps=10, seed=5).plan(8).info
    prog = make("treegrpo", {"k": 2, "d": 4, "window": 4, "window_mode": "progressive"}, steps=10)
    assert [prog.plan(i).info["treegrpo/window_start"] for i in (0, 49, 50, 250, 300, 10_000)] == [0, 0, 1, 5, 5, 5]
    plan = prog.plan(0)
    assert plan.modes == ("sde",) * 4 + ("ode",) * 6 and plan.branch == (2,) * 4 + (1,) * 6


# ---- configuration -------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,over,key", [
    ("treegrpo", {"k": 0}, "algo.k"),
    ("treegrpo", {"d": 0}, "algo.d"),
    ("treegrpo", {"d": 4, "window": 3}, "algo.d"),
    ("treegrpo", {"weighting": "mean"}, "algo.weighting"),
    ("treegrpo", {"window_mode": "sliding"}, "algo.window_mode"),
    ("treegrpo", {"k": 1, "d": 2}, "algo.k"),
    ("ddpo", {"timestep_fraction": 0.0}, "algo.timestep_fraction"),
    ("ddpo", {"min_count": 20, "buffer_size": 16}, "algo.min_count"),
    ("dancegrpo", {"group_size": 1}, "algo.group_size"),
    ("dancegrpo", {"timestep_fraction": 1.5}, "algo.timestep_fraction"),
    ("mixgrpo", {"window": 0}, "algo.window"),
    ("mixgrpo", {"sample_strategy": "decay"}, "algo.sample_strategy"),
    ("mixgrpo", {"clip_range": 0.0}, "algo.clip_range"),
])
def test_invalid_config_names_the_key(name, over, key):
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        algorithm_class(name).Config(**over)


@pytest.mark.parametrize("name,over,steps,prediction,key", [
    ("treegrpo", {"k": 2, "d": 2, "window": 6}, 5, "flow", "algo.window"),
    ("treegrpo", {"k": 2, "d": 6}, 5, "flow", "algo.d"),
    ("mixgrpo", {"window": 6}, 5, "flow", "algo.window"),
    ("mixgrpo", {"flash": True}, 5, "epsilon", "algo.flash"),
    ("dancegrpo", {"timestep_fraction": 0.1}, 5, "flow", "algo.timestep_fraction"),
])
def test_invalid_combination_with_the_sampler(name, over, steps, prediction, key):
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        make(name, over, steps=steps, prediction=prediction)


# ---- contract tests over the registry (and an installed plug-in), no per-algorithm branches -------------
CONTRACT = [*sorted(ALGORITHMS), "example_bestofgroup"]  # the last from the example plug-in package


@pytest.mark.parametrize("name", CONTRACT)
def test_contract(name, plugin_installed):
    cls = algorithm_class(name)
    assert cls.name == name
    assert dataclasses.is_dataclass(cls.Config) and cls.Config.__dataclass_params__.frozen
    cfg = cls.Config()
    doc = cls.Config.__doc__ or ""
    for f in dataclasses.fields(cls.Config):
        assert f.default is not dataclasses.MISSING, f"{name}: algo.{f.name} has no default"
        assert f.name in doc, f"{name}: algo.{f.name} is not documented in the Config docstring"
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.__setattr__(dataclasses.fields(cls.Config)[0].name, None)
    sp = SamplerSpec(steps=10, guidance=4.5, noise_level=0.7)
    algo = cls(cfg, sp, TrainSpec(), 0)
    assert isinstance(algo, Algorithm)
    assert list(inspect.signature(cls.update).parameters) == ["self", "policy", "engine", "optimizer", "rollout",
                                                               "adv"]
    plan = algo.plan(3)
    assert isinstance(plan, RolloutPlan)
    fresh = cls(cfg, sp, TrainSpec(), 0)
    assert plan == fresh.plan(3) and dict(plan.info) == dict(fresh.plan(3).info)
    for i in (0, 7, 2):  # plan is pure: planning other iterations first changes nothing
        algo.plan(i)
    assert algo.plan(3) == plan
    # every key it logs is its own (namespaced by its name) and declared with a meaning
    assert set(plan.info) <= set(cls.log_keys) and all(k.startswith(f"{name}/") for k in cls.log_keys)
    assert all(isinstance(v, str) and v for v in cls.log_keys.values())
    # its search space names its own settings and its default is part of it
    fields = {f.name for f in dataclasses.fields(cls.Config)}
    assert set(cls.search_space) <= fields and cls.search_default and set(cls.search_default) <= set(cls.search_space)
    state = json.loads(json.dumps(algo.state_dict()))
    other = cls(cfg, sp, TrainSpec(), 0)
    other.load_state_dict(state)
    assert json.loads(json.dumps(other.state_dict())) == state


@pytest.mark.parametrize("name", PAPER_ALGOS)
def test_paper_algorithms_cite_their_paper(name):
    mod = __import__(algorithm_class(name).__module__, fromlist=["_"])
    assert mod.__doc__ and "arXiv" in mod.__doc__ and "Implementation details" in mod.__doc__


@pytest.mark.parametrize("name", sorted(ALGORITHMS))
def test_presets_are_valid_overrides(name):
    cls = algorithm_class(name)
    fields = {f.name for f in dataclasses.fields(cls.Config)}
    for preset, over in getattr(cls, "PRESETS", {}).items():
        algo_over = {}
        for key, value in over.items():
            section, _, leaf = key.partition(".")
            if section == "algo":
                assert leaf in fields, f"{name} preset {preset}: unknown {key}"
                algo_over[leaf] = value
            else:
                assert section in DEFAULTS and leaf in DEFAULTS[section], f"{name} preset {preset}: unknown {key}"
        cfg = cls.Config(**algo_over)
        sp = SamplerSpec(steps=int(over.get("sampler.steps", 10)), guidance=float(over.get("sampler.guidance", 1.0)),
                         noise_level=float(over.get("sampler.noise_level", 0.7)),
                         sde_type=over.get("sampler.sde", "flow_grpo"), shift=float(over.get("sampler.shift", 1.0)))
        plan = cls(cfg, sp, TrainSpec(), 0).plan(0)
        assert plan.num_steps >= 1


def test_required_presets_exist():
    tree = algorithm_class("treegrpo").PRESETS
    for k, v in {"sampler.steps": 10, "sampler.guidance": 4.5, "sampler.noise_level": 0.7, "algo.k": 3,
                 "algo.d": 3}.items():
        assert tree["treegrpo-paper"][k] == v
    for k, v in {"algo.k": 2, "algo.d": 4, "algo.window": 4, "algo.window_mode": "progressive",
                 "algo.weighting": "uniform"}.items():
        assert tree["treegrpo-code"][k] == v
    assert algorithm_class("mixgrpo").PRESETS["mixgrpo-flash"]["algo.flash"] is True
    assert "mixgrpo-paper" in algorithm_class("mixgrpo").PRESETS
    assert "dancegrpo-paper" in algorithm_class("dancegrpo").PRESETS
    assert "ddpo-paper" in algorithm_class("ddpo").PRESETS


def test_mixgrpo_advantage_aggr_normalises_each_component(flow_policy):
    algo = make("mixgrpo", {"multi_reward": "advantage_aggr"})
    eng = RolloutEngine(flow_policy, max_micro_batch=64, seed=0)
    roll = eng.run(algo.plan(0), BATCH, 0)
    g = torch.tensor([1.0, 3.0, 2.0, 6.0, 0.0, 1.0])
    h = torch.tensor([2.0, 1.0, 3.0, 0.3, 0.5, 0.5])
    adv = algo.advantages(BATCH, roll, RewardOutput(g + h, {"a": g, "b": h}, {"a": 1.0, "b": 1.0}))
    # prompt 0 = leaves 0..2: a -> [-1, 1, 0], b -> [0, -1, 1] (unbiased std 1 each) -> mean of the two
    assert torch.allclose(adv.leaf[:3], torch.tensor([-0.5, 0.0, 0.5]), atol=1e-5)
    # the user's weights, normalised to sum 1 (MixGRPO reward_weights / total): 3:1 -> 0.75 a + 0.25 b
    w31 = algo.advantages(BATCH, roll, RewardOutput(3 * g + h, {"a": g, "b": h}, {"a": 3.0, "b": 1.0}))
    assert torch.allclose(w31.leaf[:3], torch.tensor([-0.75, 0.5, 0.25]), atol=1e-5)
    # a part's own diagnostics ("a/sub") carry no weight and are not a third reward model
    sub = algo.advantages(BATCH, roll, RewardOutput(g + h, {"a": g, "b": h, "a/sub": -g}, {"a": 1.0, "b": 1.0}))
    assert torch.allclose(sub.leaf, adv.leaf, atol=1e-6)
    with pytest.raises(ValueError, match="weights"):
        algo.advantages(BATCH, roll, RewardOutput(g + h, {"a": g, "b": h}))


def test_ddpo_without_stat_tracking_normalises_the_batch(flow_policy):
    algo = make("ddpo", {"per_prompt_stat_tracking": False})
    eng = RolloutEngine(flow_policy, max_micro_batch=64, seed=0)
    roll = eng.run(algo.plan(0), BATCH, 0)
    r = torch.tensor([1.0, 3.0, 2.0, 6.0])
    adv = algo.advantages(BATCH, roll, RewardOutput(r))
    # ddpo-pytorch scripts/train.py normalises a numpy array: population std (ddof = 0) + 1e-8
    assert torch.allclose(adv.leaf, torch.tensor([-1.0690450, 0.0, -0.5345225, 1.6035675]), atol=1e-5)
    assert algo.state_dict()["tracker"]["buffers"] == {}


def test_treegrpo_softmax_weight_diagnostic(flow_policy):
    algo = make("treegrpo")
    eng = RolloutEngine(flow_policy, max_micro_batch=64, seed=0)
    roll = eng.run(algo.plan(0), BATCH, 0)
    w = algo.advantages(BATCH, roll, brightness(roll)).metrics["treegrpo/softmax_weight_max"]
    assert 0.5 <= w <= 1.0  # k = 2: between uniform and one-hot
    kids = roll.children()
    maxima = [float(torch.softmax(roll.logp_old[torch.tensor(c)].double(), 0).max()) for c in kids if len(c) > 1]
    assert len(maxima) == P * 3 and math.isclose(w, sum(maxima) / len(maxima), rel_tol=1e-9)
