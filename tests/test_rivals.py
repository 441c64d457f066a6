"""The rival algorithms (Flow-GRPO and Flow-GRPO-Fast) on the tiny flow model: closed-form NFE with and
without CFG (the KL's reference evaluations included), the update's sign, the window schedule and the
configuration errors. Contract and runner smoke tests pick them up from the registry."""

from __future__ import annotations

import copy

import pytest
import torch
from test_algorithms import BATCH, P, SpyEngine, brightness, flow_policy, iterate, make  # noqa: F401 (fixture)

from bench.models import load_policy
from bench.policy import ModelOptions
from bench.rollout import RolloutEngine

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


def test_flowgrpo_update_moves_logp_in_the_direction_of_the_advantage(flow_policy):
    saved = copy.deepcopy(flow_policy.denoiser.state_dict())
    try:
        algo = make("flowgrpo", {"group_size": 3, "clip_range": 10.0, "beta": 0.0}, steps=4)
        eng = RolloutEngine(flow_policy, max_micro_batch=64, seed=0)
        roll = eng.run(algo.plan(0), BATCH, 0)
        adv = algo.advantages(BATCH, roll, brightness(roll))
        spy = SpyEngine(eng)
        algo.update(flow_policy, spy, torch.optim.SGD(flow_policy.trainable_parameters(), lr=0.05), roll, adv)
        trained = torch.cat(spy.nodes)
        with torch.no_grad():
            delta = eng.logp(roll, trained).log_prob - roll.logp_old[trained]
        a = adv.edge[trained].clamp(-5, 5)
        pos, neg = a > 0.1, a < -0.1
        assert pos.any() and neg.any()
        assert float(delta[pos].mean()) > 0 > float(delta[neg].mean())
    finally:
        flow_policy.denoiser.load_state_dict(saved)


@pytest.mark.parametrize("over,key", [
    ({"group_size": 1}, "algo.group_size"),
    ({"timestep_fraction": 0.0}, "algo.timestep_fraction"),
    ({"kl_divisor": "sqrt"}, "algo.kl_divisor"),
    ({"sde_window_size": -1}, "algo.sde_window_size"),
    ({"sde_window_range": (3, 1)}, "algo.sde_window_range"),
    ({"beta": -0.1}, "algo.beta"),
])
def test_flowgrpo_invalid_config_names_the_key(over, key):
    from algorithms.flowgrpo import FlowGRPOConfig

    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        FlowGRPOConfig(**over)


def test_flowgrpo_window_must_fit_and_ema_is_not_implemented():
    with pytest.raises(ValueError, match=r"algo\.sde_window_size"):
        make("flowgrpo", {"sde_window_size": 3}, steps=4)  # range (0, 2) cannot hold 3 steps
    with pytest.raises(ValueError, match=r"algo\.timestep_fraction"):
        make("flowgrpo", {"timestep_fraction": 0.1}, steps=5)
    with pytest.raises(ValueError, match="flow"):
        make("flowgrpo", prediction="epsilon")
    from algorithms.flowgrpo import FlowGRPOConfig

    with pytest.raises(NotImplementedError, match="EMA"):
        FlowGRPOConfig(ema=True)


def test_rivals_cite_their_paper_and_have_paper_presets():
    from bench.registry import algorithm_class

    for name, presets in {"flowgrpo": ("flowgrpo-paper", "flowgrpo-fast")}.items():
        cls = algorithm_class(name)
        doc = __import__(cls.__module__, fromlist=["_"]).__doc__
        assert "arXiv" in doc and "Implementation details" in doc
        assert set(presets) <= set(cls.PRESETS)
    fast = algorithm_class("flowgrpo").PRESETS["flowgrpo-fast"]
    assert fast["algo.sde_window_size"] == 2 and algorithm_class("flowgrpo").PRESETS["flowgrpo-paper"]["algo.beta"] == 0.04
