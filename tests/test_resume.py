"""Checkpoints and exact resume: a run killed (SIGKILL) or stopped (SIGTERM) at some iteration and
resumed gives the same records as an uninterrupted run of the same seed, apart from timings."""

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from bench.cli import main
from bench.engine.rollout import RolloutEngine
from bench.errors import CheckpointError
from bench.run.records import TIMING_KEYS
from bench.rundir import checkpoint

ARGS = ["--algo", "grpo", "--model", "tiny-random", "--budget", "3it", "--seed", "3",
        "--set", "sampler.steps=3", "--set", "algo.group_size=2", "--set", "eval.every=2",
        "--set", "run.checkpoint_every=1", "--no-progress"]


def _records(path):
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING_KEYS}
            for line in path.read_text().splitlines()]


def _final(run):
    f = json.loads((run / "final.json").read_text())
    f["final_eval"] = {k: v for k, v in (f["final_eval"] or {}).items() if k not in TIMING_KEYS}
    return {k: f[k] for k in ("stop_reason", "iterations", "samples_total", "nfe_total", "final_eval", "best_eval")}


def _scores(path):
    """eval_scores.jsonl without its wall-clock field."""
    return [{k: v for k, v in json.loads(line).items() if k != "seconds"} for line in path.read_text().splitlines()]


def assert_same_run(a, b):
    ra, rb = _records(a / "iterations.jsonl"), _records(b / "iterations.jsonl")
    assert [r["iteration"] for r in rb] == list(range(len(rb)))  # none lost, none twice
    assert ra == rb
    assert _records(a / "evals.jsonl") == _records(b / "evals.jsonl")
    # one line per evaluated image, none lost, none twice, in the same order
    assert _scores(a / "eval_scores.jsonl") == _scores(b / "eval_scores.jsonl")
    assert _final(a) == _final(b)


@pytest.fixture(scope="module")
def ref(tmp_path_factory):
    out = tmp_path_factory.mktemp("resume") / "ref"
    assert main(["run", *ARGS, "--out", str(out)]) == 0
    return out


def _copy(ref, tmp_path, name="copy"):
    dst = tmp_path / name
    shutil.copytree(ref, dst)
    return dst


def test_sigkill_at_random_iteration_then_resume_equals_uninterrupted(ref, tmp_path, capsys):
    k = random.randint(1, 2)  # kill once this many iterations are logged (of 3)
    out = tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    with open(tmp_path / "child.log", "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "bench.cli", "run", *ARGS, "--out", str(out)],
                                stdout=log, stderr=subprocess.STDOUT, env=env)
        deadline = time.time() + 300
        it_file = out / "iterations.jsonl"
        while proc.poll() is None and time.time() < deadline:
            if it_file.is_file() and it_file.read_bytes().count(b"\n") >= k:
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.005)
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, f"the run ended before the kill (k={k}): {proc.returncode}"
    assert not (out / "final.json").exists()
    assert main(["run", "--resume", str(out), "--no-progress"]) == 0, f"k={k}"
    assert "resuming" in capsys.readouterr().out
    assert_same_run(ref, out)


def test_sigterm_mid_rollout_checkpoints_then_resume_equals_uninterrupted(ref, tmp_path, monkeypatch):
    orig = RolloutEngine.run

    def run_then_signal(self, plan, batch, iteration, **kw):
        out = orig(self, plan, batch, iteration, **kw)
        if kw.get("stage", "rollout") == "rollout" and iteration == 2:
            os.kill(os.getpid(), signal.SIGTERM)  # arrives inside iteration 2, before its update
        return out

    monkeypatch.setattr(RolloutEngine, "run", run_then_signal)
    out = tmp_path / "term"
    before = signal.getsignal(signal.SIGTERM)
    # checkpoint_every=0: the only checkpoint is the one written on the signal
    assert main(["run", *ARGS, "--set", "run.checkpoint_every=0", "--out", str(out)]) == 130
    monkeypatch.setattr(RolloutEngine, "run", orig)
    final = json.loads((out / "final.json").read_text())
    assert final["stop_reason"] == "interrupted" and final["iterations"] == 2
    assert [p.name for p in checkpoint.list_checkpoints(out)] == ["step_000002"]
    assert [r["iteration"] for r in _records(out / "iterations.jsonl")] == [0, 1]
    assert signal.getsignal(signal.SIGTERM) is before  # handlers restored
    assert main(["run", "--resume", str(out), "--no-progress"]) == 0
    assert_same_run(ref, out)


def test_corrupt_newest_checkpoint_falls_back_to_previous(ref, tmp_path, capsys):
    run = _copy(ref, tmp_path)
    assert [p.name for p in checkpoint.list_checkpoints(run)] == ["step_000003", "step_000002"]
    f = run / "checkpoints" / "step_000003" / "policy.safetensors"
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))
    assert main(["run", "--resume", str(run), "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "skipping checkpoint step_000003" in err and "corrupt" in err and "previous checkpoint" in err
    assert_same_run(ref, run)  # iteration 2 recomputed from step_000002, identical


def test_no_valid_checkpoint_is_a_usage_error(ref, tmp_path, capsys):
    run = _copy(ref, tmp_path)
    for p in checkpoint.list_checkpoints(run):
        (p / "meta.json").unlink()
    assert main(["run", "--resume", str(run), "--no-progress"]) == 2
    assert "no valid checkpoint" in capsys.readouterr().err


def test_resume_extends_budget_and_refuses_other_changes(ref, tmp_path, capsys):
    run = _copy(ref, tmp_path)
    # refused before anything is touched, with a diff of the changed keys
    assert main(["run", "--resume", str(run), "--set", "train.lr=0.5", "--seed", "4"]) == 2
    err = capsys.readouterr().err
    assert "train.lr: 0.0001 (run) -> 0.5 (now)" in err and "seed: 3 (run) -> 4 (now)" in err
    assert main(["run", "--resume", str(run), "--budget", "2it"]) == 2
    assert "may only be extended" in capsys.readouterr().err
    assert main(["run", "--resume", str(run), "--budget", "3it,1h"]) == 2  # a new limit is not an extension
    assert main(["run", "--resume", str(run), "--overwrite"]) == 2
    assert "contradict" in capsys.readouterr().err
    assert main(["run", "--resume", str(run), "--out", str(tmp_path / "other")]) == 2
    assert main(["run", "--resume", str(tmp_path / "nothing")]) == 2
    assert "no such run directory" in capsys.readouterr().err
    assert _records(run / "iterations.jsonl") == _records(ref / "iterations.jsonl")  # untouched
    # extension: one more iteration on top of the finished run; micro-batch may change (memory only)
    assert main(["run", "--resume", str(run), "--budget", "4it", "--set", "train.micro_batch=3",
                 "--no-progress"]) == 0
    recs = _records(run / "iterations.jsonl")
    assert [r["iteration"] for r in recs] == [0, 1, 2, 3] and recs[:3] == _records(ref / "iterations.jsonl")
    man = json.loads((run / "manifest.json").read_text())
    assert man["config"]["budget"] == "4it" and man["resumes"][-1]["budget"] == {"before": "3it", "after": "4it"}
    final = json.loads((run / "final.json").read_text())
    assert final["iterations"] == 4 and final["samples_total"] == 4 * 4
    evals = _records(run / "evals.jsonl")
    assert [e["iteration"] for e in evals] == [0, 2, 4]  # the eval at 2 is not repeated; the old final one (3) is gone
    scored = [m["iteration"] for m in _scores(run / "eval_scores.jsonl")]
    assert scored == [e["iteration"] for e in evals for _ in range(evals[0]["eval_images"])]  # and its images too


def test_resume_continues_a_cost_schedule_and_keeps_eval_scores_exact(tmp_path, capsys):
    # grpo here spends 24 NFE per iteration: evaluations at 0, 48 (>= 30), 72 (>= 60), 96 (>= 90) NFE
    args = [*ARGS, "--budget", "4it", "--set", "eval.every=30nfe", "--set", "run.keep_checkpoints=4"]
    ref = tmp_path / "ref"
    assert main(["run", *args, "--out", str(ref)]) == 0
    evals = _records(ref / "evals.jsonl")
    assert [(e["iteration"], e["nfe_total"], e["eval_point"]) for e in evals] == \
        [(0, 0, 0), (2, 48, 30), (3, 72, 60), (4, 96, 90)]
    run = _copy(ref, tmp_path)
    for name in ("step_000004", "step_000003"):  # as if killed during iteration 2, after its checkpoint ...
        shutil.rmtree(run / "checkpoints" / name)
    with open(run / "eval_scores.jsonl", "a") as f:  # ... and half-way through writing a line
        f.write('{"iteration": 4, "nfe": 96, "sampl')
    assert main(["run", "--resume", str(run), "--no-progress"]) == 0
    assert "resuming" in capsys.readouterr().out
    assert_same_run(ref, run)
    assert len(_scores(run / "eval_scores.jsonl")) == 4 * evals[0]["eval_images"]


def test_resume_refuses_changed_prompts(ref, tmp_path, capsys):
    run = _copy(ref, tmp_path)
    man = json.loads((run / "manifest.json").read_text())
    man["prompts"]["train"]["sha256"] = "0" * 64  # as if the prompt file had been edited since
    (run / "manifest.json").write_text(json.dumps(man))
    assert main(["run", "--resume", str(run), "--no-progress"]) == 2
    assert "the train prompt set" in capsys.readouterr().err
    assert (run / "final.json").is_file()  # nothing touched


def test_existing_run_dir_points_to_resume(ref, tmp_path, capsys):
    assert main(["run", *ARGS, "--out", str(ref)]) == 2
    err = capsys.readouterr().err
    assert f"--resume {ref}" in err and "--overwrite" in err and "3 iterations logged" in err


# ---- checkpoint files ---------------------------------------------------------------------------------
def test_checkpoint_roundtrip_without_pickle_and_pruning(tmp_path):
    torch.manual_seed(0)
    net = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(net.parameters(), lr=0.1, betas=(0.8, 0.9))
    for _ in range(2):
        opt.zero_grad()
        net(torch.randn(4, 3)).pow(2).sum().backward()
        opt.step()
    state = {"totals": {"seconds": 1.5, "samples": 8, "nfe": 24, "iterations": 2}, "evals": [{"eval/x": 0.5}],
             "algorithm": {"tracker": {"buffers": {"a red circle": [0.1, 0.2]}}}}
    for it in (1, 2, 3):
        checkpoint.save(tmp_path, it, policy=dict(net.named_parameters()), optimizer=opt.state_dict(),
                        state=state, keep=2)
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path)] == ["step_000003", "step_000002"]
    names = sorted(p.name for p in (tmp_path / "checkpoints" / "step_000003").iterdir())
    assert names == ["meta.json", "optimizer.safetensors", "policy.safetensors", "rng.safetensors", "state.json"]
    expected_draw = torch.rand(5)  # the global generator continues from the saved state
    ck = checkpoint.load(tmp_path / "checkpoints" / "step_000003")
    assert ck.iteration == 3 and ck.state["totals"] == state["totals"] and ck.state["algorithm"] == state["algorithm"]
    for n, p in net.named_parameters():
        assert torch.equal(ck.policy[n], p.detach())
    opt2 = torch.optim.AdamW(torch.nn.Linear(3, 2).parameters(), lr=1.0)
    opt2.load_state_dict(ck.optimizer)
    a, b = opt.state_dict(), opt2.state_dict()
    assert a["param_groups"] == b["param_groups"]
    for i in a["state"]:
        for key in a["state"][i]:
            assert torch.equal(a["state"][i][key], b["state"][i][key])
    checkpoint.set_rng_state(ck.rng_tensors, ck.rng_json)
    assert torch.equal(torch.rand(5), expected_draw)
    # a leftover temporary directory of a killed writer is ignored and cleaned by the next save
    (tmp_path / "checkpoints" / ".tmp_step_000004_999999").mkdir()
    assert checkpoint.list_checkpoints(tmp_path)[0].name == "step_000003"
    checkpoint.save(tmp_path, 4, policy=dict(net.named_parameters()), optimizer=opt.state_dict(), state=state,
                    keep=2)
    assert not list((tmp_path / "checkpoints").glob(".tmp_*"))
    (tmp_path / "checkpoints" / "step_000004" / "state.json").write_text("{}")
    with pytest.raises(CheckpointError, match="corrupt"):
        checkpoint.load(tmp_path / "checkpoints" / "step_000004")


@pytest.mark.slow
@pytest.mark.parametrize("algo,model,sets", [
    ("ddpo", "tiny-random-ddim", ["--set", "algo.group_size=2", "--set", "algo.min_count=1"]),
    ("dancegrpo", "tiny-random", ["--set", "algo.group_size=2"]),
    ("mixgrpo", "tiny-random", ["--set", "algo.group_size=2", "--set", "algo.window=1",
                                "--set", "algo.shift_interval=1"]),
    ("treegrpo", "tiny-random", ["--set", "algo.k=2", "--set", "algo.d=1", "--set", "algo.window_mode=progressive",
                                 "--set", "algo.shift_interval=1"]),
])
def test_every_algorithm_resumes_exactly(algo, model, sets, tmp_path):
    args = ["--algo", algo, "--model", model, "--budget", "3it", "--set", "sampler.steps=3",
            "--set", "eval.every=2", "--set", "run.checkpoint_every=1", "--set", "run.keep_checkpoints=3",
            "--no-progress", *sets]
    ref = tmp_path / "ref"
    assert main(["run", *args, "--out", str(ref)]) == 0
    run = _copy(ref, tmp_path)
    for name in ("step_000003", "step_000002"):  # as if killed during iteration 1
        shutil.rmtree(run / "checkpoints" / name)
    assert main(["run", "--resume", str(run), "--no-progress"]) == 0
    assert_same_run(ref, run)
