"""The failpoint matrix (bench.rundir.failpoints): every write site (and the reward call) under a crash, a full
disk, an I/O error and a permission error. The run fails with a clear message (no traceback, no temporary
file, the lock released); ``--resume`` then gives the records of an uninterrupted run, or refuses clearly
with nothing logged lost; every checkpoint left stays loadable. The full matrix is ``-m slow``."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from bench.cli import main
from bench.run.records import TIMING_KEYS
from bench.rundir import checkpoint, failpoints
from bench.rundir.resume import read_jsonl

pytestmark = pytest.mark.usefixtures("one_thread")

ARGS = ["--algo", "grpo", "--model", "tiny-random", "--budget", "3it", "--seed", "3",
        "--set", "sampler.steps=3", "--set", "algo.group_size=2", "--set", "eval.every=2",
        "--set", "run.checkpoint_every=1", "--set", "run.trace=true", "--no-progress"]
SITES = ["log.iterations", "log.evals", "log.eval_scores", "manifest", "final", "checkpoint.policy", "checkpoint.optimizer",
         "checkpoint.rng", "checkpoint.state", "checkpoint.meta", "checkpoint.rename", "checkpoint.prune",
         "samples.grid", "trace", "reward", "lock"]
FAULTS = ["crash", "enospc", "eio", "eacces", "efbig"]
#: the hit that fires: mid-run where the site is hit more than once (manifest, final, lock: once per run)
AT = {"manifest": "@1", "final": "@1", "lock": "@1"}
WORDS = {"enospc": "No space left on device (ENOSPC)", "eio": "Input/output error (EIO)",
         "eacces": "Permission denied (EACCES)", "efbig": "File too large (EFBIG)"}
DEFAULT_CELLS = [("log.iterations", "crash"), ("checkpoint.rename", "enospc"), ("checkpoint.state", "eio"),
                 ("final", "eacces"), ("manifest", "enospc"), ("log.eval_scores", "eio")]


def _records(path):
    out = []
    for line in path.read_text().splitlines():
        out.append({k: v for k, v in json.loads(line).items() if k not in TIMING_KEYS})
    return out


def _final(run):
    f = json.loads((run / "final.json").read_text())
    f["final_eval"] = {k: v for k, v in (f["final_eval"] or {}).items() if k not in TIMING_KEYS}
    return {k: f[k] for k in ("stop_reason", "iterations", "samples_total", "nfe_total", "final_eval", "best_eval")}


def _scores(run):
    """eval_scores.jsonl without its wall-clock field."""
    return [{k: v for k, v in json.loads(line).items() if k != "seconds"}
            for line in (run / "eval_scores.jsonl").read_text().splitlines()]


def _temp_files(run):
    return sorted(str(p.relative_to(run)) for p in run.rglob("*") if p.name.endswith(".tmp") or p.name.startswith(".tmp_"))


def _all_checkpoints_load(run):
    for p in checkpoint.list_checkpoints(run):
        checkpoint.load(p)  # raises CheckpointError when corrupt


@pytest.fixture(scope="module")
def ref(tmp_path_factory):
    out = tmp_path_factory.mktemp("fp") / "ref"
    assert main(["run", *ARGS, "--out", str(out)]) == 0
    return out


def _run_faulted(out, site, fault, failpoints_fixture, capsys, tmp_path):
    """Run with the failpoint set; returns (exit status, stderr)."""
    spec = f"{site}={fault}{AT.get(site, '@2')}{'' if fault == 'crash' else '+'}"
    if fault == "crash":  # the process dies: it must be another process
        env = {**os.environ, failpoints.ENV: spec, "OMP_NUM_THREADS": "1"}
        p = subprocess.run([sys.executable, "-m", "bench.cli", "run", *ARGS, "--out", str(out)], env=env, check=False,
                           capture_output=True, text=True, timeout=600)
        return p.returncode, p.stderr
    failpoints_fixture(spec)
    try:
        code = main(["run", *ARGS, "--out", str(out)])
    finally:
        failpoints_fixture("")
    return code, capsys.readouterr().err


def check_cell(site, fault, ref, tmp_path, failpoints_fixture, capsys):
    out = tmp_path / f"{site}_{fault}"
    code, err = _run_faulted(out, site, fault, failpoints_fixture, capsys, tmp_path)
    assert "Traceback" not in err, err
    if fault == "crash":
        assert code == failpoints.CRASH_STATUS, err
    elif site == "checkpoint.prune":  # a checkpoint that cannot delete old ones is a warning, the run goes on
        assert code == 0 and "could not delete old checkpoints" in err, err
    elif site == "reward":
        assert code == 1 and "reward 'brightness' failed" in err and WORDS[fault].split(" (")[0] in err, err
    elif site == "lock":  # before anything is written: nothing started, no lock file left
        assert code == 1 and f"could not write the lock file {out}/.lock: {WORDS[fault]}" in err, err
    else:
        assert code == 1, err
        assert f"bench: error: could not write {out}" in err and WORDS[fault] in err, err
        assert f"bench run --resume {out}" in err or "--overwrite" in err, err
    if fault != "crash":  # a process that ends (not one that dies) leaves no temporary file and no lock
        assert _temp_files(out) == [] and not (out / ".lock").exists()
    _all_checkpoints_load(out)
    logged = [{k: v for k, v in r.items() if k not in TIMING_KEYS}  # the valid records (a torn last line aside)
              for r in read_jsonl(out / "iterations.jsonl")[0]]
    if site in ("manifest", "lock"):  # nothing was created that could be resumed: refused, nothing logged
        if fault != "crash" and site == "manifest":
            assert "nothing was kept" in err
        assert main(["run", "--resume", str(out), "--no-progress"]) == 2
        assert "nothing to resume" in capsys.readouterr().err
        assert not (out / "iterations.jsonl").exists()
        return
    assert main(["run", "--resume", str(out), "--no-progress"]) == 0, capsys.readouterr().err
    capsys.readouterr()
    ra, rb = _records(ref / "iterations.jsonl"), _records(out / "iterations.jsonl")
    assert [r["iteration"] for r in rb] == [0, 1, 2]  # none lost, none twice
    assert rb == ra and rb[: len(logged)] == logged  # what was logged before the fault is kept as it was
    assert _records(out / "evals.jsonl") == _records(ref / "evals.jsonl")
    assert _scores(out) == _scores(ref)  # one line per evaluated image, none lost, none twice
    assert _final(out) == _final(ref)
    assert [r["iteration"] for r in map(json.loads, (out / "trace.jsonl").read_text().splitlines())] == \
        [r["iteration"] for r in map(json.loads, (ref / "trace.jsonl").read_text().splitlines())]
    assert _temp_files(out) == [] and not (out / ".lock").exists()
    _all_checkpoints_load(out)


@pytest.mark.parametrize("site,fault", DEFAULT_CELLS)
def test_failpoint_cell(site, fault, ref, tmp_path, failpoints, capsys):
    check_cell(site, fault, ref, tmp_path, failpoints, capsys)


@pytest.mark.slow
@pytest.mark.parametrize("site", SITES)
@pytest.mark.parametrize("fault", FAULTS)
def test_failpoint_matrix(site, fault, ref, tmp_path, failpoints, capsys):
    check_cell(site, fault, ref, tmp_path, failpoints, capsys)


def test_write_fault_message_names_what_was_kept(ref, tmp_path, failpoints, capsys):
    out = tmp_path / "msg"
    failpoints("checkpoint.policy=enospc@3+")  # the checkpoint after iteration 2 cannot be written
    assert main(["run", *ARGS, "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert (f"bench: error: could not write {out}/checkpoints/.tmp_step_000003_{os.getpid()}/policy.safetensors: "
            f"No space left on device (ENOSPC); the run stopped.") in err
    assert (f"kept: 3 iteration(s) logged in {out}/iterations.jsonl; last good checkpoint "
            f"{out}/checkpoints/step_000002 (after iteration 1).") in err
    assert "final.json records the stop (stop_reason error)" in err
    assert f"to continue: free space on the file system holding {out}, then run:  bench run --resume {out}" in err
    final = json.loads((out / "final.json").read_text())
    assert final["stop_reason"] == "error" and "No space left on device" in final["error"]
    assert [p.name for p in checkpoint.list_checkpoints(out)] == ["step_000002", "step_000001"]


def test_failed_checkpoint_at_the_stop_exits_1_and_resumes(ref, tmp_path, failpoints, capsys):
    """Default cadence (run.checkpoint_every=20) on a 3-iteration run: the only checkpoint is the one at the
    stop. When it cannot be written the run must not end as complete (exit 0 and a later extension restarting
    from iteration 0 unannounced): exit 1, what was kept, how to resume; the resume gives the same records."""
    out = tmp_path / "stop"
    args = [a if a != "run.checkpoint_every=1" else "run.checkpoint_every=20" for a in ARGS]
    failpoints("checkpoint.policy=enospc")
    assert main(["run", *args, "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert f"could not write {out}/checkpoints/" in err and "No space left on device (ENOSPC)" in err
    assert "kept: 3 iteration(s) logged" in err and "no checkpoint yet" in err
    assert f"bench run --resume {out}" in err and "resume starts again from iteration 0" in err
    assert json.loads((out / "final.json").read_text())["stop_reason"] == "error"
    assert checkpoint.list_checkpoints(out) == [] and _temp_files(out) == [] and not (out / ".lock").exists()
    failpoints("")
    assert main(["run", "--resume", str(out), "--no-progress"]) == 0
    assert _records(out / "iterations.jsonl") == _records(ref / "iterations.jsonl")
    assert _final(out) == _final(ref)
    assert [p.name for p in checkpoint.list_checkpoints(out)] == ["step_000003"]


def test_rewrite_on_resume_fails_cleanly_then_resumes(ref, tmp_path, failpoints, capsys):
    run = tmp_path / "rw"
    shutil.copytree(ref, run)
    shutil.rmtree(run / "checkpoints" / "step_000003")  # as if killed during the last iteration
    before = (run / "iterations.jsonl").read_text()
    failpoints("log.rewrite=eio")
    assert main(["run", "--resume", str(run), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert f"could not write {run}/iterations.jsonl.tmp: Input/output error (EIO)" in err and "Traceback" not in err
    assert (run / "iterations.jsonl").read_text() == before and _temp_files(run) == []
    failpoints("")
    assert main(["run", "--resume", str(run), "--no-progress"]) == 0
    assert _records(run / "iterations.jsonl") == _records(ref / "iterations.jsonl")


def test_final_json_is_never_half_written(ref, tmp_path, failpoints, capsys):
    run = tmp_path / "fin"
    shutil.copytree(ref, run)
    old = (run / "final.json").read_text()
    from bench.rundir.runlog import atomic_write_json

    failpoints("final=enospc")
    with pytest.raises(OSError, match="No space left"):
        atomic_write_json(run / "final.json", {"x": 1}, failpoint="final")
    assert (run / "final.json").read_text() == old and _temp_files(run) == []


def test_failpoint_spec_is_validated():
    assert failpoints.parse("checkpoint.rename=enospc@2, trace=crash@1+")["checkpoint.rename"].at == 2
    with pytest.raises(ValueError, match="bad failpoint 'checkpoint.renam=enospc'"):
        failpoints.parse("checkpoint.renam=enospc")
    with pytest.raises(ValueError, match="bad hit number"):
        failpoints.parse("trace=eio@0")


def test_sweep_storage_write_fault_keeps_the_old_table(tmp_path, failpoints):
    from sweeps.study import write_csv

    path = tmp_path / "trials.csv"
    write_csv(path, [{"number": 0, "state": "COMPLETE"}])
    old = path.read_text()
    failpoints("sweep.storage=enospc")
    with pytest.raises(OSError, match="No space left"):
        write_csv(path, [{"number": 0, "state": "COMPLETE"}, {"number": 1, "state": "FAIL"}])
    assert path.read_text() == old and [p.name for p in tmp_path.iterdir()] == ["trials.csv"]
