"""The cases an adversarial hand probe broke (issue #30), each a test: inputs that must be refused, faults
that must end with a message and exit status 1 (never a traceback, never an empty lock file), nothing deleted
that treebench did not create, no file written through a link, the drivers' own locks, no secret on disk,
children that do not import from the current directory, and offline trackers. The bad inputs with a fixed
message are rows of tests/test_validation.py (docs/ERRORS.md)."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from bench.budget import Budget
from bench.cli import main
from bench.errors import RunLocked, UsageError, WriteFault
from bench.rundir import checkpoint, lock
from bench.rundir.runlog import check_out_dir, create_out_dir, host_info
from bench.rundir.secrets import redact, redact_argv

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parent.parent
ARGS = ["--algo", "grpo", "--model", "tiny-random", "--seed", "3", "--set", "sampler.steps=3",
        "--set", "algo.group_size=2", "--set", "eval.every=0", "--set", "eval.at_start=false",
        "--set", "run.checkpoint_every=1", "--no-progress"]


def _env(**extra):
    """A child's environment: this checkout first on its import path (the child must not need the cwd)."""
    path = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1", **extra}


def _tree(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def two_it_run(tmp_path_factory):
    """A finished 2-iteration run with a checkpoint after each iteration (copied by the tests that edit it)."""
    out = tmp_path_factory.mktemp("hard") / "run"
    assert main(["run", *ARGS, "--budget", "2it", "--out", str(out)]) == 0
    return out


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


# ---- inputs --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("spec", ["1e309nfe", "1e309it", "1e309samples", "1e309h", "0.5it", "2.5samples"])
def test_infinite_or_fractional_budgets_are_usage_errors(spec):
    with pytest.raises(UsageError, match="too large to be a limit|whole number"):  # never OverflowError
        Budget.parse(spec)
    assert Budget.parse("1e3it").iterations == 1000 and Budget.parse("2.5e6nfe").nfe == 2.5e6


def test_every_float_setting_refuses_nan_and_inf():
    from bench import config

    floats = [k for k, v in config.flatten(config.DEFAULTS).items() if isinstance(v, float)]
    floats += ["sampler.guidance", "sampler.noise_level", "sampler.shift", "model.lora_alpha"]
    for key in floats:
        for bad in (float("nan"), float("inf"), float("-inf")):
            with pytest.raises(UsageError, match=f"{key} must be a finite number"):
                config.resolve({key: bad}, flags={"algo.name": "grpo", "model.name": "tiny-random"})
    with pytest.raises(UsageError, match="algo.beta must be a finite number"):
        config.resolve({"algo.beta": float("nan")}, flags={"algo.name": "treegrpo", "model.name": "tiny-random"})


def test_hand_edited_manifest_is_refused_not_half_applied(two_it_run, tmp_path, capsys):
    """lr and clip edited in manifest.json: the checkpoint's state was computed with the old ones; applying
    the clip while the restored optimizer keeps the old lr (what happened) would log an lr that is not used."""
    run = _copy(two_it_run, tmp_path / "edited")
    man = json.loads((run / "manifest.json").read_text())
    man["config"]["train"]["lr"] = 0.5
    man["config"]["algo"]["clip_range"] = 0.9
    (run / "manifest.json").write_text(json.dumps(man))
    before = _tree(run)
    assert main(["run", "--resume", str(run), "--budget", "3it", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "differs from the one checkpoint step_000002 was written with" in err and "Traceback" not in err
    assert "algo.clip_range: 0.0001 (checkpoint) -> 0.9 (manifest.json)" in err
    assert "train.lr: 0.0001 (checkpoint) -> 0.5 (manifest.json)" in err
    assert _tree(run) == before and not (run / ".lock").exists()


def _strip_checkpoint_config(ck: Path) -> None:
    """A checkpoint as written before checkpoints recorded their configuration (meta.json re-hashed)."""
    state = json.loads((ck / "state.json").read_text())
    state.pop("config")
    (ck / "state.json").write_text(json.dumps(state))
    meta = json.loads((ck / "meta.json").read_text())
    meta["files"]["state.json"] = {"bytes": (ck / "state.json").stat().st_size,
                                   "sha256": checkpoint._sha256(ck / "state.json")}
    (ck / "meta.json").write_text(json.dumps(meta))


def test_old_checkpoint_edited_lr_is_refused_and_the_logged_lr_is_the_one_used(two_it_run, tmp_path, capsys):
    run = _copy(two_it_run, tmp_path / "old")
    for ck in checkpoint.list_checkpoints(run):
        _strip_checkpoint_config(ck)
    man = json.loads((run / "manifest.json").read_text())
    man["config"]["train"]["lr"] = 0.5
    (run / "manifest.json").write_text(json.dumps(man))
    assert main(["run", "--resume", str(run), "--budget", "3it", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "train.lr: 0.0001 (checkpoint) -> 0.5 (manifest.json)" in err and "Traceback" not in err
    man["config"]["train"]["lr"] = 1e-4  # restored: the resume goes on, and logs the lr it trains with
    (run / "manifest.json").write_text(json.dumps(man))
    assert main(["run", "--resume", str(run), "--budget", "3it", "--no-progress"]) == 0
    recs = [json.loads(x) for x in (run / "iterations.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in recs] == [0, 1, 2] and {r["lr"] for r in recs} == {1e-4}


# ---- --overwrite ---------------------------------------------------------------------------------------
def _fake_run(d: Path) -> Path:
    d.mkdir(parents=True)
    (d / "manifest.json").write_text(json.dumps({"schema_version": 1, "config": {"algo": {"name": "grpo"}}}))
    (d / "iterations.jsonl").write_text('{"iteration": 0}\n')
    (d / "checkpoints").mkdir()
    return d


def test_overwrite_empties_only_treebench_runs_or_with_force(tmp_path):
    run = _fake_run(tmp_path / "run")
    check_out_dir(run, overwrite=True)
    create_out_dir(run, overwrite=True).release()
    assert list(run.iterdir()) == []  # a treebench run: emptied (the lock released)

    mine = tmp_path / "mine"
    (mine / "data").mkdir(parents=True)
    (mine / "notes.txt").write_text("keep me")
    (mine / "manifest.json").write_text('{"name": "not a treebench manifest"}')
    with pytest.raises(UsageError, match=r"not a treebench run .* 3 entries \(data/, manifest.json, notes.txt\).*--force"):
        check_out_dir(mine, overwrite=True)
    with pytest.raises(UsageError, match="not a treebench run"):  # the check is repeated under the lock
        create_out_dir(mine, overwrite=True)
    assert sorted(p.name for p in mine.iterdir()) == ["data", "manifest.json", "notes.txt"]
    check_out_dir(mine, overwrite=True, force=True)
    create_out_dir(mine, overwrite=True, force=True).release()
    assert list(mine.iterdir()) == []


def test_overwrite_never_goes_through_a_link_nor_empties_the_working_directory(tmp_path, monkeypatch):
    target = _fake_run(tmp_path / "target")
    link = tmp_path / "link"
    link.symlink_to(target)
    for force in (False, True):
        with pytest.raises(UsageError, match="is a symbolic link"):
            check_out_dir(link, overwrite=True, force=force)
    monkeypatch.chdir(target)
    for out in (Path("."), target, tmp_path, Path("/")):
        with pytest.raises(UsageError, match="working directory"):
            check_out_dir(out, overwrite=True, force=True)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    _fake_run(tmp_path / "home")
    with pytest.raises(UsageError, match="the home directory"):
        check_out_dir(tmp_path / "home", overwrite=True, force=True)
    assert sorted(p.name for p in target.iterdir()) == ["checkpoints", "iterations.jsonl", "manifest.json"]


# ---- faults: the lock file, EFBIG, the checkpoint at the stop ------------------------------------------
def test_full_disk_when_writing_the_lock_leaves_no_lock(tmp_path, monkeypatch):
    """os.pwrite raising ENOSPC (a 100% full disk): a WriteFault (exit 1) and no empty .lock."""
    def full(fd, data, offset):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(lock.os, "pwrite", full)
    with pytest.raises(WriteFault, match=r"could not write the lock file .*: No space left on device \(ENOSPC\)"):
        lock.RunLock(tmp_path).acquire()
    assert list(tmp_path.iterdir()) == []

    monkeypatch.undo()
    real_open = os.open

    def no_inode(path, flags, mode=0o777):
        if str(path).endswith(lock.LOCK_NAME):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real_open(path, flags, mode)

    monkeypatch.setattr(lock.os, "open", no_inode)
    with pytest.raises(WriteFault, match=r"No space left on device \(ENOSPC\)"):
        lock.RunLock(tmp_path).acquire()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("resume", [False, True], ids=["new-run", "resume"])
def test_lock_write_fault_from_the_command_line(resume, two_it_run, tmp_path, failpoints, capsys):
    out = _copy(two_it_run, tmp_path / "run") if resume else tmp_path / "run"
    before = _tree(out) if resume else {}
    failpoints("lock=enospc")
    argv = ["run", "--resume", str(out), "--budget", "3it", "--no-progress"] if resume else \
        ["run", *ARGS, "--budget", "1it", "--out", str(out)]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert f"bench: error: could not write the lock file {out}/.lock: No space left on device (ENOSPC)" in err
    assert "Traceback" not in err and not (out / ".lock").exists()
    assert _tree(out) == before  # nothing else written (a new run's directory stays empty)


def test_a_lock_file_that_is_a_link_is_never_followed(two_it_run, tmp_path, capsys):
    run = _copy(two_it_run, tmp_path / "run")
    target = tmp_path / "precious.txt"
    target.write_text("do not touch")
    (run / ".lock").symlink_to(target)
    with pytest.raises(RunLocked, match="is a symbolic link"):
        lock.RunLock(run).acquire()
    assert lock.holder(run) is None
    dangling = tmp_path / "dangling"
    dangling.mkdir()
    (dangling / ".lock").symlink_to(tmp_path / "would_be_created")
    with pytest.raises(RunLocked, match="is a symbolic link"):
        lock.RunLock(dangling).acquire()
    assert main(["run", "--resume", str(run), "--no-progress"]) == 2
    assert "is a symbolic link" in capsys.readouterr().err
    assert target.read_text() == "do not touch" and not (tmp_path / "would_be_created").exists()


def test_efbig_from_safetensors_is_a_write_fault(tmp_path):
    """A real file-size limit (RLIMIT_FSIZE, as `ulimit -f` / prlimit --fsize set it; Python ignores SIGXFSZ):
    safetensors' own error becomes OSError(EFBIG), so the run ends with the write-fault message."""
    code = textwrap.dedent("""
        import errno, resource, sys, torch
        from bench.rundir.checkpoint import _write_tensors
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, resource.RLIM_INFINITY))
        try:
            _write_tensors(__import__("pathlib").Path(sys.argv[1]), {"w": torch.zeros(100000)}, "checkpoint.policy")
        except OSError as e:
            print(errno.errorcode[e.errno], e.filename)
    """)
    p = subprocess.run([sys.executable, "-c", code, str(tmp_path / "big.safetensors")], capture_output=True,
                       text=True, env=_env(), timeout=300, check=False)
    assert p.stdout.split() == ["EFBIG", str(tmp_path / "big.safetensors")], p.stderr
    import torch
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    with pytest.raises(SafetensorError) as e:  # a real one: the directory does not exist
        save_file({"w": torch.zeros(2)}, str(tmp_path / "missing" / "x.safetensors"))
    assert checkpoint.safetensors_errno(e.value) == errno.ENOENT
    assert checkpoint.safetensors_errno(ValueError("File too large")) == errno.EFBIG
    assert checkpoint.safetensors_errno(ValueError("header too small")) is None


def test_efbig_run_message(tmp_path, failpoints, capsys):
    out = tmp_path / "run"
    failpoints("checkpoint.policy=efbig@2+")
    assert main(["run", *ARGS, "--budget", "3it", "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "File too large (EFBIG); the run stopped." in err and "raise the file size limit" in err
    assert "last good checkpoint" in err and "Traceback" not in err


# ---- drivers: their own locks ----------------------------------------------------------------------------
def test_shared_lock_admits_one_study_only(tmp_path):
    a = lock.RunLock(tmp_path, what="sweep directory", shared="study a").acquire()
    b = lock.RunLock(tmp_path, what="sweep directory", shared="study a").acquire()  # a worker of the same study
    with pytest.raises(RunLocked, match=f"sweep directory {tmp_path} is in use by pid {os.getpid()}"):
        lock.RunLock(tmp_path, what="sweep directory", shared="study b").acquire()
    with pytest.raises(RunLocked, match="in use"):
        lock.RunLock(tmp_path, what="comparison directory").acquire()
    a.release()
    assert (tmp_path / ".lock").exists() and lock.holder(tmp_path) is not None  # b still holds it
    b.release()
    assert not (tmp_path / ".lock").exists() and lock.holder(tmp_path) is None
    lock.RunLock(tmp_path, what="comparison directory").acquire().release()


SLOW_COMPARE = textwrap.dedent("""
    import sys
    from bench.fleet import compare
    compare.RUNNER = [sys.executable, "-c", "import time; time.sleep(60)"]
    sys.exit(compare.main(sys.argv[1:]))
""")


def test_second_compare_into_one_directory_is_refused_while_the_first_runs(tmp_path, capsys):
    from bench.fleet import compare

    out = tmp_path / "cmp"
    argv = ["--algos", "grpo", "--budget", "1it", "--seeds", "1", "--out", str(out), "--no-report"]
    first = subprocess.Popen([sys.executable, "-c", SLOW_COMPARE, *argv], stdout=subprocess.PIPE, text=True,
                             env=_env())
    try:
        assert first.stdout.readline().startswith("== compare 1/1")  # training: it holds the directory
        assert compare.main(argv) == 2
        err = capsys.readouterr().err
        assert f"comparison directory {out} is in use by pid {first.pid}" in err
        assert lock.holder(out)["pid"] == first.pid
    finally:
        first.kill()
        first.wait()


@pytest.mark.slow  # end-to-end variant (make test-slow; CI runs it)
def test_compare_write_faults_keep_what_was_there(fake_bench_run, tmp_path, failpoints, capsys):
    from bench.fleet import compare

    out = tmp_path / "cmp"
    argv = ["--algos", "ddpo,treegrpo", "--budget", "300it", "--seeds", "2", "--out", str(out), "--reps", "200"]
    failpoints("compare.options=enospc")
    assert compare.main(argv) == 1
    err = capsys.readouterr().err
    assert f"could not write {out}/compare.json: No space left on device; no run was started" in err
    assert sorted(p.name for p in out.iterdir()) == []  # no run, no temporary file, the lock released
    failpoints("report=enospc")
    assert compare.main(argv) == 1
    err = capsys.readouterr().err
    assert f"could not write {out}/report.pdf: No space left on device; the runs are kept" in err
    assert "Traceback" not in err
    leftovers = [p.name for p in out.iterdir() if p.name.endswith(".tmp") or p.name.startswith(".")]
    assert leftovers == [] and not (out / "report.pdf").exists()
    failpoints("")
    assert compare.main([*argv, "--report-only"]) == 0 and (out / "report.pdf").is_file()


def test_sweep_of_another_study_is_refused_and_a_full_journal_stops_cleanly(tmp_path, failpoints, capsys):
    out = tmp_path / "sweep"
    out.mkdir()
    held = lock.RunLock(out, what="sweep directory", shared="sweep of study 'a' in somewhere").acquire()
    try:
        argv = ["sweep", "--algo", "grpo", "--model", "tiny-random", "--budget-per-trial", "1it", "--trials", "1",
                "--study", "b", "--out", str(out)]
        assert main(argv) == 2
        assert f"sweep directory {out} is in use by pid {os.getpid()}" in capsys.readouterr().err
    finally:
        held.release()
    failpoints("sweep.journal=enospc")
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert f"could not write {out}/sweeps/b.journal: No space left on device (ENOSPC); the sweep stopped" in err
    assert "Traceback" not in err and not (out / ".lock").exists()


# ---- security ------------------------------------------------------------------------------------------
def _planted(d: Path) -> Path:
    """A directory that shadows a module ``bench.cli`` imports (argparse) and a plug-in name: importing
    either from it leaves a marker."""
    marker = d / "IMPORTED_FROM_CWD"
    (d / "argparse.py").write_text(f"open({str(marker)!r}, 'w').write('argparse')\n")
    (d / "planted.py").write_text(f"open({str(marker)!r}, 'w').write('planted')\nclass Evil: pass\n")
    return marker


def test_children_do_not_import_from_the_current_directory(tmp_path):
    from bench.fleet import compare, launch

    marker = _planted(tmp_path)
    plain = subprocess.run([sys.executable, "-m", "bench.cli", "list"], cwd=tmp_path, env=_env(), timeout=300,
                           capture_output=True, text=True, check=False)
    assert marker.exists()  # what `python -m` did: the planted package ran (the test can fail)
    marker.unlink()
    stub = [sys.executable, "-c", launch._SAFE_PATH_STUB, "bench.cli"]  # the Python < 3.11 form
    for cmd in ([*launch.python_module("bench.cli"), "list"], [*stub, "list"]):
        p = subprocess.run(cmd, cwd=tmp_path, env=_env(), timeout=300, capture_output=True, text=True, check=False)
        assert p.returncode == 0 and "algorithms:" in p.stdout, p.stderr
        assert not marker.exists(), cmd
    p = subprocess.run([*launch.python_module("bench.cli"), "run", "--algo", "planted:Evil", "--model", "tiny-random"],
                       cwd=tmp_path, env=_env(), timeout=300, capture_output=True, text=True, check=False)
    assert p.returncode == 2 and "no module 'planted'" in p.stderr and not marker.exists()
    assert compare.RUNNER == launch.python_module("bench.cli") and plain.returncode != 0  # the fake argparse
    if sys.version_info >= (3, 11):
        assert launch.run_env(None)["PYTHONSAFEPATH"] == "1"  # their own children (accelerate) too


def test_sweep_workers_start_without_the_current_directory(monkeypatch):
    from bench.fleet import launch
    from sweeps import cli as sweep_cli

    started = []

    class FakeProc:
        def __init__(self, cmd, env):
            started.append((cmd, env))

        def wait(self):
            return 0

    monkeypatch.setattr(sweep_cli.subprocess, "Popen", FakeProc)
    monkeypatch.setattr(sweep_cli.time, "sleep", lambda s: None)
    assert sweep_cli._spawn_workers(["--algo", "grpo"], 2, "postgresql://u:pw@h/db") == 0
    for cmd, env in started:
        assert cmd[:len(launch.python_module("sweeps.cli"))] == launch.python_module("sweeps.cli")
        assert "pw" not in " ".join(cmd) and env["TREEBENCH_STORAGE"] == "postgresql://u:pw@h/db"
        if sys.version_info >= (3, 11):
            assert env["PYTHONSAFEPATH"] == "1"


def test_url_passwords_never_reach_manifests_locks_or_messages(tmp_path, monkeypatch):
    assert redact("--storage=postgresql://user:s3cret@db:5432/sweeps") == "--storage=postgresql://user:***@db:5432/sweeps"
    assert redact("mysql://u:p@ss@h/db and sqlite:///x.db") == "mysql://u:***@h/db and sqlite:///x.db"
    assert redact("postgresql://user@host/db") == "postgresql://user@host/db"
    argv = ["bench", "sweep", "--storage", "postgresql://user:s3cret@db/sweeps", "--out", "x"]
    monkeypatch.setattr(sys, "argv", argv)
    assert "s3cret" not in json.dumps(host_info()) and redact_argv(argv)[3] == "postgresql://user:***@db/sweeps"
    held = lock.RunLock(tmp_path).acquire()
    try:
        text = (tmp_path / ".lock").read_text()
        assert "s3cret" not in text and "postgresql://user:***@db/sweeps" in text
        with pytest.raises(RunLocked) as e:
            lock.RunLock(tmp_path).acquire()
        assert "s3cret" not in str(e.value) and "user:***@db" in str(e.value)
    finally:
        held.release()
    old = tmp_path / "old"  # a lock file written before redaction, by a holder on another host
    old.mkdir()
    (old / ".lock").write_text(json.dumps({"pid": 1, "host": "elsewhere", "command": " ".join(argv)}))
    with pytest.raises(RunLocked) as e:
        lock.RunLock(old).acquire()
    assert "s3cret" not in str(e.value)


def test_trackers_stay_offline_and_inside_the_run_directory(tmp_path, monkeypatch):
    from bench.run import trackers

    names = ("MLFLOW_DISABLE_TELEMETRY", "WANDB_ERROR_REPORTING", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR",
             "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR")
    for n in names:
        monkeypatch.delenv(n, raising=False)
    monkeypatch.setattr(trackers, "_SET_HERE", {})
    run = tmp_path / "run"
    applied = trackers.offline_env("wandb", run)
    assert applied["WANDB_ERROR_REPORTING"] == "false"
    for k in ("WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        assert Path(os.environ[k]).is_relative_to(run / "wandb")
    assert trackers.offline_env("wandb", tmp_path / "next")["WANDB_CACHE_DIR"].startswith(str(tmp_path / "next"))
    monkeypatch.setenv("WANDB_CACHE_DIR", "/users/choice")  # a user's own setting is kept
    assert "WANDB_CACHE_DIR" not in trackers.offline_env("wandb", run) and os.environ["WANDB_CACHE_DIR"] == "/users/choice"

    pytest.importorskip("mlflow")
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("XDG_CONFIG_HOME", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    t = trackers.Trackers(["mlflow"], run, {"seed": 0}, "run")
    assert "mlflow" in t.active and os.environ["MLFLOW_DISABLE_TELEMETRY"] == "true"
    from mlflow.telemetry import get_telemetry_client

    assert get_telemetry_client() is None
    t.close({"stop_reason": "budget_iterations"})
    assert list(home.iterdir()) == [] and (run / "mlflow.db").is_file()
