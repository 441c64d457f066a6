"""The EMA of the trained weights (Flow-GRPO, DiffusionNFT, AWM and ReFL ``algo.ema``): its decay schedule, its
updates against a transcription of the reference trainers' ``EMAModuleWrapper`` loops
(``tests/parity_reference.py::ema_wrapper_epoch``, ``ema_wrapper_after_epoch``), evaluation with it, and
exact resume."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from parity_reference import ema_wrapper_after_epoch, ema_wrapper_epoch
from test_algorithms import BATCH, brightness, make

from algorithms.common import EMA_SNAPSHOT, ema_decay, ema_model_decay, ema_schedule
from bench.cli import main
from bench.engine.rollout import RolloutEngine
from bench.rundir import checkpoint
from bench.types import TrainSpec

pytestmark = pytest.mark.usefixtures("one_thread")


def _same(got, expected):
    assert [k for k, _ in got] == [k for k, _ in expected]
    assert [d for _, d in got] == pytest.approx([d for _, d in expected], rel=1e-12)


def test_ema_decay_and_schedule_known_answers():
    # EMAModuleWrapper.get_current_decay: min((1 + s) / (10 + s), decay)
    assert ema_decay(0, 0.9) == pytest.approx(0.1) and ema_decay(5, 0.9) == pytest.approx(6 / 15)
    assert ema_decay(80, 0.9) == 0.9 and ema_decay(200, 0.9) == 0.9
    # DiffusionNFT: a call after every optimizer step, interval 1: steps 1..3 of a run
    _same(ema_schedule(0, 3, 1, 1, 0.9), [(1, 2 / 11), (2, 3 / 12), (3, 4 / 13)])
    # train_sd3.py with GA 2 (a call per batch) and interval 8, 2 steps after 6 earlier ones: the calls see
    # global_step 6, 7, 7, 8; 7 qualifies twice, both after the update's first step
    _same(ema_schedule(6, 2, 2, 8, 0.9), [(1, 8 / 17), (1, 8 / 17)])
    # the first call of an update, before any of its steps (k = 0), when the count already qualifies
    _same(ema_schedule(7, 1, 2, 8, 0.9), [(0, 8 / 17)])
    assert ema_schedule(0, 4, 1, 8, 0.9) == []
    with pytest.raises(ValueError):
        ema_schedule(0, 1, 0, 1, 0.9)


@pytest.mark.parametrize("over,key", [({"ema_decay": 1.5}, "algo.ema_decay"), ({"ema_interval": 0}, "algo.ema_interval"),
                                      ({"ema_calls_per_step": 0}, "algo.ema_calls_per_step")])
def test_flowgrpo_ema_settings_are_checked(over, key):
    from algorithms.flowgrpo import FlowGRPOConfig

    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        FlowGRPOConfig(ema=True, **over)


def _flat(policy):
    return torch.cat([p.detach().reshape(-1).double() for p in policy.trainable_parameters()]).numpy()


def _train(algo, policy, iterations, steps, reward=None):
    """``iterations`` plan -> rollout -> update cycles on one engine (snapshots persist), SGD lr 0.05; returns
    the engine and, per iteration, the flat trainable weights at its start and after each optimizer step.
    ``reward``: the differentiable reward a direct-gradient algorithm back-propagates."""
    eng = RolloutEngine(policy, max_micro_batch=64, seed=0)
    if reward is not None:
        eng.attach_reward(reward)
    eng.snapshots.declare(algo)
    opt = torch.optim.SGD(policy.trainable_parameters(), lr=0.05)
    step, per_iter = opt.step, []

    def recorded(*a, **kw):
        out = step(*a, **kw)
        per_iter[-1].append(_flat(policy))
        return out
    opt.step = recorded
    for it in range(iterations):
        per_iter.append([_flat(policy)])
        roll = eng.run(algo.plan(it), BATCH, it)
        st = algo.update(policy, eng, opt, roll, algo.advantages(BATCH, roll, brightness(roll)))
        assert st.optimizer_steps == steps
    return eng, per_iter


def _ema(eng):
    names = list(eng.snapshots.params)
    sd = eng.snapshots.state_dict()
    return torch.cat([sd[f"snapshot/{EMA_SNAPSHOT}/{n}"].reshape(-1).double() for n in names]).numpy()


@pytest.mark.parametrize("calls,interval", [(2, 2), (1, 1), (3, 4)])
def test_flowgrpo_ema_follows_the_reference_loop(flow_policy, calls, interval):
    algo = make("flowgrpo", {"group_size": 2, "ema": True, "ema_calls_per_step": calls, "ema_interval": interval},
                steps=3, train=TrainSpec(micro_batch=64, optimizer_steps=2, max_grad_norm=0.0))
    assert algo.snapshots == (EMA_SNAPSHOT,) and algo.eval_weights == EMA_SNAPSHOT
    eng, per_iter = _train(algo, flow_policy, 3, 2)
    ema, g = per_iter[0][0], 0
    for thetas in per_iter:
        ema, g = ema_wrapper_epoch(ema, thetas, g, calls, interval, 0.9)
    assert g == algo.optimizer_steps_total == 6 and algo.state_dict()["optimizer_steps_total"] == 6
    got = _ema(eng)
    assert not np.allclose(got, per_iter[0][0]) and not np.allclose(got, per_iter[-1][-1])  # it moved, it lags
    scale = float(np.abs(ema).max())
    np.testing.assert_allclose(got, ema, rtol=0, atol=64 * 2.0**-24 * scale)


def test_diffusionnft_ema_follows_the_reference_loop(flow_policy):
    algo = make("diffusionnft", {"group_size": 2, "ema": True, "kl_beta": 0.0}, steps=3,
                train=TrainSpec(micro_batch=64, optimizer_steps=2, max_grad_norm=0.0))
    assert set(algo.snapshots) == {"old", EMA_SNAPSHOT} and algo.eval_weights == EMA_SNAPSHOT
    eng, per_iter = _train(algo, flow_policy, 2, 2)
    ema, g = per_iter[0][0], 0
    for thetas in per_iter:
        ema, g = ema_wrapper_epoch(ema, thetas, g, 1, 1, 0.9)
    got = _ema(eng)
    assert not np.allclose(got, per_iter[-1][-1])
    np.testing.assert_allclose(got, ema, rtol=0, atol=64 * 2.0**-24 * float(np.abs(ema).max()))


@pytest.mark.parametrize("interval", [1, 3])  # 3: updates only at g = 2 (of 2, 4, 6)
def test_awm_ema_follows_the_reference_loop(flow_policy, interval):
    # train_sd3_awm.py: one ema.step after each epoch's optimizer steps, at the step count after them
    algo = make("awm", {"group_size": 2, "ema": True, "ema_interval": interval, "beta": 0.0, "ema_beta": 0.0,
                        "train_timesteps": 2}, steps=3, train=TrainSpec(micro_batch=64, optimizer_steps=2,
                                                                        max_grad_norm=0.0))
    assert algo.snapshots == (EMA_SNAPSHOT,) and algo.eval_weights == EMA_SNAPSHOT
    eng, per_iter = _train(algo, flow_policy, 3, 2)
    ema, g = per_iter[0][0], 0
    for thetas in per_iter:
        ema, g = ema_wrapper_after_epoch(ema, thetas, g, interval, 0.99)
    assert g == algo.optimizer_steps_total == 6
    got = _ema(eng)
    assert not np.allclose(got, per_iter[0][0]) and not np.allclose(got, per_iter[-1][-1])  # it moved, it lags
    np.testing.assert_allclose(got, ema, rtol=0, atol=64 * 2.0**-24 * float(np.abs(ema).max()))


def test_awm_ema_known_decays_and_presets():
    # after epochs of 2 steps at interval 1: g = 2, 4, 6 -> d = 3/12, 5/14, 7/16 (the 0.99 cap is far)
    from parity_reference import ema_wrapper_after_epoch as ref

    e, g = ref([0.0], [[0.0], [0.5], [1.0]], 0, 1, 0.99)
    assert g == 2 and e[0] == pytest.approx(1 - 3 / 12)
    from bench.registry import algorithm_class

    for name, preset in algorithm_class("awm").PRESETS.items():  # every released recipe: train.ema, 0.99, 1
        assert (preset["algo.ema"], preset["algo.ema_decay"], preset["algo.ema_interval"]) == (True, 0.99, 1), name
    plain = make("awm", {"group_size": 2})
    assert (plain.eval_weights, EMA_SNAPSHOT in plain.snapshots) == ("current", False)
    with pytest.raises(ValueError, match=r"algo\.ema_interval"):
        make("awm", {"group_size": 2, "ema": True, "ema_interval": 0})


def test_ema_model_decay_known_answers():
    # diffusers EMAModel.get_decay at its defaults, for the n-th step call: 0, then min((1 + m) / (10 + m), cap)
    # with m = n - 1
    assert ema_model_decay(1, 0.9999) == 0.0 and ema_model_decay(2, 0.9999) == pytest.approx(2 / 11)
    assert ema_model_decay(5, 0.9999) == pytest.approx(5 / 14) and ema_model_decay(10**6, 0.9999) == 0.9999


def test_refl_ema_is_diffusers_ema_model(flow_policy):
    """ReFL's --use_ema: diffusers' own EMAModel, stepped after every optimizer step, gives the snapshot."""
    from diffusers.training_utils import EMAModel
    from test_awm_refl import Brightness

    algo = make("refl", {"group_size": 2, "ema": True, "loss": "negative", "loss_scale": 1.0, "stop_steps": [-1, -1]},
                steps=3, train=TrainSpec(micro_batch=64, optimizer_steps=2, max_grad_norm=0.0))
    assert algo.snapshots == (EMA_SNAPSHOT,) and algo.eval_weights == EMA_SNAPSHOT
    params = [p.detach().clone() for p in flow_policy.trainable_parameters()]
    eng, per_iter = _train(algo, flow_policy, 2, 2, reward=Brightness())
    assert algo.optimizer_steps_total == 4 and algo.state_dict()["optimizer_steps_total"] == 4
    ref = EMAModel([torch.nn.Parameter(p.double()) for p in params])  # the reference's class, decay 0.9999
    for thetas in per_iter:
        for flat in thetas[1:]:  # the weights after each optimizer step
            chunks, i = [], 0
            for p in params:
                chunks.append(torch.nn.Parameter(torch.from_numpy(flat[i:i + p.numel()]).reshape(p.shape)))
                i += p.numel()
            ref.step(chunks)
    want = torch.cat([s.reshape(-1) for s in ref.shadow_params]).numpy()
    got = _ema(eng)
    assert not np.allclose(got, per_iter[-1][-1])  # it lags the weights
    np.testing.assert_allclose(got, want, rtol=0, atol=64 * 2.0**-24 * float(np.abs(want).max()))


ARGS = ["--algo", "flowgrpo", "--model", "tiny-random", "--budget", "3it", "--set", "sampler.steps=3",
        "--set", "algo.group_size=2", "--set", "eval.every=1", "--set", "run.checkpoint_every=1",
        "--set", "run.keep_checkpoints=3", "--set", "train.optimizer_steps=2", "--set", "train.lr=0.01",
        "--set", "algo.ema=true", "--no-progress"]


def _evals(run):
    return [{k: v for k, v in json.loads(line).items() if k.startswith("eval/")}
            for line in (run / "evals.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_flowgrpo_ema_resumes_exactly_and_is_what_evaluation_samples(tmp_path):
    from test_resume import assert_same_run

    ref = tmp_path / "ref"
    sets = ["--set", "algo.ema_interval=1", "--set", "algo.ema_calls_per_step=2"]
    assert main(["run", *ARGS, *sets, "--out", str(ref)]) == 0
    run = tmp_path / "copy"
    shutil.copytree(ref, run)
    for name in ("step_000003", "step_000002"):  # as if killed during iteration 1
        shutil.rmtree(run / "checkpoints" / name)
    assert main(["run", "--resume", str(run), "--no-progress"]) == 0
    assert_same_run(ref, run)  # the evaluations sample with the EMA: they match only if it resumed exactly
    a = checkpoint.load(checkpoint.list_checkpoints(ref)[0]).policy
    b = checkpoint.load(checkpoint.list_checkpoints(run)[0]).policy
    ema_keys = [k for k in a if k.startswith(f"snapshot/{EMA_SNAPSHOT}/")]
    assert ema_keys and all(torch.equal(a[k], b[k]) for k in a)
    # an EMA that never updates (interval beyond the run) stays at the initial weights: every evaluation
    # then equals the one before training, while the trained weights moved
    frozen = tmp_path / "frozen"
    assert main(["run", *ARGS, "--set", "algo.ema_interval=1000", "--out", str(frozen)]) == 0
    ev = _evals(frozen)
    assert len(ev) >= 3 and all(e == ev[0] for e in ev)
    plain = tmp_path / "plain"
    assert main(["run", *ARGS[:-3], "--set", "algo.ema=false", "--no-progress", "--out", str(plain)]) == 0
    assert _evals(plain)[-1] != ev[-1]


@pytest.mark.slow
def test_export_takes_the_ema_when_the_run_kept_one(tmp_path):
    """bench export-lora exports what flow_grpo's save_ckpt writes: the EMA (``--weights trained`` for the
    optimised weights); a run without EMA asked for one is a usage error."""
    from bench.errors import UsageError
    from bench.lora import load_trained_policy

    out = tmp_path / "run"
    assert main(["run", *ARGS[:-1], "--budget", "1it", "--set", "algo.ema_interval=1", "--set", "model.lora_rank=4",
                 "--no-progress", "--out", str(out)]) == 0
    ck = checkpoint.load(checkpoint.list_checkpoints(out)[0]).policy

    def flat(policy):
        return {n: p.detach() for n, p in policy.denoiser.named_parameters() if p.requires_grad}

    auto, trained = flat(load_trained_policy(out)), flat(load_trained_policy(out, weights="trained"))
    assert auto.keys() == trained.keys()
    assert all(torch.equal(auto[n], ck[f"snapshot/{EMA_SNAPSHOT}/{n}"]) for n in auto)
    assert all(torch.equal(trained[n], ck[n]) for n in trained)
    assert any(not torch.equal(auto[n], trained[n]) for n in auto)
    plain = tmp_path / "plain"
    assert main(["run", *ARGS[:-3], "--budget", "1it", "--set", "model.lora_rank=4", "--no-progress",
                 "--out", str(plain)]) == 0
    with pytest.raises(UsageError, match="no EMA"):
        load_trained_policy(plain, weights="ema")
