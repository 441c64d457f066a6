"""Adding an algorithm = one file + one registry line: a throw-away algorithm registered with one entry
is run, swept and reported with no other edit (its log keys and search space come from its class)."""

import json

import pytest

from bench import config, registry
from bench.registry import Entry
from bench.run import runner
from bench.run.records import metric_documented

optuna = pytest.importorskip("optuna")
pd = pytest.importorskip("pandas")

SMALL = {"sampler.steps": 3, "run.progress": False, "eval.every": 1, "eval.at_start": False,
         "train.prompts_per_iteration": 2, "eval.num_prompts": 2}


@pytest.fixture
def registered(monkeypatch):
    # the one registry line
    monkeypatch.setitem(registry.ALGORITHMS, "throwaway",
                        Entry("_throwaway_algorithm:Throwaway", "a test algorithm"))


def test_run_sweep_and_report_a_new_algorithm(registered, tmp_path, capsys):
    cfg = config.resolve(SMALL, flags={"algo.name": "throwaway", "model.name": "tiny-random", "budget": "2it",
                                       "out": str(tmp_path / "runs" / "throwaway_seed0")})
    s = runner.run(cfg)
    recs = [json.loads(x) for x in (s.out_dir / "iterations.jsonl").read_text().splitlines()]
    assert s.iterations == 2 and all(r["nfe_update"] > 0 and "throwaway/gap" in r for r in recs)
    assert all(metric_documented(k) for r in recs for k in r)  # its own log_keys document its keys

    from sweeps import cli as sweep_cli

    out = tmp_path / "sweep"
    assert sweep_cli.main(["--algo", "throwaway", "--trials", "2", "--out", str(out), "--model", "tiny-random",
                           "--budget-per-trial", "1it", "--pruner", "none", "--set", "sampler.steps=3",
                           "eval.num_prompts=2", "train.prompts_per_iteration=1"]) == 0
    trials = pd.read_csv(out / "trials.csv")
    assert len(trials) == 2 and set(trials["params_group_size"]) <= {2, 3}  # its declared default space

    from reports import cli as report_cli
    from reports.load import load

    runs = load([tmp_path / "runs"])
    assert list(runs.runs["algo"]) == ["throwaway"] and "throwaway/gap" in runs.iterations.columns
    pdf = tmp_path / "report.pdf"
    assert report_cli.main([str(tmp_path / "runs"), "--out", str(pdf), "--reps", "200", "--no-files"]) == 0
    assert pdf.stat().st_size > 0
