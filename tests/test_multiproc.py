"""The fast 2-process checks CI runs (`make test-dist`, marker ``multiproc``; not in the plain `pytest` run).

Each is a real ``accelerate launch --multi_gpu --num_processes 2`` of ``bench run`` on CPU (gloo) with the
tiny model, for one representative algorithm per parallel mode:

* **DDP** (``model.distributed=auto``, LoRA): GRPO;
* **FSDP** (``model.distributed=fsdp``, full fine-tuning, the denoiser sharded): DanceGRPO.

Each run trains 2 iterations and checkpoints after every one. A second launch of the same run is stopped
by a failpoint that ends rank 0 like ``kill -9`` while it appends the second iteration's record (a torn
line left behind; the launcher then terminates rank 1), and ``--resume`` finishes it: its records and
evaluations must equal the uninterrupted launch's. Every record must also count the global batch the way a
single process does (closed forms below): a runner change once counted samples world-size times and rollout
NFE as 0 on ranks other than 0, and nothing noticed. The parametrised kill-and-resume tests over more
algorithms stay in tests/test_fsdp.py (``-m slow``).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from _launch import Launch, Result, run_launch

from bench.run.records import TIMING_KEYS
from bench.rundir.checkpoint import list_checkpoints

pytestmark = pytest.mark.multiproc

#: seconds one launch may take (about 30 s each on the loaded 2-core machine, mostly imports in 3 processes)
TIMEOUT = 300
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
#: where the interrupted launch dies: rank 0 (the only writer) appending the 2nd iteration's record, after the
#: checkpoint of iteration 1 was written
CRASH = {"TREEBENCH_FAILPOINTS": "log.iterations=crash@2"}


def _records(run: Path, name: str = "iterations.jsonl") -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING_KEYS}
            for line in (run / name).read_text().splitlines()]


def _ok(res: Result) -> None:
    assert res.returncode == 0, res.tail()
    # the shutdown abort of a gloo group left to interpreter finalisation (bench.run.distributed.destroy_at_exit)
    assert "terminate called" not in res.stderr, res.tail()


@pytest.mark.parametrize("mode", sorted(CASES))
def test_two_process_run_killed_and_resumed_equals_uninterrupted(tmp_path, mode):
    extra, nfe_update = CASES[mode]
    args = [*COMMON, *extra]
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    # the uninterrupted and the interrupted launch are independent: run side by side
    ref_launch = Launch([*args, "--out", str(ref)], tmp_path / "logs_ref")
    cut_launch = Launch([*args, "--out", str(cut)], tmp_path / "logs_cut", env=CRASH)
    ref_res, cut_res = ref_launch.wait(TIMEOUT), cut_launch.wait(TIMEOUT)

    _ok(ref_res)
    man = json.loads((ref / "manifest.json").read_text())
    assert man["world_size"] == 2 and man["config"]["model"]["distributed"] == ("fsdp" if mode == "fsdp" else "auto")
    recs = _records(ref)
    assert [r["iteration"] for r in recs] == list(range(ITERS))
    # budgets count the global batch exactly once, as one process would (not world-size times, not rank 0 only)
    for i, r in enumerate(recs, start=1):
        assert (r["samples"], r["nfe_rollout"], r["nfe_update"]) == (P * G, P * G * T, nfe_update), r
        assert r["samples_total"] == i * P * G and r["nfe_total"] == i * (P * G * T + nfe_update), r
    final = json.loads((ref / "final.json").read_text())
    assert (final["iterations"], final["samples_total"]) == (ITERS, ITERS * P * G), final

    # the interrupted launch: rank 0 died at the failpoint (its status is the launch's root cause)
    assert cut_res.returncode != 0, cut_res.tail()
    assert "failpoint log.iterations: crash" in cut_res.stderr, cut_res.tail()
    assert not (cut / "final.json").exists()
    assert [c.name for c in list_checkpoints(cut)] == ["step_000001"]
    assert (cut / "iterations.jsonl").read_text().count("\n") == 1  # one whole record, then the torn line

    res = run_launch(["run", "--resume", str(cut), "--no-progress"], tmp_path / "logs_resume", TIMEOUT)
    _ok(res)
    assert "resuming" in res.stdout and "from step_000001" in res.stdout, res.tail()
    assert _records(cut) == recs
    assert _records(cut, "evals.jsonl") == _records(ref, "evals.jsonl")
    assert len(_records(ref, "evals.jsonl")) == ITERS + 1  # at the start and after every iteration
