"""One writer per run directory (bench.rundir.lock): a second run, a --resume of a live run or a sweep worker on a
live trial directory is refused with exit 2 naming the holder; a dead holder's lock is taken over."""

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from bench.cli import main
from bench.errors import RunLocked
from bench.rundir import lock

ARGS = ["--algo", "grpo", "--model", "tiny-random", "--seed", "3", "--set", "sampler.steps=3",
        "--set", "algo.group_size=2", "--set", "eval.every=0", "--set", "eval.at_start=false",
        "--set", "run.checkpoint_every=1", "--no-progress"]
HOLD = textwrap.dedent("""
    import sys, time
    from bench.rundir.lock import RunLock
    RunLock(sys.argv[1]).acquire()
    print("locked", flush=True)
    time.sleep(float(sys.argv[2]))
""")


def _env():
    return {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}


@pytest.fixture
def holder_process(tmp_path):
    """A second process holding the lock of a directory (started on demand, killed at the end)."""
    procs = []

    def start(run_dir, seconds=120):
        run_dir.mkdir(parents=True, exist_ok=True)
        p = subprocess.Popen([sys.executable, "-c", HOLD, str(run_dir), str(seconds)], stdout=subprocess.PIPE,
                             text=True, env=_env())
        assert p.stdout.readline().strip() == "locked"
        procs.append(p)
        return p

    yield start
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait()


def test_second_run_on_a_live_directory_is_refused(tmp_path, holder_process, capsys):
    out = tmp_path / "run"
    p = holder_process(out)
    assert main(["run", *ARGS, "--budget", "1it", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"run directory {out} is in use by pid {p.pid} on host {socket.gethostname()}" in err
    assert "since 20" in err and "Traceback" not in err
    assert main(["run", *ARGS, "--budget", "1it", "--out", str(out), "--overwrite"]) == 2  # never deleted
    assert f"in use by pid {p.pid}" in capsys.readouterr().err
    assert sorted(x.name for x in out.iterdir()) == [".lock"]  # nothing written, the holder's lock intact
    assert json.loads((out / ".lock").read_text())["pid"] == p.pid


def test_dead_holder_is_taken_over_with_a_warning(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    # a holder killed with SIGKILL: the kernel dropped its flock, its lock file stays
    p = subprocess.Popen([sys.executable, "-c", HOLD, str(out), "120"], stdout=subprocess.PIPE, text=True,
                         env=_env())
    assert p.stdout.readline().strip() == "locked"
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert (out / ".lock").is_file() and lock.holder(out) is None
    assert main(["run", *ARGS, "--budget", "1it", "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert f"warning: taking over the lock of {out}: its holder pid {p.pid}" in err and "no longer running" in err
    assert not (out / ".lock").exists()  # released (and removed) at the end of the run
    assert [json.loads(x)["iteration"] for x in (out / "iterations.jsonl").read_text().splitlines()] == [0]


def test_lock_of_another_host_is_not_taken_over(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / ".lock").write_text(json.dumps({"pid": 4242, "host": "node-elsewhere", "since": "2026-01-01T00:00:00Z"}))
    with pytest.raises(RunLocked, match=r"locked by pid 4242 on host node-elsewhere .* cannot check.*remove"):
        lock.RunLock(out).acquire()
    assert json.loads((out / ".lock").read_text())["host"] == "node-elsewhere"


def test_lock_conflicts_within_one_process_and_is_released(tmp_path):
    a = lock.RunLock(tmp_path).acquire()
    assert lock.holder(tmp_path)["pid"] == os.getpid()
    with pytest.raises(RunLocked, match=f"in use by pid {os.getpid()}"):
        lock.RunLock(tmp_path).acquire()
    a.release()
    assert lock.holder(tmp_path) is None and not (tmp_path / ".lock").exists()
    with lock.RunLock(tmp_path):  # free again
        pass


@pytest.mark.slow  # end-to-end variant (make test-slow; CI runs it)
def test_concurrent_resume_of_a_live_run_is_refused_and_cannot_duplicate(tmp_path, capsys):
    """The reported failure: `--resume X` while X still runs. Refused; the log stays one run's."""
    out = tmp_path / "live"
    cmd = [sys.executable, "-m", "bench.cli", "run", *ARGS, "--budget", "500it", "--out", str(out)]
    with open(tmp_path / "child.log", "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=_env())
        try:
            it_file, deadline = out / "iterations.jsonl", time.time() + 300
            while proc.poll() is None and time.time() < deadline:
                if it_file.is_file() and it_file.read_bytes().count(b"\n") >= 2:
                    break
                time.sleep(0.05)
            assert proc.poll() is None, (tmp_path / "child.log").read_text()
            assert main(["run", "--resume", str(out), "--no-progress"]) == 2
            err = capsys.readouterr().err
            assert f"is in use by pid {proc.pid}" in err
            time.sleep(1.0)  # the original keeps going, undisturbed
            proc.send_signal(signal.SIGTERM)  # clean stop: checkpoint, exit 130
            assert proc.wait(timeout=300) == 130
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    its = [json.loads(x)["iteration"] for x in (out / "iterations.jsonl").read_text().splitlines()]
    assert its == list(range(len(its))) and len(its) >= 2  # one run: no iteration lost or logged twice
    assert not (out / ".lock").exists()


def test_sweep_worker_on_a_live_trial_directory_is_refused(tmp_path, holder_process):
    """A sweep trial is an ordinary run with run.overwrite=true in <out>/trials/<n>: the lock refuses it
    before anything is deleted; the dead-trial reaper leaves a locked directory alone."""
    from types import SimpleNamespace

    from bench import config
    from bench.run import runner
    from sweeps.study import _close_dead_run_dir

    trial = tmp_path / "trials" / "0"
    p = holder_process(trial)
    (trial / "iterations.jsonl").write_text('{"iteration": 0}\n')
    cfg = config.resolve({"sampler.steps": 3, "algo.group_size": 2, "eval.every": 0, "run.progress": False},
                         flags={"algo.name": "grpo", "model.name": "tiny-random", "budget": "1it",
                                "out": str(trial), "run.overwrite": True})
    with pytest.raises(RunLocked, match=f"in use by pid {p.pid}"):
        runner.run(cfg)
    _close_dead_run_dir(SimpleNamespace(user_attrs={"run_dir": str(trial)}, number=0), "no heartbeat")
    assert sorted(x.name for x in trial.iterdir()) == [".lock", "iterations.jsonl"]  # untouched
