"""Faults: NaN/inf (stop or skip, weights never updated with it), reward exceptions (prompts saved),
out-of-memory (micro-batch advice), a reward's missing weights (usage error, exit 2)."""

import dataclasses
import json

import pytest
import torch

from bench.cli import main
from bench.engine.rollout import RolloutEngine
from bench.errors import MissingWeightsError
from bench.run import runner, scoring
from bench.rundir import checkpoint
from bench.types import RewardOutput

BASE = ["run", "--algo", "grpo", "--model", "tiny-random", "--budget", "3it", "--set", "sampler.steps=3",
        "--set", "algo.group_size=2", "--set", "eval.every=0", "--set", "eval.at_start=false",
        "--set", "run.checkpoint_every=1", "--set", "run.keep_checkpoints=3", "--no-progress"]


class Faulty:
    """Brightness, except on call number ``fail_call``: NaN scores, an exception, or missing weights."""

    name = "brightness"
    version = "1"

    def __init__(self, fail_call, mode):
        from rewards.toy import Brightness

        self.inner, self.fail_call, self.mode, self.calls = Brightness(), fail_call, mode, 0

    def __call__(self, images, prompts, meta=None):
        self.calls += 1
        out = self.inner(images, prompts, meta)
        if self.calls == self.fail_call:
            if self.mode == "nan":
                return RewardOutput(out.scores * float("nan"))
            if self.mode == "missing":
                raise MissingWeightsError("brightness weights not found: looked in $TREEBENCH_WEIGHTS/brightness")
            raise RuntimeError("scorer exploded")
        return out


def _use_reward(monkeypatch, fail_call, mode):
    monkeypatch.setattr(scoring, "build_reward", lambda spec, device, options, normalize="none": Faulty(fail_call, mode))


def _records(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_nan_reward_stops_with_nonfinite_and_last_checkpoint_stays_valid(tmp_path, monkeypatch, capsys):
    _use_reward(monkeypatch, 2, "nan")  # iteration 1
    out = tmp_path / "nan"
    assert main([*BASE, "--out", str(out)]) == 1
    assert "NaN/inf in the rewards of iteration 1" in capsys.readouterr().err
    recs = _records(out / "iterations.jsonl")
    assert [r["iteration"] for r in recs] == [0, 1]
    assert recs[1]["nonfinite"] == "reward" and recs[1]["reward_mean"] is None and "nonfinite" not in recs[0]
    final = json.loads((out / "final.json").read_text())
    assert final["stop_reason"] == "nonfinite" and final["iterations"] == 2
    assert [p.name for p in checkpoint.list_checkpoints(out)] == ["step_000001"]  # nothing after the NaN
    ck = checkpoint.load(out / "checkpoints" / "step_000001")
    assert all(bool(torch.isfinite(t).all()) for t in ck.policy.values())


def test_nan_gradient_is_never_applied_and_skip_continues(tmp_path, monkeypatch):
    from algorithms.grpo import GRPO

    orig = GRPO.update

    def poisoned(self, policy, engine, optimizer, rollout, adv):
        if rollout.iteration != 1:
            return orig(self, policy, engine, optimizer, rollout, adv)
        h = policy.trainable_parameters()[0].register_hook(lambda g: torch.full_like(g, float("inf")))
        try:
            return orig(self, policy, engine, optimizer, rollout, adv)
        finally:
            h.remove()

    monkeypatch.setattr(GRPO, "update", poisoned)
    out = tmp_path / "skip"
    assert main([*BASE, "--set", "run.on_nonfinite=skip", "--out", str(out)]) == 0
    recs = _records(out / "iterations.jsonl")
    assert [r.get("nonfinite") for r in recs] == [None, "grad", None]
    assert recs[1]["loss"] is None and recs[1]["optimizer_steps"] == 0 and recs[2]["optimizer_steps"] == 1
    cks = {p.name: checkpoint.load(p) for p in checkpoint.list_checkpoints(out)}
    one, two, three = (cks[f"step_00000{i}"] for i in (1, 2, 3))
    for n in one.policy:  # iteration 1 changed nothing (weights and Adam state), iteration 2 trained
        assert torch.equal(one.policy[n], two.policy[n])
        assert bool(torch.isfinite(three.policy[n]).all())
    assert any(not torch.equal(two.policy[n], three.policy[n]) for n in two.policy)
    assert json.loads((out / "final.json").read_text())["stop_reason"] == "budget_iterations"


def test_nan_rollout_logprob_is_detected(tmp_path, monkeypatch):
    orig = RolloutEngine.run

    def nan_logp(self, plan, batch, iteration, **kw):
        roll = orig(self, plan, batch, iteration, **kw)
        if kw.get("stage", "rollout") == "rollout":
            roll = dataclasses.replace(roll, logp_old=torch.full_like(roll.logp_old, float("nan")))
        return roll

    monkeypatch.setattr(RolloutEngine, "run", nan_logp)
    out = tmp_path / "logp"
    assert main([*BASE, "--out", str(out)]) == 1
    assert _records(out / "iterations.jsonl")[0]["nonfinite"] == "logp"
    assert checkpoint.list_checkpoints(out) == []


def test_reward_exception_saves_the_batch_prompts(tmp_path, monkeypatch, capsys):
    _use_reward(monkeypatch, 2, "raise")
    out = tmp_path / "boom"
    assert main([*BASE, "--out", str(out)]) == 1
    err = capsys.readouterr().err
    dbg = out / "debug" / "failed_batch_000001.json"
    assert "reward 'brightness' failed" in err and "RuntimeError: scorer exploded" in err and str(dbg) in err
    assert 'raise RuntimeError("scorer exploded")' not in err  # no traceback, just the message
    saved = json.loads(dbg.read_text())
    assert len(saved["prompts"]) == 2 and len(saved["image_prompt_index"]) == 4 and saved["iteration"] == 1
    assert "scorer exploded" in saved["traceback"]
    final = json.loads((out / "final.json").read_text())
    assert final["stop_reason"] == "error" and "RewardError" in final["error"]
    assert [p.name for p in checkpoint.list_checkpoints(out)] == ["step_000001"]


def test_reward_missing_weights_is_a_usage_error(tmp_path, monkeypatch, capsys):
    _use_reward(monkeypatch, 1, "missing")
    assert main([*BASE, "--set", "eval.at_start=true", "--out", str(tmp_path / "mw")]) == 2
    err = capsys.readouterr().err
    assert "bench: error: brightness weights not found: looked in $TREEBENCH_WEIGHTS/brightness" in err
    assert "raise MissingWeightsError" not in err  # no traceback, just the message


def test_out_of_memory_suggests_micro_batch(tmp_path, monkeypatch, capsys):
    def oom(self, plan, batch, iteration, **kw):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(RolloutEngine, "run", oom)
    out = tmp_path / "oom"
    assert main([*BASE, "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "out of memory" in err and "train.micro_batch=32" in err and "train.prompts_per_iteration" in err
    assert "OutOfMemory" in json.loads((out / "final.json").read_text())["error"]


def test_interrupt_during_update_writes_no_checkpoint(tmp_path, monkeypatch):
    from algorithms.grpo import GRPO

    def interrupted(self, *a, **k):
        raise KeyboardInterrupt  # e.g. a second Ctrl-C in the middle of the update

    monkeypatch.setattr(GRPO, "update", interrupted)
    out = tmp_path / "kbd"
    s = runner.run(_cfg(out))
    assert s.stop_reason == "interrupted" and checkpoint.list_checkpoints(out) == []


def _cfg(out):
    from bench import config

    return config.resolve({"sampler.steps": 3, "algo.group_size": 2, "eval.every": 0, "eval.at_start": False,
                           "run.progress": False, "run.checkpoint_every": 1},
                          flags={"algo.name": "grpo", "model.name": "tiny-random", "budget": "2it", "out": str(out)})


@pytest.mark.parametrize("key,value,msg", [
    ("run.checkpoint_every", -1, "run.checkpoint_every must be an integer >= 0"),
    ("run.keep_checkpoints", 0, "run.keep_checkpoints must be an integer >= 1"),
    ("run.on_nonfinite", "ignore", "run.on_nonfinite must be stop or skip"),
])
def test_reliability_settings_are_validated(key, value, msg):
    from bench import config
    from bench.errors import UsageError

    with pytest.raises(UsageError, match=msg):
        config.resolve({key: value}, flags={"algo.name": "grpo", "model.name": "tiny-random"})
