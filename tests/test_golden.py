"""Golden trajectories: each algorithm's first 2 iterations on the tiny models must reproduce the numbers
stored in tests/golden.json (regenerate deliberately with ``python tests/golden.py --regenerate``), within
tolerances derived from each quantity's scale and float32 rounding (tests/golden.py explains each one), and a
deliberate change of the math must still fail."""

from __future__ import annotations

import json
import math

import pytest
from golden import CASES, GOLDEN, KEYS, SCALE_KEYS, U, differences, run_case, tolerance


def _golden(name):
    return json.loads(GOLDEN.read_text())["cases"][name]


def test_golden_file_covers_every_case_and_key():
    stored = json.loads(GOLDEN.read_text())["cases"]
    assert sorted(stored) == sorted(CASES), "regenerate tests/golden.json: python tests/golden.py --regenerate"
    for name, recs in stored.items():
        for rec in recs:
            assert set(KEYS) | set(SCALE_KEYS) <= set(rec), f"{name}: regenerate tests/golden.json"


@pytest.mark.parametrize("name", sorted(CASES))
def test_golden_trajectory(tmp_path, name):
    got = run_case(name, tmp_path)
    bad = differences(_golden(name), got)
    assert not bad, (f"{name}: numerics changed ({'; '.join(bad)}). If intended, run "
                     f"`python tests/golden.py --regenerate` and commit tests/golden.json with the change.")


def test_golden_detects_a_changed_clip_range(tmp_path, monkeypatch):
    """The clip range the PPO loss clamps the ratio with, doubled (the update's gradient changes where a
    ratio lies between the two ranges): the golden case fails."""
    from algorithms import common

    clip_loss = common.ppo_clip_loss
    monkeypatch.setattr(common, "ppo_clip_loss",
                        lambda new, old, adv, clip, adv_max: clip_loss(new, old, adv, 2 * clip, adv_max))
    bad = differences(_golden("flowgrpo-fast"), run_case("flowgrpo-fast", tmp_path))
    assert any("grad_norm" in b for b in bad) and any("param_delta" in b for b in bad), bad


def test_golden_detects_a_changed_advantage_epsilon(tmp_path):
    """DanceGRPO's group-normalisation epsilon 1e-8 -> 1e-4 (1% of the tiny model's reward std): the
    advantages shrink by ~1% and the golden case fails on them and on the gradient norm."""
    bad = differences(_golden("dancegrpo"), run_case("dancegrpo", tmp_path, sets={"algo.std_eps": 1e-4}))
    assert any("adv_abs_mean" in b for b in bad) and any("grad_norm" in b for b in bad), bad


def _record(**over):
    rec = {"reward_mean": 0.5, "reward_std": 0.01, "loss": -1e-5, "surrogate": 1e-5, "approx_kl": 3e-9,
           "grad_norm": 0.2, "first_ratio": 1.0, "adv_abs_mean": 0.8, "logp_mean": -0.8, "param_delta": 0.06,
           "clip_frac": 0.25, "nfe_rollout": 40, "nfe_update": 20, "edges": 8, "optimizer_steps": 2,
           "logp_scale": 2.5, "clip_near": 0}
    return {**rec, **over}


def test_tolerances_follow_scale_and_float32_rounding():
    rec = _record()
    # the log-prob's resolution scales with the magnitude of its summands
    assert tolerance("logp_mean", _record(logp_scale=10.0)) == pytest.approx(4 * tolerance("logp_mean", rec))
    assert tolerance("logp_mean", rec) == pytest.approx(16 * U * 2.5)
    # advantages (and the gradient, linear in them) resolve 1 / reward_std times worse than rewards
    assert tolerance("adv_abs_mean", _record(reward_std=0.001)) == pytest.approx(
        10 * tolerance("adv_abs_mean", rec))
    assert tolerance("grad_norm", rec) / 0.2 == pytest.approx(tolerance("adv_abs_mean", rec) / 0.8)
    # the loss at ratio ~1 is held to its cancelling part's resolution, the surrogate far tighter
    assert tolerance("loss", rec) > 10 * tolerance("surrogate", rec)
    # clip_frac: exact (half an edge) unless edges lie within rounding of the clip boundary
    assert tolerance("clip_frac", rec, rec) == pytest.approx(0.5 / 8)
    assert tolerance("clip_frac", rec, _record(clip_near=2)) == pytest.approx(2.5 / 8)
    assert tolerance("edges", rec) == 0.0
    for k in KEYS:
        assert math.isfinite(tolerance(k, rec, rec)) and tolerance(k, rec, rec) >= 0


def test_differences_detects_a_change():
    rec = _record()
    assert differences([rec], [dict(rec)]) == []
    tol = tolerance("grad_norm", rec)
    assert differences([rec], [dict(rec, grad_norm=0.2 + 0.5 * tol)]) == []
    assert differences([rec], [dict(rec, grad_norm=0.2 + 2 * tol)])
    assert differences([rec], [dict(rec, nfe_update=21)])
    assert differences([rec], [dict(rec, adv_abs_mean=0.81)])
    assert differences([rec], [dict(rec, logp_mean=-0.7)])
    assert differences([rec], [dict(rec, param_delta=0.061)])
    assert differences([rec], [dict(rec, clip_frac=0.375)])          # one more edge clipped, none ambiguous
    assert differences([rec], [dict(rec, clip_frac=0.375, clip_near=1)]) == []  # that edge was at the boundary
    assert differences([rec], [dict(rec, surrogate=2e-5)])
    assert differences([rec], [dict(rec, reward_mean=float("nan"))])
    assert differences([rec], [rec, rec])
    # likelihood-free: no ratio (logged as null) and no PPO terms for the probe (its keys null)
    free = dict(rec, approx_kl=None, first_ratio=None, clip_frac=None, surrogate=None, adv_abs_mean=None,
                logp_mean=None, logp_scale=None, clip_near=None)
    assert differences([free], [dict(free)]) == []
    assert differences([free], [rec]) and differences([rec], [free])
    assert differences([free], [dict(free, loss=free["loss"] + 2 * tolerance("loss", free))])  # fallback scale
    assert differences([free], [dict(free, grad_norm=0.2 + 2 * tolerance("grad_norm", free))])
