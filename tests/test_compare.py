"""bench compare (bench/fleet/compare.py) with a stand-in runner: tests/synthetic_runs.py as a fake `bench run`."""

import json
import re
import subprocess
import sys

import pytest
from synthetic_runs import _head_commit, write_run

from bench.fleet import compare, launch
from bench.fleet import tune as tune_mod

#: the report steps here check the PDF, the printed verdict and verdict.json; their per-page images
#: (report_files/: most of a report's time) are tested by tests/test_reports_pdf.py
NOFILES = ["--no-report-files"]


def test_compare_runs_every_algorithm_and_seed_then_reports(fake_bench_run, tmp_path, capsys):
    out = tmp_path / "cmp"
    rc = compare.main([*NOFILES, "--algos", "treegrpo,dancegrpo", "--budget", "10it", "--reps", "200", "--seeds", "2", "--out", str(out),
                       "--reward", "shapes_pref", "--set", "train.lr=1e-5"])
    assert rc == 0
    for algo in ("treegrpo", "dancegrpo"):
        for s in (0, 1):
            assert (out / algo / f"seed{s}" / "final.json").is_file()
    assert (out / "report.pdf").stat().st_size > 10_000
    assert not (out / "report_files").exists()  # --no-report-files (make results ships them: the default)
    rows = json.loads((out / "verdict.json").read_text())  # the machine-readable verdict beside the PDF
    assert {(r["method"], r["baseline"]) for r in rows} == {("treegrpo", "dancegrpo")}
    text = capsys.readouterr().out
    assert "[treegrpo seed1] synthetic run treegrpo seed 1 budget 10it" in text  # streamed, prefixed
    # seed-major order: every algorithm at seed 0 before any at seed 1
    order = re.findall(r"== compare \d/4: .* --algo (\w+) .* --seed (\d)", text)
    assert order == [("treegrpo", "0"), ("dancegrpo", "0"), ("treegrpo", "1"), ("dancegrpo", "1")]


def test_dry_run_passes_the_same_options_to_every_run(tmp_path, capsys):
    assert compare.main([*NOFILES, "--algos", "ddpo,treegrpo", "--budget", "20m", "--seeds", "0,5", "--out", str(tmp_path),
                         "--model", "shapes", "--set", "a=1", "--set", "b=2", "--overwrite", "--dry-run"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 4
    tails = {line.split("--out ")[1].split(" ", 1)[1] for line in lines}
    cache = subprocess.list2cmdline([f"eval.cache={tmp_path / '.eval_cache'}"])
    assert tails == {f"--model shapes --set a=1 --set b=2 --overwrite --set {cache}"}
    assert "run --algo treegrpo --budget 20m --seed 5 --out" in lines[-1]


def test_force_widens_overwrite_for_every_run_and_needs_it(tmp_path, capsys):
    base = [*NOFILES, "--algos", "treegrpo", "--budget", "2it", "--seeds", "1", "--out", str(tmp_path / "c"),
            "--dry-run"]
    assert compare.main([*base, "--overwrite", "--force"]) == 0
    (line,) = capsys.readouterr().out.strip().splitlines()
    assert " --overwrite --force " in line
    assert compare.main([*base, "--force"]) == 2
    assert "--force only widens --overwrite" in capsys.readouterr().err
    # neither is a setting of the runs: the options a later compare into DIR must match leave both out
    assert compare._run_options(["--set", "a=1", "--overwrite", "--force"]) == ["--set", "a=1"]
    cmd = tune_mod.sweep_command(["bench"], "treegrpo", ["lr"], 2, "2it", tmp_path, "eval/x", ["--overwrite", "--force"])
    assert "--force" not in cmd and "--overwrite" not in cmd


@pytest.mark.parametrize("opts, cache", [([], ".eval_cache"), (["--no-eval-cache"], None),
                                         (["--set", "eval.cache=elsewhere"], "user")])
def test_runs_and_tuning_trials_share_the_eval_cache(tmp_path, capsys, opts, cache):
    out = tmp_path / "cmp"
    argv = ["--algos", "dancegrpo,treegrpo", "--budget", "6it", "--seeds", "2", "--model", "tiny-random", "--out",
            str(out), "--tune", "lr", "--tune-trials", "2", "--tune-budget", "2it", "--dry-run", *opts]
    assert compare.main(argv) == 0
    lines = [ln for ln in capsys.readouterr().out.strip().splitlines() if not ln.startswith("#")]
    assert len(lines) == 2 + 2 * 2 * 2  # two tuning studies, then tuned and default arms at two seeds
    for line in lines:
        args = line.split()
        sets = [args[i + 1] for i, a in enumerate(args) if a == "--set" and "eval.cache" in args[i + 1]]
        if cache == ".eval_cache":
            assert sets == [f"eval.cache={out / '.eval_cache'}"], line
        elif cache is None:
            assert sets == [], line
        else:
            assert sets == ["eval.cache=elsewhere"], line  # the user's, not replaced


def test_the_eval_cache_is_not_a_comparison_option(fake_bench_run, tmp_path, capsys):
    """compare.json keeps the options that change records: a comparison extends with or without the cache."""
    out = tmp_path / "cmp"
    argv = ["--algos", "ddpo", "--budget", "1it", "--seeds", "1", "--out", str(out), "--no-report"]
    assert compare.main(argv) == 0
    assert json.loads((out / "compare.json").read_text())["options"] == []
    assert compare.main([*NOFILES, *argv, "--seeds", "2", "--no-eval-cache"]) == 0


def test_failed_runs_are_reported(fake_bench_run, tmp_path, capsys):
    rc = compare.main([*NOFILES, "--algos", "ddpo", "--budget", "1it", "--reps", "200", "--seeds", "1", "--out", str(tmp_path / "f"),
                       "--set", "fail=1"])
    assert rc == 1
    err = capsys.readouterr()
    assert "[ddpo seed0] synthetic failure requested" in err.out
    assert "cannot build the report" in err.err


@pytest.mark.parametrize("argv, message", [
    (["--algos", "treegrop", "--budget", "1m"], "Did you mean 'treegrpo'"),
    (["--algos", "ddpo", "--budget", "1m", "--seeds", "0"], "--seeds '0'"),
    (["--algos", "ddpo", "--budget", "20q"], "bad budget term '20q'"),
    (["--algos", "ddpo", "--budget", "1m", "--set", "novalue"], "KEY=VALUE"),
    (["--algos", "ddpo", "--budget", "1m", "--baseline", "treegrpo"], "not among --algos"),
    (["--algos", "ddpo", "--budget", "1m", "--sesoi", "shapes_attr"], "--sesoi 'shapes_attr': expected METRIC=VALUE"),
    (["--algos", "ddpo", "--budget", "1m", "--sesoi", "shapes_attr=0"], "positive VALUE"),
])
def test_usage_errors(argv, message, tmp_path, capsys):
    assert compare.main([*NOFILES, *argv, "--out", str(tmp_path)]) == 2
    assert message in capsys.readouterr().err


def test_stream_keeps_final_progress_state_in_logs(capsys):
    code = "import sys; sys.stdout.write('bar 1%\\rbar 50%\\rbar 100%\\ndone\\n'); sys.stdout.write('tail')"
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert launch.stream(proc, "[x]", redraw=False) == 0
    assert capsys.readouterr().out == "[x] bar 100%\n[x] done\n[x] tail\n"


def test_report_only_without_runs_is_a_usage_error(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert compare.main([*NOFILES, "--algos", "ddpo", "--budget", "1m", "--out", str(tmp_path / "empty"), "--report-only"]) == 2
    assert "no run directories" in capsys.readouterr().err


def test_rerun_skips_finished_runs_and_more_seeds_extend_the_comparison(fake_bench_run, tmp_path, capsys):
    out = tmp_path / "cmp"
    args = ["--algos", "treegrpo,dancegrpo", "--budget", "10it", "--reps", "200", "--out", str(out)]
    assert compare.main([*NOFILES, *args, "--seeds", "2"]) == 0
    capsys.readouterr()
    assert compare.main([*NOFILES, *args, "--seeds", "3"]) == 0
    text = capsys.readouterr().out
    assert "[treegrpo seed0] already finished under this budget: skipped" in text
    assert re.findall(r"== compare \d/(\d): .* --algo (\w+) .* --seed (\d)", text) == [
        ("2", "treegrpo", "2"), ("2", "dancegrpo", "2")]
    assert "verdict:" in text and "too few seeds" not in text  # 3 seeds a side now: intervals
    assert "[" in text.split("verdict:")[1]


def test_killed_runs_are_resumed_or_restarted(tmp_path, capsys):
    out, head = tmp_path / "cmp", _head_commit()
    write_run(out / "ddpo" / "seed0", algo="ddpo", final=False, git_commit=head)  # killed after a checkpoint
    (out / "ddpo" / "seed0" / "checkpoints" / "step_000004").mkdir(parents=True)
    write_run(out / "ddpo" / "seed1", algo="ddpo", seed=1, final=False)  # killed before any checkpoint
    write_run(out / "ddpo" / "seed2", algo="ddpo", seed=2, budget_spec="5it")  # finished, other budget
    assert compare.run_state(out / "ddpo" / "seed0", "10it") == "resume"
    assert compare.run_state(out / "ddpo" / "seed1", "10it") == "restart"
    assert compare.run_state(out / "ddpo" / "seed2", "5it") == "done"
    assert compare.run_state(out / "ddpo" / "seed2", "10it") == "other-budget"
    assert compare.run_state(out / "ddpo" / "seed3", "10it") == "new"
    assert compare.main([*NOFILES, "--algos", "ddpo", "--budget", "10it", "--reps", "200", "--seeds", "0,1", "--out", str(out),
                         "--dry-run"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].endswith(f"run --resume {out / 'ddpo' / 'seed0'} --budget 10it")
    assert lines[1].endswith("--seed 1 --out " + str(out / "ddpo" / "seed1") + " --set eval.cache="
                             + str(out / ".eval_cache") + " --overwrite")
    assert compare.main([*NOFILES, "--algos", "ddpo", "--budget", "10it", "--reps", "200", "--seeds", "3", "--out", str(out)]) == 2
    assert "finished under budget '5it'" in capsys.readouterr().err


def test_resume_completes_a_killed_run(fake_bench_run, tmp_path, capsys):
    out = tmp_path / "cmp"
    rc = compare.main([*NOFILES, "--algos", "ddpo", "--budget", "10it", "--reps", "200", "--seeds", "1", "--out", str(out), "--set", "kill=1"])
    assert rc == 1 and not (out / "ddpo" / "seed0" / "final.json").exists()
    capsys.readouterr()
    # the same options (a resumed `bench run --resume` gets only the budget: the stand-in then finishes)
    assert compare.main([*NOFILES, "--algos", "ddpo", "--budget", "10it", "--reps", "200", "--seeds", "1", "--out", str(out),
                         "--set", "kill=1"]) == 0
    assert "(resuming a killed run)" in capsys.readouterr().out
    assert (out / "ddpo" / "seed0" / "final.json").is_file()


def test_runs_from_other_code_are_refused_unless_allowed(fake_bench_run, tmp_path, capsys):
    out = tmp_path / "cmp"
    write_run(out / "ddpo" / "seed0", algo="ddpo", git_commit="f" * 40)
    argv = ["--algos", "ddpo,treegrpo", "--budget", "10it", "--reps", "200", "--seeds", "1", "--out", str(out)]
    assert compare.main(argv) == 2
    assert "come from other code than this checkout" in capsys.readouterr().err
    assert not (out / "treegrpo").exists()
    assert compare.main([*NOFILES, *argv, "--allow-mixed-code"]) == 0
    assert "WARNING: these runs do not come from one clean commit" in capsys.readouterr().out
    assert compare.main([*NOFILES, *argv, "--report-only"]) == 2  # the report step refuses too
    assert "do not come from one clean commit" in capsys.readouterr().err


def test_bench_cli_dispatches_compare_and_report(tmp_path, capsys):
    from bench.cli import main

    assert main(["compare", "--algos", "ddpo", "--budget", "1it", "--seeds", "1", "--out", str(tmp_path),
                 "--dry-run"]) == 0
    assert "--algo ddpo --budget 1it --seed 0" in capsys.readouterr().out
    write_run(tmp_path / "r", algo="ddpo")
    assert main(["report", str(tmp_path / "r"), "--out", str(tmp_path / "r.pdf"), "--x", "modeled"]) == 2
    assert "--x modeled needs every run priced with one cost profile" in capsys.readouterr().err


def test_extending_with_other_options_is_refused(fake_bench_run, tmp_path, capsys):
    out = tmp_path / "cmp"
    argv = ["--algos", "ddpo", "--budget", "1it", "--seeds", "1", "--out", str(out), "--no-report"]
    assert compare.main([*NOFILES, *argv, "--set", "train.lr=1e-5"]) == 0
    assert compare.main([*NOFILES, *argv, "--seeds", "2", "--set", "train.lr=1e-5"]) == 0  # same options: extends
    capsys.readouterr()
    assert compare.main([*NOFILES, *argv, "--set", "train.lr=2e-5"]) == 2
    assert "was trained with options --set train.lr=1e-5, not --set train.lr=2e-5" in capsys.readouterr().err


# ---- --controls: an A/A arm and a frozen (null) arm of the baseline --------------------------------------
def test_controls_add_an_aa_arm_on_disjoint_seeds_and_a_frozen_arm(tmp_path, capsys):
    argv = ["--algos", "treegrpo,ddpo", "--budget", "20m", "--seeds", "0,5", "--out", str(tmp_path), "--dry-run"]
    assert compare.main([*NOFILES, *argv, "--controls"]) == 0  # no dancegrpo: the first of --algos is the baseline
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 8  # 4 arms x 2 seeds
    runs = {(re.search(r"--out \S+/([^/ ]+)/seed(\d+)", line).groups()): line for line in lines}
    assert sorted(runs) == sorted([("treegrpo", "0"), ("treegrpo", "5"), ("ddpo", "0"), ("ddpo", "5"),
                                   ("treegrpo-aa", "1000"), ("treegrpo-aa", "1005"),
                                   ("treegrpo-frozen", "0"), ("treegrpo-frozen", "5")])
    aa, frozen = runs[("treegrpo-aa", "1005")], runs[("treegrpo-frozen", "5")]
    assert "--algo treegrpo" in aa and "--seed 1005" in aa and aa.endswith("--set run.label=treegrpo-aa")
    assert "train.frozen" not in aa
    assert "--algo treegrpo" in frozen and "--seed 5" in frozen
    assert frozen.endswith("--set train.frozen=true --set run.label=treegrpo-frozen")
    assert all("run.label" not in line and "frozen" not in line for key, line in runs.items()
               if key[0] in ("treegrpo", "ddpo"))
    # the A/A seeds are never the baseline's
    assert set(compare.build_arms(["ddpo"], [0, 1, 2], True)[1].seeds).isdisjoint({0, 1, 2})
    # --baseline picks the copied algorithm; so does dancegrpo when compared
    assert compare.main([*NOFILES, *argv, "--controls", "--baseline", "ddpo"]) == 0
    assert "ddpo-aa/seed1005" in capsys.readouterr().out
    assert [a.label for a in compare.build_arms(["ddpo", "dancegrpo"], [0], True)][2:] == \
        ["dancegrpo-aa", "dancegrpo-frozen"]
    # without --controls nothing changes
    assert compare.main(argv) == 0
    assert len(capsys.readouterr().out.strip().splitlines()) == 4


@pytest.mark.parametrize("argv, message", [
    (["--seeds", "0,1000"], "would also be baseline seeds"),
    (["--set", "run.label=mine"], "bench compare labels its runs itself"),
])
def test_controls_usage_errors(argv, message, tmp_path, capsys):
    assert compare.main([*NOFILES, "--algos", "ddpo", "--budget", "1m", "--controls", "--out", str(tmp_path), *argv]) == 2
    assert message in capsys.readouterr().err


def test_controls_runs_are_labelled_for_reports(fake_bench_run, tmp_path, capsys):
    from reports.load import load

    out = tmp_path / "cmp"
    assert compare.main([*NOFILES, "--algos", "treegrpo,dancegrpo", "--budget", "10it", "--seeds", "2", "--out", str(out),
                         "--controls", "--no-report"]) == 0
    for label, seeds in (("dancegrpo-aa", (1000, 1001)), ("dancegrpo-frozen", (0, 1))):
        for s in seeds:
            assert (out / label / f"seed{s}" / "final.json").is_file()
    rs = load([out])
    assert rs.labels == ["dancegrpo", "treegrpo", "dancegrpo-aa", "dancegrpo-frozen"]  # controls last
    runs = rs.runs.set_index("run")
    assert list(runs.loc[["dancegrpo-aa/seed1000", "dancegrpo-frozen/seed0"], "algo"]) == ["dancegrpo", "dancegrpo"]
    assert runs["frozen"].to_dict() == {r: r.startswith("dancegrpo-frozen/") for r in runs.index}
    assert set(rs.evals[rs.evals["label"] == "dancegrpo-aa"]["seed"]) == {1000, 1001}
    # re-running extends: the control arms are skipped like any finished run
    capsys.readouterr()
    assert compare.main([*NOFILES, "--algos", "treegrpo,dancegrpo", "--budget", "10it", "--seeds", "2", "--out", str(out),
                         "--controls", "--no-report"]) == 0
    assert "[dancegrpo-frozen seed1] already finished under this budget: skipped" in capsys.readouterr().out
    # DIR/compare.json remembers whose controls these are (the report's baseline), also for runs without
    # --controls that extend the comparison
    assert json.loads((out / "compare.json").read_text())["controls"] == "dancegrpo"
    assert compare.main([*NOFILES, "--algos", "treegrpo,dancegrpo", "--budget", "10it", "--seeds", "2", "--out", str(out),
                         "--no-report"]) == 0
    assert json.loads((out / "compare.json").read_text())["controls"] == "dancegrpo"


def test_compare_help_documents_controls(capsys):
    with pytest.raises(SystemExit):
        compare.main([*NOFILES, "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--controls" in text and "disjoint from the baseline's" in text and "train.frozen=true" in text
    assert "--no-eval-cache" in text and "DIR/.eval_cache" in text
def test_report_only_passes_the_verdict_options(tmp_path, capsys):
    from synthetic_runs import write_comparison

    out = tmp_path / "cmp"
    write_comparison(out, algos=("dancegrpo", "treegrpo"), seeds=(0,), git_commit=_head_commit())
    argv = ["--algos", "dancegrpo,treegrpo", "--budget", "10it", "--seeds", "1", "--out", str(out), "--report-only"]
    assert compare.main([*NOFILES, *argv, "--sesoi", "nope=0.1"]) == 2  # the metric names are checked by the report
    assert "--sesoi nope: not an eval metric of these runs" in capsys.readouterr().err
    assert compare.main([*NOFILES, *argv, "--targets", "0,2"]) == 2
    assert "--targets '0,2'" in capsys.readouterr().err
