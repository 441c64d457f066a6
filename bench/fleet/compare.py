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
from pathlib import Path

from bench.budget import Budget
from bench.errors import RunFailure, UsageError
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
from bench.rundir.lock import RunLock
from bench.rundir.runlog import atomic_write_text

#: The report step: ``fn(out_dir, report_path, baseline=, x=, title=, allow_mixed_code=) -> list[str]``
#: (the page headings; it prints the verdict). A string so that bench does not import reports.
REPORT = "reports.cli:compare_report"

#: How a training run is launched (without the current directory on its import path,
#: ``bench.fleet.launch.python_module``); tests replace it with a stand-in that writes synthetic run dirs.
RUNNER: list[str] = python_module("bench.cli")


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
    p.add_argument("--baseline", default=None, help="report baseline (default: dancegrpo if compared)")
    p.add_argument("--x", default="samples", choices=("samples", "nfe", "modeled", "seconds"),
                   help="budget axis of the report's learning curves (default: samples)")
    p.add_argument("--allow-mixed-code", action="store_true",
                   help="put runs from different git commits or a dirty working tree on one axis anyway "
                        "(the report marks them loudly)")
    p.add_argument("--reps", type=int, default=2000, help="bootstrap resamples of the report (default 2000)")
    p.add_argument("--no-report", action="store_true",
                   help="train only (e.g. one cell of a grid that is reported as a whole later)")
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
    if args.overwrite:
        out.append("--overwrite")
    return out


def run_command(algo: str, seed: int, budget: str, out: Path, extra: Sequence[str]) -> list[str]:
    return [*RUNNER, "run", "--algo", algo, "--budget", budget, "--seed", str(seed),
            "--out", str(out / algo / f"seed{seed}"), *extra]


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def run_state(run_dir: Path, budget: str) -> str:
    """What to do with one run directory of the comparison:
    "new" (absent), "done" (finished under this budget), "resume" (killed, has a checkpoint),
    "restart" (killed before any checkpoint), "failed" (stopped by an error: rerun with --overwrite),
    or "other-budget" (finished under a different budget: refuse)."""
    man = _read_json(run_dir / "manifest.json")
    if man is None:
        return "new" if not run_dir.exists() or not any(run_dir.iterdir()) else "restart"
    final = _read_json(run_dir / "final.json")
    spec = (man.get("budget") or {}).get("spec")
    has_ckpt = (run_dir / "checkpoints").is_dir() and any((run_dir / "checkpoints").glob("step_*"))
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
        git = (_read_json(d / "manifest.json") or {}).get("git") or {}
        if git.get("commit") != here.get("commit"):
            bad.append(f"{d} (commit {str(git.get('commit'))[:12]})")
        elif git.get("dirty"):
            bad.append(f"{d} (dirty working tree)")
    return bad


def plan_jobs(algos: Sequence[str], seeds: Sequence[int], budget: str, out: Path, extra: Sequence[str],
              overwrite: bool) -> list[tuple[str, int, str, list[str] | None]]:
    """(algo, seed, state, command or None) in seed-major order; see ``run_state``."""
    jobs = []
    for s in seeds:
        for a in algos:
            d = out / a / f"seed{s}"
            state = "new" if overwrite else run_state(d, budget)
            if state == "other-budget":
                man = _read_json(d / "manifest.json") or {}
                raise UsageError(f"{d} finished under budget {(man.get('budget') or {}).get('spec')!r}, not "
                                 f"{budget!r}: use another --out, or --overwrite to rerun every run")
            if state == "done":
                cmd = None
            elif state == "resume":
                cmd = [*RUNNER, "run", "--resume", str(d), "--budget", budget]
            else:
                rerun = [*extra] + (["--overwrite"] if state in ("restart", "failed") and "--overwrite" not in extra
                                    else [])
                cmd = run_command(a, s, budget, out, rerun)
            jobs.append((a, s, state, cmd))
    return jobs


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        algos, seeds, extra = parse_algos(args.algos), parse_seeds(args.seeds), passthrough(args)
        Budget.parse(args.budget)  # fail before starting any run
        if args.reps < 100:
            raise UsageError("--reps must be at least 100")
        if args.baseline is not None and args.baseline not in algos:
            raise UsageError(f"--baseline {args.baseline!r} is not among --algos ({', '.join(algos)})")
        out = Path(args.out)
        launch = launch_from_args(args, jobs=args.jobs, threads=args.threads_per_run)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    lock = None
    try:
        if not args.dry_run:  # one comparison writes a directory at a time (its runs lock their own)
            lock = lock_output(out, create=not args.report_only)
        return _compare(args, algos, seeds, extra, out, launch)
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
             launch: Launch) -> int:
    if not args.report_only and not args.dry_run:
        check_options(out, extra, args.overwrite)
    jobs = plan_jobs(algos, seeds, args.budget, out, extra, args.overwrite)
    if not args.report_only and not args.allow_mixed_code:
        _check_code(out, jobs)
    if args.dry_run:
        for a, s, state, cmd in jobs:
            print(subprocess.list2cmdline(cmd) if cmd else f"# {a} seed{s}: already finished, skipped")
        return 0

    failed: list[str] = []
    if not args.report_only:
        try:
            atomic_write_text(out / OPTIONS_FILE, json.dumps({"options": _run_options(extra)}, indent=1) + "\n",
                              failpoint="compare.options")
        except OSError as e:
            raise RunFailure(f"could not write {out / OPTIONS_FILE}: {os.strerror(e.errno) if e.errno else e}; no "
                             f"run was started. Fix the file system holding {out}, then run the command "
                             f"again.") from None
        failed = _train(jobs, launch, out, args.device)

    if args.no_report:
        if failed:
            print(f"error: {len(failed)} of {len(jobs)} runs failed: {', '.join(failed)}", file=sys.stderr)
        return 1 if failed else 0
    try:
        pages = load_object(REPORT)(out, out / "report.pdf", baseline=args.baseline, x=args.x,
                                    title=f"bench compare --budget {args.budget}",
                                    allow_mixed_code=args.allow_mixed_code, reps=args.reps)
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


OPTIONS_FILE = "compare.json"


def _run_options(extra: Sequence[str]) -> list[str]:
    return [x for x in extra if x != "--overwrite"]


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
