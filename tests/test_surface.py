"""The daily-use surface: results printed where the user looks, progress without a terminal, bench show,
bench env / --version, the shared reward check, secrets in storage URLs, the documented Python API."""

import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from bench.cli import main
from bench.run.progress import Progress, end_summary, eval_line

ROOT = Path(__file__).resolve().parent.parent
TINY = ["--algo", "grpo", "--model", "tiny-random", "--set", "sampler.steps=3", "--set", "eval.every=1",
        "--set", "eval.num_prompts=2", "--set", "train.prompts_per_iteration=1"]


def _bench(*args, env=None, timeout=300):
    return subprocess.run([sys.executable, "-m", "bench.cli", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, env={**os.environ, **(env or {})})


# ---- known answers of the printed lines -------------------------------------------------------------
def test_eval_line_shows_change_from_first_evaluation():
    first = {"iteration": 0, "eval/a": 0.5, "eval/a/std": 0.1, "eval/b": 1.0, "samples_png": "x.png"}
    later = {"iteration": 4, "eval/a": 0.625, "eval/a/std": 0.1, "eval/a/part": 3.0, "eval/b": 0.75}
    assert eval_line(first, first) == "eval @ it 0: a 0.5000, b 1.0000"
    assert eval_line(later, first) == "eval @ it 4: a 0.6250 (+0.1250), b 0.7500 (-0.2500)"


def test_end_summary_table():
    evals = [{"iteration": 0, "eval/a": 0.5}, {"iteration": 2, "eval/a": 0.75}, {"iteration": 4, "eval/a": 0.625}]
    final = {"stop_reason": "budget_iterations", "iterations": 4, "samples_total": 64, "nfe_total": 900,
             "seconds_total": 3.25}
    text = end_summary(evals, final, "runs/x")
    lines = text.splitlines()
    assert lines[0] == "run finished (budget_iterations): 4 iterations, 64 samples, 900 NFE, 3.2 s training"
    assert lines[1].split() == ["eval", "reward", "(it", "0", "->", "4)", "start", "end", "change", "best"]
    assert lines[3].split() == ["a", "0.5000", "0.6250", "+0.1250", "0.7500", "@", "it", "2"]
    assert lines[-1] == "run directory: runs/x   (bench show runs/x)"


# ---- progress: a terminal gets a bar, a log file gets plain lines -----------------------------------
REC = {"iteration": 3, "reward_mean": 0.25, "nfe_total": 120, "samples_total": 32}


def test_progress_without_terminal_prints_plain_lines():
    buf = io.StringIO()
    p = Progress(stream=buf, every_s=0)
    assert not p.tty
    p.update(0.25, REC)
    p.update(0.5, {**REC, "iteration": 4})
    p.close()
    lines = buf.getvalue().splitlines()
    assert "\r" not in buf.getvalue() and len(lines) == 2
    assert lines[0].startswith("[ 25.0% budget] it 3 reward 0.2500 nfe 120 samples 32 elapsed ")
    assert re.search(r"eta \d\d:\d\d$", lines[1])


def test_progress_without_terminal_throttles_to_every_n_seconds():
    buf = io.StringIO()
    p = Progress(stream=buf, every_s=3600)
    for i in range(5):
        p.update(0.1 * (i + 1), {**REC, "iteration": i})
    p.update(1.0, {**REC, "iteration": 9})  # the last update is always shown
    assert [ln.split("] it ")[1].split()[0] for ln in buf.getvalue().splitlines()] == ["0", "9"]


def test_progress_on_terminal_is_a_tqdm_bar():
    class Tty(io.StringIO):
        def isatty(self):
            return True

    buf = Tty()
    p = Progress(stream=buf)
    assert p.tty
    p.update(0.5, REC)
    p.close()
    assert "\r" in buf.getvalue() and "it 3 reward 0.2500" in buf.getvalue()


# ---- a real run through the CLI, then bench show ---------------------------------------------------
@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("surface") / "run"
    res = _bench("run", *TINY, "--budget", "2it", "--out", str(out))
    assert res.returncode == 0, res.stderr
    return out, res


def test_run_prints_evaluations_and_result_table(finished_run):
    out, res = finished_run
    evals = [json.loads(ln) for ln in (out / "evals.jsonl").read_text().splitlines()]
    assert [e["iteration"] for e in evals] == [0, 1, 2]
    shown = [ln for ln in res.stdout.splitlines() if ln.startswith("eval @ it")]
    assert len(shown) == 3
    delta = evals[2]["eval/brightness"] - evals[0]["eval/brightness"]
    assert shown[2] == f"eval @ it 2: brightness {evals[2]['eval/brightness']:.4f} ({delta:+.4f})"
    row = next(ln for ln in res.stdout.splitlines() if ln.startswith("brightness "))
    assert row.split()[:4] == ["brightness", f"{evals[0]['eval/brightness']:.4f}",
                               f"{evals[2]['eval/brightness']:.4f}", f"{delta:+.4f}"]
    assert "run finished (budget_iterations): 2 iterations" in res.stdout


def test_run_progress_in_a_log_file_is_one_plain_line_per_iteration(finished_run):
    _, res = finished_run  # stderr is a pipe here, as under SLURM or `| tee`
    lines = [ln for ln in res.stderr.splitlines() if "budget]" in ln]
    assert "\r" not in res.stderr
    assert [ln.split("%")[0].strip("[ ") for ln in lines] == ["50.0", "100.0"]


def test_show_table_json_markdown(finished_run, capsys):
    out, _ = finished_run
    final = json.loads((out / "final.json").read_text())
    assert main(["show", str(out.parent), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == 1
    r = rows[0]
    assert (r["algorithm"], r["seed"], r["budget"], r["iterations"], r["samples"], r["nfe"]) == \
        ("grpo", 0, "2it", 2, final["samples_total"], final["nfe_total"])
    assert r["final_eval"]["brightness"] == pytest.approx(final["final_eval"]["eval/brightness"])
    assert r["best_eval"]["value"] == pytest.approx(final["best_eval"]["value"])
    assert main(["show", str(out)]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split()[:3] == ["run", "algorithm", "seed"] and "grpo" in table[2]
    assert main(["show", str(out), "--markdown"]) == 0
    md = capsys.readouterr().out.splitlines()
    assert md[0].startswith("| run | algorithm |") and md[2].count("|") == md[0].count("|")


def test_show_refuses_a_path_without_runs(tmp_path, capsys):
    assert main(["show", str(tmp_path)]) == 2
    assert "no run directory below it" in capsys.readouterr().err
    assert main(["show", str(tmp_path / "none")]) == 2


# ---- small commands -----------------------------------------------------------------------------------
def test_version_and_env():
    res = _bench("--version")
    assert res.returncode == 0 and res.stdout.startswith("treebench ")
    res = _bench("env", "--json")
    assert res.returncode == 0, res.stderr
    info = json.loads(res.stdout)
    assert info["packages"]["torch"] and "cuda_available" in info
    assert info["rewards"]["brightness"] == "built-in"
    assert set(info["rewards"]) >= {"hpsv2", "clip_score", "shapes_attr"}


def test_rewards_alone_names_check(capsys):
    assert main(["rewards"]) == 2
    assert "a subcommand is required: check" in capsys.readouterr().err


def test_list_presets_each_once_under_its_algorithm(capsys):
    assert main(["list", "--presets"]) == 0
    out = capsys.readouterr().out
    block = out.split("presets (--algo ALGO --preset NAME):")[1].split("prompt sets:")[0]
    current, seen = None, []
    for ln in block.splitlines():
        if ln.startswith("  ") and not ln.startswith("    "):
            current = ln.strip().rstrip(":")
        elif ln.startswith("    "):
            seen.append((current, ln.split()[0]))
    assert ("treegrpo", "treegrpo-paper") in seen and ("dancegrpo", "treegrpo-paper") in seen
    assert ("ddpo", "treegrpo-paper") in seen
    assert len(seen) == len(set(seen))


# ---- one reward check, in one order, before anything is created ------------------------------------
@pytest.mark.parametrize("flag", ["--reward", pytest.param("--eval-rewards", marks=pytest.mark.slow)])
def test_reward_without_weights_refused_before_anything_exists(flag, tmp_path):
    """clip_score used to be checked only after the base-model evaluation, leaving a run directory."""
    env = {"TREEBENCH_WEIGHTS": str(tmp_path / "weights"), "HF_HOME": str(tmp_path / "hf"),
           "HF_HUB_CACHE": str(tmp_path / "hf" / "hub"), "XDG_CACHE_HOME": str(tmp_path / "cache")}
    out = tmp_path / "run"
    res = _bench("run", *TINY, flag, "clip_score", "--budget", "1it", "--out", str(out), env=env)
    assert res.returncode == 2, res.stderr
    assert not out.exists()
    check = _bench("rewards", "check", "clip_score", "--json", env=env)
    why = json.loads(check.stdout)[0]
    assert why["status"] in ("missing-package", "missing-weights")
    first = str(why["why"]).splitlines()[0]
    assert first in res.stderr  # the run and the check report the same cause


# ---- secrets -------------------------------------------------------------------------------------------
def test_storage_password_is_never_printed(monkeypatch):
    from bench.errors import UsageError
    from sweeps import study as st

    monkeypatch.setattr(st.time, "sleep", lambda s: None)
    url = "postgresql://alice:s3cr3t-pw@127.0.0.1:1/db"
    assert st.redact(url) == "postgresql://alice:***@127.0.0.1:1/db"
    with pytest.raises(UsageError) as e:
        st.make_storage(url, Path("unused"), "s")
    assert "s3cr3t-pw" not in str(e.value) and "alice:***@127.0.0.1" in str(e.value)


def test_storage_from_environment(monkeypatch, tmp_path):
    from sweeps.cli import build_parser

    monkeypatch.setenv("TREEBENCH_STORAGE", "postgresql://bob:pw@host/db")
    assert build_parser().parse_args(["--algo", "grpo"]).storage == "postgresql://bob:pw@host/db"


@pytest.mark.slow  # end-to-end variant (make test-slow; CI runs it)
def test_sweep_with_password_leaves_it_nowhere(tmp_path):
    out = tmp_path / "sw"
    res = subprocess.run([sys.executable, "-m", "bench.cli", "sweep", "--algo", "grpo", "--model", "tiny-random",
                          "--budget-per-trial", "1it", "--trials", "1", "--out", str(out)],
                         capture_output=True, text=True, timeout=300, cwd=ROOT,
                         env={**os.environ, "TREEBENCH_STORAGE": "postgresql://u:hunter22@127.0.0.1:1/db"})
    assert res.returncode == 2
    assert "hunter22" not in res.stdout + res.stderr and "cannot open the database" in res.stderr
    assert not out.exists()


# ---- the documented Python API -------------------------------------------------------------------------
def test_api_doc_example_runs(tmp_path, monkeypatch, capsys):
    pytest.importorskip("pandas")
    text = (ROOT / "docs" / "API.md").read_text()
    code = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "docs/API.md", "exec"), {})
    assert "enough 2" in capsys.readouterr().out
    assert (tmp_path / "runs" / "api-example" / "final.json").is_file()
