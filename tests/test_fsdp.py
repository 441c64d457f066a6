"""Sharded full fine-tuning (FSDP2 through an accelerate launch, bench/model/fsdp.py) with 2 CPU processes (gloo):
a run trains, checkpoints, is killed (SIGKILL) and resumes with the records of an uninterrupted run, for a
likelihood-based algorithm and for DiffusionNFT (whose weight snapshots are sharded too); a snapshot
swapped into sharded weights. Opt-in (-m slow, minutes): the fast sharded kill-and-resume run CI makes is
tests/test_multiproc.py (`make test-dist`)."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import pytest
from _launch import Launch, kill_tree, run_launch

from bench.run.records import TIMING_KEYS
from bench.rundir.checkpoint import list_checkpoints

COMMON = ["--model", "tiny-random", "--budget", "3it", "--no-progress", "--set", "model.distributed=fsdp",
          "--set", "sampler.steps=3", "--set", "train.prompts_per_iteration=2", "--set", "run.checkpoint_every=1",
          "--set", "eval.every=2", "--set", "eval.num_prompts=2", "--set", "model.lora_rank=0"]
ALGOS = {"dancegrpo": ["--set", "algo.group_size=2"],
         "diffusionnft": ["--set", "algo.group_size=2", "--set", "algo.kl_beta=0.001"]}


def _records(run, name="iterations.jsonl"):
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING_KEYS and k != "peak_mem_mb"}
            for line in (run / name).read_text().splitlines()]


@pytest.mark.slow
@pytest.mark.multiproc
@pytest.mark.parametrize("algo", sorted(ALGOS))
def test_sharded_run_killed_and_resumed_equals_uninterrupted(tmp_path, algo):
    args = ["--algo", algo, *COMMON, *ALGOS[algo]]
    ref = tmp_path / "ref"
    res = run_launch(["run", *args, "--out", str(ref)], tmp_path / "logs_ref", 900)
    assert res.returncode == 0, res.tail()
    man = json.loads((ref / "manifest.json").read_text())
    assert man["world_size"] == 2 and man["config"]["model"]["distributed"] == "fsdp"
    recs = _records(ref)
    # budgets count globally: 3 iterations x 2 prompts (one per rank) x 2 images, rollout NFE of both ranks
    assert len(recs) == 3 and recs[-1]["samples_total"] == 12 and all(r["samples"] == 4 for r in recs)
    assert all(r["nfe_rollout"] == 2 * 2 * 3 for r in recs)  # P G T of both ranks (the tiny model: no CFG)

    killed = tmp_path / "killed"
    proc = Launch(["run", *args, "--out", str(killed)], tmp_path / "logs_killed").proc
    deadline = time.time() + 600
    it_file = killed / "iterations.jsonl"
    while proc.poll() is None and time.time() < deadline:
        if it_file.is_file() and it_file.read_bytes().count(b"\n") >= 2 and len(list_checkpoints(killed)) >= 2:
            # the launcher and both ranks (each rank runs in a session of its own: killing the launcher's
            # process group would leave them training on)
            kill_tree(proc.pid)
            break
        time.sleep(0.05)
    else:
        kill_tree(proc.pid)  # ended by itself or past the deadline: nothing may be left running
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "the run ended before the kill"
    assert not (killed / "final.json").exists()
    res = run_launch(["run", "--resume", str(killed), "--no-progress"], tmp_path / "logs_resume", 900)
    assert res.returncode == 0, res.tail()
    assert "resuming" in res.stdout
    assert _records(ref) == _records(killed)
    assert _records(ref, "evals.jsonl") == _records(killed, "evals.jsonl")


@pytest.mark.slow
@pytest.mark.multiproc
def test_a_snapshot_swapped_into_sharded_weights_gives_its_outputs(tmp_path):
    worker = str(Path(__file__).with_name("_fsdp_snapshot_worker.py"))
    res = run_launch([], tmp_path / "logs", 600, script=[worker, str(tmp_path)])
    assert res.returncode == 0, res.tail()
    ranks = [json.loads(f.read_text()) for f in sorted(tmp_path.glob("rank*.json"))]
    assert sorted(r["rank"] for r in ranks) == [0, 1]
    for r in ranks:
        assert r["moved"] > 1e-3  # the optimizer step changed the sharded weights ...
        assert r["old_vs_before"] == 0.0 and r["restored_vs_after"] == 0.0  # ... the snapshot undoes it exactly
