"""Where `bench compare` runs execute (bench/fleet/launch.py): N at once with pinned threads and identical records,
one GPU per concurrent run, submitit's local executor end to end, and the launcher's usage errors."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from bench.errors import UsageError
from bench.fleet import compare, launch
from bench.run.records import TIMING_KEYS

#: the report steps here check the PDF, the printed verdict and verdict.json; their per-page images
#: (report_files/: most of a report's time) are tested by tests/test_reports_pdf.py
NOFILES = ["--no-report-files"]

#: a stand-in runner: records its thread setting, its GPU and the most stand-in runs it saw running at once. Each
#: holds a marker file in $PROBE_LIVE while it runs; it waits (up to 20 s) until it has seen a second one, then
#: watches 0.5 s more, so "two at a time" does not depend on how fast the machine starts processes
PROBE = """
import json, os, sys, time

out = sys.argv[sys.argv.index('--out') + 1]
os.makedirs(out, exist_ok=True)
live = os.environ['PROBE_LIVE']
me = os.path.join(live, str(os.getpid()))
open(me, 'w').close()
peak, t0, paired = 0, time.time(), None
while time.time() - t0 < 20 and (paired is None or time.time() - paired < 0.5):
    peak = max(peak, len(os.listdir(live)))
    if peak >= 2 and paired is None:
        paired = time.time()
    time.sleep(0.01)
os.remove(me)
json.dump({'peak': peak, 'omp': os.environ.get('OMP_NUM_THREADS'), 'gpu': os.environ.get('CUDA_VISIBLE_DEVICES')},
          open(os.path.join(out, 'probe.json'), 'w'))
"""


@pytest.fixture
def probe_runner(monkeypatch, tmp_path):
    live = tmp_path / "live"
    live.mkdir()
    monkeypatch.setenv("PROBE_LIVE", str(live))
    monkeypatch.setattr(compare, "RUNNER", [sys.executable, "-c", PROBE])


def _probes(out: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(out.glob("*/seed*/probe.json"))]


def test_jobs_run_side_by_side_with_pinned_threads(probe_runner, tmp_path, capsys):
    out = tmp_path / "par"
    assert compare.main([*NOFILES, "--algos", "ddpo,treegrpo", "--budget", "1it", "--seeds", "2", "--out", str(out),
                         "--jobs", "2", "--threads-per-run", "1", "--no-report"]) == 0
    probes = _probes(out)
    assert len(probes) == 4 and {p["omp"] for p in probes} == {"1"}
    # two at a time: some run saw another running; none saw more than two
    assert max(p["peak"] for p in probes) == 2
    text = capsys.readouterr().out
    assert text.count("== compare") == 4 and "1 thread(s)" in text


def test_one_gpu_per_concurrent_run(probe_runner, tmp_path, monkeypatch):
    monkeypatch.setattr(launch, "visible_gpus", lambda: ["3", "5"])
    out = tmp_path / "gpu"
    assert compare.main([*NOFILES, "--algos", "ddpo,treegrpo", "--budget", "1it", "--seeds", "1", "--out", str(out),
                         "--jobs", "2", "--no-report"]) == 0
    assert sorted(p["gpu"] for p in _probes(out)) == ["3", "5"]
    with pytest.raises(UsageError, match="--jobs 3 needs one GPU per concurrent run, 2 visible"):
        launch.device_slots(3, None)
    assert launch.device_slots(2, "cpu") == [None, None]  # CPU runs are never pinned to a GPU


def _records(run: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING_KEYS and k != "peak_mem_mb"}
            for line in (run / "iterations.jsonl").read_text().splitlines()]


@pytest.mark.slow  # end-to-end variant (make test-slow; CI runs it)
def test_jobs_2_gives_the_records_of_jobs_1(tmp_path):
    """Real `bench run`s on the tiny model: side by side (2 jobs) or one by one, same records."""
    common = ["--algos", "grpo,dancegrpo", "--budget", "2it", "--seeds", "1", "--model", "tiny-random",
              "--threads-per-run", "1", "--no-report", "--set", "sampler.steps=3", "--set", "algo.group_size=2",
              "--set", "train.prompts_per_iteration=2", "--set", "eval.every=0", "--set", "eval.at_start=false",
              "--set", "run.progress=false"]
    assert compare.main([*NOFILES, *common, "--out", str(tmp_path / "one"), "--jobs", "1"]) == 0
    assert compare.main([*NOFILES, *common, "--out", str(tmp_path / "two"), "--jobs", "2"]) == 0
    for algo in ("grpo", "dancegrpo"):
        a, b = _records(tmp_path / "one" / algo / "seed0"), _records(tmp_path / "two" / algo / "seed0")
        assert len(a) == 2 and a == b


def test_submitit_local_executor_runs_a_comparison_and_its_report(fake_bench_run, tmp_path, capsys):
    pytest.importorskip("submitit")
    out = tmp_path / "sub"
    rc = compare.main([*NOFILES, "--algos", "treegrpo,dancegrpo", "--budget", "4it", "--seeds", "1", "--reps", "200",
                       "--out", str(out), "--launcher", "submitit-local", "--time-limit", "5"])
    assert rc == 0
    text = capsys.readouterr().out
    assert text.count("== submitted") == 2 and text.count("finished (log") == 2
    for algo in ("treegrpo", "dancegrpo"):
        assert (out / algo / "seed0" / "final.json").is_file()
    assert (out / "report.pdf").stat().st_size > 10_000
    assert any((out / "submitit").glob("*_log.out"))  # submitit's own logs of each job


def test_submitit_failure_is_reported(fake_bench_run, tmp_path, capsys):
    pytest.importorskip("submitit")
    rc = compare.main([*NOFILES, "--algos", "ddpo", "--budget", "1it", "--seeds", "1", "--out", str(tmp_path / "f"),
                       "--launcher", "submitit-local", "--set", "fail=1", "--no-report"])
    assert rc == 1
    out = capsys.readouterr()
    assert "[ddpo seed0] job" in out.out and "FAILED" in out.out and "1 of 1 runs failed" in out.err


def test_multi_gpu_jobs_run_under_accelerate_launch():
    runner = [sys.executable, "-m", "bench.cli"]
    cmd = [*runner, "run", "--algo", "treegrpo", "--out", "x"]
    assert launch.submitit_command(cmd, runner, 1) == cmd
    multi = launch.submitit_command(cmd, runner, 4)
    assert "launch" in multi and multi[multi.index("--num_processes") + 1] == "4" and "--multi_gpu" in multi
    assert multi[-7:] == ["-m", "bench.cli", "run", "--algo", "treegrpo", "--out", "x"]
    with pytest.raises(UsageError, match="standard runner"):
        launch.submitit_command([sys.executable, "fake.py", "run"], [sys.executable, "fake.py"], 2)


@pytest.mark.parametrize("argv, message", [
    (["--jobs", "0"], "--jobs must be >= 1"),
    (["--threads-per-run", "0"], "--threads-per-run must be >= 1"),
    (["--launcher", "slurm", "--jobs", "2"], "--jobs is for --launcher local"),
    (["--gpus-per-run", "2"], "--gpus-per-run > 1 is for --launcher slurm"),
    (["--launcher", "slurm", "--slurm-arg", "account"], "--slurm-arg 'account': expected KEY=VALUE"),
    (["--launcher", "slurm", "--time-limit", "0"], "--time-limit must be >= 1 minute"),
])
def test_launcher_usage_errors(argv, message, tmp_path, capsys):
    assert compare.main([*NOFILES, "--algos", "ddpo", "--budget", "1it", "--out", str(tmp_path / "u"), *argv]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.slow  # end-to-end variant (make test-slow; CI runs it)
def test_sweep_workers_as_submitit_local_jobs_share_one_study(tmp_path):
    pytest.importorskip("submitit")
    optuna = pytest.importorskip("optuna")
    from sweeps import cli as sweep_cli

    space = tmp_path / "space.yaml"
    space.write_text("params:\n  group_size: {type: int, low: 2, high: 3}\n")
    out = tmp_path / "sw"
    rc = sweep_cli.main(["--algo", "grpo", "--space-file", str(space), "--trials", "3", "--study", "sub",
                         "--out", str(out), "--model", "tiny-random", "--budget-per-trial", "1it", "--pruner", "none",
                         "--set", "sampler.steps=3", "--set", "eval.every=1", "--set", "eval.num_prompts=2",
                         "--set", "train.prompts_per_iteration=1", "--launcher", "submitit-local", "--n-jobs", "2"])
    assert rc == 0
    from sweeps import study as st

    study = optuna.load_study(study_name="sub", storage=st.make_storage(None, out, "sub")[0])
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(done) >= 3  # two workers may each finish the trial they hold when the target is reached
    assert (out / "trials.csv").is_file() and len(list((out / "submitit").glob("*_log.out"))) == 2


def test_sweep_refuses_a_password_on_the_command_line_of_submitted_workers(tmp_path, capsys):
    pytest.importorskip("optuna")
    from sweeps import cli as sweep_cli

    with pytest.raises(UsageError, match="export TREEBENCH_STORAGE instead"):
        sweep_cli._submit_workers([], sweep_cli.build_parser().parse_args(
            ["--algo", "grpo", "--launcher", "slurm", "--storage", "postgresql://u:secret@db/s"]), tmp_path)
