"""The runner end to end on the tiny model: run files, budgets, stop reasons, determinism, glossary."""

import json

import pytest

from bench import config
from bench.errors import UsageError
from bench.run import runner
from bench.run.records import TIMING_KEYS, glossary, metric_documented

REQUIRED = ["iteration", "samples_total", "nfe_total", "seconds_total", "t_rollout_s", "t_reward_s",
            "t_advantage_s", "t_update_s", "reward_mean", "reward_std", "loss", "approx_kl", "clip_frac",
            "grad_norm", "lr", "peak_mem_mb", "nfe_rollout", "nfe_update", "zero_spread_frac", "first_ratio"]


def _cfg(tmp_path, name="run", budget="2it", **sets):
    base = {"eval.every": 2, "sampler.steps": 3, "run.progress": False, "algo.group_size": 3}
    base.update(sets)
    return config.resolve(base, flags={"algo.name": "grpo", "model.name": "tiny-random", "budget": budget,
                                       "out": str(tmp_path / name)})


def _records(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_run_writes_all_files_with_fields(tmp_path):
    s = runner.run(_cfg(tmp_path, budget="3it"))
    out = s.out_dir
    assert s.stop_reason == "budget_iterations" and s.iterations == 3
    man = json.loads((out / "manifest.json").read_text())
    for k in ("schema_version", "config", "git", "packages", "device", "model", "reward", "budget", "seed",
              "eval_rewards", "batch"):
        assert k in man, k
    assert man["reward"]["name"] == "brightness" and man["budget"]["iterations"] == 3
    recs = _records(out / "iterations.jsonl")
    assert [r["iteration"] for r in recs] == [0, 1, 2]
    for r in recs:
        for k in REQUIRED:
            assert k in r, k
        assert r["nfe_rollout"] == 2 * 3 * 3  # P * G * T, no CFG
        assert r["nfe_update"] == 2 * 3 * 3   # every SDE edge once
    assert recs[-1]["nfe_total"] == 3 * 36 and recs[-1]["samples_total"] == 18
    assert abs(recs[0]["first_ratio"] - 1.0) < 1e-4
    evals = _records(out / "evals.jsonl")
    assert [e["iteration"] for e in evals] == [0, 2, 3]
    assert all((out / e["samples_png"]).is_file() for e in evals)
    final = json.loads((out / "final.json").read_text())
    assert final["stop_reason"] == "budget_iterations" and final["nfe_total"] == recs[-1]["nfe_total"]
    # every key ever written is documented in the glossary
    for r in recs + evals:
        for k in r:
            assert metric_documented(k), k


def test_samples_and_seconds_budgets_stop_for_the_right_reason(tmp_path):
    s = runner.run(_cfg(tmp_path, "a", budget="20samples", **{"eval.every": 0, "eval.at_start": False}))
    assert s.stop_reason == "budget_samples" and s.samples_total == 24  # 6 images per iteration, stops at >= 20
    s = runner.run(_cfg(tmp_path, "b", budget="1.5s", **{"eval.every": 0, "eval.at_start": False}))
    assert s.stop_reason == "budget_seconds" and s.seconds_total >= 1.5
    s = runner.run(_cfg(tmp_path, "c", budget="100nfe,50it", **{"eval.every": 0, "eval.at_start": False}))
    assert s.stop_reason == "budget_nfe" and s.nfe_total == 108


def test_same_seed_same_records_apart_from_timing(tmp_path):
    a = runner.run(_cfg(tmp_path, "a", budget="2it"))
    b = runner.run(_cfg(tmp_path, "b", budget="2it"))
    c = runner.run(_cfg(tmp_path, "c", budget="2it", seed=1))

    def strip(path):
        return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in _records(path)]

    assert strip(a.out_dir / "iterations.jsonl") == strip(b.out_dir / "iterations.jsonl")
    assert strip(a.out_dir / "evals.jsonl") == strip(b.out_dir / "evals.jsonl")
    assert strip(a.out_dir / "iterations.jsonl") != strip(c.out_dir / "iterations.jsonl")


def test_existing_run_dir_refused_without_overwrite(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "iterations.jsonl").write_text("{}\n")
    with pytest.raises(UsageError, match="--overwrite"):
        runner.run(_cfg(tmp_path, "x"))


def test_glossary_has_no_undocumented_patterns():
    assert metric_documented("treegrpo/window_start") and metric_documented("eval/shapes_attr/colour")
    assert not metric_documented("made_up_key")
    assert "peak_mem_mb" in glossary() and "treegrpo/leaves" in glossary()
