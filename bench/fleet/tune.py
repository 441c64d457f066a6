"""``bench compare --tune``: an equal tuning budget per method before the final comparison.

For every compared algorithm, one Optuna study (``bench sweep`` in a subprocess: the sweeps package's
storage, samplers, pruners and trials table) over the same space (``lr``, log-uniform 1e-6..1e-3, plus any
other ``--tune`` key the algorithm declares in its own ``search_space``), with the same number of trials
and the same budget per trial, all on the tuning seed ``TUNE_SEED`` (``--tune-seeds N``: seeds ``TUNE_SEED`` ..
``TUNE_SEED + N - 1``, each trial's value the mean over them; never a final or A/A seed). Trials:

* are scored on a **validation split** (``bench sweep --validation-split``: the eval prompt set's prompts
  past the first ``eval.num_prompts``, so never the held-out prompts the final verdict uses, and, for the
  shapes world, combinations never trained on), with the **held-out metric** (the first eval reward that is
  not the training reward), not with the training reward: tuning on the training reward picks the
  learning rate that hacks it;
* are **rejected** (PRUNED, reason "rejected: possible reward hacking ...") when the whole-curve
  reward-hacking rule flags them (``bench sweep --reject-hacking``) in any of their seeds: a held-out score
  that collapsed on the validation prompts while the training reward rose must not win even if it recovers
  a little;
* are evaluated four times within their budget (``eval.every`` = a quarter of ``--tune-budget``) so that
  Optuna's Hyperband pruner (successive halving) stops the poor ones early.

Each algorithm's results are in ``DIR/tuning/<algo>/``: ``tuned.json`` (the best parameters as config
overrides, the objective, trial counts per state, budget per trial, seed, validation prompts),
``trials.csv``, ``sweep.json``, the study journal and one run directory per trial. The final comparison
then runs ``<algo>`` with its tuned overrides and ``<algo>-default`` (reference defaults) under fresh seeds.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from bench.budget import Budget
from bench.errors import UsageError

#: Every tuning trial runs at this seed: disjoint from the final seeds (checked) and the A/A seeds.
TUNE_SEED = 2000
#: Parameters every algorithm can tune (sweeps.spaces.COMMON): the learning rate and the SDE noise level.
COMMON_KEYS = ("lr", "noise_level")
#: Evaluations per trial (besides iteration 0): the intermediate values the pruner compares.
EVALS_PER_TRIAL = 4


def parse_keys(text: str) -> list[str]:
    keys = [k.strip() for k in text.split(",") if k.strip()]
    if not keys:
        raise UsageError("--tune: name the parameters to tune, e.g. --tune lr or --tune lr,timestep_fraction")
    if len(set(keys)) != len(keys):
        raise UsageError(f"--tune {text!r}: repeated parameter")
    return keys


def keys_per_algo(algos: Sequence[str], keys: Sequence[str]) -> dict[str, list[str]]:
    """The space of each algorithm: the common keys asked for, and each other key the algorithm declares in
    its ``search_space`` (a key no compared algorithm declares is a usage error)."""
    from bench.registry import algorithm_class

    own = {a: set((getattr(algorithm_class(a), "search_space", {}) or {}).keys()) for a in algos}
    unknown = [k for k in keys if k not in COMMON_KEYS and not any(k in own[a] for a in algos)]
    if unknown:
        known = sorted(set().union(*own.values()) | set(COMMON_KEYS))
        raise UsageError(f"--tune {','.join(unknown)}: no compared algorithm declares it; tunable: {', '.join(known)}")
    return {a: [k for k in keys if k in COMMON_KEYS or k in own[a]] for a in algos}


def eval_every(budget: str) -> str:
    """``eval.every`` of the trials: a quarter of the trial budget, in its currency."""
    b = Budget.parse(budget)
    if b.iterations is not None:
        return str(max(1, b.iterations // EVALS_PER_TRIAL))
    if b.samples is not None:
        return f"{max(1, b.samples // EVALS_PER_TRIAL)}samples"
    if b.nfe is not None:
        return f"{max(1, int(b.nfe) // EVALS_PER_TRIAL)}nfe"
    if b.seconds is not None:
        return f"{b.seconds / EVALS_PER_TRIAL:g}s"
    raise UsageError(f"--tune-budget {budget!r}: give an amount (300it, 5000samples, 2e6nfe, 5m)")


def heldout_metric(cfg: Mapping[str, Any]) -> tuple[str, str | None]:
    """The tuning objective, ``eval/<first eval reward that is not the training reward>``, and None; or,
    when the evaluation has no such reward (the tiny test models evaluate only their training reward),
    the training reward's score on the validation prompts and a warning that hacking cannot be rejected."""
    train = str(cfg["reward"]["name"])
    rewards = list(cfg["eval"]["rewards"])
    held = [r for r in rewards if r != train]
    if held:
        return f"eval/{held[0]}", None
    return f"eval/{rewards[0]}", (f"no held-out reward besides the training reward {train!r}: trials are scored "
                                  f"with the training reward on the validation prompts and reward hacking cannot "
                                  f"be detected or rejected (add one with --eval-rewards {train},<held-out reward>)")


def parse_ranges(items: Sequence[str], keys: Sequence[str]) -> dict[str, list[float]]:
    """``--tune-range KEY=LOW:HIGH`` items -> {KEY: [LOW, HIGH]}: parsed as ``bench sweep --range``
    (``bench.config.parse_ranges``), each KEY one of the ``--tune`` keys (the sweep checks the rest against the
    parameter: log scale needs LOW > 0)."""
    from bench.config import parse_ranges as parse_range_items

    ranges = parse_range_items(items, "--tune-range")  # syntax, LOW < HIGH, each key once
    for key in ranges:
        if key not in keys:
            raise UsageError(f"--tune-range {key}=...: {key!r} is not tuned (--tune {','.join(keys)})")
    return {k: list(v) for k, v in ranges.items()}


def parse_grid(items: Sequence[str], keys: Sequence[str]) -> dict[str, list[str]]:
    """``--tune-grid KEY=V1,V2,...`` items -> {KEY: [V1, V2, ...]} (values as written; the sweep parses and
    checks them): each KEY a ``--tune`` key, given once; when a grid is given, every tuned key needs one."""
    out: dict[str, list[str]] = {}
    for item in items:
        key, sep, values = str(item).partition("=")
        key = key.strip()
        vals = [v.strip() for v in values.split(",")]
        if not sep or not key or not all(vals):
            raise UsageError(f"--tune-grid {item!r}: expected KEY=V1,V2,..., e.g. lr=1e-5,3e-5,1e-4")
        if key not in keys:
            raise UsageError(f"--tune-grid {item!r}: {key!r} is not tuned (--tune {','.join(keys)})")
        if key in out:
            raise UsageError(f"--tune-grid names {key!r} twice")
        if len(set(vals)) != len(vals):
            raise UsageError(f"--tune-grid {item!r} lists a value twice")
        out[key] = vals
    missing = [k for k in keys if out and k not in out]
    if missing:
        raise UsageError(f"--tune-grid: give a grid for every tuned key (missing: {', '.join(missing)})")
    return out


def grid_trials(grid: Mapping[str, Sequence[str]], names: Sequence[str] | None = None) -> int:
    """Trials of a grid study: the product of the grid sizes (of ``names`` only, when given)."""
    return math.prod(len(v) for k, v in grid.items() if names is None or k in names)


#: the folder of a comparison directory that holds the tuning studies (their trials are runs, but not arms of
#: the comparison: its report leaves them out)
TUNING_DIR = "tuning"


#: options of the comparison that act on its run directories, not settings of the runs: neither saved with the
#: comparison's run options nor passed to a tuning sweep
RUN_DIR_FLAGS = ("--overwrite", "--force")


def tune_seeds(n: int) -> list[int]:
    """The seeds every tuning trial trains at (``--tune-seeds n``)."""
    return list(range(TUNE_SEED, TUNE_SEED + n))


def tuning_dir(out: Path, algo: str) -> Path:
    return Path(out) / TUNING_DIR / algo


def sweep_command(runner: Sequence[str], algo: str, names: Sequence[str], trials: int, budget: str,
                  out: Path, objective: str, extra: Sequence[str], ranges: Sequence[str] = (),
                  grid: Mapping[str, Sequence[str]] | None = None, seeds: int = 1) -> list[str]:
    """``bench sweep`` of one algorithm's tuning study (the comparison's run options, less ``RUN_DIR_FLAGS``):
    over ``names`` sampled (TPE), or, with ``grid``, over exactly the grid's values of ``names``; each trial
    at ``seeds`` seeds from ``TUNE_SEED``."""
    passed = [x for x in extra if x not in RUN_DIR_FLAGS]
    if grid:
        space = ["--grid", *[f"{k}={','.join(v)}" for k, v in grid.items() if k in names]]
        trials = grid_trials(grid, names)
    else:
        space = ["--space", ",".join(names)]
    return [*runner, "sweep", "--algo", algo, *space, "--trials", str(trials),
            "--budget-per-trial", budget, "--objective", objective, "--pruner", "hyperband",
            "--sampler-seed", "0", "--seed", str(TUNE_SEED), *(["--seeds-per-trial", str(seeds)] if seeds > 1 else []),
            "--study", f"tune-{algo}",
            "--reject-hacking", "--validation-split", "--out", str(tuning_dir(out, algo)),
            *[x for r in ranges if r.partition("=")[0].strip() in names for x in ("--range", r)],
            *passed, "--set", f"eval.every={eval_every(budget)}"]


def write_tuned(out: Path, algo: str, names: Sequence[str], trials: int, budget: str, objective: str,
                objective_note: str | None = None, ranges: Mapping[str, Sequence[float]] | None = None,
                grid: Mapping[str, Sequence[str]] | None = None, seeds: int = 1) -> dict:
    """Read the finished study's sweep.json and write ``tuned.json``: the best trial's overrides (None when
    no trial completed without being pruned, rejected or failing: the tuned arm then runs the reference
    defaults, and the file says so)."""
    d = tuning_dir(out, algo)
    try:
        sweep = json.loads((d / "sweep.json").read_text())
    except (OSError, json.JSONDecodeError):
        sweep = {}
    best = sweep.get("best")
    info = {"algo": algo, "space": list(names), "ranges": {k: list(v) for k, v in (ranges or {}).items() if k in names},
            "grid": {k: list(v) for k, v in (grid or {}).items() if k in names} or None,
            "sampler": "grid" if grid else "tpe",
            "objective": objective, "objective_note": objective_note,
            "trials": grid_trials(grid, names) if grid else trials,
            "budget_per_trial": budget, "eval_every": eval_every(budget), "seed": TUNE_SEED,
            "seeds": tune_seeds(seeds),
            "validation_prompts": str((d / "validation.jsonl").resolve()), "pruner": "hyperband",
            "states": sweep.get("states", {}), "best_trial": best.get("number") if best else None,
            "best_value": best.get("value") if best else None,
            "best_params": best.get("params") if best else None,
            "overrides": (best.get("overrides") or None) if best else None,
            "note": None if best else "no trial completed (every one pruned, rejected for reward hacking or "
                                      "failed; see trials.csv): the tuned arm runs the reference defaults"}
    d.mkdir(parents=True, exist_ok=True)
    (d / "tuned.json").write_text(json.dumps(info, indent=2) + "\n")
    return info


def read_tuned(out: Path, algo: str) -> dict | None:
    try:
        return json.loads((tuning_dir(out, algo) / "tuned.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None


def tuned_sets(info: Mapping[str, Any] | None) -> tuple[str, ...]:
    """``--set KEY=VALUE`` options of an algorithm's tuned arm."""
    out: list[str] = []
    for k, v in ((info or {}).get("overrides") or {}).items():
        out += ["--set", f"{k}={v!r}" if isinstance(v, float) else f"{k}={v}"]
    return tuple(out)
