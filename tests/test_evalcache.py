"""eval.cache: the iteration-0 evaluation computed once and copied, writing exactly what it would have written."""

import json
import threading

import pytest
import torch

from bench import config
from bench.engine.trace import Call
from bench.errors import UsageError
from bench.run import evalcache, runner
from bench.run.records import TIMING_KEYS
from bench.types import RewardOutput

BASE = {"eval.every": 1, "sampler.steps": 2, "run.progress": False, "eval.num_prompts": 2,
        "eval.images_per_prompt": 2, "eval.grid": 4, "algo.group_size": 2, "run.trace": True,
        "run.cost_profile": "shapes-cpu"}


def _cfg(tmp_path, name, budget="1it", **sets):
    return config.resolve({**BASE, **sets}, flags={"algo.name": "grpo", "model.name": "tiny-random",
                                                   "budget": budget, "seed": 0, "out": str(tmp_path / name)})


def _run(tmp_path, name, **sets):
    return runner.run(_cfg(tmp_path, name, **sets)).out_dir


def _lines(path, drop=()):
    return [{k: v for k, v in json.loads(line).items() if k not in drop} for line in path.read_text().splitlines()]


def _evals(d):
    return _lines(d / "evals.jsonl", (*TIMING_KEYS, "cached"))


def _same_outputs(a, b):
    """Two run directories hold the same records (timings and the cached marker aside), grids and trace."""
    assert _evals(a) == _evals(b)
    assert _lines(a / "eval_scores.jsonl", ("seconds",)) == _lines(b / "eval_scores.jsonl", ("seconds",))
    assert _lines(a / "iterations.jsonl", TIMING_KEYS) == _lines(b / "iterations.jsonl", TIMING_KEYS)
    assert _lines(a / "trace.jsonl") == _lines(b / "trace.jsonl")
    for png in sorted(p.name for p in (a / "samples").glob("*.png")):
        assert (a / "samples" / png).read_bytes() == (b / "samples" / png).read_bytes(), png


def _entries(cache):
    return sorted(p.name for p in cache.glob("*.json")), sorted(p.name for p in cache.glob("*.png"))


def test_a_hit_writes_what_an_uncached_run_writes(tmp_path):
    cache = tmp_path / "cache"
    plain = _run(tmp_path, "plain")
    miss = _run(tmp_path, "miss", **{"eval.cache": str(cache)})
    jsons, pngs = _entries(cache)
    assert len(jsons) == 1 and len(pngs) == 1
    hit = _run(tmp_path, "hit", **{"eval.cache": str(cache)})
    assert _entries(cache) == (jsons, pngs)  # read, not written again
    first = [json.loads(line) for line in (hit / "evals.jsonl").read_text().splitlines()]
    assert first[0]["iteration"] == 0 and first[0]["cached"] is True
    assert "cached" not in first[1]  # only iteration 0 is cached
    assert all("cached" not in r for r in _lines(miss / "evals.jsonl") + _lines(plain / "evals.jsonl"))
    assert first[0]["modeled_eval_s"] > 0 and first[0]["samples_png"] == "samples/eval_000000.png"
    assert any(line["stage"] == "eval" and line["iteration"] == 0 for line in _lines(hit / "trace.jsonl"))
    _same_outputs(plain, hit)
    _same_outputs(plain, miss)
    # a plain run writes nothing outside its run directory
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "hit", "miss", "plain"]


def test_other_eval_seed_or_other_weights_miss(tmp_path, monkeypatch, capsys):
    cache = tmp_path / "cache"
    _run(tmp_path, "a", **{"eval.cache": str(cache)})
    seed5 = _run(tmp_path, "seed5", **{"eval.cache": str(cache), "eval.seed": 5})
    assert "cached" not in _lines(seed5 / "evals.jsonl")[0]
    assert len(_entries(cache)[0]) == 2
    # the same model preset and settings, other initial weights (one weight moved by 1e-3)
    build = runner.build_policy

    def moved(model, device):
        pol = build(model, device)
        with torch.no_grad():
            next(pol.denoiser.parameters()).view(-1)[0] += 1e-3
        return pol

    monkeypatch.setattr(runner, "build_policy", moved)
    other = _run(tmp_path, "other", **{"eval.cache": str(cache)})
    assert "cached" not in _lines(other / "evals.jsonl")[0]
    assert len(_entries(cache)[0]) == 3
    assert "eval cache" not in capsys.readouterr().err  # misses, not warnings


@pytest.mark.parametrize("damage", ["json", "png"])
def test_a_corrupt_entry_is_recomputed(tmp_path, capsys, damage):
    cache = tmp_path / "cache"
    first = _run(tmp_path, "first", **{"eval.cache": str(cache)})
    (entry,), (grid,) = _entries(cache)
    if damage == "json":
        text = (cache / entry).read_text()
        (cache / entry).write_text(text[: len(text) // 2])  # a torn file
    else:
        data = bytearray((cache / grid).read_bytes())
        data[-20] ^= 0xFF
        (cache / grid).write_bytes(bytes(data))
    again = _run(tmp_path, "again", **{"eval.cache": str(cache)})
    err = capsys.readouterr().err
    assert "warning: eval cache: entry" in err and "evaluating again" in err
    assert "cached" not in _lines(again / "evals.jsonl")[0]
    _same_outputs(first, again)
    # the entry was replaced by a good one: the next run hits
    third = _run(tmp_path, "third", **{"eval.cache": str(cache)})
    assert _lines(third / "evals.jsonl")[0].get("cached") is True
    _same_outputs(first, third)


def test_resume_of_a_run_whose_first_evaluation_was_cached(tmp_path):
    from bench.rundir import resume

    cache = str(tmp_path / "cache")
    straight = runner.run(_cfg(tmp_path, "straight", budget="2it", **{"eval.cache": cache,
                                                                       "run.checkpoint_every": 1})).out_dir
    part = runner.run(_cfg(tmp_path, "part", budget="1it", **{"eval.cache": cache,
                                                               "run.checkpoint_every": 1})).out_dir
    assert _lines(part / "evals.jsonl")[0]["cached"] is True
    runner.run(resume.resume_config(part, flags={"budget": "2it"}), resume=True)
    recs = _lines(part / "evals.jsonl")
    assert [r["iteration"] for r in recs] == [0, 1, 2] and recs[0]["cached"] is True
    assert _evals(part) == _evals(straight)
    assert _lines(part / "eval_scores.jsonl", ("seconds",)) == _lines(straight / "eval_scores.jsonl", ("seconds",))
    assert _lines(part / "iterations.jsonl", TIMING_KEYS) == _lines(straight / "iterations.jsonl", TIMING_KEYS)


def test_the_cache_directory_may_change_on_resume(tmp_path):
    from bench.rundir import resume

    d = runner.run(_cfg(tmp_path, "r", **{"run.checkpoint_every": 1})).out_dir
    cfg = resume.resume_config(d, {"eval.cache": str(tmp_path / "c")}, flags={"budget": "2it"})
    assert cfg["eval"]["cache"] == str(tmp_path / "c")


@pytest.mark.parametrize("value", [5, ""])
def test_bad_cache_settings_are_usage_errors(tmp_path, value):
    with pytest.raises(UsageError, match="eval.cache"):
        _cfg(tmp_path, "x", **{"eval.cache": value})


def test_a_file_is_not_a_cache_directory(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(UsageError, match="not a directory"):
        _cfg(tmp_path, "x", **{"eval.cache": str(tmp_path / "f")})


# ---- entries without a model -------------------------------------------------------------------------------
FIELDS = {"format": evalcache.FORMAT, "weights": "w", "seed": 0}
SCORED = {"r": RewardOutput(torch.tensor([0.25, float("nan"), 1 / 3]), {"c": torch.tensor([1.0, 0.0, 0.5])})}
CALLS = [Call("denoiser_fwd", 6, "eval"), Call("reward", 3, "eval", "r")]


def test_an_entry_reads_back_bit_for_bit(tmp_path):
    png = tmp_path / "grid.png"
    png.write_bytes(b"\x89PNG grid bytes")
    key = evalcache.digest(FIELDS)
    evalcache.store(tmp_path / "c", key, FIELDS, [0, 0, 1], SCORED, CALLS, 6, png, 1.5)
    e = evalcache.read_entry(tmp_path / "c", key, FIELDS, ["r"])
    assert e.leaf_prompts == [0, 0, 1] and e.calls == CALLS and e.nfe == 6 and e.png == png.read_bytes()
    a, b = SCORED["r"], e.scored["r"]
    assert b.scores.dtype == torch.float32 and b.scores.view(torch.int32).tolist() == a.scores.view(torch.int32).tolist()
    assert torch.equal(b.components["c"], a.components["c"])
    # a key whose settings differ, or other rewards: ignored (with a warning), never applied
    assert evalcache.read_entry(tmp_path / "c", key, {**FIELDS, "seed": 1}, ["r"]) is None
    assert evalcache.read_entry(tmp_path / "c", key, FIELDS, ["r", "s"]) is None
    assert evalcache.read_entry(tmp_path / "c", "absent", FIELDS, ["r"]) is None


def test_concurrent_writers_of_one_key_leave_a_correct_entry(tmp_path, capsys):
    png = tmp_path / "grid.png"
    png.write_bytes(b"\x89PNG grid bytes" * 1000)
    key, cache = evalcache.digest(FIELDS), tmp_path / "c"
    seen, errors = [], []

    def writer():
        try:
            for _ in range(20):
                evalcache.store(cache, key, FIELDS, [0, 0, 1], SCORED, CALLS, 6, png, 1.0)
                seen.append(evalcache.read_entry(cache, key, FIELDS, ["r"]))
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=writer) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(seen) == 80 and all(e is not None and e.png == png.read_bytes() for e in seen)
    assert "warning" not in capsys.readouterr().err
    assert not list(cache.glob(".*.tmp"))  # no temporary file left
    jsons, pngs = _entries(cache)
    assert jsons == [f"{key}.json"] and len(pngs) == 1


def test_an_unwritable_cache_is_a_warning_not_a_failure(tmp_path, capsys):
    png = tmp_path / "grid.png"
    png.write_bytes(b"png")
    (tmp_path / "file").write_text("x")
    evalcache.store(tmp_path / "file" / "c", "k", FIELDS, [0], SCORED, CALLS, 1, png, 1.0)
    assert "could not store" in capsys.readouterr().err


def test_the_cache_directory_is_not_part_of_a_sweep_definition():
    """A tuning study resumed with or without the cache (bench compare --no-eval-cache) stays joinable."""
    from types import SimpleNamespace

    from sweeps.cli import _definition

    a = SimpleNamespace(algo="grpo", direction="maximize", multi_objective=False, budget_per_trial="2it", model=None,
                        model_path=None, reward=None, eval_rewards=None, config=None, preset=None,
                        reject_hacking=True, validation_split=True, seeds_per_trial=1)
    space = SimpleNamespace(to_dict=lambda: {"lr": [1e-6, 1e-3]})

    def definition(sets):
        return _definition(a, space, "eval/r", sets, {"seed": 0})

    assert definition({"eval.every": 1, "eval.cache": "DIR/.eval_cache"}) == definition({"eval.every": 1})
    assert definition({"eval.every": 2}) != definition({"eval.every": 1})
