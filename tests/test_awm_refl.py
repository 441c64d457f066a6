"""AWM and ReFL / DRaFT-K on the tiny models: closed-form NFE per iteration (with and without CFG and the KL
terms), the calls in the cost trace (the run's trace equals ``bench plan``'s), the update's direction, the
EMA policy, exact resume, the reward gradient path and its usage errors. Parity with the reference code is
tests/test_parity_awm_refl.py; contract, smoke and preset tests pick both up from the registry."""

from __future__ import annotations

import json
import math

import pytest
import torch
from test_algorithms import BATCH, P, brightness, iterate, make

from algorithms.awm import ema_decay
from bench import config
from bench.cost.estimate import simulate
from bench.engine.rollout import RolloutEngine
from bench.engine.trace import read_trace
from bench.errors import UsageError
from bench.model.snapshots import PREFIX
from bench.run import runner
from bench.run.records import TIMING_KEYS

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def fresh_policy(flow_policy):
    """The shared tiny flow model, its weights restored after the test (updates here take real steps)."""
    saved = {k: v.clone() for k, v in flow_policy.denoiser.state_dict().items()}
    yield flow_policy
    flow_policy.denoiser.load_state_dict(saved)


class Brightness:
    """The toy reward with its gradient path (rewards/toy.py:Brightness)."""

    name, version, differentiable = "brightness", "1", True

    def score_grad(self, images, prompts, meta):
        return images.float().clamp(0, 1).mean(dim=(1, 2, 3))


# ---- AWM ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("guidance,beta,ema_beta,cfg", [(1.0, 0.0, 0.0, False), (3.0, 1e-4, 0.0, False),
                                                        (1.0, 1e-4, 1.0, False), (3.0, 1e-3, 1.0, True)])
def test_awm_nfe_closed_form(flow_policy, guidance, beta, ema_beta, cfg):
    G, T, K = 3, 5, 4
    algo = make("awm", {"group_size": G, "beta": beta, "ema_beta": ema_beta, "train_timesteps": K, "cfg": cfg},
                steps=T, guidance=guidance)
    c = 2 if guidance > 1 else 1
    assert algo.plan(0).modes == ("dpm2",) * T
    eng, roll, _, st, trained = iterate(algo, flow_policy)
    assert eng.nfe_rollout == roll.nfe == P * G * T * c
    assert trained.numel() == 0  # no log-prob is ever asked for
    # per (image, step): the trained weights (+ initial with beta + EMA with ema_beta), guided only with cfg
    per = 1 + (beta > 0) + (ema_beta > 0)
    assert eng.nfe_update == st.nfe == P * G * K * per * (c if cfg else 1)
    assert st.edges == P * G * K
    assert st.kl == pytest.approx(0.0, abs=1e-12)  # before the first step: trained = initial = EMA weights
    assert st.metrics["awm/ema_kl"] == pytest.approx(0.0, abs=1e-12)
    assert all(math.isnan(v) for v in (st.approx_kl, st.clip_frac, st.first_ratio))  # no sampling log-prob


def test_awm_terms_cover_each_image_with_one_step_per_stratum():
    algo = make("awm", {"group_size": 2, "train_timesteps": 3, "timestep_fraction": 1.0}, steps=6)

    class R:  # the fields ``terms`` reads
        num_leaves, iteration = 4, 3
        plan = algo.plan(0)

    leaves, steps = algo.terms(R)
    assert leaves.numel() == steps.numel() == 4 * 3
    for j in range(4):  # strata [0, 2), [2, 4), [4, 6): one step in each
        s = sorted(steps[leaves == j].tolist())
        assert [v // 2 for v in s] == [0, 1, 2]
    again = algo.terms(R)
    assert torch.equal(again[0], leaves) and torch.equal(again[1], steps)  # pure in the iteration


def test_awm_update_lowers_the_matching_error_of_positive_samples(fresh_policy):
    algo = make("awm", {"group_size": 4, "beta": 0.0, "ema_beta": 0.0, "weighting": "uniform"}, steps=4)
    eng = RolloutEngine(fresh_policy, max_micro_batch=64, seed=0)
    eng.snapshots.declare(algo)
    roll = eng.run(algo.plan(0), BATCH, 0)
    adv = algo.advantages(BATCH, roll, brightness(roll))
    leaves, steps = algo.terms(roll)
    x0 = roll.latents[roll.leaves][leaves]
    t = roll.sigmas[steps].reshape(-1, 1, 1, 1)
    eps = algo.term_noise(roll, torch.arange(leaves.numel()), tuple(x0.shape[1:]))
    xt = (1 - t) * x0 + t * eps
    prompts = roll.leaf_prompts()[leaves]

    def matching_error():
        with torch.no_grad():
            v = eng.predict(roll, xt, steps, prompts).out
        return ((v - (eps - x0)) ** 2).mean(dim=(1, 2, 3))

    before = matching_error()
    algo.update(fresh_policy, eng, torch.optim.SGD(fresh_policy.trainable_parameters(), lr=0.05), roll, adv)
    delta = matching_error() - before
    a = adv.leaf[leaves]
    pos, neg = a > 0.1, a < -0.1
    assert pos.any() and neg.any()
    assert float(delta[pos].mean()) < float(delta[neg].mean())  # positive samples are matched better
    assert float((a * delta).sum()) < 0


def test_awm_ema_policy_trails_the_trained_weights(fresh_policy):
    algo = make("awm", {"group_size": 2, "beta": 0.0, "ema_beta": 1.0, "kl_ema_decay": 0.3}, steps=3)
    eng = RolloutEngine(fresh_policy, max_micro_batch=64, seed=0)
    eng.snapshots.declare(algo)
    assert eng.snapshots.names == ("ema",)
    opt = torch.optim.SGD(fresh_policy.trainable_parameters(), lr=0.05)
    old = {k: v.clone() for k, v in eng.snapshots.state_dict().items()}
    for i in range(2):
        roll = eng.run(algo.plan(i), BATCH, i)
        st = algo.update(fresh_policy, eng, opt, roll, algo.advantages(BATCH, roll, brightness(roll)))
        d = ema_decay(algo.optimizer_steps_total, 0.3, "linear")
        assert d == pytest.approx(0.001 * (i + 1)) == st.metrics["awm/ema_decay"]
        new = eng.snapshots.state_dict()
        for n, p in fresh_policy.named_trainable_parameters().items():
            key = f"{PREFIX}ema/{n}"
            torch.testing.assert_close(new[key], d * old[key] + (1 - d) * p.detach())
        old = {k: v.clone() for k, v in new.items()}
    assert ema_decay(400, 0.3, "linear") == 0.3 and ema_decay(5, 0.3, "constant") == 0.3
    assert algo.state_dict()["optimizer_steps_total"] == 2


def test_awm_invalid_settings_name_the_key():
    for over, key in [({"group_size": 1}, "algo.group_size"), ({"time_type": "uniform"}, "algo.time_type"),
                      ({"weighting": "Uniform"}, "algo.weighting"), ({"kl_weight": "ELBO"}, "algo.kl_weight"),
                      ({"beta": -1.0}, "algo.beta"), ({"train_timesteps": 0}, "algo.train_timesteps"),
                      ({"kl_ema_decay": 1.0}, "algo.kl_ema_decay"), ({"advantage_max": 0.0}, "algo.advantage_max"),
                      ({"solver": "sa"}, "algo.solver"), ({"kl_ema_decay_type": "cosine"}, "algo.kl_ema_decay_type")]:
        with pytest.raises(ValueError, match=key.replace(".", r"\.")):
            make("awm", over)
    with pytest.raises(ValueError, match="algo.timestep_fraction"):  # int(5 * 0.1) = 0: no step to train
        make("awm", {"timestep_fraction": 0.1}, steps=5)
    with pytest.raises(ValueError, match="past the last step"):  # strata of [1, 1): step 1 = sigma 0 at T = 1
        make("awm", {"timestep_fraction": 1.0, "time_type": "discrete_wo_init"}, steps=1)
    with pytest.raises(ValueError, match="flow"):
        make("awm", prediction="epsilon")
    with pytest.raises(ValueError, match=r"algo\.ema_decay"):  # the evaluation EMA: tests/test_ema.py
        make("awm", {"ema": True, "ema_decay": 1.5})


# ---- ReFL / DRaFT-K -------------------------------------------------------------------------------------
@pytest.mark.parametrize("guidance,K,G", [(1.0, 1, 1), (3.0, 1, 2), (1.0, 2, 2), (3.0, 3, 1)])
def test_refl_nfe_closed_form(flow_policy, guidance, K, G):
    T = 5
    algo = make("refl", {"grad_steps": K, "group_size": G}, steps=T, guidance=guidance)
    c = 2 if guidance > 1 else 1
    eng = RolloutEngine(flow_policy, max_micro_batch=64, seed=0)
    eng.attach_reward(Brightness())
    roll = eng.run(algo.plan(0), BATCH, 0)
    st = algo.update(flow_policy, eng, torch.optim.SGD(flow_policy.trainable_parameters(), lr=0.0), roll,
                     algo.advantages(BATCH, roll, brightness(roll)))
    L = P * G
    assert eng.nfe_rollout == roll.nfe == L * T * c
    assert eng.nfe_update == st.nfe == L * K * c  # K gradient steps per image, guided like the rollout
    assert st.edges == L
    calls = eng.recorder.drain()
    assert sum(x.rows for x in calls if x.kind == "reward_backward") == L
    assert sum(x.rows for x in calls if x.kind.startswith("forward_backward")) == L * K * c
    lo, hi = algo.stop_range()
    assert (lo, hi) == (min(3 * T // 4, T - K), T - K)
    assert lo <= st.metrics["refl/stop_step_mean"] <= hi


def test_refl_stop_range_of_the_paper_and_draft():
    assert make("refl", steps=40).stop_range() == (30, 39)  # ReFL: random.randint(30, 39) of 40 steps
    assert make("refl", {"stop_steps": [-2, -2], "grad_steps": 2}, steps=10).stop_range() == (8, 8)
    order, m = make("refl", steps=40).stops(type("R", (), {"num_leaves": 500, "iteration": 0})())
    assert sorted(order.tolist()) == list(range(500)) and set(m.tolist()) == set(range(30, 40))


def test_refl_update_raises_the_reward(fresh_policy):
    """The direct gradient: one step of ascent on brightness brightens the images it trained through."""
    algo = make("refl", {"group_size": 2, "loss": "negative", "loss_scale": 1.0, "stop_steps": [-1, -1],
                         "solver": "ode"}, steps=4)
    eng = RolloutEngine(fresh_policy, max_micro_batch=64, seed=0)
    eng.attach_reward(Brightness())
    roll = eng.run(algo.plan(0), BATCH, 0)
    before = brightness(roll).scores
    opt = torch.optim.SGD(fresh_policy.trainable_parameters(), lr=20.0)
    st = algo.update(fresh_policy, eng, opt, roll, algo.advantages(BATCH, roll, brightness(roll)))
    # DRaFT-1 on an ODE rollout trains the very images the rollout made
    assert st.metrics["refl/trained_reward"] == pytest.approx(float(before.mean()), abs=1e-5)
    after = eng.run(algo.plan(0), BATCH, 0)  # same noise, updated weights
    assert float(brightness(after).scores.mean()) > float(before.mean()) + 1e-4


def test_refl_invalid_settings_name_the_key():
    for over, key in [({"group_size": 0}, "algo.group_size"), ({"stop_steps": [3, 1]}, "algo.stop_steps"),
                      ({"stop_steps": [-1, 2]}, "algo.stop_steps"), ({"grad_steps": 0}, "algo.grad_steps"),
                      ({"solver": "dpm2"}, "algo.solver"), ({"loss": "mse"}, "algo.loss"),
                      ({"loss_scale": 0.0}, "algo.loss_scale")]:
        with pytest.raises(ValueError, match=key.replace(".", r"\.")):
            make("refl", over)
    with pytest.raises(ValueError, match="algo.stop_steps"):
        make("refl", {"stop_steps": [3, 4], "grad_steps": 2}, steps=5)
    with pytest.raises(ValueError, match=r"algo\.ema_decay"):  # the evaluation EMA: tests/test_ema.py
        make("refl", {"ema": True, "ema_decay": -0.5})


def test_engine_refuses_a_reward_without_gradient_path(flow_policy):
    eng = RolloutEngine(flow_policy)
    with pytest.raises(ValueError, match="gradient path"):
        eng.attach_reward(type("R", (), {"name": "r"})())
    roll = eng.run(make("refl", steps=2).plan(0), BATCH, 0)
    with pytest.raises(RuntimeError, match="attach_reward"):
        eng.reward_grad(roll, roll.images, torch.arange(roll.num_leaves))


# ---- through the runner: usage errors, the trace, resume ----------------------------------------------------
def _cfg(out, algo, budget="2it", model="tiny-random", **sets):
    base = {"sampler.steps": 4, "run.progress": False, "eval.every": 0, "eval.at_start": False,
            "train.prompts_per_iteration": 2, "train.lr": 1e-3, "run.trace": True, "run.checkpoint_every": 1,
            **sets}
    return config.resolve(base, flags={"algo.name": algo, "model.name": model, "budget": budget, "out": str(out)})


def test_backward_calls_are_priced_by_their_own_tables():
    from bench.engine import pricing as cost
    from bench.engine.trace import Call

    obj = {"format": cost.FORMAT, "name": "t", "kinds": {
        "reward:brightness": {"points": [{"rows": 1, "seconds": 1.0}]},
        "reward_backward:brightness": {"points": [{"rows": 1, "seconds": 3.0}, {"rows": 4, "seconds": 6.0}]},
        "vae_decode_backward": {"points": [{"rows": 2, "seconds": 5.0}]}}}
    prof = cost.CostProfile.from_json(obj)
    calls = [Call("reward_backward", 2, "update", "brightness", True), Call("vae_decode_backward", 4, "update", "vae",
                                                                            True),
             Call("reward_backward", 2, "update", "shapes_pref", True), Call("reward", 2, "reward", "brightness")]
    priced = cost.price(prof, calls)
    assert priced.phases["update"] == pytest.approx(4.0 + 10.0)  # 3 + (6 - 3) / 3; 5 per 2 rows -> 10
    assert priced.phases["reward"] == pytest.approx(2.0)  # one point: proportional to rows
    assert priced.unpriced == {"reward_backward:shapes_pref": 1}  # never silently free


def test_refl_with_a_reward_without_gradient_is_a_usage_error(tmp_path):
    with pytest.raises(UsageError, match="no gradient path"):
        runner.run(_cfg(tmp_path / "r", "refl", **{"reward.name": "jpeg_compressibility"}))
    assert not (tmp_path / "r").exists()  # refused before the run directory is created
    with pytest.raises(UsageError, match="no gradient path"):  # a z-scored sum depends on the batch split
        runner.run(_cfg(tmp_path / "w", "refl", **{"reward.name": "brightness=1.0", "reward.normalize": "zscore"}))


@pytest.mark.parametrize("algo,model,sets,nfe", [
    # P = 2 prompts, T = 4: AWM rollout P G T, update P G K (1 + [beta > 0] + [ema_beta > 0]), defaults 1e-4, 1
    ("awm", "tiny-random", {"algo.group_size": 2, "algo.train_timesteps": 3}, (2 * 2 * 4, 2 * 2 * 3 * 3)),
    # ReFL rollout P G T, update P G K
    ("refl", "tiny-random", {"algo.group_size": 2, "algo.grad_steps": 2}, (2 * 2 * 4, 2 * 2 * 2)),
    pytest.param("refl", "sd3.5-medium-random-reduced", {"algo.grad_steps": 2, "sampler.steps": 2,
                                                         "train.prompts_per_iteration": 1, "train.micro_batch": 2},
                 (1 * 1 * 2 * 2, 1 * 1 * 2 * 2),  # CFG 4.5: x2 in the rollout and the gradient steps
                 marks=pytest.mark.slow),  # the real SD3.5 classes at CPU size: the VAE decode with gradients
])
def test_run_nfe_is_the_closed_form_and_its_trace_is_bench_plans(tmp_path, algo, model, sets, nfe):
    cfg = _cfg(tmp_path / "run", algo, model=model, **sets)
    s = runner.run(cfg)
    real = [r["calls"] for r in read_trace(s.out_dir) if r["stage"] == "train"]
    assert real == simulate(cfg, 2)
    recs = [json.loads(x) for x in (s.out_dir / "iterations.jsonl").read_text().splitlines()]
    assert all((r["nfe_rollout"], r["nfe_update"]) == nfe for r in recs)
    kinds = {c.kind for c in real[0]}
    if algo == "refl":
        assert "reward_backward" in kinds and recs[0]["trace/reward_backward/rows"] == recs[0]["samples"]
        if model != "tiny-random":  # a latent model decodes with gradients
            assert recs[0]["trace/vae_decode_backward/rows"] == recs[0]["samples"]
    for rec, calls in zip(recs, real):
        assert rec["nfe_rollout"] + rec["nfe_update"] == sum(c.rows for c in calls if c.component == "denoiser")


def _records(run):
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING_KEYS}
            for line in (run / "iterations.jsonl").read_text().splitlines()]


def test_awm_resume_restores_the_snapshots_and_continues_identically(tmp_path):
    sets = {"algo.group_size": 2, "algo.train_timesteps": 2, "sampler.steps": 3}
    ref = runner.run(_cfg(tmp_path / "ref", "awm", "3it", **sets)).out_dir
    part = tmp_path / "part"
    runner.run(_cfg(part, "awm", "2it", **sets))
    resumed = runner.run(_cfg(part, "awm", "3it", **sets), resume=True).out_dir
    assert _records(resumed) == _records(ref)
