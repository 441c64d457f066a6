"""bench sweep: spaces, grids, pruning, failures, resume and shared storage on the tiny random model."""

import csv
import itertools
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

optuna = pytest.importorskip("optuna")

from optuna.trial import TrialState

from bench.errors import UsageError
from bench.run.runner import RunSummary
from sweeps import cli, spaces
from sweeps import study as st
from sweeps.objective import Objective, TrialFailed

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--model", "tiny-random", "--budget-per-trial", "1it", "--pruner", "none",
        "--set", "sampler.steps=3", "--set", "eval.every=1", "--set", "eval.num_prompts=2",
        "--set", "train.prompts_per_iteration=1"]


@pytest.fixture
def small_space(tmp_path):
    f = tmp_path / "space.yaml"
    f.write_text("params:\n  group_size: {type: int, low: 2, high: 3}\n")
    return str(f)


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _study(out, name):
    storage, _ = st.make_storage(None, out, name)
    return optuna.load_study(study_name=name, storage=storage), storage


def _spec(tmp_path, *args):
    a = cli.build_parser().parse_args(["--algo", "grpo", "--out", str(tmp_path), *TINY, *args])
    spec, _grid, _name, _ = cli.prepare(a)
    return spec


# ---- spaces ---------------------------------------------------------------------------------------------
def test_treegrpo_window_is_constrained_to_hold_d():
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    base = {"sampler": {"steps": 6}}
    for _ in range(30):
        ov = spaces.builtin_space("treegrpo", ["k", "d", "window"])(study.ask(), base)
        assert set(ov) == {"algo.k", "algo.d", "algo.window"}
        assert 2 <= ov["algo.k"] <= 4 and 1 <= ov["algo.d"] <= 3 and ov["algo.d"] <= ov["algo.window"] <= 6


def test_yaml_space_keys_bounds_constraints(tmp_path):
    f = tmp_path / "space.yaml"
    f.write_text("params:\n  k: {type: int, low: 2, high: 3}\n  lr: {type: float, low: 1e-6, high: 1e-4, log: true}\n"
                 "  weighting: [uniform, softmax_logprob]\n  train.optimizer_steps: {type: int, low: 1, high: k}\n"
                 "  window: {type: int, low: 1, high: sampler.steps - 1}\n"
                 "constraints: ['train.optimizer_steps < k', 'window - k <= 0']\nfixed: {sampler.steps: 4}\n")
    space = spaces.load_space_file(f, "treegrpo")
    assert [p.key for p in space.params] == ["algo.k", "train.lr", "algo.weighting", "train.optimizer_steps",
                                             "algo.window"]
    assert space.params[1].low == 1e-6  # YAML reads 1e-6 as text: converted
    fixed = {"k": 3, "lr": 1e-5, "weighting": "uniform", "train.optimizer_steps": 2, "window": 3}
    ov = space(optuna.trial.FixedTrial(fixed), {"sampler": {"steps": 50}})
    assert ov == {"sampler.steps": 4, "algo.k": 3, "train.lr": 1e-5, "algo.weighting": "uniform",
                  "train.optimizer_steps": 2, "algo.window": 3}
    with pytest.raises(spaces.InvalidCombination, match="train.optimizer_steps < k"):
        space(optuna.trial.FixedTrial({**fixed, "k": 2}))
    with pytest.raises(spaces.InvalidCombination, match="window - k <= 0"):
        space(optuna.trial.FixedTrial({**fixed, "k": 2, "train.optimizer_steps": 1}))  # window 3 > k 2
    # the window's upper bound follows the space's fixed sampler.steps (4), not the base config (50)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(10):
        try:
            assert space(study.ask(), {"sampler": {"steps": 50}})["algo.window"] <= 3
        except spaces.InvalidCombination:
            pass
    assert spaces.evaluate("window - d + 1", {"window": 5, "d": 2}, None) == 4


def test_bad_user_input_teaches(tmp_path):
    def run(*args):
        return cli.main(["--out", str(tmp_path / "x"), *TINY, *args])

    with pytest.raises(UsageError, match="Did you mean 'window'"):
        run("--algo", "treegrpo", "--space", "k,windw")
    with pytest.raises(UsageError, match="NAME=V1,V2"):
        run("--algo", "treegrpo", "--grid", "k:2,3")
    with pytest.raises(UsageError, match="unknown objective 'shapes_attr'.*eval/brightness"):
        run("--algo", "grpo", "--objective", "shapes_attr")
    with pytest.raises(UsageError, match="cannot be combined"):
        run("--algo", "treegrpo", "--grid", "k=2,3", "--space", "k")
    with pytest.raises(UsageError, match="unknown parameter for treegrpo: 'kk'"):
        run("--algo", "treegrpo", "--grid", "kk=2,3")
    with pytest.raises(UsageError, match="journal file"):
        run("--algo", "grpo", "--storage", "postgres-server-1")
    assert not (tmp_path / "x" / "trials").exists()
    # a usage error that every trial would hit (no model at the path) stops the sweep instead of pruning
    with pytest.raises(UsageError, match="no model found"):
        cli.main(["--out", str(tmp_path / "y"), *TINY, "--algo", "grpo", "--model-path", str(tmp_path / "none")])


# ---- sweeps on the tiny model ---------------------------------------------------------------------------
def test_four_trial_sweep_on_journal_writes_run_dirs_and_table(tmp_path, small_space):
    out = tmp_path / "sw"
    assert cli.main(["--algo", "grpo", "--space-file", small_space, "--trials", "4", "--study", "s", "--out", str(out),
                     "--sampler-seed", "0", *TINY]) == 0
    assert (out / "sweeps" / "s.journal").is_file()
    rows = _rows(out / "trials.csv")
    assert [r["number"] for r in rows] == ["0", "1", "2", "3"]
    assert all(r["state"] == "COMPLETE" and r["stop_reason"] == "budget_iterations" for r in rows)
    for r in rows:
        run = out / "trials" / r["number"]
        final = json.loads((run / "final.json").read_text())
        manifest = json.loads((run / "manifest.json").read_text())
        assert manifest["config"]["algo"]["group_size"] == int(r["params_group_size"])
        assert manifest["seed"] == 0  # one seed for the whole study
        assert float(r["value"]) == pytest.approx(final["final_eval"]["eval/brightness"])
    assert json.loads((out / "sweep.json").read_text())["states"] == {"COMPLETE": 4}


def test_grid_enumerates_exactly_the_grid_and_prunes_invalid_points(tmp_path):
    out = tmp_path / "g"
    assert cli.main(["--algo", "grpo", "--grid", "group_size=2,3", "clip_range=1e-4,1e-3", "--out", str(out),
                     *TINY]) == 0
    rows = _rows(out / "trials.csv")
    got = sorted((int(r["params_group_size"]), float(r["params_clip_range"])) for r in rows)
    assert got == sorted(itertools.product([2, 3], [1e-4, 1e-3]))
    assert all(r["state"] == "COMPLETE" for r in rows)
    # d > window cannot run: pruned with the algorithm's message, no run directory
    out = tmp_path / "bad"
    cli.main(["--algo", "treegrpo", "--grid", "d=1,2", "window=1", "--set", "algo.k=2", "--out", str(out), *TINY])
    rows = {r["params_d"]: r for r in _rows(out / "trials.csv")}
    assert rows["1"]["state"] == "COMPLETE"
    assert rows["2"]["state"] == "PRUNED" and "algo.d=2 > algo.window=1" in rows["2"]["reason"]
    assert not (out / "trials" / rows["2"]["number"]).exists()


class _AlwaysPrune(optuna.pruners.BasePruner):
    def prune(self, study, trial):
        return True


def test_pruned_trial_stops_early_and_shows_as_pruned(tmp_path):
    spec = _spec(tmp_path, "--budget-per-trial", "3it")
    study = optuna.create_study(pruner=_AlwaysPrune(), direction="maximize")
    study.optimize(Objective(spec), n_trials=1, catch=(TrialFailed,))
    t = study.trials[0]
    assert t.state == TrialState.PRUNED and t.user_attrs["reason"].startswith("pruned at iteration 1")
    assert t.intermediate_values and min(t.intermediate_values) == 1
    final = json.loads((tmp_path / "trials" / "0" / "final.json").read_text())
    assert final["stop_reason"] == "pruned" and final["iterations"] == 1
    # the evaluation after the last iteration is reported but never pruned: the run is already done
    spec = _spec(tmp_path / "last", "--budget-per-trial", "1it")
    study = optuna.create_study(pruner=_AlwaysPrune(), direction="maximize")
    study.optimize(Objective(spec), n_trials=1, catch=(TrialFailed,))
    assert study.trials[0].state == TrialState.COMPLETE and study.trials[0].intermediate_values


def test_failing_trials_are_recorded_and_the_sweep_goes_on(tmp_path):
    import torch

    from bench.run import runner

    def flaky(cfg, **kw):
        n = int(Path(cfg["out"]).name)
        if n == 0:
            raise RuntimeError("boom")
        if n == 1:
            return RunSummary(Path(cfg["out"]), "nonfinite", 1, 2, 10, 0.1)
        if n == 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return runner.run(cfg, **kw)

    spec = _spec(tmp_path)
    study = optuna.create_study(direction="maximize")
    study.optimize(Objective(spec, run_fn=flaky), n_trials=4, catch=(TrialFailed,))
    states = [t.state for t in study.trials]
    assert states == [TrialState.FAIL] * 3 + [TrialState.COMPLETE]
    reasons = [t.user_attrs["reason"] for t in study.trials[:3]]
    assert reasons[0] == "error: RuntimeError: boom"
    assert reasons[1].startswith("nonfinite")
    assert reasons[2].startswith("out of memory")
    rows = st.trial_rows(study, ["value"], 0)
    assert rows[0]["reason"] == "error: RuntimeError: boom" and rows[3]["state"] == "COMPLETE"


def test_resume_requeues_a_trial_whose_worker_died(tmp_path, small_space):
    out = tmp_path / "r"
    args = ["--algo", "grpo", "--space-file", small_space, "--study", "r", "--out", str(out), *TINY]
    assert cli.main([*args, "--trials", "1"]) == 0
    study, _ = _study(out, "r")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    t = study.ask()
    t.suggest_int("group_size", 2, 8)
    t.set_user_attr("worker", {**st.worker_identity(30.0), "pid": dead.pid, "start": "0"})
    assert cli.main([*args, "--trials", "2"]) == 0
    trials = _study(out, "r")[0].trials
    assert [x.state for x in trials] == [TrialState.COMPLETE, TrialState.FAIL, TrialState.COMPLETE]
    assert "died" in trials[1].user_attrs["reason"] and trials[1].user_attrs["reason"].endswith("re-queued")
    assert trials[2].params == trials[1].params and trials[2].user_attrs["requeued_from"] == 1
    # a worker with another sweep definition is refused
    with pytest.raises(UsageError, match="seed: study has 0, this worker has 1"):
        cli.main([*args, "--trials", "2", "--seed", "1"])


def test_multi_objective_writes_a_pareto_set(tmp_path, small_space):
    out = tmp_path / "mo"
    assert cli.main(["--algo", "grpo", "--space-file", small_space, "--trials", "2", "--multi-objective", "nfe",
                     "--out", str(out), *TINY]) == 0
    rows = _rows(out / "trials.csv")
    assert all(float(r["cost_nfe"]) == float(r["nfe_total"]) > 0 for r in rows)
    pareto = _rows(out / "pareto.csv")
    assert pareto and {r["number"] for r in pareto} <= {r["number"] for r in rows}


def test_two_seeds_per_trial_run_both_and_average(tmp_path, small_space):
    """--seeds-per-trial 2 end to end: each trial trains seeds 0 and 1 in trials/<n>/seed<S>/, its value is the
    mean of their final values and its cost (multi-objective) their summed NFE; the table says which seeds."""
    out = tmp_path / "two"
    assert cli.main(["--algo", "grpo", "--space-file", small_space, "--trials", "1", "--multi-objective", "nfe",
                     "--seeds-per-trial", "2", "--out", str(out), *TINY]) == 0
    (row,) = _rows(out / "trials.csv")
    assert row["state"] == "COMPLETE" and row["seed"] == "0-1"
    finals = [json.loads((out / "trials" / "0" / f"seed{s}" / "final.json").read_text()) for s in (0, 1)]
    seeds = [json.loads((out / "trials" / "0" / f"seed{s}" / "manifest.json").read_text())["seed"] for s in (0, 1)]
    assert seeds == [0, 1]
    vals = [f["final_eval"]["eval/brightness"] for f in finals]
    assert json.loads(row["seed_values"]) == pytest.approx(vals, rel=1e-12)
    assert float(row["value"]) == pytest.approx(sum(vals) / 2, rel=1e-12)
    assert float(row["cost_nfe"]) == float(row["nfe_total"]) == sum(f["nfe_total"] for f in finals)


def _worker(out, storage, name, trials, space):
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-m", "sweeps.cli", "--algo", "grpo", "--space-file", space,
                             "--trials", str(trials), "--study", name, "--storage", storage, "--out", str(out),
                             *TINY], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.mark.slow  # end-to-end variant (make test-slow; CI runs it)
@pytest.mark.parametrize("backend", ["sqlite"])
def test_two_workers_share_one_study(tmp_path, backend, small_space):
    out = tmp_path / "w"
    storage = f"sqlite:///{tmp_path / 'study.db'}" if backend == "sqlite" else str(tmp_path / "s.journal")
    procs = [_worker(out, storage, "shared", 4, small_space), _worker(out, storage, "shared", 4, small_space)]
    logs = [p.communicate(timeout=240)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), logs
    study = optuna.load_study(study_name="shared", storage=st.make_storage(storage, out, "shared")[0])
    done = [t for t in study.trials if t.state == TrialState.COMPLETE]
    assert len(done) == 4 and len({t.number for t in study.trials}) == len(study.trials)
    workers = {t.user_attrs["worker"]["pid"] for t in done}
    assert len(workers) == 2, "both workers ran trials"
    assert sorted(p.name for p in (out / "trials").iterdir()) == sorted(str(t.number) for t in done)


@pytest.mark.postgres
def test_two_workers_share_a_postgres_study(tmp_path, small_space):
    url = os.environ.get("TREEBENCH_POSTGRES_URL")
    if not url:
        pytest.skip("set TREEBENCH_POSTGRES_URL=postgresql://USER@127.0.0.1/DB (scripts/postgres_sweep_demo.sh)")
    name = f"pg-{os.getpid()}-{int(time.time())}"
    procs = [_worker(tmp_path / "a", url, name, 4, small_space), _worker(tmp_path / "b", url, name, 4, small_space)]
    logs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), logs
    study = optuna.load_study(study_name=name, storage=st.make_storage(url, tmp_path, name)[0])
    done = [t for t in study.trials if t.state == TrialState.COMPLETE]
    assert len(done) == 4 and len({t.user_attrs["worker"]["pid"] for t in done}) == 2


def test_stale_trial_detection_for_remote_workers():
    def running(**attrs):
        return optuna.trial.create_trial(state=TrialState.RUNNING, user_attrs=attrs)

    remote = {"host": "elsewhere", "pidns": None, "pid": 1, "start": None, "heartbeat_s": 30.0}
    now = 1_000_000.0
    assert st.stale_reason(running(worker=remote, heartbeat=now - 60), 600, now) is None
    assert "no heartbeat from elsewhere:1 for 700 s" in st.stale_reason(running(worker=remote, heartbeat=now - 700),
                                                                         600, now)
    # the grace period is at least three heartbeat intervals
    slow = {**remote, "heartbeat_s": 400.0}
    assert st.stale_reason(running(worker=slow, heartbeat=now - 700), 600, now) is None
    # a worker without heartbeats is never declared dead from another host
    assert st.stale_reason(running(worker={**remote, "heartbeat_s": 0}, heartbeat=now - 10**6), 600, now) is None
    # this very process is alive
    assert st.stale_reason(running(worker=st.worker_identity(30.0), heartbeat=now - 10**6), 600, now) is None
