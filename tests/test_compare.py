"""bench compare with a stand-in runner (reports.synthetic's fake `bench run`)."""

import re
import sys
from pathlib import Path

import pytest

from bench import compare


@pytest.fixture
def fake_runner(monkeypatch):
    monkeypatch.setattr(compare, "RUNNER", [sys.executable, str(Path(__file__).with_name("synthetic_runs.py"))])


def test_compare_runs_every_algorithm_and_seed_then_reports(fake_runner, tmp_path, capsys):
    out = tmp_path / "cmp"
    rc = compare.main(["--algos", "treegrpo,dancegrpo", "--budget", "10it", "--seeds", "2", "--out", str(out),
                       "--reward", "shapes_pref", "--set", "train.lr=1e-5"])
    assert rc == 0
    for algo in ("treegrpo", "dancegrpo"):
        for s in (0, 1):
            assert (out / algo / f"seed{s}" / "final.json").is_file()
    assert (out / "report.pdf").stat().st_size > 10_000
    text = capsys.readouterr().out
    assert "[treegrpo seed1] synthetic run treegrpo seed 1 budget 10it" in text  # streamed, prefixed
    # seed-major order: every algorithm at seed 0 before any at seed 1
    order = re.findall(r"== compare \d/4: .* --algo (\w+) .* --seed (\d)", text)
    assert order == [("treegrpo", "0"), ("dancegrpo", "0"), ("treegrpo", "1"), ("dancegrpo", "1")]


def test_dry_run_passes_the_same_options_to_every_run(tmp_path, capsys):
    assert compare.main(["--algos", "ddpo,treegrpo", "--budget", "20m", "--seeds", "0,5", "--out", str(tmp_path),
                         "--model", "shapes", "--set", "a=1", "--set", "b=2", "--overwrite", "--dry-run"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 4
    tails = {line.split("--out ")[1].split(" ", 1)[1] for line in lines}
    assert tails == {"--model shapes --set a=1 --set b=2 --overwrite"}
    assert "run --algo treegrpo --budget 20m --seed 5 --out" in lines[-1]


def test_failed_runs_are_reported(fake_runner, tmp_path, capsys):
    rc = compare.main(["--algos", "ddpo", "--budget", "1it", "--seeds", "1", "--out", str(tmp_path / "f"),
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
])
def test_usage_errors(argv, message, tmp_path, capsys):
    assert compare.main([*argv, "--out", str(tmp_path)]) == 2
    assert message in capsys.readouterr().err


def test_stream_keeps_final_progress_state_in_logs(capsys):
    code = "import sys; sys.stdout.write('bar 1%\\rbar 50%\\rbar 100%\\ndone\\n'); sys.stdout.write('tail')"
    assert compare._stream([sys.executable, "-c", code], "[x]") == 0
    assert capsys.readouterr().out == "[x] bar 100%\n[x] done\n[x] tail\n"


def test_report_only_without_runs_is_a_usage_error(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert compare.main(["--algos", "ddpo", "--budget", "1m", "--out", str(tmp_path / "empty"), "--report-only"]) == 2
    assert "no run directories" in capsys.readouterr().err
