"""CLI: exit codes, did-you-mean, fast --help, the documented run command."""

import json
import subprocess
import sys

import pytest

from bench.cli import main


def _bench(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "bench.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


def test_help_imports_no_torch_models():
    code = ("import sys; from bench.cli import main\n"
            "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "heavy = [m for m in ('torch', 'diffusers', 'transformers', 'open_clip') if m in sys.modules]\n"
            "print('HEAVY', heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60).stdout
    assert "HEAVY []" in out


def test_list_does_not_import_models(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert "treegrpo" in out and "shapes_attr" in out and "tiny-random" in out
    code = ("import sys; from bench.cli import main; main(['list'])\n"
            "print('HEAVY', [m for m in ('diffusers', 'transformers', 'open_clip') if m in sys.modules])")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60).stdout
    assert "HEAVY []" in res


@pytest.mark.parametrize("args,msg", [
    (["run", "--budget", "5x"], "24h"),
    (["run", "--algo", "treegrpoo"], "Did you mean 'treegrpo'"),
    (["run", "--reward", "brightnes", "--algo", "grpo", "--model", "tiny-random", "--budget", "1it"],
     "Did you mean 'brightness'"),
    (["run", "--set", "sampler.stepss=3"], "sampler.steps"),
    (["run", "--set", "nokey"], "key=value"),
    (["rnu"], "Did you mean 'run'"),
])
def test_usage_errors_exit_2(args, msg, tmp_path, capsys):
    if args[0] == "run":
        args = [*args, "--out", str(tmp_path / "r")]
    try:
        code = main(args)
    except SystemExit as e:  # argparse-level errors (an unknown command) exit through the parser
        code = e.code
    assert code == 2
    assert msg in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


@pytest.mark.slow  # end-to-end variant (make test-slow; CI runs it)
def test_run_3it_via_cli(tmp_path):
    out = tmp_path / "x"
    res = _bench("run", "--algo", "grpo", "--model", "tiny-random", "--budget", "3it", "--out", str(out),
                 "--set", "sampler.steps=3", "--no-progress")
    assert res.returncode == 0, res.stderr
    assert "run directory" in res.stdout
    for f in ("manifest.json", "iterations.jsonl", "evals.jsonl", "final.json"):
        assert (out / f).is_file()
    assert json.loads((out / "final.json").read_text())["stop_reason"] == "budget_iterations"
    again = _bench("run", "--algo", "grpo", "--model", "tiny-random", "--budget", "1it", "--out", str(out))
    assert again.returncode == 2 and "--overwrite" in again.stderr
