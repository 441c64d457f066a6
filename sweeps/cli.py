"""``bench sweep``: Optuna studies over an algorithm's settings, one ordinary run directory per trial.

    bench sweep --algo treegrpo --space k,d,window --trials 40 --budget-per-trial 5m \\
        --objective eval/shapes_attr --study kd --storage postgresql://user@host/db --out runs/kd
    bench sweep --algo treegrpo --grid k=2,3,4 d=1,2,3 --budget-per-trial 5m --out runs/kd-grid
    bench sweep --algo treegrpo --space k,d --multi-objective nfe --trials 30 --budget-per-trial 200it

Output: ``<out>/trials/<number>/`` (run directories), ``<out>/trials.csv`` (one row per trial: state,
value(s), params_*, reason, run_dir, ...), ``<out>/pareto.csv`` (multi-objective), ``<out>/sweep.json``
and, with the default storage, ``<out>/sweeps/<study>.journal``. See docs/SWEEPS.md.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import subprocess
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.cli import seed_arg
from bench.errors import RunFailure, UsageError
from bench.fleet.launch import Job, add_cluster_args, launch_from_args, python_module, run_submitit, safe_env
from bench.registry import ALGORITHMS, MODELS, algorithm_class, did_you_mean
from bench.rundir.lock import RunLock

PRUNERS = ("median", "hyperband", "none")
SAMPLERS = ("tpe", "random")
#: Sweep defaults under the user's --set: no eval of the (identical) base model at iteration 0 in every
#: trial, no progress bars.
SWEEP_DEFAULTS = {"eval.at_start": False, "run.progress": False}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:
        raise UsageError(f"bench sweep: {message} (see bench sweep --help)")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="bench sweep", description=__doc__.split("\n\n")[0],
                epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--algo", default="treegrpo",
                   help=f"algorithm: {', '.join(ALGORITHMS)}, an installed plug-in or module:Class "
                        f"(default treegrpo)")
    p.add_argument("--space", help="comma-separated built-in parameters to search (e.g. k,d,window; 'all'); "
                                   "default: the algorithm's own search_default (every algorithm's space: "
                                   "docs/SWEEPS.md)")
    p.add_argument("--space-file", help="YAML search space (docs/SWEEPS.md); --space then selects from it")
    p.add_argument("--range", action="append", default=[], metavar="NAME=LOW:HIGH",
                   help="narrow a numeric parameter of the space to [LOW, HIGH] (repeatable), e.g. "
                        "--range lr=1e-5:2e-4; its scale (log or not) is kept")
    p.add_argument("--grid", nargs="+", action="extend", metavar="NAME=V1,V2",
                   help="exhaustive grid, e.g. --grid k=2,3,4 d=1,2,3 (names as in --space or config keys)")
    p.add_argument("--trials", type=int, help="trials in the study in total, over all workers (default 20; "
                                              "a grid: its size)")
    p.add_argument("--budget-per-trial", default="5m", help="budget of every trial: 5m, 300it, 2e6nfe, ... "
                                                            "(default 5m)")
    p.add_argument("--objective", help="held-out eval key to maximise, eval/<reward>[/<component>] "
                                       "(default: eval/<first eval reward>)")
    p.add_argument("--direction", choices=("maximize", "minimize"), default="maximize")
    p.add_argument("--multi-objective", choices=("seconds", "nfe", "samples"),
                   help="also minimise this cost of a trial -> a Pareto set (no pruning)")
    p.add_argument("--study", help="study name (default <algo>-sweep, <algo>-grid with --grid)")
    p.add_argument("--storage", default=os.environ.get("TREEBENCH_STORAGE") or None,
                   help="journal file (*.journal), sqlite:///FILE.db, postgresql://USER@HOST/DB (default: "
                        "$TREEBENCH_STORAGE, else <out>/sweeps/<study>.journal); put a URL with a password in "
                        "TREEBENCH_STORAGE: it is never printed or written")
    p.add_argument("--out", help="output directory (default runs/sweep-<study>)")
    p.add_argument("--model", help=f"model preset: {', '.join(MODELS)} (default shapes)")
    p.add_argument("--model-path", help="local diffusers pipeline directory")
    p.add_argument("--reward", help="training reward name or weighted spec")
    p.add_argument("--eval-rewards", help="comma-separated held-out rewards")
    p.add_argument("--config", help="YAML config file applied to every trial")
    p.add_argument("--preset", help="algorithm preset applied to every trial")
    p.add_argument("--set", dest="sets", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                   help="fixed override for every trial, repeatable as in bench run: --set sampler.steps=10 "
                        "--set eval.every=5 (several after one --set also work)")
    p.add_argument("--seed", type=seed_arg, help="run seed shared by all trials (default 0)")
    p.add_argument("--seeds-per-trial", type=int, default=1, metavar="N",
                   help="train every trial at N seeds (--seed, --seed + 1, ...), one run after the other: its value "
                        "is the mean of their final values; the pruner sees the first seed's evaluations; with "
                        "--reject-hacking a trial is rejected when any seed hacks (default 1)")
    p.add_argument("--device", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--reject-hacking", action="store_true",
                   help="prune (reject) a trial whose held-out reward falls below its iteration-0 value beyond "
                        "its resolution and stays there in a run whose training reward rose (the whole-curve "
                        "reward-hacking rule); turns eval.at_start on")
    p.add_argument("--validation-split", action="store_true",
                   help="evaluate trials on a validation split: the eval prompt set's prompts past the first "
                        "eval.num_prompts (those final runs are scored on), written to <out>/validation.jsonl")
    p.add_argument("--pruner", choices=PRUNERS, default="median", help="default median")
    p.add_argument("--sampler", choices=SAMPLERS, default="tpe", help="default tpe (ignored with --grid)")
    p.add_argument("--sampler-seed", type=int, help="seed of the Optuna sampler (default: fresh per worker)")
    p.add_argument("--n-jobs", type=int, default=1,
                   help="workers: processes started on this machine, or jobs submitted with --launcher (default 1)")
    p.add_argument("--heartbeat", type=float, default=30.0, help="seconds between trial heartbeats (default 30)")
    p.add_argument("--grace", type=float, default=600.0,
                   help="a running trial of another host without heartbeat for this long is re-queued "
                        "(default 600 s; same-host trials are re-queued as soon as their process is gone)")
    add_cluster_args(p, "workers", "slurm: each of the --n-jobs workers is a SLURM job (submitit) sharing the study's "
                                   "storage; submitit-local: submitit's local executor; local: processes here")
    return p


# ---- assembling the sweep --------------------------------------------------------------------------------
def _flags(a: argparse.Namespace) -> dict[str, Any]:
    flags = {"algo.name": a.algo, "model.name": a.model, "model.path": a.model_path, "reward.name": a.reward,
             "budget": a.budget_per_trial, "seed": 0 if a.seed is None else a.seed, "model.device": a.device}
    if a.eval_rewards:
        flags["eval.rewards"] = [r.strip() for r in a.eval_rewards.split(",") if r.strip()]
    return flags


def _space(a: argparse.Namespace):
    from sweeps import spaces

    names = [n.strip() for n in a.space.split(",") if n.strip()] if a.space else None
    if a.grid:
        if a.space or a.space_file or a.range:
            raise UsageError("--grid enumerates a fixed grid and cannot be combined with --space/--space-file/--range; "
                             "fix other settings with --set")
        grid, keys = spaces.parse_grid(a.grid, a.algo)
        return spaces.grid_space(grid, keys), grid
    if a.space_file:
        space = spaces.select(spaces.load_space_file(a.space_file, a.algo), names)
    else:
        space = spaces.builtin_space(a.algo, names)
    return spaces.with_ranges(space, spaces.parse_ranges(a.range)), None


def _check_space_keys(space: Any, base_cfg: dict[str, Any]) -> None:
    from bench.config import DEFAULTS

    for p in space.params:
        parts = p.key.split(".")
        if parts[0] == "algo":
            if len(parts) != 2 or parts[1] not in base_cfg["algo"]:
                raise UsageError(did_you_mean(p.key, [f"algo.{k}" for k in base_cfg["algo"] if k != "name"],
                                              f"setting for algorithm {base_cfg['algo']['name']!r}:"))
            continue
        node: Any = DEFAULTS
        for part in parts:
            if not isinstance(node, dict) or part not in node:
                raise UsageError(f"search-space parameter {p.name!r} sets unknown config key {p.key!r} "
                                 f"(see bench run --help and bench/config.py DEFAULTS)")
            node = node[part]


def check_grid(spec: Any, grid: dict[str, list[Any]]) -> None:
    """Refuse, before a study exists, a grid value that no trial could run whatever the other values:
    one of another type than the setting takes (``k=2,x``) or one the config refuses on its own
    (``sampler.steps=0``). Combinations refused only together (d=3 with window=2) stay: the sweep prunes
    those trials with the algorithm's message (docs/SWEEPS.md)."""
    from bench.errors import AlgorithmSettingsError

    keys = {p.name: p.key for p in spec.space.params}
    for name, values in grid.items():
        node: Any = spec.base_cfg
        for part in keys[name].split("."):
            node = node.get(part) if isinstance(node, dict) else None
        for v in values:
            if isinstance(node, bool) and not isinstance(v, bool) or (
                    isinstance(node, (int, float)) and not isinstance(node, bool)
                    and not (isinstance(v, (int, float)) and not isinstance(v, bool))):
                kind = "true or false" if isinstance(node, bool) else "a number"
                raise UsageError(f"--grid {name}={v!r}: {keys[name]} takes {kind} (now {node!r}), got {v!r}; "
                                 f"fix the grid")
            try:
                spec.resolve({keys[name]: v}, None)
            except AlgorithmSettingsError:
                continue  # may depend on the other grid values: pruned per trial
            except UsageError as e:
                raise UsageError(f"--grid {name}={v!r}: {e}; fix the grid") from None


def _sampler(a: argparse.Namespace, grid: dict | None):
    import optuna

    if grid is not None:
        return optuna.samplers.GridSampler(grid, seed=a.sampler_seed)
    if a.sampler == "random":
        return optuna.samplers.RandomSampler(seed=a.sampler_seed)
    # constant_liar: running trials count as bad guesses, so parallel workers spread out
    return optuna.samplers.TPESampler(seed=a.sampler_seed, constant_liar=True)


def _pruner(a: argparse.Namespace, multi: bool):
    import optuna

    if multi or a.pruner == "none":
        if multi and a.pruner != "median":
            print("bench sweep: note: multi-objective trials cannot be pruned; --pruner ignored", file=sys.stderr)
        return optuna.pruners.NopPruner()
    if a.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource="auto")
    return optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=0)


#: The validation split needs at least this many prompts past the held-out ones.
MIN_VALIDATION_PROMPTS = 2


def validation_split(cfg: dict[str, Any], out: Path) -> dict[str, Any]:
    """Overrides that evaluate on a validation split: the prompts of ``cfg``'s eval prompt set past its
    first ``eval.num_prompts`` (the held-out prompts final runs and the verdict are scored on), written to
    ``out/validation.jsonl`` with their metadata (the shapes checker needs each prompt's attributes), at
    most ``max(eval.num_prompts, 4)`` of them (a trial's evaluation costs no more than a final run's).
    For ``shapes-eval`` (48 combinations, none in the training split) that is prompts 33-48 at the
    default eval.num_prompts 32: never trained on, never in the verdict."""
    from bench.engine.prompts import load_prompt_set

    name, held = cfg["data"]["eval_prompts"], int(cfg["eval"]["num_prompts"])
    ps = load_prompt_set(name)
    # no larger than the held-out evaluation (at least 4 prompts where the set has them)
    rest = list(range(held, min(len(ps), held + max(held, 4))))
    if len(rest) < MIN_VALIDATION_PROMPTS:
        raise UsageError(f"--validation-split: eval prompt set {name!r} has {len(ps)} prompts and the held-out "
                         f"evaluation uses the first {held}; at least {MIN_VALIDATION_PROMPTS} must remain for "
                         f"validation (lower eval.num_prompts or use a larger eval prompt set)")
    overlap = set(ps.prompts[:held]) & {ps.prompts[i] for i in rest}
    if overlap:
        raise UsageError(f"--validation-split: prompt set {name!r} repeats held-out prompts after the first {held} "
                         f"({sorted(overlap)[:3]}): validation would not be disjoint")
    out.mkdir(parents=True, exist_ok=True)
    path = (out / "validation.jsonl").resolve()
    lines = [json.dumps({"prompt": ps.prompts[i], **ps.metadata[i]}, sort_keys=True) for i in rest]
    text = "\n".join(lines) + "\n"
    if not path.is_file() or path.read_text() != text:
        path.write_text(text)
    return {"data.eval_prompts": str(path), "eval.num_prompts": len(rest)}


def _definition(a: argparse.Namespace, space: Any, objective: str, base_sets: dict, flags: dict) -> dict:
    """What makes trials comparable; a worker joining the study must agree on all of it."""
    return {"algo": a.algo, "objective": objective, "direction": a.direction, "multi_objective": a.multi_objective,
            "budget_per_trial": a.budget_per_trial, "seed": flags["seed"], "model": a.model,
            "model_path": a.model_path, "reward": a.reward, "eval_rewards": a.eval_rewards, "config": a.config,
            "preset": a.preset, "space": space.to_dict(),
            # where the iteration-0 evaluation is cached changes no trial's result (bench.run.evalcache)
            "sets": {k: v for k, v in base_sets.items() if k != "eval.cache"},
            # only when given: studies created before these options existed stay joinable
            **({"reject_hacking": True} if a.reject_hacking else {}),
            **({"seeds_per_trial": a.seeds_per_trial} if a.seeds_per_trial != 1 else {}),
            **({"validation_split": True} if a.validation_split else {})}


def prepare(a: argparse.Namespace):
    from bench import config as config_mod
    from bench.budget import Budget
    from sweeps.objective import SweepSpec, check_objective_key

    algorithm_class(a.algo)  # unknown names: a usage error with a did-you-mean
    if a.trials is not None and a.trials < 1:
        raise UsageError(f"--trials must be >= 1, got {a.trials}")
    if a.n_jobs < 1:
        raise UsageError(f"--n-jobs must be >= 1, got {a.n_jobs}")
    if a.seeds_per_trial < 1:
        raise UsageError(f"--seeds-per-trial must be >= 1, got {a.seeds_per_trial}")
    Budget.parse(a.budget_per_trial)
    space, grid = _space(a)
    user_sets = config_mod.parse_sets(a.sets)
    if a.reject_hacking:
        if user_sets.get("eval.at_start") is False:
            raise UsageError("--reject-hacking compares each evaluation with iteration 0: drop --set eval.at_start=false")
        user_sets["eval.at_start"] = True
    base_sets = {**SWEEP_DEFAULTS, **user_sets}
    flags = _flags(a)
    base_cfg = config_mod.resolve(base_sets, config_file=a.config, preset=a.preset, flags=flags)
    out = Path(a.out or f"runs/sweep-{a.study or a.algo + ('-grid' if grid else '-sweep')}").expanduser()
    if a.validation_split:
        base_sets.update(validation_split(base_cfg, out))
        base_cfg = config_mod.resolve(base_sets, config_file=a.config, preset=a.preset, flags=flags)
    _check_space_keys(space, base_cfg)
    objective = a.objective or f"eval/{base_cfg['eval']['rewards'][0]}"
    check_objective_key(objective, base_cfg)
    study = a.study or f"{a.algo}-{'grid' if grid else 'sweep'}"
    spec = SweepSpec(out=out, space=space, objective=objective, base_overrides=base_sets, flags=flags,
                     config_file=a.config, preset=a.preset, cost=a.multi_objective, heartbeat_s=a.heartbeat,
                     base_cfg=base_cfg, reject_hacking=a.reject_hacking, seeds_per_trial=a.seeds_per_trial)
    if grid:
        check_grid(spec, grid)
    return spec, grid, study, _definition(a, space, objective, base_sets, flags)


# ---- running ----------------------------------------------------------------------------------------------
def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    a = build_parser().parse_args(argv)
    spec, grid, study_name, definition = prepare(a)

    from sweeps import study as st

    out = spec.out
    storage, where = st.make_storage(a.storage, out, study_name)  # a bad storage leaves no directory behind
    out.mkdir(parents=True, exist_ok=True)
    # the sweep's own lock on its directory: every worker of this study shares it (--n-jobs, or the same
    # command started again); another study, or a comparison, writing here is refused while one lives
    lock = RunLock(out, what="sweep directory", shared=f"sweep of study {study_name!r} in {where}").acquire()
    try:
        return _sweep(a, argv, spec, grid, study_name, definition, storage, where)
    except OSError as e:
        if e.errno not in WRITE_ERRNOS:
            raise
        raise RunFailure(f"could not write {e.filename or where}: {os.strerror(e.errno)} "
                         f"({errno.errorcode.get(e.errno, e.errno)}); the sweep stopped. The study keeps every "
                         f"finished trial: fix the file system (free space), then run the same command again to "
                         f"continue (a trial that was running is re-queued).") from None
    finally:
        lock.release()


#: errno values of a sweep's storage or tables that cannot be written: the sweep stops with exit status 1
WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO, errno.EACCES, errno.EPERM, errno.EROFS}


def _sweep(a: argparse.Namespace, argv: list[str], spec: Any, grid: dict | None, study_name: str, definition: dict,
           storage: Any, where: str) -> int:
    from sweeps import spaces
    from sweeps import study as st

    out = spec.out
    multi = spec.cost is not None
    directions = [a.direction] + (["minimize"] if multi else [])
    value_names = ["value"] + ([f"cost_{spec.cost}"] if multi else [])
    study, created = st.open_study(study_name, storage, directions, definition, _sampler(a, grid),
                                   _pruner(a, multi))
    trials_dir = out / "trials"
    if created and trials_dir.is_dir() and any(trials_dir.iterdir()):
        raise UsageError(f"{trials_dir} holds trials of another study; choose another --out (or --study/--storage "
                         f"of the study that wrote them)")
    with warnings.catch_warnings():  # metric names are experimental in Optuna; they label the dashboard
        warnings.simplefilter("ignore")
        study.set_metric_names([spec.objective] + ([spec.cost] if multi else []))
    target = a.trials or (spaces.grid_size(grid) if grid else 20)
    print(f"bench sweep: study {study_name!r} ({'created' if created else 'joined'}) in {where}; "
          f"{'grid of ' + str(spaces.grid_size(grid)) if grid else str(target)} trials of {a.algo} "
          f"(budget {a.budget_per_trial} each, {_seed_label(spec)}), objective {spec.objective}"
          f"{' + ' + spec.cost if multi else ''}; space: "
          f"{'; '.join(p.describe() for p in spec.space.params)}", flush=True)
    seeds = spec.seeds()
    seed: int | str = seeds[0] if len(seeds) == 1 else f"{seeds[0]}-{seeds[-1]}"  # the table's seed column
    requeued = st.requeue_dead_trials(study, storage, a.grace)
    if requeued:
        print(f"bench sweep: re-queued trial(s) {requeued} whose worker died", flush=True)

    def write_table(*_: Any) -> None:
        st.write_csv(out / "trials.csv", st.trial_rows(study, value_names, seed))

    code = 0
    try:
        if a.launcher != "local":
            code = _submit_workers(argv, a, out)
        elif a.n_jobs > 1:
            code = _spawn_workers(argv, a.n_jobs, a.storage)
        else:
            _optimize(study, storage, spec, target, grid, a, write_table)
    except KeyboardInterrupt:
        print("bench sweep: interrupted; the running trial was re-queued: run the same command to resume",
              file=sys.stderr)
        code = 130
    finally:
        write_table()
    return _finish(study, out, value_names, seed, study_name, where, definition, multi) if code == 0 else code


def _seed_label(spec: Any) -> str:
    """``seed 0``, or with --seeds-per-trial 3 ``seeds 0-2``."""
    seeds = spec.seeds()
    return f"seed {seeds[0]}" if len(seeds) == 1 else f"seeds {seeds[0]}-{seeds[-1]}"


def _optimize(study: Any, storage: Any, spec: Any, target: int, grid: dict | None, a: argparse.Namespace,
              write_table: Any) -> None:
    from sweeps import study as st
    from sweeps.objective import Objective, TrialFailed

    def after_trial(study_: Any, trial: Any) -> None:
        write_table()
        st.requeue_dead_trials(study_, storage, a.grace)
        waiting = study_.get_trials(deepcopy=False, states=(_waiting(),))
        if st.counted_trials(study_) >= target and not waiting:
            study_.stop()

    if st.counted_trials(study) >= target and not study.get_trials(deepcopy=False, states=(_waiting(),)):
        print(f"bench sweep: the study already has {st.counted_trials(study)} trials (target {target}); "
              f"nothing to run", flush=True)
        return
    spec.target = target
    study.optimize(Objective(spec), n_trials=None if grid and a.trials is None else target,
                   catch=(TrialFailed,), callbacks=[after_trial], gc_after_trial=True)


def _waiting() -> Any:
    from optuna.trial import TrialState

    return TrialState.WAITING


def _without_storage(argv: list[str]) -> list[str]:
    out, skip = [], False
    for x in argv:
        if skip:
            skip = False
        elif x == "--storage":
            skip = True
        elif not x.startswith("--storage="):
            out.append(x)
    return out


def _spawn_workers(argv: list[str], n: int, storage: str | None = None) -> int:
    """Start ``n`` worker processes of this same sweep (they join the study just created) and wait. The
    storage URL goes to them in the environment, not on their command line (process lists show that)."""
    env = dict(os.environ)
    if storage is not None:
        env["TREEBENCH_STORAGE"] = storage
        argv = _without_storage(argv)
    gpus = _cuda_count()
    procs = []
    for i in range(n):
        wenv = dict(env)
        if gpus > 1 and "CUDA_VISIBLE_DEVICES" not in env:
            wenv["CUDA_VISIBLE_DEVICES"] = str(i % gpus)  # one device per worker
        # without the current directory on the worker's import path (bench.fleet.launch.python_module)
        procs.append(subprocess.Popen([*python_module("sweeps.cli"), *argv, "--n-jobs", "1"], env=safe_env(wenv)))
        time.sleep(0.5)
    codes = [p.wait() for p in procs]
    bad = [c for c in codes if c != 0]
    if bad:
        print(f"bench sweep: {len(bad)} worker(s) exited with status {bad}", file=sys.stderr)
    return bad[0] if bad else 0


def _submit_workers(argv: list[str], a: argparse.Namespace, out: Path) -> int:
    """Submit ``--n-jobs`` workers of this sweep as scheduler jobs (bench/fleet/launch.py) and wait for them.
    Each runs this command locally inside its job and joins the study through the shared storage (a
    journal or SQLite file on a shared file system, or a database)."""
    from sweeps.study import redact

    launch = launch_from_args(a)
    if launch.gpus_per_run > 1:
        raise UsageError("--gpus-per-run > 1: a sweep worker trains one single-process run at a time")
    if a.storage is not None and redact(a.storage) != a.storage:
        raise UsageError("--storage holds a password: the jobs' command lines are written to the submitit "
                         "folder; export TREEBENCH_STORAGE instead (SLURM passes your environment to the jobs)")
    cmd = [*python_module("sweeps.cli"), *argv, "--launcher", "local", "--n-jobs", "1"]
    jobs = [Job(f"[worker {i}]", cmd) for i in range(a.n_jobs)]
    failed = run_submitit(jobs, launch, out, runner=[])
    if failed:
        print(f"bench sweep: {len(failed)} worker job(s) failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


def _cuda_count() -> int:
    try:
        import torch

        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception:  # noqa: BLE001
        return 0


def _finish(study: Any, out: Path, value_names: list[str], seed: int | str, name: str, where: str,
            definition: dict, multi: bool) -> int:
    from sweeps import study as st

    rows = st.trial_rows(study, value_names, seed)
    summary = st.summarize(study, value_names)
    if multi and "pareto" in summary:
        st.write_csv(out / "pareto.csv", st.pareto_rows(study, value_names, seed))
    info = {"study": name, "storage": where, "definition": definition, **summary}
    # whole or not at all: concurrent workers of the study write it too (a temporary name of this process)
    st.atomic_write(out / "sweep.json", json.dumps(info, indent=2, default=str))
    print(f"bench sweep: {study.study_name}: {st.describe_states(rows)} -> {out / 'trials.csv'}")
    if "best" in summary:
        b = summary["best"]
        print(f"  best: trial {b['number']} value {b['value']:.6g} params {b['params']}")
    for p in summary.get("pareto", []):
        print(f"  pareto: trial {p['number']} value {p['value']:.6g} {value_names[1]} {p[value_names[1]]:.6g} "
              f"params {p['params']}")
    complete = summary["states"].get("COMPLETE", 0)
    return 0 if complete or not rows else 1


if __name__ == "__main__":
    try:
        sys.exit(main())
    except UsageError as e:
        print(f"bench sweep: error: {e}", file=sys.stderr)
        sys.exit(2)
    except RunFailure as e:
        print(f"bench sweep: error: {e}", file=sys.stderr)
        sys.exit(1)
