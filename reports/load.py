"""Run directories -> tidy pandas frames (reads docs/RUNDIR.md, schema_version 1; writes nothing).

``load(paths)`` accepts run directories (a directory holding ``manifest.json``) and any directory
containing run directories at any depth (a ``bench compare`` output, a sweep's ``trials/<n>/``), and
returns a :class:`RunSet` with three frames keyed by ``run``:

* ``runs``       one row per run: identity (algorithm, label, seed, reward + version, device, git;
                 ``run_label`` (``run.label``) and ``frozen`` (``train.frozen``) for control arms),
                 totals from ``final.json`` (or the last iteration when a run has not finished),
                 mean seconds per iteration and per phase, peak memory, ``cfg.<dotted key>`` columns
                 for the algorithm's config (``cfg.algo.k``...)
* ``iterations`` one row per iteration record, with ``run``, ``algo``, ``label``, ``seed`` prepended
* ``evals``      one row per eval record, likewise
* ``tuning``     the tuning studies of a tuned comparison (``bench compare --tune``), per algorithm:
                 ``DIR/tuning/<algo>/tuned.json`` and its ``trials.csv`` (``read_tuning``)
* ``scores``     one row per evaluated image (``eval_scores.jsonl``: run, iteration, prompt_index,
                 image_index, prompt and an ``eval/<reward>[/<component>]`` column per score); empty for
                 run directories written before per-image scores existed

A run's **label** is the algorithm name plus the ``algo.*`` settings that vary between that
algorithm's runs (``treegrpo k=3 d=2``), or the arm label its manifest carries (``label``, e.g. the
controls ``dancegrpo-aa`` and ``dancegrpo-frozen`` of ``bench compare --controls``); a run directory
under ``<arm>/seed<s>`` whose ``<arm>`` is ``<algorithm>-aa`` or ``<algorithm>-frozen`` gets that label
too.

``check_comparable`` refuses to put runs with different schema versions, training reward
(name@version), held-out reward versions, or (for wall-clock axes) devices on one axis.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from bench.errors import UsageError
from bench.fleet.compare import OPTIONS_FILE as COMPARE_OPTIONS
from bench.fleet.tune import TUNING_DIR
from bench.registry import ALGORITHMS
from bench.rundir import layout
from bench.rundir.layout import (
    EVAL_SCORES,
    EVALS,
    FINAL,
    ITERATIONS,
    MANIFEST,
    NOT_RUNS,
    READABLE_SCHEMA_VERSIONS,
)

SUPPORTED_SCHEMA_VERSIONS = READABLE_SCHEMA_VERSIONS  # the run directory layout's (bench.rundir.layout)

#: Canonical order of algorithms on every page (others follow alphabetically).
#: Tables and legends list algorithms in the registry's order (bench.registry.ALGORITHMS), plug-ins after them.
ALGO_ORDER = tuple(ALGORITHMS)

#: Budget axes: name -> (cumulative column in iterations/evals, axis label with unit). An axis whose
#: column no run logged is simply absent from a report; add an entry here to report a new cost column.
X_AXES = {
    "samples": ("samples_total", "scored samples (images)"),
    "nfe": ("nfe_total", "denoiser forward passes (NFE)"),
    # runs with a cost profile (run.cost_profile / run.clock): modeled, not measured, seconds
    "modeled": ("modeled_seconds_total", "MODELED seconds (cost profile; not wall-clock)"),
    "seconds": ("seconds_total", "training wall-clock (s)"),
}
#: Axes that are exact counts or model outputs, identical on any machine; verdicts use these (and the
#: budget's own axis). Wall-clock seconds are noisy and machine-bound: used only with that said.
NOISE_FREE_AXES = ("samples", "nfe", "modeled")


def axis_label(runs: pd.DataFrame, axis: str) -> str:
    """The axis label; the modeled axis names its cost profile (docs/COST.md)."""
    if axis == "modeled" and "cost_profile" in runs:
        names = sorted({str(x) for x in runs["cost_profile"].dropna()})
        if names:
            return f"MODELED seconds, cost profile {', '.join(names)} (not wall-clock)"
    return X_AXES[axis][1]


def modeled_profiles(runs: pd.DataFrame) -> list:
    """Cost profile of each run (None where a run has none): the modeled axis needs one profile for all."""
    return list(runs["cost_profile"]) if "cost_profile" in runs else [None] * len(runs)

#: Identity columns of the per-image score frame (``RunSet.scores``).
SCORE_ID_COLUMNS = ["run", "label", "seed", "iteration", "prompt_index", "image_index", "prompt"]
#: Suffixes of control-arm labels (``bench compare --controls``): A/A (the baseline algorithm under other
#: seeds) and frozen (the baseline's rollouts and rewards, weights never updated).
CONTROL_SUFFIXES = {"-aa": "aa", "-frozen": "frozen"}


def control_of(label: str) -> tuple[str, str] | None:
    """(kind, baseline label) of a control arm's label (``dancegrpo-aa`` -> ("aa", "dancegrpo")), else None."""
    for suffix, kind in CONTROL_SUFFIXES.items():
        if str(label).endswith(suffix) and len(str(label)) > len(suffix):
            return kind, str(label)[: -len(suffix)]
    return None


# Config keys that differ between runs without making them different methods (seed, output paths,
# budget, logging); used when deciding whether runs of one algorithm are variants.
_IGNORED_CONFIG_LEAVES = {"seed", "out", "out_dir", "output", "run_name", "overwrite", "resume",
                          "name", "spec", "budget", "tensorboard", "wandb", "device", "log_every"}


@dataclass
class RunSet:
    runs: pd.DataFrame
    iterations: pd.DataFrame
    evals: pd.DataFrame
    manifests: dict[str, dict] = field(default_factory=dict)
    finals: dict[str, dict] = field(default_factory=dict)
    trials: pd.DataFrame | None = None
    scores: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=SCORE_ID_COLUMNS))
    tuning: dict[str, dict[str, Any]] = field(default_factory=dict)  # algo -> {"tuned": ..., "trials": ...}

    @property
    def labels(self) -> list[str]:
        """Run groups (algorithm, or algorithm + varying config) in canonical order."""
        return order_labels(self.runs.drop_duplicates("label")[["label", "algo"]].itertuples(index=False))

    def train_eval_key(self) -> str:
        """``eval/<training reward>``: the training reward as measured by the held-out evaluation."""
        names = self.runs["reward"].unique()
        return f"eval/{names[0]}"

    def eval_keys(self) -> list[str]:
        """Every ``eval/<reward>`` mean column (no ``/std`` or component columns); training reward first."""
        keys = []
        for m in self.manifests.values():
            for r in m.get("eval_rewards") or []:
                k = f"eval/{r['name']}"
                if k not in keys:
                    keys.append(k)
        if self.evals is not None and not self.evals.empty:
            for c in self.evals.columns:
                if c.startswith("eval/") and c.count("/") == 1 and c not in keys:
                    keys.append(c)
        t = self.train_eval_key() if len(self.runs) else None
        return sorted(keys, key=lambda k: (k != t, keys.index(k)))

    def heldout_keys(self) -> list[str]:
        t = self.train_eval_key()
        return [k for k in self.eval_keys() if k != t]


# --------------------------------------------------------------------------------------- discovery

def find_run_dirs(paths: Iterable[str | os.PathLike]) -> list[Path]:
    """Every run directory (holding manifest.json) at or below the given paths, in a stable order."""
    found: list[Path] = []
    for p in paths:
        p = Path(p)
        if not p.exists():
            raise UsageError(f"{p}: no such file or directory")
        if p.is_file():
            if p.name == MANIFEST:
                p = p.parent
            else:
                raise UsageError(f"{p}: expected a run directory (holding manifest.json) or a directory of them")
        before = len(found)
        _walk(p, found)
        if len(found) == before:
            raise UsageError(f"{p}: no run directories (directories holding manifest.json) found at or below it")
    seen, unique = set(), []
    for d in found:
        r = d.resolve()
        if r not in seen:
            seen.add(r)
            unique.append(d)
    return unique


def _walk(d: Path, out: list[Path]) -> None:
    if (d / MANIFEST).is_file():
        out.append(d)
        return
    # a bench compare directory's tuning studies hold runs too (trials on the validation prompts), but they
    # are not arms of the comparison: report them by naming DIR/tuning/<algo> itself
    skip = {TUNING_DIR} if (d / COMPARE_OPTIONS).is_file() else set()
    for child in sorted(d.iterdir(), key=lambda c: _natural_key(c.name)):
        if child.is_dir() and child.name not in NOT_RUNS and child.name not in skip and not child.name.startswith("."):
            _walk(child, out)


def _natural_key(s: str) -> list:
    import re

    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)]


# --------------------------------------------------------------------------------------- reading

def read_json(path: Path) -> dict:
    """A JSON object file of a run directory (``UsageError`` naming the file when it is not one)."""
    return layout.read_json(path)


def read_jsonl(path: Path) -> list[dict]:
    """Records of a JSON Lines file; a truncated last line (a run still writing) is skipped with a
    warning, a bad line elsewhere is an error naming the file and line (``bench.rundir.layout``)."""
    recs, bad = layout.read_jsonl(path)
    for n in bad:
        warnings.warn(f"{path}:{n}: skipping incomplete last line (run still writing?)", stacklevel=2)
    return recs


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    """{"algo": {"k": 3}} -> {"algo.k": 3}; lists become tuples (hashable)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = tuple(v) if isinstance(v, list) else v
    return out


def config_value(manifest: dict, dotted: str, default: Any = None) -> Any:
    cur: Any = manifest.get("config") or {}
    for part in dotted.split("."):
        if not isinstance(cur, dict) or part not in cur:
            return default
        cur = cur[part]
    return cur


def _mean(values: Sequence[Any]) -> float:
    xs = [float(v) for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    return sum(xs) / len(xs) if xs else math.nan


def _max(values: Sequence[Any]) -> float:
    xs = [float(v) for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    return max(xs) if xs else math.nan


def _run_row(run_id: str, path: Path, m: dict, final: dict, its: list[dict]) -> dict[str, Any]:
    algo = (m.get("algorithm") or {}).get("name") or config_value(m, "algo.name") or "unknown"
    reward = m.get("reward") or {}
    dev = m.get("device") or {}
    git = m.get("git") or {}
    last = its[-1] if its else {}
    row: dict[str, Any] = {
        "run": run_id, "path": str(path), "run_name": m.get("run_name", path.name), "algo": algo,
        # run.label names the run's group in reports (bench compare --controls: <baseline>-aa, -frozen)
        "run_label": config_value(m, "run.label"),
        "frozen": bool(m.get("weights_frozen", config_value(m, "train.frozen", False))),
        "arm_label": arm_label(m, path, algo),
        "seed": m.get("seed", config_value(m, "seed")),
        "lr": config_value(m, "train.lr"),
        "schema_version": m.get("schema_version"),
        "reward": reward.get("name"), "reward_version": str(reward.get("version")),
        "reward_spec": reward.get("spec"),
        "eval_rewards": ", ".join(f"{r.get('name')}@{r.get('version')}" for r in m.get("eval_rewards") or []),
        "model": (m.get("model") or {}).get("name"),
        "device_type": dev.get("type"), "device_name": dev.get("name"), "device_count": dev.get("count"),
        "budget_spec": (m.get("budget") or {}).get("spec"),
        "git_commit": git.get("commit"), "git_dirty": git.get("dirty"),
        "created": m.get("created"),
        "stop_reason": final.get("stop_reason", "incomplete (no final.json)"),
        "iterations": final.get("iterations", len(its)),
        "samples_total": final.get("samples_total", last.get("samples_total", math.nan)),
        "nfe_total": final.get("nfe_total", last.get("nfe_total", math.nan)),
        "seconds_total": final.get("seconds_total", last.get("seconds_total", math.nan)),
        "wall_seconds": final.get("wall_seconds", math.nan),
        "s_per_iter": _mean([r.get("t_iteration_s") for r in its]),
        "peak_mem_mb": _max([r.get("peak_mem_mb") for r in its]),
        "cost_profile": (m.get("cost_profile") or {}).get("name"),  # (cost) None without a profile
        "modeled_seconds_total": final.get("modeled_seconds_total", last.get("modeled_seconds_total", math.nan)),
    }
    for phase in ("t_rollout_s", "t_reward_s", "t_advantage_s", "t_update_s"):
        row[phase] = _mean([r.get(phase) for r in its])
    for k, v in flatten((m.get("config") or {}).get("algo") or {}, "algo.").items():
        row[f"cfg.{k}"] = v
    return row


def arm_label(m: dict, path: Path, algo: str) -> str | None:
    """The label a run directory declares: its manifest's ``label`` (or ``config.run.label``), else a
    control arm's directory name (``<algo>-aa`` / ``<algo>-frozen`` above ``seed<s>``); None otherwise."""
    for v in (m.get("label"), config_value(m, "run.label")):
        if isinstance(v, str) and v.strip():
            return v.strip()
    for d in (path.parent, path):
        if d.name in (f"{algo}{suffix}" for suffix in CONTROL_SUFFIXES):
            return d.name
    return None


def read_scores(path: Path, run_id: str) -> pd.DataFrame:
    """``eval_scores.jsonl`` of one run as a frame (columns SCORE_ID_COLUMNS minus label/seed, plus
    ``eval/<key>`` per score key); empty when the file is absent."""
    recs = read_jsonl(path / EVAL_SCORES)
    if not recs:
        return pd.DataFrame()
    cols: dict[str, list] = {c: [] for c in ("iteration", "prompt_index", "image_index", "prompt")}
    keys: dict[str, list] = {}
    for n, r in enumerate(recs):
        for c, lst in cols.items():
            lst.append(r.get(c))
        for k, v in (r.get("scores") or {}).items():
            keys.setdefault(f"eval/{k}", [math.nan] * n)
        for k, lst in keys.items():
            v = (r.get("scores") or {}).get(k[5:])
            lst.append(float(v) if isinstance(v, (int, float)) else math.nan)
    df = pd.DataFrame({**cols, **keys})
    df.insert(0, "run", run_id)
    return df


def load(paths: Iterable[str | os.PathLike]) -> RunSet:
    """Read every run directory at or below ``paths`` into a :class:`RunSet`."""
    paths = list(paths)
    dirs = find_run_dirs(paths)
    ids = _run_ids(dirs)
    rows, it_frames, ev_frames, sc_frames, manifests, finals = [], [], [], [], {}, {}
    for run_id, d in zip(ids, dirs):
        m = read_json(d / MANIFEST)
        final = read_json(d / FINAL) if (d / FINAL).is_file() else {}
        its = read_jsonl(d / ITERATIONS)
        evs = read_jsonl(d / EVALS)
        manifests[run_id], finals[run_id] = m, final
        rows.append(_run_row(run_id, d, m, final, its))
        it_frames.append(pd.DataFrame(its).assign(run=run_id))
        ev_frames.append(pd.DataFrame(evs).assign(run=run_id))
        sc_frames.append(read_scores(d, run_id))
    runs = pd.DataFrame(rows)
    runs["label"] = _labels(runs)
    runs = _sort_runs(runs)
    ident = runs[["run", "algo", "label", "seed"]]
    iterations = _concat(it_frames, ident)
    evals = _fill_axis_columns(_concat(ev_frames, ident), iterations)
    sc = [f for f in sc_frames if not f.empty]
    scores = (ident.merge(pd.concat(sc, ignore_index=True), on="run", how="right").drop(columns="algo")
              if sc else pd.DataFrame(columns=SCORE_ID_COLUMNS))
    return RunSet(runs=runs, iterations=iterations, evals=evals, manifests=manifests, finals=finals,
                  trials=_read_trials(paths), scores=scores,
                  tuning=read_tuning(paths, set(runs["algo"].astype(str))))


def read_tuning(paths: Iterable[str | os.PathLike], algos: set[str] | None = None) -> dict[str, dict[str, Any]]:
    """The tuning studies of ``bench compare --tune`` for the algorithms in ``algos`` (all when None): each
    ``<algo>/tuned.json`` (and ``trials.csv`` beside it) under ``P/tuning/`` for every path ``P``, or under
    ``P`` itself when it is such a folder (``docs/results/tuning``). An algorithm found twice must be the
    same study (a UsageError otherwise: the page would show one of two tunings)."""
    out: dict[str, dict[str, Any]] = {}
    for p in paths:
        p = Path(p)
        for root in (p / TUNING_DIR, p):
            if not root.is_dir():
                continue
            for f in sorted(root.glob("*/tuned.json")):
                algo = f.parent.name
                if algos is not None and algo not in algos:
                    continue
                tuned = read_json(f)
                trials_csv = f.parent / "trials.csv"
                trials = pd.read_csv(trials_csv) if trials_csv.is_file() else None
                if algo in out and out[algo]["tuned"] != tuned:
                    raise UsageError(f"two tuning studies of {algo!r}: {out[algo]['path']} and {f.parent}; "
                                     f"name one (--tuning)")
                out[algo] = {"tuned": tuned, "trials": trials, "path": str(f.parent)}
    return out


def _concat(frames: list[pd.DataFrame], ident: pd.DataFrame) -> pd.DataFrame:
    frames = [f for f in frames if not f.empty and len(f.columns) > 1]
    if not frames:
        return pd.DataFrame(columns=["run", "algo", "label", "seed", "iteration"])
    df = pd.concat(frames, ignore_index=True)
    for col in df.columns:  # the run log writes non-finite floats as null / "inf" / "-inf"
        if col != "run" and not pd.api.types.is_numeric_dtype(df[col]) and not pd.api.types.is_bool_dtype(df[col]):
            try:
                df[col] = pd.to_numeric(df[col])
            except (ValueError, TypeError):
                pass
    df = ident.merge(df, on="run", how="right")
    return df


def _fill_axis_columns(evals: pd.DataFrame, iterations: pd.DataFrame) -> pd.DataFrame:
    """Give eval records the cumulative cost columns they lack but iterations carry (e.g. a modeled
    cost): an eval after j completed iterations takes iteration j - 1's cumulative value (0 at j = 0)."""
    if evals.empty or iterations.empty or "iteration" not in iterations:
        return evals
    for col, _ in X_AXES.values():
        if col in evals or col not in iterations:
            continue
        cum = iterations[["run", "iteration", col]].assign(iteration=iterations["iteration"] + 1)
        evals = evals.merge(cum, on=["run", "iteration"], how="left")
        evals.loc[evals["iteration"] == 0, col] = 0.0
    return evals


def axes_present(rs: RunSet) -> list[str]:
    """Budget axes with finite values in every run's eval records, in X_AXES order."""
    out = []
    for name, (col, _) in X_AXES.items():
        if col in rs.evals and not rs.evals.empty:
            ok = rs.evals.groupby("run")[col].apply(lambda v: pd.to_numeric(v, errors="coerce").notna().any())
            if len(ok) and ok.all():
                out.append(name)
    return out


def budget_axis(rs: RunSet) -> str | None:
    """The axis the budget fixed ("samples", "nfe", "seconds", or None for iteration budgets or budgets
    that differ between runs)."""
    found = set()
    for m in rs.manifests.values():
        b = m.get("budget") or {}
        kinds = [k for k in ("seconds", "samples", "nfe") if b.get(k) is not None]
        found.add(kinds[0] if len(kinds) == 1 else None)
    return found.pop() if len(found) == 1 else None


def _run_ids(dirs: list[Path]) -> list[str]:
    """Paths relative to the deepest common parent (``treegrpo/seed0``); unique by construction."""
    resolved = [d.resolve() for d in dirs]
    if len(resolved) == 1:
        return [resolved[0].name]
    common = Path(os.path.commonpath([str(r) for r in resolved]))
    return [str(r.relative_to(common)) or r.name for r in resolved]


def _read_trials(paths: list) -> pd.DataFrame | None:
    frames = []
    for p in paths:
        f = Path(p) / "trials.csv"
        if f.is_file():
            frames.append(pd.read_csv(f).assign(study=str(p)))
    return pd.concat(frames, ignore_index=True) if frames else None


# --------------------------------------------------------------------------------------- labels

def _labels(runs: pd.DataFrame) -> list[str]:
    """``run.label`` where a run has one (the control arms of ``bench compare --controls``), else the
    algorithm name plus the config values that vary between that algorithm's runs (``treegrpo k=3 d=2``)
    so that variants are never averaged together as seeds."""
    cfg_cols = [c for c in runs.columns if c.startswith("cfg.")
                and c.split(".")[-1] not in _IGNORED_CONFIG_LEAVES]
    labels = []
    varying: dict[str, list[str]] = {}
    declared = runs["arm_label"].notna() if "arm_label" in runs else pd.Series(False, index=runs.index)
    for algo, grp in runs[~declared].groupby("algo", sort=False):
        cols = []
        for c in cfg_cols:
            vals = grp[c].map(repr).unique()
            if len(vals) > 1:
                cols.append(c)
        varying[algo] = cols
    for i, r in runs.iterrows():
        if declared[i]:
            labels.append(str(r["arm_label"]))
            continue
        parts = [r["algo"]]
        for c in varying.get(r["algo"], []):
            parts.append(f"{c.split('.')[-1]}={_fmt_value(r[c])}")
        labels.append(" ".join(parts))
    return labels


def _fmt_value(v: Any) -> str:
    if isinstance(v, float) and math.isnan(v):
        return "-"
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)


def order_labels(pairs: Iterable[tuple[str, str]]) -> list[str]:
    """(label, algo) pairs -> labels in canonical algorithm order, then natural label order."""
    pairs = list(pairs)

    def key(p):
        label, algo = p
        rank = ALGO_ORDER.index(algo) if algo in ALGO_ORDER else len(ALGO_ORDER)
        control = control_of(label) is not None  # control arms after every method
        return (control, rank, algo if rank == len(ALGO_ORDER) else "", _natural_key(label))

    return [label for label, _ in sorted(pairs, key=key)]


def _sort_runs(runs: pd.DataFrame) -> pd.DataFrame:
    order = order_labels(runs.drop_duplicates("label")[["label", "algo"]].itertuples(index=False))
    rank = {lab: i for i, lab in enumerate(order)}
    runs = runs.assign(_r=runs["label"].map(rank), _s=pd.to_numeric(runs["seed"], errors="coerce"))
    return runs.sort_values(["_r", "_s", "run"]).drop(columns=["_r", "_s"]).reset_index(drop=True)


# --------------------------------------------------------------------------------------- checks

def _differ(runs: pd.DataFrame, values: pd.Series, what: str) -> str | None:
    groups: dict[str, list[str]] = {}
    for run, v in zip(runs["run"], values):
        groups.setdefault(str(v), []).append(str(run))
    if len(groups) <= 1:
        return None
    parts = []
    for v, rs in groups.items():
        shown = ", ".join(rs[:4]) + (f" and {len(rs) - 4} more" if len(rs) > 4 else "")
        parts.append(f"{v} ({shown})")
    return f"runs differ in {what}: " + "; ".join(parts)


def comparability_problems(runs: pd.DataFrame, wall_clock: bool = False) -> list[str]:
    """Why these runs cannot share an axis (empty list: they can)."""
    problems = []
    checks = [
        (runs["schema_version"], "run-directory schema version"),
        (runs["reward"].astype(str) + "@" + runs["reward_version"].astype(str), "training reward (name@version)"),
        (runs["eval_rewards"], "evaluation rewards (name@version)"),
    ]
    if wall_clock:
        checks.append((runs["device_type"].astype(str) + ":" + runs["device_name"].astype(str)
                       + " x" + runs["device_count"].astype(str), "device (wall-clock axes need one device)"))
    for values, what in checks:
        msg = _differ(runs, values, what)
        if msg:
            problems.append(msg)
    bad = sorted({v for v in runs["schema_version"] if v not in SUPPORTED_SCHEMA_VERSIONS}, key=str)
    if bad:
        problems.append(f"unsupported run-directory schema version(s) {bad} "
                        f"(this report reads {list(SUPPORTED_SCHEMA_VERSIONS)})")
    return problems


def check_comparable(runs: pd.DataFrame, wall_clock: bool = False) -> None:
    """Raise UsageError saying which runs differ in what, if they cannot share an axis."""
    problems = comparability_problems(runs, wall_clock)
    if problems:
        raise UsageError("cannot put these runs on one axis: " + " | ".join(problems)
                         + ". Report them separately (pass only comparable run directories).")


def code_version_problems(runs: pd.DataFrame) -> list[str]:
    """Why these runs may not come from one code version: several git commits, an uncommitted (dirty)
    working tree, or an unknown commit. Differences between methods could then be code changes."""
    problems = []
    msg = _differ(runs, runs["git_commit"].map(lambda c: str(c)[:12]), "git commit")
    if msg:
        problems.append(msg)
    dirty = runs.loc[runs["git_dirty"].map(lambda d: d is True), "run"].tolist()
    if dirty:
        problems.append(f"{len(dirty)} run(s) from a working tree with uncommitted changes: "
                        + ", ".join(map(str, dirty[:4])) + (" ..." if len(dirty) > 4 else ""))
    unknown = runs.loc[runs["git_commit"].map(lambda c: not c or str(c) in ("None", "nan", "unknown")), "run"]
    if len(unknown):
        problems.append(f"{len(unknown)} run(s) with no git commit recorded")
    return problems
