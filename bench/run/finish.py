"""The two ends of a run (``bench.run.parts.RunParts``, i.e. a ``bench.run.runner.Run``): what it announces
at the start, how a resumed run continues, and how it finishes: a checkpoint at the stop where that is safe,
the final evaluation, final.json, the trackers closed."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from bench.run.evaluation import evaluate
from bench.run.faults import is_write_fault
from bench.run.parts import RunParts
from bench.rundir import checkpoint as ckpt_mod
from bench.rundir import resume as resume_mod
from bench.rundir.layout import MANIFEST
from bench.rundir.runlog import now_iso


def finish(r: RunParts, stop_reason: str, failure: BaseException | None) -> dict[str, Any] | None:
    """Checkpoint at the stop where that is safe, evaluate the final state, write final.json."""
    st = r.state
    # a checkpoint at the stop, unless the state is mid-update or must not move past a NaN batch
    want = stop_reason == "interrupted" or (r.spec.run.checkpoint_every > 0 and stop_reason != "nonfinite")
    want = want and not is_write_fault(failure)  # the log may lack the last record: keep the last good checkpoint
    pending = None  # a checkpoint failure that is not a write fault: raised once final.json records it
    if want and not st.in_update and st.last_checkpoint != st.totals.iterations:
        try:
            resume_mod.save_checkpoint(r.checkpointed, st)
        except Exception as e:  # noqa: BLE001 - recorded: the run ends with status 1 (docs/ERRORS.md)
            # without it, a later resume (or an extension of the budget) would restart from the last good
            # checkpoint, possibly iteration 0: the run must not end as if it were complete
            if failure is None:
                failure = e
                if is_write_fault(e):
                    st.write_fault = e  # bench.run.runner.run turns it into the write-fault message (exit 1)
                else:
                    pending = e
            else:
                ckpt_mod.warn(f"could not write the checkpoint at the stop either: {type(e).__name__}: {e}")
            stop_reason = "error"
    if stop_reason == "interrupted":
        if st.in_update:
            ckpt_mod.warn(f"interrupted during an update: no checkpoint of the partial iteration; resume "
                          f"continues from iteration {st.last_checkpoint}")
        print(f"interrupted: resume with  bench run --resume {r.out}", file=sys.stderr, flush=True)
    final_eval = None
    if failure is None and stop_reason not in ("nonfinite", "interrupted"):
        try:
            done = st.evals and st.evals[-1]["iteration"] == st.totals.iterations
            final_eval = st.evals[-1] if done else evaluate(r, st.totals.iterations)
        except Exception as e:  # noqa: BLE001 - a failed final evaluation leaves final_eval empty ...
            if is_write_fault(e):  # ... but a write fault ends the run with its message
                failure = st.write_fault = e
                stop_reason = "error"
    error = f"{type(failure).__name__}: {failure}" if failure is not None else None
    st.final_record = final_record(r, stop_reason, error, final_eval, st.wall_seconds())
    try:
        r.log.final(st.final_record)
    except OSError as e:  # atomic: the previous final.json (if any) is intact, no temporary file is left
        if not is_write_fault(e):
            raise
        st.final_fault = e
        if failure is None:
            st.write_fault = e
    r.trackers.close(st.final_record)
    if pending is not None:
        raise pending
    return final_eval


def final_record(r: RunParts, stop_reason: str, error: str | None, final_eval: dict | None, wall: float) -> dict[str, Any]:
    """final.json: stop reason, totals, the final and best evaluation, the newest checkpoint."""
    st = r.state
    best = None
    if st.evals:
        key = f"eval/{next(iter(r.eval_rewards))}"
        top = max(st.evals, key=lambda e: e.get(key, float("-inf")))
        best = {"key": key, "value": top.get(key), "iteration": top["iteration"]}
    out = {"stop_reason": stop_reason, "iterations": st.totals.iterations, "samples_total": st.totals.samples,
           "nfe_total": st.totals.nfe, "seconds_total": st.totals.seconds, "wall_seconds": wall,
           "final_eval": final_eval, "best_eval": best, "finished": now_iso(),
           "checkpoint": (str(ckpt_mod.step_dir(Path("."), st.last_checkpoint))
                          if st.last_checkpoint is not None else None),
           "checkpoint_seconds": st.checkpoint_seconds,
           # the evaluations that warned of possible reward hacking (either rule, bench.run.evaluation)
           "reward_hacking_evals": [int(e["iteration"]) for e in st.evals if e.get("reward_hacking")]}
    if r.counts is not None:
        peak = r.flops_info.get("peak_flops_per_device")
        out["flops_total"] = st.totals.flops
        out["mfu"] = (st.totals.flops / (st.totals.seconds * peak * r.dist.world_size)
                      if peak and st.totals.seconds > 0 else None)
    if r.spec.cost_profile is not None:
        out["modeled_seconds_total"] = st.totals.modeled_seconds
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


def announce(r: RunParts) -> None:
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


def resume_run(r: RunParts) -> list[dict[str, Any]]:
    """Continue run ``r`` in its directory (``bench.rundir.resume``): check its inputs, restore the newest valid
    checkpoint, cut the logs back to it and record the resume in the manifest. Returns the iteration records
    kept."""
    if not r.dist.is_main:  # other ranks only restore the state; rank 0 owns the files
        return resume_mod.restore_latest(r.checkpointed, r.state)[0]
    manifest = json.loads((r.out / MANIFEST).read_text())
    resume_mod.check_same_inputs(
        r.out, manifest, prompts={"train": (r.train_prompts.name, r.train_prompts.sha256),
                                  "eval": (r.eval_prompts.name, r.eval_prompts.sha256)},
        weights_path=r.policy.path, reward_versions={name: str(getattr(rw, "version", "unknown"))
                                                     for name, rw in {r.spec.reward.name: r.reward,
                                                                      **r.eval_rewards}.items()})
    kept, resumed_from = resume_mod.restore_latest(r.checkpointed, r.state)
    t = r.state.totals
    r.log.write_manifest(resume_mod.resumed_manifest(
        manifest, checkpoint=resumed_from, iterations=t.iterations, config=r.spec.config, budget=r.spec.budget,
        micro_batch=r.spec.train.micro_batch, batch=r.arith))
    print(f"resuming {r.out} from {resumed_from or 'the start'}: {t.iterations} iterations, "
          f"{t.samples} samples, {t.nfe} NFE, {t.seconds:.1f} s training already done", flush=True)
    return kept
