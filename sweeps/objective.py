"""The sweep objective: one trial = one ordinary ``bench.run.runner.run`` in this process.

Each trial samples overrides from the space, resolves the run config on top of the sweep's base
settings (fixed seed: every trial trains on the same prompts and evaluates on the same prompts and
noise), writes a normal run directory ``<out>/trials/<number>/`` and returns the final held-out value
of the objective key (and the cost in multi-objective mode).

Outcomes:
- an invalid combination (space constraint, or a setting the algorithm refuses, e.g. d > window)
  -> PRUNED, ``reason`` = the message; no run directory;
- held-out evaluations are reported as intermediate values (step = completed iterations); when the
  pruner says so the run stops (stop reason "pruned") -> PRUNED;
- an exception, a non-finite loss/reward (stop reason "nonfinite"), running out of memory -> FAIL with
  ``reason``; the sweep goes on;
- a mistake in the sweep itself (objective key absent from the eval records, a model that cannot be
  loaded, any other usage error the runner raises that is not about the algorithm's settings)
  -> ``SweepAbort``: the sweep stops with the message.

With ``--seeds-per-trial N`` (N > 1) a trial trains N runs, one after the other, at seeds ``seed`` ..
``seed + N - 1`` (``<out>/trials/<number>/seed<S>/``) with the same sampled parameters; its value is the
mean of their final held-out values (its cost, in multi-objective mode, their summed cost). The first
seed's evaluations are the intermediate values the pruner compares (every trial's first seed is the same
seed, so they are comparable); with ``--reject-hacking`` a trial is rejected when the hacking rule flags
*any* of its seeds (a learning rate that hacks in one seed of N must not win on the others' mean).
"""

from __future__ import annotations

import gc
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna

from bench import config as config_mod
from bench.budget import Budget, Totals
from bench.errors import AlgorithmSettingsError, StopRun, UsageError, algorithm_settings, is_out_of_memory
from bench.registry import algorithm_class
from bench.run import runner
from bench.spec import RunSpec
from sweeps.spaces import InvalidCombination, Space, sample
from sweeps.study import Heartbeat, counts

COSTS = {"seconds": "seconds_total", "nfe": "nfe_total", "samples": "samples_total"}
#: a run's totals, recorded on its trial (summed over the runs of a --seeds-per-trial trial)
TOTALS = ("iterations", "samples_total", "nfe_total", "seconds_total")


class SweepAbort(UsageError):
    """A mistake in the sweep definition found while running a trial: stops the whole sweep."""


class TrialFailed(Exception):
    """Raised by the objective so that Optuna records the trial as FAIL (the sweep continues)."""


@dataclass
class SweepSpec:
    """Everything a trial needs besides the sampled parameters."""

    out: Path
    space: Space
    objective: str                         # eval key, e.g. "eval/shapes_attr"
    base_overrides: dict[str, Any]         # --set + sweep defaults (dotted keys)
    flags: dict[str, Any]                  # algo.name, model.name, budget, seed, ...
    config_file: str | None = None
    preset: str | None = None
    cost: str | None = None                # None | "seconds" | "nfe" | "samples" (multi-objective)
    heartbeat_s: float = 30.0
    target: int | None = None              # --trials: trials of the study in total, over all workers
    base_cfg: dict[str, Any] = field(default_factory=dict)  # the resolved base config (bounds, checks)
    reject_hacking: bool = False           # --reject-hacking: a trial the whole-curve hacking rule flags is PRUNED
    seeds_per_trial: int = 1               # --seeds-per-trial: runs per trial, at seed, seed + 1, ...

    def seeds(self) -> list[int]:
        """The run seeds of every trial."""
        first = int(self.flags["seed"])
        return list(range(first, first + self.seeds_per_trial))

    def resolve(self, overrides: Mapping[str, Any], out: Path | None, seed: int | None = None) -> dict[str, Any]:
        flags = dict(self.flags)
        flags["out"] = str(out) if out is not None else None
        if seed is not None:
            flags["seed"] = seed
        return config_mod.resolve({**self.base_overrides, **overrides}, config_file=self.config_file,
                                  preset=self.preset, flags=flags)


def check_objective_key(key: str, cfg: Mapping[str, Any]) -> None:
    """The objective must be a held-out eval key of a reward the runs evaluate."""
    valid = [f"eval/{r}" for r in cfg["eval"]["rewards"]]
    parts = key.split("/")
    if len(parts) < 2 or parts[0] != "eval" or parts[1] not in cfg["eval"]["rewards"] or key.endswith("/std") \
            and len(parts) == 3:
        hint = ""
        if not key.startswith("eval/"):
            hint = " The objective is a held-out evaluation value (evals.jsonl), written eval/<reward>."
        raise UsageError(f"unknown objective {key!r}.{hint} Valid: {', '.join(valid)} (or eval/<reward>/<component>"
                         f"); add rewards to evaluate with --eval-rewards a,b")


def validate_run_config(cfg: Mapping[str, Any]) -> None:
    """Build the algorithm exactly as the runner would (from the same ``RunSpec``, so with the model's own
    prediction type), without loading weights: catches combinations such as algo.d > algo.window or a
    window longer than the schedule before any run directory exists (``AlgorithmSettingsError``)."""
    spec = RunSpec.from_config(cfg)
    with algorithm_settings(spec.algo_name):
        algorithm_class(spec.algo_name)(spec.algo_config, spec.sampler, spec.train, spec.seed)


def _free_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class Objective:
    """``Objective(spec)(trial) -> value`` (or ``(value, cost)``) for ``study.optimize``."""

    def __init__(self, spec: SweepSpec, run_fn: Callable[..., runner.RunSummary] | None = None):
        self.spec = spec
        self.run_fn = run_fn or runner.run  # tests substitute a failing run
        self._where = ""  # with --seeds-per-trial: the seed a reason is about ("seed 2001: ")

    def _prune(self, trial: optuna.Trial, reason: str) -> None:
        reason = self._where + reason
        trial.set_user_attr("reason", reason)
        raise optuna.TrialPruned(reason)

    def _fail(self, trial: optuna.Trial, reason: str) -> None:
        reason = self._where + reason
        trial.set_user_attr("reason", reason)
        raise TrialFailed(reason)

    def _requeue_interrupted(self, trial: optuna.Trial) -> None:
        """Ctrl-C: the trial ends FAIL and its parameters wait for the resumed sweep."""
        trial.set_user_attr("reason", "interrupted; re-queued")
        trial.study.enqueue_trial(dict(trial.params), user_attrs={"requeued_from": trial.number})

    def __call__(self, trial: optuna.Trial) -> Any:
        spec = self.spec
        self._where = ""
        if spec.target is not None:
            # parallel workers may both start a trial as the study reaches its target: the later one is
            # surplus and ends at once (it still shows in the table, with this reason)
            ahead = sum(counts(t) for t in trial.study.get_trials(deepcopy=False) if t.number < trial.number)
            if ahead >= spec.target:
                trial.study.stop()
                self._prune(trial, f"surplus: the study already had its {spec.target} trials")
        trial_dir = spec.out / "trials" / str(trial.number)
        seeds = spec.seeds()
        try:
            overrides = sample(trial, spec.space, spec.base_cfg)
            cfgs = [spec.resolve(overrides, trial_dir if len(seeds) == 1 else trial_dir / f"seed{s}", s)
                    for s in seeds]
        except (InvalidCombination, UsageError) as e:  # a sampled value the config refuses
            self._prune(trial, f"invalid combination: {e}")
        try:
            validate_run_config(cfgs[0])
        except AlgorithmSettingsError as e:
            self._prune(trial, f"invalid combination: {e}")
        except UsageError as e:  # e.g. no model at the path: every trial would fail the same way
            raise SweepAbort(str(e)) from None
        trial.set_user_attr("overrides", {k: v for k, v in overrides.items()})
        if len(seeds) == 1:
            return self._outcome(trial, *self._run(trial, cfgs[0], first=True))
        return self._mean_outcome(trial, seeds, cfgs)

    def _run(self, trial: optuna.Trial, cfg: dict[str, Any], first: bool
             ) -> tuple[runner.RunSummary, _Reporter]:
        """Train one run of the trial; its evaluations go to the pruner when it is the trial's ``first`` run."""
        spec = self.spec
        cfg["run"]["overwrite"] = True  # trial numbers are unique within a study
        trial.set_user_attr("run_dir", str(Path(cfg["out"]).resolve()))  # the running one (a dead worker's is closed)
        reporter = _Reporter(trial, spec.objective, multi=spec.cost is not None,
                             budget=Budget.parse(str(cfg["budget"])), reject_hacking=spec.reject_hacking,
                             report=first)
        try:
            with Heartbeat(trial, spec.heartbeat_s):
                summary = self.run_fn(cfg, on_eval=reporter, progress=False)
        except SweepAbort:
            raise
        except AlgorithmSettingsError as e:  # refused once the model was loaded (a window longer than its schedule)
            self._prune(trial, f"invalid combination: {e}")
        except UsageError as e:  # e.g. no model at the path: every trial would fail
            raise SweepAbort(str(e)) from None
        except KeyboardInterrupt:
            self._requeue_interrupted(trial)
            raise
        except Exception as e:  # noqa: BLE001 - any failure of one trial is recorded, the sweep goes on
            oom = is_out_of_memory(e)
            _free_memory()
            self._fail(trial, f"{'out of memory' if oom else 'error'}: {type(e).__name__}: {e}")
        return summary, reporter

    def _mean_outcome(self, trial: optuna.Trial, seeds: list[int], cfgs: list[dict[str, Any]]) -> Any:
        """``--seeds-per-trial``: the runs one after the other, each judged as a one-seed trial (a pruned,
        rejected or failed seed ends the trial, its reason naming the seed); the mean of their values, the sum
        of their costs. The table's totals are the trial's (all its runs so far)."""
        results: list[Any] = []
        totals = dict.fromkeys(TOTALS, 0)
        for i, (seed, cfg) in enumerate(zip(seeds, cfgs)):
            self._where = f"seed {seed}: "
            try:
                summary, reporter = self._run(trial, cfg, first=i == 0)
                for k in totals:
                    totals[k] += getattr(summary, k)
                results.append(self._outcome(trial, summary, reporter))
            finally:
                for k, v in totals.items():
                    trial.set_user_attr(k, v)
            values = [r[0] if isinstance(r, tuple) else r for r in results]
            trial.set_user_attr("seed_values", values)
        value = sum(values) / len(values)
        if self.spec.cost is None:
            return value
        return value, float(sum(r[1] for r in results))

    def _outcome(self, trial: optuna.Trial, summary: runner.RunSummary, reporter: _Reporter) -> Any:
        """The value(s) of a finished run, or PRUNED / FAIL / re-queued with the reason."""
        spec = self.spec
        for k in ("stop_reason", *TOTALS):
            trial.set_user_attr(k, getattr(summary, k))
        if summary.stop_reason == "pruned":
            self._prune(trial, reporter.prune_reason or "pruned")
        if spec.reject_hacking:  # the final evaluation is not passed to on_eval: judge it here too
            reporter.judge(summary.final_eval or {})
            if reporter.rejected:
                self._prune(trial, reporter.rejected)
        if summary.stop_reason == "interrupted":
            self._requeue_interrupted(trial)
            raise KeyboardInterrupt
        if summary.stop_reason == "nonfinite":
            self._fail(trial, f"nonfinite: loss, reward or gradient norm became NaN/inf at iteration "
                              f"{summary.iterations - 1}")
        final = summary.final_eval or {}
        if spec.objective not in final:
            if final:
                raise SweepAbort(f"objective {spec.objective!r} is not in the eval records; they hold: "
                                 f"{', '.join(k for k in final if k.startswith('eval/'))}")
            self._fail(trial, f"no final evaluation (stop reason {summary.stop_reason})")
        value = float(final[spec.objective])
        if not math.isfinite(value):
            self._fail(trial, f"nonfinite: final {spec.objective} = {value}")
        if spec.cost is None:
            return value
        return value, float(getattr(summary, COSTS[spec.cost]))


class _Reporter:
    """``on_eval`` callback: reports held-out values to Optuna and stops the run when it is pruned (``report``
    False: a trial's later seeds, judged for hacking but not reported: the pruner sees the first seed's curve)."""

    def __init__(self, trial: optuna.Trial, key: str, multi: bool, budget: Budget | None = None,
                 reject_hacking: bool = False, report: bool = True):
        self.trial, self.key, self.multi, self.budget = trial, key, multi, budget
        self.report = report
        self.reject_hacking = reject_hacking
        self.prune_reason: str | None = None
        self.rejected: str | None = None

    def judge(self, rec: Mapping[str, Any]) -> None:
        """Reject the trial when the whole-curve reward-hacking rule (``heldout_below_start``, set by
        ``bench.run.evaluation``) flags this evaluation: a held-out reward below its iteration-0 value by
        more than its resolution at two evaluations in a row while the training reward rose."""
        below = rec.get("heldout_below_start") or []
        if self.reject_hacking and below and self.rejected is None:
            self.rejected = (f"rejected: possible reward hacking at iteration {rec.get('iteration')}: held-out "
                             f"{', '.join(k.split('/', 1)[-1] for k in below)} stays below its iteration-0 value "
                             f"while the training reward rose")

    def _finished(self, rec: Mapping[str, Any]) -> bool:
        """The evaluation after the last iteration: the run is done, pruning would only discard it."""
        if self.budget is None:
            return False
        totals = Totals(seconds=float(rec["seconds_total"]), samples=int(rec["samples_total"]),
                        nfe=int(rec["nfe_total"]), iterations=int(rec["iteration"]))
        return self.budget.exhausted(totals) is not None

    def __call__(self, rec: Mapping[str, Any]) -> None:
        if self.key not in rec:
            raise SweepAbort(f"objective {self.key!r} is not in the eval records; they hold: "
                             f"{', '.join(k for k in rec if k.startswith('eval/'))}")
        self.judge(rec)
        if self.rejected is not None:
            self.prune_reason = self.rejected
            raise StopRun("pruned")
        if self.multi or not self.report:  # Optuna cannot prune multi-objective trials
            return
        step, value = int(rec["iteration"]), float(rec[self.key])
        if not math.isfinite(value):
            return
        self.trial.report(value, step)
        if step > 0 and not self._finished(rec) and self.trial.should_prune():
            self.prune_reason = f"pruned at iteration {step}: {self.key} = {value:.6g}"
            raise StopRun("pruned")
