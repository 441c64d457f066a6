"""Resume policy: what a resumed run may change, and how it continues from its newest valid checkpoint.

Resume (``bench run --resume RUN``) continues a run with the run's own configuration. Only settings that
cannot change the records may differ (``RESUME_MUTABLE``), and the budget may only be extended. The same
prompts, model weights and reward versions are required. ``iterations.jsonl`` keeps the records of the
checkpointed iterations (a partial last line from a killed process is dropped, later records are
recomputed) and ``evals.jsonl`` is rewritten from the checkpoint's evaluations (``eval_scores.jsonl`` keeps
the lines of those evaluations only), so no iteration or evaluation is lost or counted twice. The checkpoint format itself is ``bench.rundir.checkpoint``.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from bench.budget import Budget, Totals
from bench.errors import UsageError
from bench.model import fsdp
from bench.model.policy import Policy
from bench.model.snapshots import PREFIX as SNAPSHOT_PREFIX
from bench.rundir import checkpoint as ckpt_mod
from bench.rundir import layout
from bench.rundir.checkpoint import warn
from bench.rundir.layout import EVAL_SCORES, EVALS, FINAL, ITERATIONS, MANIFEST
from bench.rundir.runlog import atomic_write_text, git_state, host_info, json_safe, now_iso, remove_temp_files
from bench.rundir.state import CheckpointParts, RunState

#: Settings that may differ on resume because they cannot change a record: where the run lives,
#: display and checkpoint cadence, the micro-batch (memory only: results are independent of it) and the
#: evaluation cache directory (a cached evaluation writes the same scores).
#: ``budget`` may change too, but only to extend the run (``check_budget_extension``).
RESUME_MUTABLE = ("out", "run.overwrite", "run.force", "run.progress", "run.tensorboard", "run.log_with",
                  "run.checkpoint_every", "run.keep_checkpoints", "train.micro_batch", "run.label",
                  "eval.cache")



# ---- run-log repair -------------------------------------------------------------------------------
def read_jsonl(path: Path) -> tuple[list[dict[str, Any]], int]:
    """Records of a JSON Lines file and the number of unreadable lines dropped (a partial last line
    from a killed process; a bad line elsewhere is dropped with a warning: resume repairs the log)."""
    recs, bad = layout.read_jsonl(path, strict=False)
    total = len(path.read_text().splitlines()) if bad else 0
    for n in bad:
        if n != total:
            warn(f"{path}: line {n} is not valid JSON; dropped")
    return recs, len(bad)


def rewrite_jsonl(path: Path, records: Sequence[Mapping[str, Any]]) -> None:
    """Replace ``path`` whole or not at all (the old log stays intact when the write fails)."""
    atomic_write_text(path, "".join(json.dumps(json_safe(r)) + "\n" for r in records), "log.rewrite")


def repair_logs(run_dir: Path, iteration: int, evals: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Cut the run's logs back to the checkpoint after ``iteration`` completed iterations; returns the
    iteration records kept (exactly iterations 0 .. iteration-1)."""
    it_path = run_dir / ITERATIONS
    recs, bad = read_jsonl(it_path)
    if bad:
        warn(f"{it_path}: dropped {bad} incomplete line(s) left by the interrupted process")
    kept = [r for r in recs if isinstance(r.get("iteration"), int) and r["iteration"] < iteration]
    if [r["iteration"] for r in kept] != list(range(iteration)):
        raise UsageError(f"{it_path} does not hold iterations 0..{iteration - 1} that checkpoint step_{iteration:06d} "
                         f"expects; the run directory was modified. Start again with --overwrite.")
    dropped = len(recs) - len(kept)
    if dropped:
        after = f"after iteration {iteration - 1}" if iteration else "(no checkpoint)"
        print(f"resume: discarding {dropped} iteration record(s) {after}; they are recomputed "
              f"{'from the checkpoint' if iteration else 'from the start'}", file=sys.stderr)
    rewrite_jsonl(it_path, kept)
    rewrite_jsonl(run_dir / EVAL_SCORES, kept_eval_scores(run_dir / EVAL_SCORES, evals))
    rewrite_jsonl(run_dir / EVALS, evals)
    with_final = run_dir / FINAL
    if with_final.exists():
        with_final.unlink()
    return kept


def kept_eval_scores(path: Path, evals: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The lines of eval_scores.jsonl that belong to the checkpoint's evaluations ``evals``, each image once:
    a killed process may have written the lines of an evaluation it did not live to record, or that the
    checkpoint does not hold (it is recomputed)."""
    recs, bad = read_jsonl(path)
    if bad:
        warn(f"{path}: dropped {bad} incomplete line(s) left by the interrupted process")
    wanted = {e.get("iteration") for e in evals}
    seen: set[tuple[Any, Any, Any]] = set()
    out = []
    for r in recs:
        key = (r.get("iteration"), r.get("prompt_index"), r.get("image_index"))
        if key[0] in wanted and key not in seen:
            seen.add(key)
            out.append(r)
    return out


# ---- configuration on resume ----------------------------------------------------------------------
_MISSING = object()


def config_diff(saved: Mapping[str, Any], new: Mapping[str, Any], explicit: set[str] | None = None,
                ignore: tuple[str, ...] = RESUME_MUTABLE + ("budget",)) -> list[tuple[str, Any, Any]]:
    """(key, saved value, new value) for every setting that differs. Keys absent from the saved config
    (added by a newer treebench) only count when given explicitly."""
    from bench.config import flatten

    a, b = flatten(saved), flatten(new)
    out = []
    for k in sorted(set(a) | set(b)):
        if k in ignore:
            continue
        va, vb = a.get(k, _MISSING), b.get(k, _MISSING)
        if va is _MISSING and not (explicit and k in explicit):
            continue
        if va != vb:
            out.append((k, None if va is _MISSING else va, None if vb is _MISSING else vb))
    return out


def check_budget_extension(old_spec: str, new_spec: str) -> None:
    """A resumed run may raise or drop budget limits but not lower or add one (a shorter budget would
    make the run incomparable with the one it was started as; to stop early, interrupt it)."""
    from bench.budget import Budget

    old, new = Budget.parse(str(old_spec)), Budget.parse(str(new_spec))
    bad = []
    for cur in ("seconds", "samples", "nfe", "iterations"):
        o, n = getattr(old, cur), getattr(new, cur)
        if n is not None and (o is None or n < o):
            bad.append(f"{cur}: {'unlimited' if o is None else o} -> {n}")
    if bad:
        raise UsageError(f"on resume the budget may only be extended (raise a limit or drop it), not lowered "
                         f"or given a new limit: {old.spec!r} -> {new.spec!r} ({'; '.join(bad)})")


def format_diff(diff: list[tuple[str, Any, Any]]) -> str:
    return "\n".join(f"  {k}: {a!r} (run) -> {b!r} (now)" for k, a, b in diff)


def check_resume_config(run_dir: Path, saved: Mapping[str, Any], new: Mapping[str, Any],
                        explicit: set[str] | None = None) -> None:
    diff = config_diff(saved, new, explicit)
    if diff:
        raise UsageError(f"cannot resume {run_dir}: the configuration differs from the one the run was started "
                         f"with:\n{format_diff(diff)}\nOn resume only the budget may be extended and "
                         f"{', '.join(k for k in RESUME_MUTABLE if k not in ('out', 'run.overwrite', 'run.force'))} may "
                         f"change; start a new run (another --out) to change anything else.")
    check_budget_extension(saved["budget"], new["budget"])


def saved_config(run_dir: str | os.PathLike) -> dict[str, Any]:
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UsageError(f"--resume {run_dir}: no such run directory")
    man = run_dir / MANIFEST
    try:
        manifest = json.loads(man.read_text())
    except OSError:
        raise UsageError(f"--resume {run_dir}: not a run directory (no manifest.json); nothing to resume") from None
    except ValueError as e:
        raise UsageError(f"--resume {run_dir}: manifest.json is not valid JSON ({e})") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("config"), dict):
        raise UsageError(f"--resume {run_dir}: manifest.json has no config")
    layout.check_schema(manifest, run_dir)  # a directory of another run-directory schema is refused
    problem = manifest_problem(manifest)
    if problem:
        raise UsageError(f"cannot resume {run_dir}: its manifest.json is not one treebench wrote ({problem}); it "
                         f"was edited or damaged. Restore it, or start a new run (another --out).")
    return manifest["config"]


#: the parts of manifest.json a resume reads, and their JSON types
MANIFEST_TYPES = {"config": dict, "budget": dict, "model": dict, "reward": dict, "prompts": dict, "eval_rewards": list,
                  "git": dict, "resumes": list}


def manifest_problem(manifest: Mapping[str, Any]) -> str | None:
    """What is wrong with the shape of a run's manifest (None: nothing): every part a resume reads has its
    type, and the saved configuration has every section of ``bench.config.DEFAULTS`` with its type."""
    from bench.config import DEFAULTS

    for key, kind in MANIFEST_TYPES.items():
        if key in manifest and not isinstance(manifest[key], kind):
            return f"{key!r} is {type(manifest[key]).__name__}, not {'an object' if kind is dict else 'a list'}"
    for key in ("eval_rewards", "resumes"):
        if not all(isinstance(x, dict) for x in manifest.get(key, [])):
            return f"{key!r} holds something else than objects"
    cfg = manifest["config"]
    for sec, default in DEFAULTS.items():
        if sec == "out":
            continue
        if sec not in cfg:
            return f"its config has no {sec!r}"
        if isinstance(default, dict) and not isinstance(cfg[sec], dict):
            return f"its config's {sec!r} is {cfg[sec]!r}, not a section"
    if not isinstance(cfg["algo"].get("name"), str):
        return "its config names no algorithm (algo.name)"
    if not isinstance(cfg["seed"], int) or isinstance(cfg["seed"], bool):
        return f"its config's seed is {cfg['seed']!r}, not an integer"
    if not isinstance(cfg["budget"], str):
        return f"its config's budget is {cfg['budget']!r}, not a budget string"
    return None


def resume_config(run_dir: str | os.PathLike, overrides: Mapping[str, Any] | None = None, *,
                  config_file: str | os.PathLike | None = None, preset: str | None = None,
                  flags: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The config to resume ``run_dir`` with: the run's saved config with the user's options applied on
    top (same precedence as ``bench.config.resolve``), refused with a diff when they change anything
    but ``RESUME_MUTABLE`` settings or extend the budget."""
    from bench import config
    from bench.registry import algorithm_class, did_you_mean

    run_dir = Path(run_dir)
    saved = saved_config(run_dir)
    flags = {k: v for k, v in (flags or {}).items() if v is not None}
    if flags.get("out") is not None and Path(flags["out"]).resolve() != run_dir.resolve():
        raise UsageError(f"--out {flags['out']} and --resume {run_dir} name different run directories; "
                         f"give only --resume")
    if flags.get("run.overwrite") or flags.get("run.force"):
        what = "--overwrite" if flags.get("run.overwrite") else "--force (which widens --overwrite)"
        raise UsageError(f"{what} and --resume contradict each other: --overwrite deletes the run that --resume "
                         f"continues")
    layer: dict[str, Any] = dict(config.flatten(saved))
    # runs started before eval.images_per_prompt / eval.seed existed evaluated one image per prompt on
    # noise from the run seed: keep that, so a resumed run's evaluations stay comparable with its own
    layer.setdefault("eval.images_per_prompt", 1)
    layer.setdefault("eval.seed", int(saved.get("seed") or 0))
    try:  # the saved configuration alone must be valid (a hand-edited manifest: refused, not half applied)
        config.resolve(dict(layer), flags={"out": str(run_dir), "run.overwrite": False})
    except UsageError as e:
        raise UsageError(f"cannot resume {run_dir}: the configuration in its manifest.json is not valid ({e}); "
                         f"the file was edited or damaged. Restore it, or start a new run (another --out).") from None
    explicit: set[str] = set()
    file_layer = config.load_config_file(config_file) if config_file else {}
    algo = saved.get("algo", {}).get("name")
    for src in (file_layer, overrides or {}, flags):
        if src.get("algo.name") not in (None, algo):
            raise UsageError(f"cannot resume {run_dir}: the configuration differs from the one the run was started "
                             f"with:\n{format_diff([('algo.name', algo, src['algo.name'])])}\nA run cannot change its "
                             f"algorithm; start a new run (another --out).")
    if preset:
        presets = getattr(algorithm_class(algo), "PRESETS", {}) or {}
        if preset not in presets:
            raise UsageError(did_you_mean(preset, list(presets) or ["(none)"], f"preset for algorithm {algo!r}"))
        layer.update(presets[preset])
        explicit |= set(presets[preset])
    layer.update(file_layer)
    explicit |= set(file_layer)
    layer.update(overrides or {})
    explicit |= set(overrides or {})
    explicit |= set(flags)
    flags = {**flags, "out": str(run_dir), "run.overwrite": False, "run.force": False}
    new = config.resolve(layer, flags=flags)
    check_resume_config(run_dir, saved, new, explicit)
    return new


# ---- a run's state: written to checkpoints, restored on resume -------------------------------------
def trainable_state(policy: Policy) -> dict[str, torch.Tensor]:
    return policy.named_trainable_parameters()


def save_checkpoint(parts: CheckpointParts, state: RunState) -> Path:
    """Save the run's state after ``state.totals.iterations`` completed iterations; outside the budget."""
    t0 = time.perf_counter()
    if parts.sharded:  # every rank gathers the whole tensors of its shards (collectives); rank 0 writes them
        fsdp.reshard(parts.policy.denoiser)
        weights = {n: fsdp.full(p) for n, p in trainable_state(parts.policy).items()}
        weights.update(parts.snapshots.state_dict())
        with parts.ignoring_calls():  # an optimizer without state yet gets one by a zero-lr step
            optimizer = fsdp.full_optimizer_state(parts.policy.denoiser, parts.optimizer)
    if not parts.is_main:  # the state is identical on every rank; rank 0 writes it
        state.last_checkpoint = state.totals.iterations
        return parts.out
    if not parts.sharded:
        # the trainable weights and, beside them, the algorithm's weight snapshots (bench.model.snapshots)
        weights = {**trainable_state(parts.policy), **parts.snapshots.state_dict()}
        optimizer = parts.optimizer.state_dict()
    saved = {"config": parts.config,  # what the state was computed with: a resume checks the manifest against it
             "totals": asdict(state.totals), "evals": state.evals, "algorithm": parts.algo.state_dict(),
             "wall_seconds": state.wall_seconds(), "checkpoint_seconds": state.checkpoint_seconds,
             "optimizer_format": "by_name" if parts.sharded else "by_index"}
    path = ckpt_mod.save(parts.out, state.totals.iterations, policy=weights,
                         optimizer=optimizer, state=saved, keep=parts.keep)
    state.last_checkpoint = state.totals.iterations
    state.checkpoint_seconds += time.perf_counter() - t0
    return path


def check_checkpoint_config(parts: CheckpointParts, ck: ckpt_mod.Checkpoint) -> None:
    """The configuration a resume runs with (manifest.json) must be the one the checkpoint's state was computed
    with: a hand-edited manifest would otherwise be applied in part (the clip range from the file, the learning
    rate from the restored optimizer). Refused, with the differences. (Dict against dict: the checkpoint stores
    the resolved config, the user-facing format.)"""
    saved = ck.state.get("config")
    diff = config_diff(saved, parts.config) if isinstance(saved, dict) else []
    if diff:
        lines = "\n".join(f"  {k}: {a!r} (checkpoint) -> {b!r} (manifest.json)" for k, a, b in diff)
        raise UsageError(f"cannot resume {parts.out}: the configuration in its manifest.json differs from the one "
                         f"checkpoint {ck.path.name} was written with:\n{lines}\nmanifest.json was edited after the "
                         f"run started; restore it, or start a new run (another --out) with the settings you want.")


def check_optimizer_settings(parts: CheckpointParts, ck: ckpt_mod.Checkpoint) -> None:
    """After the optimizer state is loaded: its hyperparameters are the configuration's (the logged lr is the
    lr used). Covers checkpoints written before they recorded their configuration."""
    want = parts.optimizer_settings
    names = {"lr": "train.lr", "betas": "train.beta1/beta2", "eps": "train.adam_eps",
             "weight_decay": "train.weight_decay"}
    bad: list[tuple[str, Any, Any]] = []
    for g in parts.optimizer.param_groups:
        for k, v in want.items():
            got = tuple(float(x) for x in g[k]) if k == "betas" else float(g[k])
            exp = tuple(float(x) for x in v) if k == "betas" else float(v)
            if got != exp and names[k] not in [b[0] for b in bad]:
                bad.append((names[k], got, exp))
    if bad:
        lines = "\n".join(f"  {k}: {a!r} (checkpoint) -> {b!r} (manifest.json)" for k, a, b in bad)
        raise UsageError(f"cannot resume {parts.out}: the optimizer settings in checkpoint {ck.path.name} differ from "
                         f"the configuration in its manifest.json:\n{lines}\nmanifest.json was edited after the run "
                         f"started; restore it, or start a new run (another --out) with the settings you want.")


def restore(parts: CheckpointParts, state: RunState, ck: ckpt_mod.Checkpoint) -> None:
    """Load checkpoint ``ck`` into the run: weights, optimizer, algorithm state, ``state``, RNG."""
    check_checkpoint_config(parts, ck)
    params = trainable_state(parts.policy)
    saved = {k: v for k, v in ck.policy.items() if not k.startswith(SNAPSHOT_PREFIX)}
    missing, extra = sorted(set(params) - set(saved)), sorted(set(saved) - set(params))
    if missing or extra:
        raise UsageError(f"checkpoint {ck.path} does not match the model's trainable parameters "
                         f"(missing {missing[:3]}, unexpected {extra[:3]})")
    if parts.sharded:
        fsdp.reshard(parts.policy.denoiser)
    with torch.no_grad():
        for n, p in params.items():
            if tuple(ck.policy[n].shape) != tuple(p.shape):
                raise UsageError(f"checkpoint {ck.path}: parameter {n} has shape {tuple(ck.policy[n].shape)}, "
                                 f"the model has {tuple(p.shape)}")
            fsdp.copy_full_into(p, ck.policy[n])  # this rank's shard of it, when sharded
    try:
        parts.snapshots.load_state_dict(ck.policy, where=f"checkpoint {ck.path}")
    except ValueError as e:
        raise UsageError(str(e)) from None
    by_name = ck.state.get("optimizer_format") == "by_name"  # written by a sharded run (bench/model/fsdp.py)
    if by_name != parts.sharded:
        raise UsageError(f"checkpoint {ck.path} was written by a {'sharded' if by_name else 'non-sharded'} run; "
                         f"resume it with model.distributed={'fsdp' if by_name else 'auto'} under the same launch")
    if by_name:
        with parts.ignoring_calls():  # the fresh optimizer's state is created by a zero-lr step first
            fsdp.load_optimizer_state(parts.policy.denoiser, parts.optimizer, ck.optimizer)
    else:
        parts.optimizer.load_state_dict(ck.optimizer)
    check_optimizer_settings(parts, ck)
    parts.algo.load_state_dict(ck.state.get("algorithm", {}))
    state.totals = Totals(**ck.state["totals"])
    state.evals = [dict(e) for e in ck.state.get("evals", [])]
    state.wall_before = float(ck.state.get("wall_seconds", 0.0))
    state.checkpoint_seconds = float(ck.state.get("checkpoint_seconds", 0.0))
    state.last_checkpoint = ck.iteration
    ckpt_mod.set_rng_state(ck.rng_tensors, ck.rng_json)


def restore_latest(parts: CheckpointParts, state: RunState) -> tuple[list[dict[str, Any]], str | None]:
    """Restore the newest valid checkpoint into the run and, on rank 0, cut the logs back to it (no checkpoint:
    the run restarts from iteration 0). Returns (the iteration records kept, the checkpoint's name or None)."""
    if not parts.is_main:  # other ranks only restore the state; rank 0 owns the files
        ck = ckpt_mod.load_latest(parts.out)
        if ck is not None:
            restore(parts, state, ck)
        return [], None if ck is None else ck.path.name
    left = remove_temp_files(parts.out)  # we hold the run's lock: these belong to a writer that died
    if left:
        warn(f"removed {len(left)} temporary file(s) left by the interrupted process: "
             f"{', '.join(p.name for p in left[:4])}")
    ck = ckpt_mod.load_latest(parts.out)
    if ck is None:
        warn(f"{parts.out} has no checkpoint: the run restarts from iteration 0")
        return repair_logs(parts.out, 0, []), None
    restore(parts, state, ck)
    return repair_logs(parts.out, ck.iteration, state.evals), ck.path.name


def resumed_manifest(manifest: Mapping[str, Any], *, checkpoint: str | None, iterations: int,
                     config: Mapping[str, Any], budget: Budget, micro_batch: int,
                     batch: Mapping[str, Any]) -> dict[str, Any]:
    """The run's manifest with this resume recorded: from which checkpoint, the budget before and after, the
    micro-batch (it may change on resume), and the config, budget and batch arithmetic it now runs with."""
    out = dict(manifest)
    out.pop("schema_version", None)
    out["resumes"] = [*out.get("resumes", []), {
        "time": now_iso(), "checkpoint": checkpoint, "iteration": iterations,
        "budget": {"before": out.get("config", {}).get("budget"), "after": budget.spec}, "git": git_state(),
        "micro_batch": micro_batch, "host": host_info()}]
    out.update(config=config, budget=budget.to_dict(), batch=batch)
    return out


def check_same_inputs(out: Path, manifest: Mapping[str, Any], *, prompts: Mapping[str, tuple[str, str]],
                      weights_path: Path, reward_versions: Mapping[str, str]) -> None:
    """A resumed run must see the same prompts (``prompts``: split -> (name, sha256) of its prompt set), model
    weights (those in ``weights_path``) and reward versions (``reward_versions``: name -> version, the training
    reward first) as the run recorded in its manifest."""
    from bench.model.models import weights_hash

    changed = []
    for split, (name, sha) in prompts.items():
        old = manifest.get("prompts", {}).get(split, {}).get("sha256")
        if old and old != sha:
            changed.append(f"the {split} prompt set {name!r} (sha256 {old[:12]}... -> {sha[:12]}...)")
    old_w = manifest.get("model", {}).get("weights_sha256")
    if old_w and old_w != weights_hash(weights_path):
        changed.append(f"the model weights in {weights_path}")
    old_r = {e.get("name"): e.get("version") for e in manifest.get("eval_rewards", [])}
    old_r[manifest.get("reward", {}).get("spec")] = manifest.get("reward", {}).get("version")
    for name, v in reward_versions.items():
        if old_r.get(name) not in (None, v):
            changed.append(f"the version of reward {name!r} ({old_r[name]} -> {v})")
    if changed:
        raise UsageError(f"cannot resume {out}: {'; '.join(changed)} changed since the run started, so "
                         f"the resumed iterations would not continue the same run. Restore them or start "
                         f"a new run.")
    old_git, git = manifest.get("git", {}), git_state()
    if old_git.get("commit") and git.get("commit") and old_git["commit"] != git["commit"]:
        warn(f"the code changed since the run started (git {old_git['commit'][:10]} -> "
             f"{git['commit'][:10]}); results may differ from an uninterrupted run")
