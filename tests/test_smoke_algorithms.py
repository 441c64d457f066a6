"""Every registered algorithm runs 2 iterations through the real runner on the tiny models, with the
papers' presets resolvable and invalid combinations rejected as usage errors."""

from __future__ import annotations

import json

import pytest

from bench import config
from bench.errors import UsageError
from bench.registry import ALGORITHMS, algorithm_class
from bench.run import runner
from bench.run.records import metric_documented

#: small per-algorithm settings (tiny model, 4 steps) so each run takes about a second
SMALL = {"grpo": {"algo.group_size": 2}, "ddpo": {"algo.group_size": 2}, "dancegrpo": {"algo.group_size": 2},
         "mixgrpo": {"algo.group_size": 2, "algo.window": 2, "algo.shift_interval": 1},
         "treegrpo": {"algo.k": 2, "algo.d": 2}, "flowgrpo": {"algo.group_size": 2},
         "branchgrpo": {"algo.split_rounds": 2}, "diffusionnft": {"algo.group_size": 2},
         "awm": {"algo.group_size": 2, "algo.train_timesteps": 3}, "refl": {"algo.group_size": 2},
         "flowdppo": {"algo.group_size": 2, "algo.num_sde_steps": 2}}


pytestmark = pytest.mark.usefixtures("one_thread")


def _cfg(tmp_path, algo, model="tiny-random", **sets):
    base = {"sampler.steps": 4, "run.progress": False, "eval.every": 0, "eval.at_start": False,
            "train.prompts_per_iteration": 2, "train.lr": 1e-4, **SMALL.get(algo, {}), **sets}
    return config.resolve(base, flags={"algo.name": algo, "model.name": model, "budget": "2it",
                                       "out": str(tmp_path / f"{algo}_{model}")})


def _records(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize("algo", sorted(ALGORITHMS))
def test_two_iterations_through_the_runner(tmp_path, algo):
    s = runner.run(_cfg(tmp_path, algo))
    assert s.stop_reason == "budget_iterations" and s.iterations == 2
    recs = _records(s.out_dir / "iterations.jsonl")
    assert len(recs) == 2
    likelihood_free = getattr(algorithm_class(algo), "likelihood_free", False)
    for r in recs:
        assert r["nfe_rollout"] > 0 and r["nfe_update"] > 0 and r["edges"] > 0
        if likelihood_free:  # no importance ratio exists: logged as null, never as a made-up 1
            assert r["first_ratio"] is None and r["approx_kl"] is None
        else:
            assert abs(r["first_ratio"] - 1.0) < 1e-3
    assert recs[-1]["nfe_total"] == sum(r["nfe_rollout"] + r["nfe_update"] for r in recs)
    for r in recs:  # every key the algorithm logs is in the METRICS glossary
        undocumented = [k for k in r if not metric_documented(k)]
        assert not undocumented, undocumented
    if algo in ("treegrpo", "mixgrpo"):
        assert f"{algo}/window_start" in recs[0]
    if algo == "treegrpo":
        assert recs[0]["treegrpo/leaves"] == 4 and recs[0]["samples"] == 2 * 4


def test_ddpo_on_the_epsilon_model_through_the_runner(tmp_path):
    s = runner.run(_cfg(tmp_path, "ddpo", model="tiny-random-ddim"))
    recs = _records(s.out_dir / "iterations.jsonl")
    assert s.iterations == 2 and recs[0]["nfe_rollout"] == 2 * 2 * 4 and recs[0]["nfe_update"] == 2 * 2 * 4


def test_mixgrpo_flash_through_the_runner(tmp_path):
    s = runner.run(_cfg(tmp_path, "mixgrpo", **{"algo.flash": True, "sampler.steps": 6}))
    recs = _records(s.out_dir / "iterations.jsonl")
    # window [0, 2): 2 SDE steps + 1 DPM-Solver++ step (num_post = 2); then [1, 3): 3 + 2 - 1 = 4 steps
    assert [r["mixgrpo/sampling_steps"] for r in recs] == [3, 4]
    assert [r["nfe_rollout"] for r in recs] == [2 * 2 * 3, 2 * 2 * 4]


@pytest.mark.parametrize("algo", ["ddpo", "dancegrpo", "mixgrpo", "treegrpo", "flowgrpo", "branchgrpo", "diffusionnft",
                                  "awm", "refl"])
def test_presets_resolve(algo):
    for preset in algorithm_class(algo).PRESETS:
        cfg = config.resolve({}, preset=preset, flags={"algo.name": algo, "model.name": "tiny-random"})
        config.algorithm_config(cfg)


def test_treegrpo_paper_preset_values():
    cfg = config.resolve({}, preset="treegrpo-paper", flags={"algo.name": "treegrpo", "model.name": "tiny-random"})
    assert (cfg["sampler"]["steps"], cfg["sampler"]["guidance"], cfg["sampler"]["noise_level"]) == (10, 4.5, 0.7)
    assert (cfg["algo"]["k"], cfg["algo"]["d"]) == (3, 3)


@pytest.mark.parametrize("sets,match", [
    ({"algo.d": 4, "algo.window": 3}, "algo.d"),
    ({"algo.k": 0}, "algo.k"),
    ({"algo.window": 9, "algo.d": 2}, "algo.window"),
])
def test_invalid_treegrpo_settings_are_usage_errors(tmp_path, sets, match):
    with pytest.raises(UsageError, match=match):
        runner.run(_cfg(tmp_path, "treegrpo", **sets))
