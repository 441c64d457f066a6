"""The fast 2-process checks CI runs (`make test-dist`, marker ``multiproc``; not in the plain `pytest` run).

Each is a real ``accelerate launch --multi_gpu --num_processes 2`` of ``bench run`` on CPU (gloo) with the
tiny model, for one representative algorithm per parallel mode:

* **DDP** (``model.distributed=auto``, LoRA): GRPO;
* **FSDP** (``model.distributed=fsdp``, full fine-tuning, the denoiser sharded): DanceGRPO.

The launch trains 2 iterations, logging and evaluating after each, and checkpoints after each; a failpoint
ends rank 0 like ``kill -9`` as it renames the second checkpoint into place (the launcher then terminates
rank 1). What that launch logged up to there, both iterations' records and the evaluations, is what an
uninterrupted 2-process run logs: the reference. ``--resume`` restarts from the first checkpoint, cuts the
logs back to it and computes the second iteration and its evaluation again; its records and evaluations
must equal the reference. Every record must also count the global batch the way a single process does
(closed forms below): a runner change once counted samples world-size times and rollout NFE as 0 on ranks
other than 0, and nothing noticed. Two launches per mode; the parametrised kill-and-resume tests over more
algorithms stay in tests/test_fsdp.py (``-m slow``).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from _launch import Result, run_launch

from bench.run.records import TIMING_KEYS
from bench.rundir.checkpoint import list_checkpoints

pytestmark = pytest.mark.multiproc

#: seconds one launch may take (30-60 s on the loaded 2-core machine, mostly imports in 3 processes); two of them
#: stay under pytest's --timeout=600, which would stop the test without killing the ranks
TIMEOUT = 240
P, G, T, ITERS = 2, 2, 3, 2  # prompts per iteration (one per rank), group size, denoising steps, iterations
COMMON = ["run", "--model", "tiny-random", "--budget", f"{ITERS}it", "--no-progress",
          "--set", f"sampler.steps={T}", "--set", f"train.prompts_per_iteration={P}", "--set", f"algo.group_size={G}",
          "--set", "run.checkpoint_every=1", "--set", "eval.every=1", "--set", "eval.num_prompts=2"]
# single-process closed forms of one iteration (the tiny model has no CFG: 1 NFE per denoiser step):
#   samples = P G images; rollout NFE = P G T (every chain runs T steps);
#   update NFE = P G x (steps trained per chain): GRPO trains all T steps (Flow-GRPO without a window),
#   DanceGRPO int((T - 1) * timestep_fraction) = int(2 * 0.6) = 1 (its default fraction, algorithms/dancegrpo.py)
CASES = {
    "ddp": (["--algo", "grpo", "--set", "model.lora_rank=4", "--set", "train.lr=1e-2"], P * G * T),
    "fsdp": (["--algo", "dancegrpo", "--set", "model.distributed=fsdp", "--set", "model.lora_rank=0"],
             P * G * int((T - 1) * 0.6)),
}
#: where the launch dies: rank 0 (the only writer) renaming the 2nd checkpoint into place, after both iterations
#: and their evaluations were logged (its temporary checkpoint directory is left behind)
CRASH = {"TREEBENCH_FAILPOINTS": "checkpoint.rename=crash@2"}


def _records(run: Path, name: str = "iterations.jsonl") -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING_KEYS}
            for line in (run / name).read_text().splitlines()]


def _no_abort(res: Result) -> None:
    # the shutdown abort of a gloo group left to interpreter finalisation (bench.run.distributed.destroy_at_exit)
    assert "terminate called" not in res.stderr, res.tail()


@pytest.mark.parametrize("mode", sorted(CASES))
def test_two_process_run_killed_and_resumed_equals_uninterrupted(tmp_path, mode):
    extra, nfe_update = CASES[mode]
    run = tmp_path / "run"
    res = run_launch([*COMMON, *extra, "--out", str(run)], tmp_path / "logs_cut", TIMEOUT, env=CRASH)
    # rank 0 died at the failpoint (the launch fails with its status), before anything marked the run complete
    assert res.returncode != 0 and "failpoint checkpoint.rename: crash" in res.stderr, res.tail()
    _no_abort(res)
    assert not (run / "final.json").exists()
    assert [c.name for c in list_checkpoints(run)] == ["step_000001"]
    man = json.loads((run / "manifest.json").read_text())
    assert man["world_size"] == 2 and man["config"]["model"]["distributed"] == ("fsdp" if mode == "fsdp" else "auto")

    # the log of the uninterrupted run
    recs, evals = _records(run), _records(run, "evals.jsonl")
    assert [r["iteration"] for r in recs] == list(range(ITERS))
    assert [e["iteration"] for e in evals] == list(range(ITERS + 1))  # at the start and after every iteration
    # budgets count the global batch exactly once, as one process would (not world-size times, not rank 0 only)
    for i, r in enumerate(recs, start=1):
        assert (r["samples"], r["nfe_rollout"], r["nfe_update"]) == (P * G, P * G * T, nfe_update), r
        assert r["samples_total"] == i * P * G and r["nfe_total"] == i * (P * G * T + nfe_update), r
        # one edge loss term per trained step of every chain (1 NFE each without CFG), of both ranks
        assert r["edges"] == nfe_update, r

    res = run_launch(["run", "--resume", str(run), "--no-progress"], tmp_path / "logs_resume", TIMEOUT)
    assert res.returncode == 0, res.tail()
    _no_abort(res)
    # restarted after iteration 1: the second iteration and its evaluation were computed again
    assert "from step_000001: 1 iterations" in res.stdout and f"eval @ it {ITERS}" in res.stdout, res.tail()
    final = json.loads((run / "final.json").read_text())
    assert (final["iterations"], final["samples_total"]) == (ITERS, ITERS * P * G), final
    assert _records(run) == recs
    assert _records(run, "evals.jsonl") == evals
