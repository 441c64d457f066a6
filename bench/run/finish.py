"""The two ends of a run (``bench.run.runner.Run``): what it announces at the start, and how it finishes:
a checkpoint at the stop where that is safe, the final evaluation, final.json, the trackers closed."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from bench.run.evaluation import evaluate
from bench.run.faults import is_write_fault
from bench.rundir import checkpoint as ckpt_mod
from bench.rundir import resume as resume_mod
from bench.rundir.runlog import now_iso


def finish(r: Any, stop_reason: str, failure: BaseException | None) -> dict[str, Any] | None:
    """Checkpoint at the stop where that is safe, evaluate the final state, write final.json."""
    # a checkpoint at the stop, unless the state is mid-update or must not move past a NaN batch
    want = stop_reason == "interrupted" or (r.spec.run.checkpoint_every > 0 and stop_reason != "nonfinite")
    want = want and not is_write_fault(failure)  # the log may lack the last record: keep the last good checkpoint
    pending = None  # a checkpoint failure that is not a write fault: raised once final.json records it
    if want and not r.in_update and r.last_checkpoint != r.totals.iterations:
        try:
            resume_mod.save_checkpoint(r)
        except Exception as e:  # noqa: BLE001 - recorded: the run ends with status 1 (docs/ERRORS.md)
            # without it, a later resume (or an extension of the budget) would restart from the last good
            # checkpoint, possibly iteration 0: the run must not end as if it were complete
            if failure is None:
                failure = e
                if is_write_fault(e):
                    r.write_fault = e  # bench.run.runner.run turns it into the write-fault message (exit 1)
                else:
                    pending = e
            else:
                ckpt_mod.warn(f"could not write the checkpoint at the stop either: {type(e).__name__}: {e}")
            stop_reason = "error"
    if stop_reason == "interrupted":
        if r.in_update:
            ckpt_mod.warn(f"interrupted during an update: no checkpoint of the partial iteration; resume "
                          f"continues from iteration {r.last_checkpoint}")
        print(f"interrupted: resume with  bench run --resume {r.out}", file=sys.stderr, flush=True)
    final_eval = None
    if failure is None and stop_reason not in ("nonfinite", "interrupted"):
        try:
            done = r.evals and r.evals[-1]["iteration"] == r.totals.iterations
            final_eval = r.evals[-1] if done else evaluate(r, r.totals.iterations)
        except Exception as e:  # noqa: BLE001 - a failed final evaluation leaves final_eval empty ...
            if is_write_fault(e):  # ... but a write fault ends the run with its message
                failure = r.write_fault = e
                stop_reason = "error"
    error = f"{type(failure).__name__}: {failure}" if failure is not None else None
    r.final_record = final_record(r, stop_reason, error, final_eval, r.wall_seconds())
    try:
        r.log.final(r.final_record)
    except OSError as e:  # atomic: the previous final.json (if any) is intact, no temporary file is left
        if not is_write_fault(e):
            raise
        r.final_fault = e
        if failure is None:
            r.write_fault = e
    r.trackers.close(r.final_record)
    if pending is not None:
        raise pending
    return final_eval


def final_record(r: Any, stop_reason: str, error: str | None, final_eval: dict | None, wall: float) -> dict[str, Any]:
    """final.json: stop reason, totals, the final and best evaluation, the newest checkpoint."""
    best = None
    if r.evals:
        key = f"eval/{next(iter(r.eval_rewards))}"
        top = max(r.evals, key=lambda e: e.get(key, float("-inf")))
        best = {"key": key, "value": top.get(key), "iteration": top["iteration"]}
    out = {"stop_reason": stop_reason, "iterations": r.totals.iterations, "samples_total": r.totals.samples,
           "nfe_total": r.totals.nfe, "seconds_total": r.totals.seconds, "wall_seconds": wall,
           "final_eval": final_eval, "best_eval": best, "finished": now_iso(),
           "checkpoint": (str(ckpt_mod.step_dir(Path("."), r.last_checkpoint))
                          if r.last_checkpoint is not None else None),
           "checkpoint_seconds": r.checkpoint_seconds,
           # the evaluations that warned of possible reward hacking (either rule, bench.run.evaluation)
           "reward_hacking_evals": [int(e["iteration"]) for e in r.evals if e.get("reward_hacking")]}
    if getattr(r, "counts", None) is not None:
        peak = r.flops_info.get("peak_flops_per_device")
        out["flops_total"] = r.totals.flops
        out["mfu"] = (r.totals.flops / (r.totals.seconds * peak * r.dist.world_size)
                      if peak and r.totals.seconds > 0 else None)
    if r.spec.cost_profile is not None:
        out["modeled_seconds_total"] = r.totals.modeled_seconds
        out["cost_profile"] = r.spec.cost_profile.name
    if error:
        out["error"] = error
    return out


def update_line(a: dict[str, Any]) -> str:
    """What the announcement says of the update: trained SDE parents, or, for a plan without SDE steps
    (likelihood-free algorithms such as DiffusionNFT), that the algorithm chooses its own terms."""
    if a["max_trainable_parents"] == 0:
        return (f"the algorithm's own loss terms (the plan has no SDE edges) in {a['optimizer_steps']} optimizer "
                f"step(s)")
    return (f"<= {a['max_trainable_parents']} trained parents in {a['optimizer_steps']} optimizer step(s), "
            f"gradient accumulation <= {a['grad_accumulation_max']}")


def announce(r: Any) -> None:
    """What the run will do, printed once at its start: batch arithmetic, run directory, clock."""
    a, s = r.arith, r.spec
    print(f"treebench: {s.algo_name} on {s.model.name} ({r.device}), reward {s.reward.name}, budget "
          f"{s.budget.spec}, seed {s.seed}\n"
          f"  per iteration: {a['prompts']} prompts x {a['trees_per_prompt']} trees x {a['leaves_per_tree']} "
          f"leaves = {a['images']} images, {a['rollout_nfe']} rollout NFE in iteration 0 (plans that move a "
          f"window change it)\n"
          f"  denoiser micro-batch {a['micro_batch_rows']} rows ({a['evaluations_per_call']} evaluations with "
          f"CFG x{a['cfg_factor']}); update: {update_line(a)}\n"
          f"  evaluation {s.eval.every.describe()}; run directory: {r.out}", flush=True)
    if s.optimizer.frozen:
        print("  train.frozen=true: the update runs (same NFE and calls) but no weight changes (a null arm)",
              flush=True)
    if s.cost_profile is not None:
        clock = ("the seconds budget counts these modeled seconds" if s.budget.clock == "modeled" else
                 "the budget counts wall-clock seconds")
        print(f"  modeled clock: cost profile {s.cost_profile.name} ({s.cost_profile.device}); {clock}", flush=True)
