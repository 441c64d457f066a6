"""The only training loop: plan -> rollout -> reward -> advantages -> update -> log, under a budget.

``run(cfg)`` alone reads the clock, checks the budget at iteration boundaries, records the stop reason
and writes the run directory (docs/RUNDIR.md). Evaluation is timed but outside the training budget.
Same config + seed on CPU gives an identical iterations.jsonl apart from timing fields.

Where each part lives: the typed run spec ``bench.spec``; the model ``bench.model.models``; rewards
``bench.run.scoring``; the run directory and log ``bench.rundir.runlog``; records ``bench.run.records``; evaluation
``bench.run.evaluation``; checkpoints and resume ``bench.rundir.resume``; faults ``bench.run.faults``.
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

from bench.budget import Totals
from bench.engine import flops as flops_mod
from bench.engine import pricing as cost_mod
from bench.engine import trace as trace_mod
from bench.engine.arithmetic import batch_arithmetic
from bench.engine.prompts import load_prompt_set
from bench.engine.rollout import Schedule
from bench.errors import (
    Interrupted,
    NonFiniteGrad,
    StopRun,
    UsageError,
    is_out_of_memory,
)
from bench.model.models import build_policy, resolve_device, weights_hash
from bench.model.policy import Conditioning
from bench.run import trackers as trackers_mod
from bench.run.build import build_algorithm, build_engine, build_optimizer
from bench.run.distributed import Dist, NullLog
from bench.run.evaluation import evaluate
from bench.run.faults import (
    StopFlag,
    is_write_fault,
    nonfinite_inputs,
    oom_failure,
    report_nonfinite,
    stop_signals,
    write_failure,
)
from bench.run.finish import announce, finish, resume_run
from bench.run.progress import Progress, end_summary
from bench.run.records import PHASES, IterationRecord, zero_spread_fraction
from bench.run.scoring import build_rewards, check_reward_gradient, score
from bench.run.timing import PhaseTimer, peak_mem_mb
from bench.rundir import resume as resume_mod
from bench.rundir.lock import RunLock
from bench.rundir.runlog import RunLog, check_out_dir, create_out_dir, manifest
from bench.rundir.state import CheckpointParts, RunState
from bench.spec import RunSpec
from bench.types import Advantages, RewardOutput, Rollout, RolloutPlan, UpdateStats


@dataclass
class RunSummary:
    out_dir: Path
    stop_reason: str
    iterations: int
    samples_total: int
    nfe_total: int
    seconds_total: float
    final_eval: dict[str, Any] | None = None
    records: list[dict[str, Any]] = field(default_factory=list, repr=False)


class Run:
    """One training run: the components built from the spec, and the state that checkpoints carry."""

    def __init__(self, spec: RunSpec, resume: bool = False):
        self.lock: RunLock | None = None         # one writer per run directory (bench.rundir.lock), held until release()
        try:
            self._build(spec, resume)
        except BaseException:
            self.release()
            raise

    def release(self) -> None:
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    def _build(self, spec: RunSpec, resume: bool) -> None:
        self.spec, self.resume = spec, resume
        device = resolve_device(spec.model.device)
        self.dist = Dist.launch(spec.model.distributed, device)  # one process, or data-parallel under accelerate
        self.device = self.dist.device(device)
        self.train_prompts = load_prompt_set(spec.train_prompts)
        self.eval_prompts = load_prompt_set(spec.eval_prompts)
        # everything is validated before the run directory is created, replaced or resumed
        self.out = spec.run.out
        if self.dist.is_main:
            if self.out.is_dir():  # refused at once when a live process writes it
                self.lock = RunLock(self.out).acquire()
            check_out_dir(self.out, spec.run.overwrite, resume, force=spec.run.force)
        if resume:  # the saved config against the new one: both resolved dicts, the format manifests store
            resume_mod.check_resume_config(self.out, resume_mod.saved_config(self.out), spec.config)
        tracker_names = trackers_mod.check_run(spec.run)  # opened once the run directory exists
        # the algorithm and the rewards are checked before the (possibly large) model is loaded
        self.algo = build_algorithm(spec)
        self.reward, self.eval_rewards = build_rewards(spec.reward, spec.eval.rewards, self.device)
        if getattr(self.algo, "reward_gradient", False):  # direct-gradient algorithms (ReFL, DRaFT-K)
            check_reward_gradient(self.reward, spec.algo_name)
        torch.manual_seed(spec.seed)
        self.policy = build_policy(spec.model, self.device)
        if self.policy.prediction != spec.model.prediction:
            raise UsageError(f"{self.policy.path}: the model predicts {self.policy.prediction!r} but its "
                             f"model_index.json says {spec.model.prediction!r}")
        self.dist.prepare_policy(self.policy)  # DDP wrapper for the update's forward passes
        # weight snapshots of the initial weights (restored on resume); the reward a direct-gradient update scores with
        self.engine = build_engine(spec, self.policy, self.algo, self.dist.rollout_seed(spec.seed), self.reward)
        self.check_schedule()
        # AdamW (train.frozen: FrozenAdamW), NaN/inf steps refused, every step in the call trace
        self.optimizer = build_optimizer(spec.optimizer, self.policy.trainable_parameters(), self.engine.recorder)
        o = spec.optimizer
        self.checkpointed = CheckpointParts(
            out=self.out, config=spec.config, policy=self.policy, snapshots=self.engine.snapshots,
            optimizer=self.optimizer, algo=self.algo, keep=spec.run.keep_checkpoints, is_main=self.dist.is_main,
            sharded=self.dist.fsdp, ignoring_calls=self.engine.recorder.ignoring, optimizer_settings={"lr": o.lr, "betas": (o.beta1, o.beta2), "eps": o.eps,
                                                        "weight_decay": o.weight_decay})
        self.trace_writer: trace_mod.TraceWriter | None = None  # the full call trace (run.trace), set by run()
        self.counts, self.flops_info = self.count_flops()  # FLOPs per call kind (meta device) and the device peak
        self.train_calls: list[trace_mod.Call] = []  # the last iteration's training calls
        self.arith = batch_arithmetic(self.algo.plan(0), spec.prompts_per_iteration, spec.train.micro_batch,
                                      spec.train.optimizer_steps)
        if not resume and self.dist.is_main:
            self.lock = create_out_dir(self.out, spec.run.overwrite, self.lock, force=spec.run.force)
        self.log: RunLog | NullLog = RunLog(self.out, tensorboard=spec.run.tensorboard) if self.dist.is_main else NullLog()
        # trackers record the configuration as the user wrote it (the resolved dict, as the manifest stores it)
        self.trackers = trackers_mod.Trackers(tracker_names if self.dist.is_main else [], self.out, spec.config,
                                              self.out.name)
        self.eval_batch = self.eval_prompts.head(spec.eval.num_prompts)
        self.eval_conditioning: Conditioning | None = None  # encoded eval prompts, reused by every evaluation
        self.state = RunState()                  # what the run has done (restored on resume); its wall clock starts now
        self.stop = StopFlag()

    def count_flops(self) -> tuple[flops_mod.ModelCounts | None, dict[str, Any]]:
        """FLOPs per call kind of this run's model and training reward, counted on a meta-device copy
        (bench.engine.flops; cached), and the peak FLOP/s per device MFU divides by. Never fatal: a model
        the counter cannot copy leaves flops null, with the reason in the manifest."""
        from bench.rundir.runlog import device_info

        name = device_info(self.device).get("name") if self.device.type == "cuda" else "cpu"
        peak, source = flops_mod.run_peak(self.spec.run.peak_flops, self.spec.model.mixed_precision, name)
        info: dict[str, Any] = {"peak_flops_per_device": peak, "peak_source": source}
        if not self.spec.run.flops:
            return None, {**info, "counted": False, "reason": "run.flops=false"}
        try:
            counts = flops_mod.count_model(self.policy, {self.spec.reward.name: self.reward})
        except Exception as e:  # noqa: BLE001 - counting FLOPs must never stop a run
            return None, {**info, "counted": False, "reason": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"}
        return counts, {**info, "counted": True, "flops_per_row": {k: v.flops_per_row for k, v in counts.kinds.items()},
                        "uncounted": dict(counts.uncounted)}

    def start(self) -> list[dict[str, Any]]:
        """Write the manifest, or resume; returns the iteration records already in the run directory."""
        if self.resume:
            return resume_run(self)
        if self.dist.is_main:
            self.log.write_manifest(manifest(
                self.spec, out=self.out, policy=self.policy, weights_sha256=weights_hash(self.policy.path),
                reward=self.reward, eval_rewards=self.eval_rewards, device=self.device, batch=self.arith,
                world_size=self.dist.world_size,
                prompts={"train": self.train_prompts.describe(), "eval": self.eval_prompts.describe()},
                schedule=self.schedule_record(), flops=self.flops_info))
        return []

    def base_schedule(self) -> Schedule:
        """The schedule of a plain T-step plan: the run's base schedule."""
        T = self.spec.sampler.steps
        return self.engine.schedule(RolloutPlan(num_steps=T, modes=("ode",) * T, branch=(1,) * T))

    def check_schedule(self) -> None:
        """The loaded model's scheduler must give the schedule read from its config before loading."""
        want = self.spec.sampler.sigmas
        if want is not None:
            got = self.base_schedule().levels
            if not torch.allclose(got, torch.tensor(want), atol=1e-6):
                raise RuntimeError(f"the loaded model's schedule {got.tolist()} differs from the one read from "
                                   f"its scheduler config {list(want)}")

    def schedule_record(self) -> dict[str, Any]:
        s, sched = self.spec.sampler, self.base_schedule()
        return {"kind": s.schedule if s.prediction == "flow" else "ddim", "steps": s.steps, "shift": s.shift,
                "sigmas": [float(v) for v in sched.levels], "timesteps": [float(v) for v in sched.timesteps]}

    def check_stop(self) -> None:
        if self.stop.signal is not None:
            raise Interrupted(self.stop.signal)

    # ---- one iteration: plan -> rollout -> reward -> advantages -> update -> record ----
    def iteration(self, i: int) -> IterationRecord:
        timer = PhaseTimer(self.device)
        global_batch = self.train_prompts.sample(self.spec.prompts_per_iteration, self.spec.seed, i)
        batch = self.dist.shard(global_batch)  # this rank's prompts (all of them in one process)
        self.check_stop()
        with timer("rollout"):
            plan = self.algo.plan(i)
            rollout = self.engine.run(plan, batch, i)
        self.check_stop()
        with timer("reward"):
            rewards = score(self.reward, rollout.images, batch, rollout.leaf_prompts(), out_dir=self.out,
                            iteration=i, stage="train", recorder=self.engine.recorder)
        self.check_stop()
        nonfinite = self.dist.any_flag(nonfinite_inputs(rewards, rollout))  # one rank's bad batch: all skip
        adv, stats, view, update_nfe = None, None, None, 0
        if nonfinite is None:
            self.state.in_update = True  # from here the algorithm's state changes: not checkpointable until done
            with timer("advantage"):
                # computed on every rank's data (the single-process result), local part kept
                adv, view = self.dist.advantages(self.algo, global_batch, batch, rollout, rewards)
            with timer("update"):
                stats, update_nfe, nonfinite = self._update(rollout, adv)
        local = (rollout.num_leaves, rollout.nfe)  # this rank's share: the budgets sum them over ranks
        if view is not None:  # the logged reward statistics are the global batch's
            rollout, rewards = view.rollout, view.rewards
        rec = self._record(i, plan, rollout, rewards, adv, stats, local, update_nfe, timer.seconds)
        if nonfinite is None and not rec.finite():
            nonfinite = "loss"
        self.state.in_update = False
        return rec if nonfinite is None else dataclasses.replace(rec, nonfinite=nonfinite)

    def _update(self, rollout: Rollout, adv: Advantages) -> tuple[UpdateStats | None, int, str | None]:
        """(stats, NFE spent, "grad" when the optimizer refused a non-finite step)."""
        self.policy.train(True)
        try:
            stats = self.algo.update(self.policy, self.engine, self.optimizer, rollout, adv)
            return stats, stats.nfe, None
        except NonFiniteGrad as e:
            self.optimizer.zero_grad(set_to_none=True)
            return None, e.nfe, "grad"
        finally:
            self.policy.train(False)

    def _record(self, i: int, plan: RolloutPlan, rollout: Rollout, rewards: RewardOutput, adv: Advantages | None,
                stats: UpdateStats | None, local: tuple[int, int], update_nfe: int, seconds: dict[str, float]
                ) -> IterationRecord:
        # budgets count globally: samples, NFE and trained edges of all ranks, seconds of the slowest
        n_samples, nfe_r, nfe_u, seconds, edges = self.dist.totals(local[0], local[1], update_nfe, seconds,
                                                                    stats.edges if stats is not None else 0)
        secs = sum(seconds.get(p, 0.0) for p in PHASES)
        cost = self.drain_calls(i)
        flops = unc = None
        if self.counts is not None:  # every rank makes the same calls on an equal shard
            f, unc = flops_mod.trace_flops(self.counts, self.train_calls)
            flops = f * self.dist.world_size
        was = self.state.totals
        t = self.state.totals = Totals(seconds=was.seconds + secs, samples=was.samples + n_samples,
                                       nfe=was.nfe + nfe_r + nfe_u, iterations=i + 1,
                                       modeled_seconds=cost.get("modeled_seconds_total", was.modeled_seconds),
                                       flops=was.flops + (flops or 0.0))
        peak = self.flops_info.get("peak_flops_per_device")
        mfu = flops / (secs * peak * self.dist.world_size) if flops is not None and peak and secs > 0 else None
        sc = rewards.scores
        update = {} if stats is None else {
            "loss": stats.loss, "approx_kl": stats.approx_kl, "clip_frac": stats.clip_frac,
            "grad_norm": stats.grad_norm, "first_ratio": stats.first_ratio, "kl": stats.kl, "edges": edges,
            "optimizer_steps": stats.optimizer_steps, "micro_batches": stats.micro_batches}
        return IterationRecord(
            iteration=i, samples=n_samples, samples_total=t.samples, nfe_rollout=nfe_r, nfe_update=nfe_u,
            nfe_total=t.nfe, seconds_total=t.seconds,
            **{f"t_{p}_s": seconds.get(p, 0.0) for p in PHASES}, t_iteration_s=secs,
            reward_mean=float(sc.mean()), reward_std=float(sc.std(unbiased=False)), reward_min=float(sc.min()),
            reward_max=float(sc.max()),
            reward_components={k: float(v.float().mean()) for k, v in rewards.components.items()},
            lr=self.optimizer.param_groups[0]["lr"], peak_mem_mb=peak_mem_mb(self.device), flops=flops,
            flops_total=t.flops if flops is not None else None, mfu=mfu, flops_uncounted_calls=unc or 0,
            zero_spread_frac=zero_spread_fraction(sc, rollout.leaf_prompts()), **update,
            algorithm={**plan.info, **(adv.metrics if adv else {}), **(stats.metrics if stats else {})}, cost=cost)

    def drain_calls(self, iteration: int, stage: str = "train") -> dict[str, Any]:
        """The engine's calls since the last drain: written to trace.jsonl (run.trace), summarised per kind
        and, with a cost profile, priced (training: the modeled keys and running total; eval: its seconds)."""
        calls = self.engine.recorder.drain()
        if self.trace_writer is not None:
            self.trace_writer.write(iteration, calls, stage)
        profile = self.spec.cost_profile
        if stage == "eval":
            return {} if profile is None else {
                "modeled_eval_s": cost_mod.price(profile, calls, self.counts).phases["eval"],
                "modeled_seconds_total": self.state.totals.modeled_seconds}
        self.train_calls = [c for c in calls if c.phase in trace_mod.TRAIN_PHASES]
        keys: dict[str, Any] = trace_mod.summarize(calls)
        if profile is not None:
            keys.update(cost_mod.iteration_record(profile, calls, self.state.totals.modeled_seconds, self.counts))
        return keys


# ---- the loop ------------------------------------------------------------------------------------------
def run(cfg: Mapping[str, Any], on_iteration: Callable[[dict], None] | None = None,
        on_eval: Callable[[dict], None] | None = None, progress: bool | None = None,
        resume: bool = False) -> RunSummary:
    """Train under the budget and write the run directory. ``cfg`` is a resolved config
    (``bench.config.resolve``; for ``resume=True`` normally ``bench.rundir.resume.resume_config``);
    callbacks may raise ``StopRun`` to stop early. With ``resume`` the run continues in ``cfg['out']``
    from its newest valid checkpoint. The run directory is locked for the whole run (``bench.rundir.lock``); a
    write fault (disk full, I/O error, permission) ends it with a ``WriteFault`` saying what was kept."""
    r = Run(RunSpec.from_config(cfg), resume=resume)
    try:
        summary = _run(r, on_iteration, on_eval, progress, resume)
    except OSError as e:
        if not is_write_fault(e):
            raise
        raise write_failure(e, r.out, last_checkpoint=r.state.last_checkpoint,
                            final_fault=r.state.final_fault) from None
    finally:
        r.release()
    st = r.state
    if st.write_fault is not None:
        raise write_failure(st.write_fault, r.out, last_checkpoint=st.last_checkpoint, final_fault=st.final_fault)
    return summary


def _run(r: Run, on_iteration: Callable[[dict], None] | None, on_eval: Callable[[dict], None] | None,
         progress: bool | None, resume: bool) -> RunSummary:
    records = r.start()
    if r.spec.run.trace and r.dist.is_main:
        r.trace_writer = trace_mod.TraceWriter(r.out, r.state.totals.iterations if resume else None,
                                               kept_evals=[e["iteration"] for e in r.state.evals])
    show = (r.spec.run.progress if progress is None else progress) and r.dist.is_main
    if r.dist.is_main:
        announce(r)
    bar = Progress() if show else None
    stop_reason, failure = None, None
    with stop_signals(r.stop):
        try:
            stop_reason = _train(r, records, bar, on_iteration, on_eval)
        except StopRun as e:
            stop_reason = e.reason
        except (Interrupted, KeyboardInterrupt):
            stop_reason = "interrupted"
        except Exception as e:  # noqa: BLE001 - recorded in final.json, then re-raised
            failure = e if not is_out_of_memory(e) else oom_failure(
                e, device=r.device, iteration=r.state.totals.iterations, micro_batch=r.spec.train.micro_batch,
                prompts_per_iteration=r.spec.prompts_per_iteration, out=r.out,
                resumable=r.state.last_checkpoint is not None)
            stop_reason = "error"
        if bar is not None:
            bar.close()
        final_eval = finish(r, stop_reason, failure)
    if failure is not None:
        raise failure
    if r.dist.is_main:
        print(end_summary(r.state.evals, r.state.final_record or {}, r.out), flush=True)
    t = r.state.totals
    return RunSummary(out_dir=r.out, stop_reason=stop_reason, iterations=t.iterations, samples_total=t.samples,
                      nfe_total=t.nfe, seconds_total=t.seconds, final_eval=final_eval, records=records)


def _train(r: Run, records: list[dict[str, Any]], bar: Any, on_iteration: Callable[[dict], None] | None,
           on_eval: Callable[[dict], None] | None) -> str:
    """Iterate until the budget (or a non-finite batch with run.on_nonfinite=stop) stops the run."""
    every, ckpt_every = r.spec.eval.every, r.spec.run.checkpoint_every
    if r.spec.eval.at_start and r.state.totals.iterations == 0 and not r.state.evals:
        _evaluate(r, 0, on_eval, point=0.0)
    i = r.state.totals.iterations
    while True:
        # the budget is checked at iteration boundaries: the last iteration may pass it (final.json and the
        # final evaluation record the exact totals)
        stop_reason = r.spec.budget.exhausted(r.state.totals)
        if stop_reason:
            return stop_reason
        r.check_stop()
        before = r.state.totals
        rec = r.iteration(i).to_json()
        r.log.iteration(rec)
        r.trackers.iteration(rec)
        records.append(rec)
        if i == 0 and abs(rec["first_ratio"] - 1.0) > 1e-3:
            print(f"warning: first importance ratio {rec['first_ratio']:.6f} != 1: rollout and update "
                  f"log-probs disagree (mixed precision or nondeterministic kernels?)", file=sys.stderr)
        if bar is not None:
            bar.update(r.spec.budget.fraction(r.state.totals), rec)
        i += 1
        if "nonfinite" in rec:
            stop = r.spec.run.on_nonfinite != "skip"
            report_nonfinite(rec["nonfinite"], i - 1, stop, r.state.last_checkpoint)
            if stop:
                return "nonfinite"
        if on_iteration:
            on_iteration(rec)
        # the evaluation schedule: the first iteration boundary at or past each multiple of eval.every (in
        # iterations or a budget currency), decided from cumulative totals, so a resumed run keeps it
        if every.due(before, r.state.totals):
            _evaluate(r, i, on_eval, point=every.point(r.state.totals))
        if ckpt_every and i % ckpt_every == 0:
            resume_mod.save_checkpoint(r.checkpointed, r.state)


def _evaluate(r: Run, iteration: int, on_eval: Callable[[dict], None] | None, point: float | None = None) -> None:
    rec = evaluate(r, iteration, point=point)
    if on_eval:
        on_eval(rec)
