"""The held-out evaluation isolates training: its prompts and noise come from eval.seed, not the run seed."""

import json

import pytest

from bench import config
from bench.errors import UsageError
from bench.run import runner


def _cfg(tmp_path, name, seed, algo="grpo", **sets):
    base = {"eval.every": 1, "sampler.steps": 3, "run.progress": False, "eval.num_prompts": 3,
            "eval.images_per_prompt": 2, "eval.grid": 4, **sets}
    return config.resolve(base, flags={"algo.name": algo, "model.name": "tiny-random", "budget": "1it",
                                       "seed": seed, "out": str(tmp_path / name)})


def _evals(summary):
    return [json.loads(line) for line in (summary.out_dir / "evals.jsonl").read_text().splitlines()]


def _scores(rec):
    return {k: v for k, v in rec.items() if k.startswith("eval/")}


def test_runs_with_different_seeds_log_identical_iteration0_evaluations(tmp_path):
    a = _evals(runner.run(_cfg(tmp_path, "a", seed=0)))
    b = _evals(runner.run(_cfg(tmp_path, "b", seed=7)))
    c = _evals(runner.run(_cfg(tmp_path, "c", seed=3, algo="dancegrpo", **{"algo.group_size": 2})))
    assert a[0]["iteration"] == b[0]["iteration"] == c[0]["iteration"] == 0
    assert _scores(a[0]) and _scores(a[0]) == _scores(b[0]) == _scores(c[0])  # exact, not approximate
    assert a[0]["eval_images"] == 6 and a[0]["samples_prompts"] == b[0]["samples_prompts"]
    assert len(a[0]["samples_prompts"]) == 4
    # training changed the policy differently per seed: the later evaluations are free to differ
    assert _scores(a[-1]) != _scores(a[0])


def test_eval_seed_changes_the_evaluation_noise(tmp_path):
    a = _evals(runner.run(_cfg(tmp_path, "a", seed=0)))
    b = _evals(runner.run(_cfg(tmp_path, "b", seed=0, **{"eval.seed": 5})))
    assert _scores(a[0]) != _scores(b[0])


@pytest.mark.parametrize("key, value", [("eval.images_per_prompt", 0), ("eval.seed", -1), ("eval.seed", 1.5)])
def test_bad_eval_settings_are_usage_errors(tmp_path, key, value):
    with pytest.raises(UsageError, match=key):
        _cfg(tmp_path, "x", seed=0, **{key: value})


def test_resumed_old_run_keeps_its_evaluation(tmp_path):
    from bench.rundir import resume

    s = runner.run(_cfg(tmp_path, "old", seed=5))
    man = json.loads((s.out_dir / "manifest.json").read_text())
    for k in ("images_per_prompt", "seed"):  # as written before these settings existed
        del man["config"]["eval"][k]
    (s.out_dir / "manifest.json").write_text(json.dumps(man))
    cfg = resume.resume_config(s.out_dir, flags={"budget": "2it"})
    assert cfg["eval"]["images_per_prompt"] == 1 and cfg["eval"]["seed"] == 5
