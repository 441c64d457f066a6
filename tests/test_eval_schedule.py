"""One evaluation schedule on the cost axis (eval.every = a budget amount), per-image evaluation scores
(eval_scores.jsonl), and the frozen arm (train.frozen), on the tiny model."""

import itertools
import json

import pytest
import torch

from bench import config
from bench.budget import Cadence, Totals
from bench.cli import main
from bench.errors import UsageError
from bench.run import runner
from bench.run.records import EVAL_SCORE_KEYS, TIMING_KEYS
from bench.rundir import checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = {"sampler.steps": 3, "run.progress": False, "eval.num_prompts": 2, "eval.images_per_prompt": 2,
         "run.checkpoint_every": 0, "algo.group_size": 2}


def _cfg(tmp_path, algo, name, budget, **sets):
    return config.resolve({**SMALL, **sets}, flags={"algo.name": algo, "model.name": "tiny-random", "budget": budget,
                                                     "out": str(tmp_path / name)})


def _lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


# ---- the cadence itself ------------------------------------------------------------------------------
def test_cadence_parses_iterations_and_budget_amounts():
    assert Cadence.parse(10) == Cadence("iterations", 10.0)
    assert Cadence.parse(0).amount == 0 and not Cadence.parse(0).due(Totals(), Totals(iterations=5))
    assert Cadence.parse("2000nfe") == Cadence("nfe", 2000.0)
    assert Cadence.parse("2e3nfe") == Cadence("nfe", 2000.0)
    assert Cadence.parse("500samples") == Cadence("samples", 500.0)
    assert Cadence.parse("2m") == Cadence("seconds", 120.0)
    assert Cadence.parse("25it") == Cadence("iterations", 25.0)
    # seconds count the run's clock: modeled seconds when run.clock is a cost profile
    c = Cadence.parse("30s", clock="modeled")
    assert c.due(Totals(seconds=100.0, modeled_seconds=29.0), Totals(seconds=200.0, modeled_seconds=31.0))
    assert not c.due(Totals(seconds=10.0, modeled_seconds=1.0), Totals(seconds=200.0, modeled_seconds=2.0))


def test_cadence_is_due_at_the_first_boundary_at_or_past_each_multiple():
    c = Cadence.parse("100nfe")
    steps = [0, 40, 80, 120, 160, 200, 260, 420]  # cumulative NFE at successive iteration boundaries
    due = [b for a, b in itertools.pairwise(steps) if c.due(Totals(nfe=a), Totals(nfe=b))]
    # 100 -> at 120; 200 reached exactly; none in 200..260; 300 and 400 both passed at 420: one evaluation
    assert due == [120, 200, 420]
    assert [c.point(Totals(nfe=n)) for n in due] == [100.0, 200.0, 400.0]
    # an integer keeps meaning "every N iterations"
    it = Cadence.parse(3)
    assert [i for i in range(1, 10) if it.due(Totals(iterations=i - 1), Totals(iterations=i))] == [3, 6, 9]


@pytest.mark.parametrize("bad", ["2h,500samples", "fast", "0nfe", "-5nfe", "2.5it", 1.5, True, -1, "10 apples"])
def test_bad_eval_every_is_a_usage_error_listing_the_forms(bad):
    with pytest.raises(UsageError, match=r"eval\.every.*Valid forms: 10 \(iterations\).*2000nfe, 500samples, 30s"):
        config.resolve({"eval.every": bad})


def test_bad_eval_every_exits_2_from_the_cli(tmp_path, capsys):
    out = tmp_path / "never"
    assert main(["run", "--model", "tiny-random", "--set", "eval.every=2000furlongs", "--out", str(out)]) == 2
    assert "Valid forms" in capsys.readouterr().err and not out.exists()


# ---- two algorithms on one NFE grid; one line per evaluated image ---------------------------------------
def test_two_algorithms_evaluate_at_the_same_nfe_grid_points(tmp_path):
    every, budget = 30, 60  # grpo spends 24 NFE per iteration here, dancegrpo 16: both below eval.every
    runs = {}
    for algo in ("grpo", "dancegrpo"):
        s = runner.run(_cfg(tmp_path, algo, algo, f"{budget}nfe", **{"eval.every": f"{every}nfe"}))
        assert s.stop_reason == "budget_nfe"
        runs[algo] = s.out_dir
    per_iter = {}
    for algo, out in runs.items():
        its = _lines(out / "iterations.jsonl")
        evals = _lines(out / "evals.jsonl")
        step = {r["nfe_total"]: r["nfe_rollout"] + r["nfe_update"] for r in its}
        per_iter[algo] = set(step.values())
        # iteration 0, each multiple of 30 NFE up to the budget, the last one at the end of the run
        assert [e["eval_point"] for e in evals] == [0, 30, 60], algo
        for e in evals[1:]:
            # the first iteration boundary at or past the point: within one iteration's NFE of it
            assert e["eval_point"] <= e["nfe_total"] < e["eval_point"] + step[e["nfe_total"]], (algo, e)
        final = json.loads((out / "final.json").read_text())
        assert evals[-1]["nfe_total"] == final["nfe_total"] == its[-1]["nfe_total"]  # the exact final cost
        assert final["final_eval"]["iteration"] == final["iterations"]
        # eval_scores.jsonl: one line per evaluated image, the exact keys, the evaluation's totals
        lines = _lines(out / "eval_scores.jsonl")
        assert len(lines) == len(evals) * 2 * 2  # evaluations x eval.num_prompts x eval.images_per_prompt
        assert all(set(line) == set(EVAL_SCORE_KEYS) for line in lines)
        for e in evals:
            mine = [line for line in lines if line["iteration"] == e["iteration"]]
            assert {(m["prompt_index"], m["image_index"]) for m in mine} == {(0, 0), (0, 1), (1, 0), (1, 1)}
            assert {(m["nfe"], m["samples"], m["seconds"]) for m in mine} == {
                (e["nfe_total"], e["samples_total"], e["seconds_total"])}
            for reward in ("brightness",):
                mean = sum(m["scores"][reward] for m in mine) / len(mine)
                assert mean == pytest.approx(e[f"eval/{reward}"], rel=1e-6, abs=1e-7)
    assert per_iter["grpo"] != per_iter["dancegrpo"]  # the grid is not an artefact of equal iteration costs
    # the shared evaluation set: before training both runs score the same images on the same noise
    start = {a: {(m["prompt_index"], m["image_index"]): m["scores"] for m in _lines(d / "eval_scores.jsonl")
                 if m["iteration"] == 0} for a, d in runs.items()}
    assert start["grpo"] == start["dancegrpo"]


# ---- the frozen arm ------------------------------------------------------------------------------------
def test_frozen_weights_stay_bit_identical_with_the_same_nfe_and_calls(tmp_path, tiny_flow_dir):
    sets = {"eval.every": 0, "run.checkpoint_every": 1, "run.keep_checkpoints": 3}
    live = runner.run(_cfg(tmp_path, "grpo", "live", "2it", **sets)).out_dir
    frozen = runner.run(_cfg(tmp_path, "grpo", "frozen", "2it", **{**sets, "train.frozen": True})).out_dir
    from bench.model.models import load_policy

    start = load_policy(tiny_flow_dir).named_trainable_parameters()
    for step in (1, 2):
        weights = checkpoint.load(checkpoint.step_dir(frozen, step)).policy
        assert set(weights) == set(start)
        for name, p in start.items():
            a, b = weights[name].contiguous(), p.detach().contiguous()
            assert a.dtype == b.dtype and a.shape == b.shape
            assert torch.equal(a.view(torch.uint8), b.view(torch.uint8)), name  # bit for bit, -0.0 too
    moved = checkpoint.load(checkpoint.step_dir(live, 2)).policy
    assert any(not torch.equal(moved[n], p.detach()) for n, p in start.items())  # the unfrozen run learns
    a, b = _lines(live / "iterations.jsonl"), _lines(frozen / "iterations.jsonl")
    for ra, rb in zip(a, b, strict=True):
        for k in ("nfe_rollout", "nfe_update", "nfe_total", "samples_total", "edges", "optimizer_steps"):
            assert ra[k] == rb[k], k
        assert {k: v for k, v in ra.items() if k.startswith("trace/")} == \
               {k: v for k, v in rb.items() if k.startswith("trace/")}  # the same calls, optimizer steps too
        assert rb["lr"] == 0.0 and ra["lr"] > 0
    assert rb["optimizer_steps"] >= 1 and rb["trace/optimizer_step/calls"] >= 1
    # iteration 0 starts from the same weights: the same rollouts, rewards and loss
    def same(r):
        return {k: v for k, v in r.items() if k not in TIMING_KEYS and k != "lr"}

    assert same(a[0]) == same(b[0])
    man = json.loads((frozen / "manifest.json").read_text())
    assert man["weights_frozen"] is True and man["config"]["train"]["frozen"] is True
    assert json.loads((live / "manifest.json").read_text())["weights_frozen"] is False
    # unchanged weights evaluate exactly as before training
    scores = _lines(frozen / "eval_scores.jsonl")
    first = [m["scores"] for m in scores if m["iteration"] == 0]
    last = [m["scores"] for m in scores if m["iteration"] == 2]
    assert first == last and len(first) == 4
