"""``bench compare``: train every algorithm under one budget on the same prompts and seeds, then report.

    bench compare --algos ddpo,dancegrpo,mixgrpo,treegrpo --budget 20m --seeds 3 --out DIR

runs ``bench run --algo A --budget B --seed S --out DIR/A/seedS [passthrough]`` once per algorithm and
seed, each in its own subprocess (so no state leaks between runs and each gets a fresh device), in
seed-major order (all algorithms for seed 0, then seed 1, ...) so that an interrupted comparison still
has every algorithm at the seeds it finished, streams their output prefixed with ``[A seedS]``, and
finally writes DIR/report.pdf from whatever run directories exist. Every run receives exactly the same
passthrough options (model, reward, config file, preset, --set overrides), so prompts, evaluation and
seeds are identical across algorithms.

Where the runs execute is ``bench.fleet.launch``: one after another (default), ``--jobs N`` at once on this
machine (one GPU each; ``--threads-per-run`` pins CPU threads so that records do not depend on it), or
one scheduler job per run through submitit (``--launcher slurm`` / ``submitit-local``).

``--controls`` adds two control arms of the baseline algorithm (``--baseline``, else dancegrpo when
compared, else the first of ``--algos``): ``<baseline>-aa``, the baseline under other seeds (seed
``s + AA_SEED_OFFSET`` for each seed ``s``, so never one of the baseline's), which a sound comparison finds
equivalent to the baseline; and ``<baseline>-frozen``, the baseline with ``train.frozen=true`` (the same
rollouts, rewards and NFE, no weight change), which it must find worse. They live in
DIR/<baseline>-aa/seed<s>/ and DIR/<baseline>-frozen/seed<s>/, and ``run.label`` names them in reports.

Re-running a comparison extends it: a run directory that already finished under the same budget is
skipped, a killed one (no final.json, or stopped by a signal) is resumed from its newest checkpoint
(``bench run --resume``) or, without one, started again. Runs from another git commit, or from a
working tree with uncommitted changes, are refused on one axis unless ``--allow-mixed-code``.

This module only orchestrates: the report is built by the reports package, named here by a lazy
import string (``bench`` never imports ``reports``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from bench.budget import Budget
from bench.errors import RunFailure, UsageError
from bench.fleet import tune as tune_mod
from bench.fleet.launch import (
    Job,
    Launch,
    add_cluster_args,
    launch_from_args,
    python_module,
    run_local,
    run_submitit,
)
from bench.registry import algorithms, did_you_mean, is_spec, load_object
from bench.rundir import layout
from bench.rundir.layout import FINAL, MANIFEST
from bench.rundir.lock import RunLock
from bench.rundir.runlog import atomic_write_text

#: The report step: ``fn(out_dir, report_path, baseline=, x=, title=, allow_mixed_code=, reps=, sesoi=, targets=,
#: files=)
#: -> list[str]`` (the page headings; it prints the verdict and writes DIR/verdict.json beside the PDF). A
#: string so that bench does not import reports.
REPORT = "reports.cli:compare_report"

#: How a training run is launched (without the current directory on its import path,
#: ``bench.fleet.launch.python_module``); tests replace it with a stand-in that writes synthetic run dirs.
RUNNER: list[str] = python_module("bench.cli")

#: The A/A control arm runs the baseline at seed s + AA_SEED_OFFSET for each seed s of the comparison:
#: disjoint from the baseline's seeds (checked), and stable when a comparison is extended with more seeds.
AA_SEED_OFFSET = 1000


@dataclass(frozen=True)
class Arm:
    """One arm of a comparison: its label (DIR/<label>/seed<s>/), the algorithm, its seeds, and the
    options only its runs get (the control arms' ``--set``)."""

    label: str
    algo: str
    seeds: tuple[int, ...]
    sets: tuple[str, ...] = ()


def default_baseline(algos: Sequence[str], baseline: str | None) -> str:
    """The baseline the controls copy: ``--baseline``, else dancegrpo when compared, else the first."""
    if baseline is not None:
        return baseline
    return "dancegrpo" if "dancegrpo" in algos else algos[0]


def build_arms(algos: Sequence[str], seeds: Sequence[int], controls: bool = False,
               baseline: str | None = None, tuned: dict[str, tuple[str, ...]] | None = None,
               default_arms: bool = True) -> list[Arm]:
    """Every algorithm at ``seeds``; with ``controls`` also ``<baseline>-aa`` (seeds s + AA_SEED_OFFSET)
    and ``<baseline>-frozen`` (train.frozen=true, the baseline's seeds). With ``tuned`` (algorithm -> its
    tuned ``--set`` options, ``--tune``) each algorithm's arm runs its tuned settings (labelled with the
    algorithm), the controls copy the baseline's tuned settings, and ``<algo>-default`` runs the reference
    defaults beside it (unless ``default_arms`` is false: ``--no-default-arms``)."""
    t = tuned or {}
    arms = []
    for a in algos:
        if tuned is None:
            arms.append(Arm(a, a, tuple(seeds)))
        else:
            arms.append(Arm(a, a, tuple(seeds), (*t.get(a, ()), "--set", f"run.label={a}")))
            if default_arms:
                arms.append(Arm(f"{a}-default", a, tuple(seeds), ("--set", f"run.label={a}-default")))
    if controls:
        b = default_baseline(algos, baseline)
        aa = tuple(s + AA_SEED_OFFSET for s in seeds)
        clash = sorted(set(aa) & set(seeds))
        if clash:
            raise UsageError(f"--controls: the A/A arm runs seed s + {AA_SEED_OFFSET} for each seed s, and "
                             f"{clash} would also be baseline seeds; use seeds below {AA_SEED_OFFSET}")
        arms += [Arm(f"{b}-aa", b, aa, (*t.get(b, ()), "--set", f"run.label={b}-aa")),
                 Arm(f"{b}-frozen", b, tuple(seeds), (*t.get(b, ()), "--set", "train.frozen=true", "--set",
                                                      f"run.label={b}-frozen"))]
    taken = [a.label for a in arms]
    if len(set(taken)) != len(taken):
        raise UsageError(f"--controls: an algorithm is named like a control arm ({', '.join(taken)})")
    return arms


def build_parser(prog: str = "bench compare") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog, description="Train every algorithm under one budget on the same prompts and seeds "
                               "(one `bench run` subprocess each), then write DIR/report.pdf.")
    p.add_argument("--algos", required=True, help="comma-separated algorithms, e.g. ddpo,dancegrpo,mixgrpo,treegrpo")
    p.add_argument("--budget", required=True, help="budget of every run, e.g. 20m, 5000samples, 2e6nfe, 300it")
    p.add_argument("--seeds", default="3",
                   help="number of seeds N (runs seeds 0..N-1) or a comma-separated list, e.g. 0,1,7 (default 3)")
    p.add_argument("--out", required=True, help="output directory: DIR/<algo>/seed<s>/ and DIR/report.pdf")
    p.add_argument("--model", default=None, help="model preset or path passed to every run")
    p.add_argument("--model-path", default=None, help="local diffusers pipeline directory passed to every run")
    p.add_argument("--reward", default=None, help="training reward spec passed to every run")
    p.add_argument("--eval-rewards", default=None,
                   help="comma-separated held-out rewards passed to every run (needed for reward-hacking checks)")
    p.add_argument("--device", default=None, help="device passed to every run")
    p.add_argument("--config", default=None, help="YAML config file passed to every run")
    p.add_argument("--preset", default=None, help="preset passed to every run")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="config override passed to every run (repeatable)")
    p.add_argument("--overwrite", action="store_true", help="pass --overwrite to every run")
    p.add_argument("--force", action="store_true",
                   help="with --overwrite: pass --force to every run, which then also empties a run directory that "
                        "is not a treebench run (bench run names its entries when --overwrite alone refuses)")
    p.add_argument("--baseline", default=None,
                   help="report baseline, and the algorithm --controls copies (default: dancegrpo if compared; "
                        "the report's default otherwise, the first of --algos for --controls)")
    p.add_argument("--controls", action="store_true",
                   help="add two control arms of the baseline: <baseline>-aa, the baseline under other seeds "
                        f"(seed s+{AA_SEED_OFFSET} for each seed s, disjoint from the baseline's: it should come "
                        "out equivalent), and <baseline>-frozen, the baseline with train.frozen=true (same "
                        "rollouts, rewards and NFE, weights never change: it should come out worse)")
    p.add_argument("--tune", default=None, metavar="lr[,KEY...]",
                   help="first tune every algorithm with an equal budget: one Optuna study each over the same "
                        "space (lr log-uniform in [1e-6, 1e-3]; other keys from the algorithm's own search "
                        "space), --tune-trials trials of --tune-budget each at tuning seed 2000, scored on a "
                        "validation split with the held-out metric, hacking trials rejected; then each algorithm "
                        "runs tuned (label <algo>) and with reference defaults (<algo>-default). Studies and "
                        "tuned settings: DIR/tuning/<algo>/ (docs/REPORTS.md)")
    p.add_argument("--tune-trials", type=int, default=None, help="trials per algorithm with --tune (default 8; "
                                                                   "with --tune-grid: the grid's size)")
    p.add_argument("--tune-range", action="append", default=[], metavar="KEY=LOW:HIGH",
                   help="narrow a tuned parameter's range for every algorithm alike (repeatable), e.g. "
                        "--tune-range lr=1e-5:2e-4 (default: the built-in range, lr 1e-6..1e-3)")
    p.add_argument("--tune-grid", action="append", default=[], metavar="KEY=V1,V2,...",
                   help="tune on a fixed grid instead of sampling (repeatable, one per tuned key): every algorithm "
                        "tries exactly these values, e.g. --tune-grid lr=1e-5,1.8e-5,3.2e-5,5.6e-5,1e-4")
    p.add_argument("--tune-seeds", type=int, default=1, metavar="N",
                   help="train every tuning trial at N seeds (2000, 2001, ...): its value is their mean and it is "
                        "rejected when any of them hacks (default 1; each trial then costs N runs)")
    p.add_argument("--tune-budget", default=None, help="budget of every tuning trial, e.g. 300it, 5000nfe "
                                                       "(required with --tune)")
    p.add_argument("--no-default-arms", action="store_true",
                   help="with --tune: run only the tuned arms, not <algo>-default beside them (halves the final "
                        "runs when the reference defaults are not in question)")
    p.add_argument("--no-eval-cache", action="store_true",
                   help="evaluate iteration 0 in every run and tuning trial; by default they share DIR/.eval_cache "
                        "(eval.cache): the iteration-0 evaluation (same initial weights, prompts, noise and "
                        "sampler in every run) is computed once per setting and copied, marked \"cached\": true "
                        "in evals.jsonl (docs/REPORTS.md). A --set eval.cache=PATH or eval.cache in --config wins")
    p.add_argument("--x", default="samples", choices=("samples", "nfe", "modeled", "seconds"),
                   help="budget axis of the report's learning curves (default: samples)")
    p.add_argument("--allow-mixed-code", action="store_true",
                   help="put runs from different git commits or a dirty working tree on one axis anyway "
                        "(the report marks them loudly)")
    p.add_argument("--reps", type=int, default=2000,
                   help="Monte-Carlo draws of the report's permutation p-values beyond 200,000 splits (default 2000)")
    p.add_argument("--sesoi", action="append", default=[], metavar="METRIC=VALUE",
                   help="the report's smallest effect of interest of an eval metric or of costs (cost=0.1), "
                        "repeatable (docs/REPORTS.md)")
    p.add_argument("--targets", default=None,
                   help="the report's cost-to-target fractions of the baseline's gain (default 0.5,0.75)")
    p.add_argument("--no-report", action="store_true",
                   help="train only (e.g. one cell of a grid that is reported as a whole later)")
    p.add_argument("--no-report-files", action="store_true",
                   help="write the report PDF and verdict.json only, no DIR/report_files/ (per-page PNG/SVG images "
                        "and CSV/Markdown tables; rendering the images takes most of a report's time)")
    p.add_argument("--report-only", action="store_true", help="skip training; rebuild DIR/report.pdf")
    p.add_argument("--dry-run", action="store_true", help="print the run commands and exit")
    g = add_cluster_args(p, "runs", "slurm: one SLURM job per run through submitit; submitit-local: submitit's "
                                    "local executor; local: subprocesses here (default)")
    g.add_argument("--jobs", type=int, default=1,
                   help="local: runs at once (default 1); with GPUs each run gets its own device")
    g.add_argument("--threads-per-run", type=int, default=None,
                   help="CPU threads of every run (OMP/MKL); runs with the same value give identical records "
                        "alone or side by side (default: the library default, all cores)")
    return p


def parse_seeds(text: str) -> list[int]:
    text = text.strip()
    try:
        if "," in text:
            seeds = [int(s) for s in text.split(",") if s.strip()]
        else:
            n = int(text)
            if n < 1:
                raise ValueError
            seeds = list(range(n))
    except ValueError:
        raise UsageError(f"--seeds {text!r}: give a positive count (3) or a comma-separated list (0,1,7)") from None
    from bench.config import SEED_MAX

    if any(not 0 <= s <= SEED_MAX for s in seeds):
        raise UsageError(f"--seeds {text!r}: every seed must be an integer from 0 to {SEED_MAX} (2**63 - 1)")
    if len(set(seeds)) != len(seeds):
        raise UsageError(f"--seeds {text!r}: repeated seed")
    return seeds


def parse_algos(text: str) -> list[str]:
    algos = [a.strip() for a in text.split(",") if a.strip()]
    if not algos:
        raise UsageError("--algos: give at least one algorithm, e.g. --algos ddpo,treegrpo")
    known = algorithms()  # built-in and installed plug-ins (entry points); module:Class specs too
    for a in algos:
        if a not in known and not is_spec(a):
            raise UsageError(did_you_mean(a, list(known), "algorithm"))
    if len(set(algos)) != len(algos):
        raise UsageError(f"--algos {text!r}: repeated algorithm")
    return algos


def passthrough(args: argparse.Namespace) -> list[str]:
    out: list[str] = []
    for flag in ("model", "model_path", "reward", "eval_rewards", "config", "preset", "device"):
        v = getattr(args, flag)
        if v is not None:
            out += [f"--{flag.replace('_', '-')}", v]
    for kv in args.set:
        if "=" not in kv:
            raise UsageError(f"--set {kv!r}: expected KEY=VALUE")
        out += ["--set", kv]
    if args.force and not args.overwrite:
        raise UsageError("--force only widens --overwrite (emptying run directories that are not treebench runs): "
                         "give both")
    if args.overwrite:
        out.append("--overwrite")
    if args.force:
        out.append("--force")
    return out


def eval_cache_options(args: argparse.Namespace, out: Path) -> list[str]:
    """``--set eval.cache=DIR/.eval_cache`` for every run and tuning trial (``bench.run.evalcache``), unless
    ``--no-eval-cache`` or the user set ``eval.cache`` (``--set`` or the ``--config`` file). Not part of the
    comparison's saved options (compare.json): where the cache lives changes no record."""
    from bench.config import load_config_file

    if args.no_eval_cache or any(kv.partition("=")[0].strip() == "eval.cache" for kv in args.set):
        return []
    if args.config is not None and "eval.cache" in load_config_file(args.config):
        return []
    return ["--set", f"eval.cache={out / layout.EVAL_CACHE}"]


def run_command(algo: str, seed: int, budget: str, out: Path, extra: Sequence[str], label: str | None = None
                ) -> list[str]:
    """``bench run`` of one run: DIR/<label (default: the algorithm)>/seed<s>/."""
    return [*RUNNER, "run", "--algo", algo, "--budget", budget, "--seed", str(seed),
            "--out", str(out / (label or algo) / f"seed{seed}"), *extra]


def _read_json(path: Path) -> dict | None:
    return layout.read_json_or_none(path)


def run_state(run_dir: Path, budget: str) -> str:
    """What to do with one run directory of the comparison:
    "new" (absent), "done" (finished under this budget), "resume" (killed, has a checkpoint),
    "restart" (killed before any checkpoint), "failed" (stopped by an error: rerun with --overwrite),
    or "other-budget" (finished under a different budget: refuse)."""
    man = _read_json(run_dir / MANIFEST)
    if man is None:
        return "new" if not run_dir.exists() or not any(run_dir.iterdir()) else "restart"
    final = _read_json(run_dir / FINAL)
    spec = (man.get("budget") or {}).get("spec")
    has_ckpt = layout.RunDir(run_dir).has_checkpoint()
    if final is None or final.get("stop_reason") == "interrupted":
        return "resume" if has_ckpt else "restart"
    if final.get("stop_reason") in ("error", "nonfinite"):
        return "failed"
    if spec is not None and Budget.parse(str(spec)) != Budget.parse(budget):
        return "other-budget"
    return "done"


def code_mismatch(run_dirs: Sequence[Path], here: dict) -> list[str]:
    """Existing run directories whose git commit differs from this checkout's, or that were dirty."""
    bad = []
    for d in run_dirs:
        git = (_read_json(d / MANIFEST) or {}).get("git") or {}
        if git.get("commit") != here.get("commit"):
            bad.append(f"{d} (commit {str(git.get('commit'))[:12]})")
        elif git.get("dirty"):
            bad.append(f"{d} (dirty working tree)")
    return bad


def plan_jobs(arms: Sequence[Arm], budget: str, out: Path, extra: Sequence[str],
              overwrite: bool) -> list[tuple[str, int, str, list[str] | None]]:
    """(label, seed, state, command or None) in seed-major order (the k-th seed of every arm, then the
    (k+1)-th); see ``run_state``."""
    jobs = []
    for k in range(max((len(arm.seeds) for arm in arms), default=0)):
        for arm in arms:
            if k >= len(arm.seeds):
                continue
            a, s = arm.label, arm.seeds[k]
            d = out / a / f"seed{s}"
            state = "new" if overwrite else run_state(d, budget)
            if state == "other-budget":
                man = _read_json(d / MANIFEST) or {}
                raise UsageError(f"{d} finished under budget {(man.get('budget') or {}).get('spec')!r}, not "
                                 f"{budget!r}: use another --out, or --overwrite to rerun every run")
            if state == "done":
                cmd = None
            elif state == "resume":
                cmd = [*RUNNER, "run", "--resume", str(d), "--budget", budget]
            else:
                rerun = [*extra, *arm.sets] + (["--overwrite"] if state in ("restart", "failed")
                                               and "--overwrite" not in extra else [])
                cmd = run_command(arm.algo, s, budget, out, rerun, label=arm.label)
            jobs.append((a, s, state, cmd))
    return jobs


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        algos, seeds, extra = parse_algos(args.algos), parse_seeds(args.seeds), passthrough(args)
        Budget.parse(args.budget)  # fail before starting any run
        if args.reps < 100:
            raise UsageError("--reps must be at least 100")
        _check_sesoi(args.sesoi)
        if args.baseline is not None and args.baseline not in algos:
            raise UsageError(f"--baseline {args.baseline!r} is not among --algos ({', '.join(algos)})")
        if any(kv.partition("=")[0].strip() == "run.label" for kv in args.set):
            raise UsageError("--set run.label: bench compare labels its runs itself (the algorithm, or "
                             "<baseline>-aa / <baseline>-frozen for --controls)")
        out = Path(args.out)
        launch = launch_from_args(args, jobs=args.jobs, threads=args.threads_per_run)
        if args.no_default_arms and args.tune is None:
            raise UsageError("--no-default-arms leaves out the <algo>-default arms of a tuned comparison: it needs --tune")
        tune_plan = _tune_plan(args, algos, seeds, extra, out) if args.tune is not None else None
        tuned = None if tune_plan is None else {a: tune_mod.tuned_sets(tune_mod.read_tuned(out, a)) for a in algos}
        arms = build_arms(algos, seeds, args.controls, args.baseline, tuned, not args.no_default_arms)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    lock = None
    try:
        if not args.dry_run:  # one comparison writes a directory at a time (its runs lock their own)
            lock = lock_output(out, create=not args.report_only)
        return _compare(args, algos, seeds, extra, out, launch, tune_plan, arms)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except RunFailure as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        if lock is not None:
            lock.release()


def lock_output(out: Path, create: bool = True) -> RunLock:
    """The comparison's own lock on its directory (``bench.rundir.lock``): a second comparison (or a sweep) into
    it is refused while this one runs."""
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} exists and is not a directory; choose another --out")
    if not create and not out.is_dir():
        raise UsageError(f"--report-only: {out} does not exist; nothing to report")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"cannot create comparison directory {out}: {e.strerror or e}; choose another --out") from None
    return RunLock(out, what="comparison directory").acquire()


def _compare(args: argparse.Namespace, algos: list[str], seeds: list[int], extra: list[str], out: Path,
             launch: Launch, tune_plan: dict | None, arms: list[Arm]) -> int:
    """The comparison, once its directory is locked (``--dry-run``: not locked, nothing written); what it
    finds in the directory (finished runs, compare.json) is read under the lock."""
    # with controls (now, or from an earlier run into DIR) the report compares against the baseline they copy
    controls = default_baseline(algos, args.baseline) if args.controls else \
        (_read_json(out / OPTIONS_FILE) or {}).get("controls")
    baseline = args.baseline or controls
    if not args.report_only and not args.dry_run:
        check_options(out, extra, args.overwrite)
    runs_extra = [*extra, *eval_cache_options(args, out)]  # what the runs get; compare.json keeps ``extra``
    jobs = plan_jobs(arms, args.budget, out, runs_extra, args.overwrite)
    if not args.report_only and not args.allow_mixed_code:
        _check_code(out, jobs)
    if args.dry_run:
        for _, cmd in (tune_plan or {}).values():
            print(subprocess.list2cmdline(cmd))
        if tune_plan:
            print("# then, with the tuned settings of DIR/tuning/<algo>/tuned.json (shown where it exists):")
        for a, s, state, cmd in jobs:
            print(subprocess.list2cmdline(cmd) if cmd else f"# {a} seed{s}: already finished, skipped")
        return 0

    failed: list[str] = []
    if not args.report_only:
        try:  # whole or not at all (a temporary file, renamed)
            atomic_write_text(out / OPTIONS_FILE, json.dumps({"options": _run_options(extra), "controls": controls},
                                                             indent=1) + "\n", failpoint="compare.options")
        except OSError as e:
            raise RunFailure(f"could not write {out / OPTIONS_FILE}: {os.strerror(e.errno) if e.errno else e}; no "
                             f"run was started. Fix the file system holding {out}, then run the command "
                             f"again.") from None
        if tune_plan is not None:
            try:
                _tune(tune_plan, launch, out, args)
                tuned = {a: tune_mod.tuned_sets(tune_mod.read_tuned(out, a)) for a in algos}
                arms = build_arms(algos, seeds, args.controls, args.baseline, tuned, not args.no_default_arms)
                jobs = plan_jobs(arms, args.budget, out, runs_extra, args.overwrite)
            except UsageError as e:
                print(f"error: {e}", file=sys.stderr)
                return 2
        failed = _train(jobs, launch, out, args.device)

    if args.no_report:
        if failed:
            print(f"error: {len(failed)} of {len(jobs)} runs failed: {', '.join(failed)}", file=sys.stderr)
        return 1 if failed else 0
    try:
        pages = load_object(REPORT)(out, out / "report.pdf", baseline=baseline, x=args.x,
                                    title=f"bench compare --budget {args.budget}",
                                    allow_mixed_code=args.allow_mixed_code, reps=args.reps,
                                    sesoi=args.sesoi, targets=args.targets, files=not args.no_report_files)
    except UsageError as e:
        print(f"error: cannot build the report: {e}", file=sys.stderr)
        return 1 if failed else 2
    except OSError as e:  # the report is written to a temporary file and renamed: no half report is left
        print(f"error: could not write {e.filename or out / 'report.pdf'}: {os.strerror(e.errno) if e.errno else e}; "
              f"the runs are kept. Fix the file system holding {out}, then rebuild the report: bench compare "
              f"... --out {out} --report-only", file=sys.stderr)
        return 1
    print(f"wrote {out / 'report.pdf'} ({len(pages)} pages)")
    if failed:
        print(f"error: {len(failed)} of {len(jobs)} runs failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


#: DIR/compare.json: the options every run was trained with, and the baseline whose controls DIR holds
#: (null without --controls); a later `bench compare` into DIR reports against that baseline.
def _check_sesoi(items: Sequence[str]) -> None:
    """--sesoi syntax, before any run starts (the report checks the metric names)."""
    for part in (x.strip() for item in items for x in item.split(",")):
        name, _, value = part.partition("=")
        try:
            ok = bool(part) and bool(name.strip()) and float(value) > 0
        except ValueError:
            ok = False
        if part and not ok:
            raise UsageError(f"--sesoi {part!r}: expected METRIC=VALUE with a positive VALUE, e.g. shapes_attr=0.01")


OPTIONS_FILE = "compare.json"


def _run_options(extra: Sequence[str]) -> list[str]:
    return [x for x in extra if x not in tune_mod.RUN_DIR_FLAGS]


def check_options(out: Path, extra: Sequence[str], overwrite: bool) -> None:
    """A comparison directory keeps the options its runs were trained with (DIR/compare.json): extending
    it with other options would put differently configured runs under one label."""
    saved = _read_json(out / OPTIONS_FILE)
    if saved is None or overwrite:
        return
    before, now = saved.get("options", []), _run_options(extra)
    if before != now:
        raise UsageError(f"{out} was trained with options {subprocess.list2cmdline(before) or '(none)'}, not "
                         f"{subprocess.list2cmdline(now) or '(none)'}: use another --out, the same options, "
                         f"or --overwrite to retrain every run")


def _check_code(out: Path, jobs: Sequence[tuple[str, int, str, list[str] | None]]) -> None:
    """Refuse to extend a comparison whose existing runs come from other code than this checkout."""
    from bench.rundir.runlog import git_state

    here = git_state()
    existing = [out / a / f"seed{s}" for a, s, state, _ in jobs if state in ("done", "resume")]
    bad = code_mismatch(existing, here)
    if bad:
        raise UsageError(f"{len(bad)} existing run(s) come from other code than this checkout (commit "
                         f"{str(here.get('commit'))[:12]}{', dirty' if here.get('dirty') else ''}): "
                         + "; ".join(bad[:4]) + (" ..." if len(bad) > 4 else "")
                         + ". Use a new --out, --overwrite, or --allow-mixed-code (the report then marks it)")
    if here.get("dirty"):
        print("warning: this working tree has uncommitted changes: the runs will be marked dirty and the "
              "report says so; commit first for results that can be rebuilt", file=sys.stderr, flush=True)


def _tune_plan(args: argparse.Namespace, algos: Sequence[str], seeds: Sequence[int], extra: Sequence[str],
               out: Path) -> dict[str, tuple[list[str], list[str]]]:
    """algorithm -> (its tuning space, its ``bench sweep`` command); checks the tuning options."""
    from bench import config as config_mod

    if args.tune_budget is None:
        raise UsageError("--tune needs --tune-budget (the budget of every tuning trial, e.g. 300it)")
    tuned_keys = tune_mod.parse_keys(args.tune)
    args.tune_grids = tune_mod.parse_grid(args.tune_grid, tuned_keys)
    if args.tune_grids and args.tune_range:
        raise UsageError("--tune-grid fixes the values tried; --tune-range narrows a sampled range: give one of them")
    if args.tune_grids:
        size = tune_mod.grid_trials(args.tune_grids)
        if args.tune_trials is not None and args.tune_trials != size:
            raise UsageError(f"--tune-trials {args.tune_trials}: the grid has {size} points (leave --tune-trials out)")
        args.tune_trials = size
    elif args.tune_trials is None:
        args.tune_trials = 8
    if args.tune_trials < 1:
        raise UsageError(f"--tune-trials must be >= 1, got {args.tune_trials}")
    Budget.parse(args.tune_budget)
    if args.tune_seeds < 1:
        raise UsageError(f"--tune-seeds must be >= 1, got {args.tune_seeds}")
    used = set(seeds) | ({s + AA_SEED_OFFSET for s in seeds} if args.controls else set())
    clash = sorted(used & set(tune_mod.tune_seeds(args.tune_seeds)))
    if clash:
        where = f"seed {tune_mod.TUNE_SEED}" if args.tune_seeds == 1 else \
            f"seeds {tune_mod.TUNE_SEED}-{tune_mod.TUNE_SEED + args.tune_seeds - 1}"
        raise UsageError(f"--tune trains its trials at {where}: the final runs (or their A/A control, at seed + "
                         f"{AA_SEED_OFFSET}) would reuse {', '.join(map(str, clash))}; choose other --seeds")
    keys = tune_mod.keys_per_algo(algos, tune_mod.parse_keys(args.tune))
    args.tune_ranges = tune_mod.parse_ranges(args.tune_range, tuned_keys)
    flags = {"algo.name": algos[0], "model.name": args.model, "model.path": args.model_path,
             "reward.name": args.reward, "budget": args.tune_budget, "seed": tune_mod.TUNE_SEED,
             "model.device": args.device}
    if args.eval_rewards:
        flags["eval.rewards"] = [r.strip() for r in args.eval_rewards.split(",") if r.strip()]
    cfg = config_mod.resolve(config_mod.parse_sets(args.set), config_file=args.config, preset=args.preset,
                             flags=flags)
    objective, note = tune_mod.heldout_metric(cfg)
    args.tune_objective, args.tune_note = objective, note
    runs_extra = [*extra, *eval_cache_options(args, out)]
    return {a: (keys[a], tune_mod.sweep_command(RUNNER, a, keys[a], args.tune_trials, args.tune_budget, out,
                                                objective, runs_extra, args.tune_range, args.tune_grids,
                                                args.tune_seeds))
            for a in algos}


def _tune(plan: dict[str, tuple[list[str], list[str]]], launch: Launch, out: Path,
          args: argparse.Namespace) -> None:
    """Run every algorithm's tuning study (resumed where it stopped), then write its tuned.json."""
    objective, note = args.tune_objective, args.tune_note
    if note:
        print(f"warning: --tune: {note}", file=sys.stderr, flush=True)
    todo = [Job(f"[tune {a}]", cmd) for a, (_, cmd) in plan.items()]
    print(f"== tuning {len(todo)} algorithm(s): {args.tune_trials} trials of {args.tune_budget} each, objective "
          f"{objective} on the validation split, seed {tune_mod.TUNE_SEED}"
          f"{f' (and the next {args.tune_seeds - 1}: mean over {args.tune_seeds})' if args.tune_seeds > 1 else ''}",
          flush=True)
    if launch.launcher == "local":
        failed = run_local(todo, launch, args.device)  # a study with no completed trial exits 1: tuned.json says so
    else:
        failed = run_submitit(todo, launch, out, RUNNER)
    refused = [f for f in failed if f.endswith("(exit 2)")]
    if refused:  # e.g. DIR/tuning/<algo> holds a study with other settings: its old result must not be used
        raise UsageError(f"tuning refused: {', '.join(refused)} (see the message above); use another --out or "
                         f"the tuning options DIR was tuned with")
    for a, (names, _) in plan.items():
        info = tune_mod.write_tuned(out, a, names, args.tune_trials, args.tune_budget, objective, note,
                                    ranges=args.tune_ranges, grid=args.tune_grids, seeds=args.tune_seeds)
        got = info["overrides"]
        print(f"== [tune {a}] {'best ' + ', '.join(f'{k}={v:.3g}' if isinstance(v, float) else f'{k}={v}' for k, v in got.items()) if got else info['note']}"
              f" ({', '.join(f'{n} {s.lower()}' for s, n in sorted(info['states'].items()))}) -> "
              f"{tune_mod.tuning_dir(out, a) / 'tuned.json'}", flush=True)


def _train(jobs: Sequence[tuple[str, int, str, list[str] | None]], launch: Launch, out: Path,
           device: str | None) -> list[str]:
    for a, s, state, cmd in jobs:
        if cmd is None:
            print(f"== [{a} seed{s}] already finished under this budget: skipped", flush=True)
    notes = {"resume": " (resuming a killed run)", "restart": " (restarting a run killed before its first "
             "checkpoint)", "failed": " (rerunning a failed run)"}
    todo = [Job(f"[{a} seed{s}]", cmd, notes.get(state, "")) for a, s, state, cmd in jobs if cmd is not None]
    if launch.launcher == "local":
        return run_local(todo, launch, device)
    return run_submitit(todo, launch, out, RUNNER)


if __name__ == "__main__":
    sys.exit(main())
