"""Flow-DPPO, GRPO-Guard and the CPS sampler on the tiny model: Flow-DPPO's closed-form NFE and its calls
in the cost trace, the mask acting after an optimizer step, the anchor sources agreeing, and the Guard /
CPS options running through the updates of flowgrpo, dancegrpo and treegrpo."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from test_algorithms import BATCH, P, SpyEngine, brightness

from bench import config
from bench.engine.rollout import RolloutEngine
from bench.engine.trace import nfe as trace_nfe
from bench.errors import UsageError
from bench.registry import algorithm_class
from bench.run import runner
from bench.types import SamplerSpec, TrainSpec

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = {"flowgrpo": {"group_size": 3}, "dancegrpo": {"group_size": 3}, "treegrpo": {"k": 2, "d": 2},
         "flowdppo": {"group_size": 3, "num_sde_steps": 2}}


def build(name, over=None, *, steps=5, guidance=1.0, sde="flow_grpo", noise=0.7, train=None):
    cls = algorithm_class(name)
    cfg = cls.Config(**{**SMALL.get(name, {}), **(over or {})})
    sp = SamplerSpec(steps=steps, guidance=guidance, noise_level=noise, sde_type=sde)
    return cls(cfg, sp, train or TrainSpec(micro_batch=64, optimizer_steps=1, max_grad_norm=0.0), 0)


def run_update(algo, policy, lr=0.0, iteration=0):
    eng = RolloutEngine(policy, max_micro_batch=64, seed=0)
    roll = eng.run(algo.plan(iteration), BATCH, iteration)
    adv = algo.advantages(BATCH, roll, brightness(roll))
    spy = SpyEngine(eng)
    opt = torch.optim.SGD(policy.trainable_parameters(), lr=lr)
    stats = algo.update(policy, spy, opt, roll, adv)
    return eng, roll, adv, stats, torch.cat(spy.nodes) if spy.nodes else torch.empty(0, dtype=torch.long)


@pytest.fixture
def restore(flow_policy):
    saved = copy.deepcopy(flow_policy.denoiser.state_dict())
    yield flow_policy
    flow_policy.denoiser.load_state_dict(saved)


# ---- Flow-DPPO: closed-form NFE, the trace, the anchor -------------------------------------------------------
@pytest.mark.parametrize("guidance,anchor", [(1.0, "replay"), (3.0, "replay"), (3.0, "rollout")])
def test_flowdppo_nfe_closed_form_and_trace(flow_policy, guidance, anchor):
    c = 2 if guidance > 1 else 1
    G, T, S = 3, 6, 2
    algo = build("flowdppo", {"anchor": anchor}, steps=T, guidance=guidance)
    steps = algo.sde_steps(0)
    assert len(steps) == S and all(0 <= i < T // 2 for i in steps)
    eng, roll, _, st, trained = run_update(algo, flow_policy)
    # rollout: every chain evaluates every step; update: one evaluation with gradients per trained edge, and
    # with the reference's anchor one more without gradients (prepare_segment's replay)
    replay = 1 if anchor == "replay" else 0
    assert eng.nfe_rollout == roll.nfe == P * G * T * c
    assert st.nfe == eng.nfe_update == (1 + replay) * P * G * S * c
    assert st.edges == P * G * S and sorted(set((roll.level[trained] - 1).tolist())) == steps
    calls = eng.recorder.drain()
    upd = [cl for cl in calls if cl.phase == "update" and cl.component == "denoiser"]
    assert sum(cl.rows for cl in upd if cl.grad) == P * G * S * c
    assert sum(cl.rows for cl in upd if not cl.grad) == replay * P * G * S * c
    assert trace_nfe(calls) == eng.nfe_rollout + eng.nfe_update


def test_flowdppo_sde_steps_follow_the_reference_draw():
    import numpy as np

    algo = build("flowdppo", {"num_sde_steps": 3, "sde_range": (0.0, 0.5)}, steps=10)
    for it in (0, 1, 7, 123):
        want = sorted(int(i) for i in np.random.default_rng(it).choice(list(range(5)), size=3, replace=False))
        assert algo.sde_steps(it) == want
        plan = algo.plan(it)
        assert [i for i, m in enumerate(plan.modes) if m == "sde"] == want
        assert plan.info["flowdppo/sde_step_mask"] == sum(2**i for i in want)
    everything = build("flowdppo", {"num_sde_steps": None, "sde_range": (0.2, 0.8)}, steps=10)
    assert everything.sde_steps(5) == [2, 3, 4, 5, 6, 7]


@pytest.mark.parametrize("over,match", [
    ({"num_sde_steps": 4}, "algo.num_sde_steps"),
    ({"sde_range": (0.5, 0.55)}, "algo.sde_range"),
])
def test_flowdppo_rejects_a_pool_that_cannot_hold_its_steps(over, match):
    with pytest.raises(ValueError, match=match.replace(".", r"\.")):
        build("flowdppo", over, steps=6)


@pytest.mark.parametrize("over,key", [({"kl_threshold": 0.0}, "algo.kl_threshold"),
                                      ({"kl_sigma": "exact"}, "algo.kl_sigma"),
                                      ({"anchor": "old"}, "algo.anchor"),
                                      ({"sde_range": (0.6, 0.2)}, "algo.sde_range"),
                                      ({"num_sde_steps": 0}, "algo.num_sde_steps"),
                                      ({"group_size": 1}, "algo.group_size")])
def test_flowdppo_invalid_config_names_the_key(over, key):
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        algorithm_class("flowdppo").Config(**over)


def test_flowdppo_mask_acts_after_an_optimizer_step(restore):
    train = TrainSpec(micro_batch=64, optimizer_steps=2, max_grad_norm=0.0)
    stats = {}
    for thr in (1e-12, 1e3):
        policy = restore
        saved = copy.deepcopy(policy.denoiser.state_dict())
        algo = build("flowdppo", {"kl_threshold": thr}, train=train)
        _, _, _, st, _ = run_update(algo, policy, lr=0.5)
        policy.denoiser.load_state_dict(saved)
        stats[thr] = st
    tight, loose = stats[1e-12].metrics, stats[1e3].metrics
    # before the first step every ratio is 1 and no KL is positive: nothing masked in the first mini-batch;
    # after it, a tiny threshold masks the edges that keep moving along their advantage, a huge one none
    assert loose["flowdppo/masked_frac"] == 0.0 and loose["flowdppo/kl_high_frac"] == 0.0
    assert 0.0 < tight["flowdppo/masked_frac"] <= tight["flowdppo/kl_high_frac"] <= 0.5 + 1e-9
    assert tight["flowdppo/kl_mean"] > 0 and stats[1e-12].clip_frac == tight["flowdppo/masked_frac"]
    assert abs(stats[1e-12].first_ratio - 1.0) < 1e-5


def test_flowdppo_anchor_replay_equals_the_rollout_means(restore):
    train = TrainSpec(micro_batch=64, optimizer_steps=2, max_grad_norm=0.0)
    out = {}
    for anchor in ("replay", "rollout"):
        saved = copy.deepcopy(restore.denoiser.state_dict())
        _, _, _, st, _ = run_update(build("flowdppo", {"anchor": anchor, "kl_threshold": 1e-9}, train=train),
                                    restore, lr=0.5)
        restore.denoiser.load_state_dict(saved)
        out[anchor] = st
    a, b = out["replay"], out["rollout"]
    assert a.nfe == 2 * b.nfe
    assert a.loss == pytest.approx(b.loss, rel=1e-4, abs=1e-7)
    assert a.metrics["flowdppo/kl_mean"] == pytest.approx(b.metrics["flowdppo/kl_mean"], rel=1e-3)
    assert a.metrics["flowdppo/masked_frac"] == b.metrics["flowdppo/masked_frac"]


# ---- GRPO-Guard and CPS through the updates of the SDE policy-gradient methods -----------------------------
CASES = [(name, opt) for name in ("flowgrpo", "dancegrpo", "treegrpo") for opt in ("guard", "cps")]


@pytest.mark.parametrize("name,option", CASES)
def test_guard_and_cps_move_logp_along_the_advantage(restore, name, option):
    over = {"clip_range": 10.0, **({"guard": True} if option == "guard" else {})}
    algo = build(name, over, steps=4, sde="cps" if option == "cps" else "flow_grpo", noise=0.8 if option == "cps" else 0.7)
    plan = algo.plan(0)
    assert plan.keep_means == (option == "guard") and plan.sde_type == ("cps" if option == "cps" else "flow_grpo")
    eng, roll, adv, st, trained = run_update(algo, restore, lr=0.05)
    assert abs(st.first_ratio - 1.0) < 1e-5 and st.edges == trained.numel() > 0
    with torch.no_grad():
        delta = eng.logp(roll, trained).log_prob - roll.logp_old[trained]
    a = adv.edge[trained].clamp(-5, 5)
    assert float((a * delta).sum()) > 0


def test_guard_reweights_each_term_by_the_step_size(restore):
    from algorithms.common import step_dsigma

    plain = run_update(build("flowgrpo", steps=4), restore)[3]
    _, roll, adv, guard, trained = run_update(build("flowgrpo", {"guard": True}, steps=4), restore)
    assert guard.edges == plain.edges and guard.nfe == plain.nfe
    # at the rollout's weights the normalised ratio is exactly 1, so each term is -A / (sigma_i - sigma_{i+1})
    a = adv.edge[trained].clamp(-5, 5).double()
    want = float((-a / step_dsigma(roll, trained).double()).mean())
    assert guard.loss == pytest.approx(want, rel=1e-5, abs=1e-7)
    assert guard.first_ratio == 1.0


def _cfg(tmp_path, algo, name, **sets):
    base = {"sampler.steps": 4, "run.progress": False, "eval.every": 0, "eval.at_start": False,
            "train.prompts_per_iteration": 2, "train.lr": 1e-4, **sets}
    return config.resolve(base, flags={"algo.name": algo, "model.name": "tiny-random", "budget": "2it",
                                       "out": str(tmp_path / name)})


@pytest.mark.parametrize("algo,sets", [
    ("flowgrpo", {"algo.group_size": 2, "sampler.sde": "cps", "algo.guard": False}),
    ("treegrpo", {"algo.k": 2, "algo.d": 2, "algo.guard": True}),
])
def test_options_through_the_runner(tmp_path, algo, sets):
    s = runner.run(_cfg(tmp_path, algo, "run", **sets))
    recs = [json.loads(line) for line in (s.out_dir / "iterations.jsonl").read_text().splitlines()]
    assert s.iterations == 2 and all(abs(r["first_ratio"] - 1.0) < 1e-4 for r in recs)
    manifest = json.loads((s.out_dir / "manifest.json").read_text())
    assert manifest["config"]["sampler"]["sde"] == sets.get("sampler.sde", "flow_grpo")
    assert manifest["config"]["algo"]["guard"] is sets["algo.guard"]


def test_guard_with_cps_or_a_bad_sde_is_a_usage_error(tmp_path):
    with pytest.raises(UsageError, match="sampler.sde"):
        _cfg(tmp_path, "flowgrpo", "bad", **{"sampler.sde": "ddim"})
    with pytest.raises(NotImplementedError, match=r"algo\.guard"):
        runner.run(_cfg(tmp_path, "dancegrpo", "guard_cps", **{"algo.guard": True, "sampler.sde": "cps"}))
