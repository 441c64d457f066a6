"""The report writer (the only module that writes files): run directories -> one PDF.

Fixed page order (pages marked * appear only when the runs contain what they show):
  1. title page: what was compared, budgets, seeds, devices, git commits, packages, notes
  2. learning curves on the chosen budget axis: the training reward (per-iteration batch mean) and
     every eval reward (held-out evaluation), IQM over seeds with 95% stratified-bootstrap CI bands
  3. the primary metric vs scored samples, NFE and training wall-clock side by side
  4. Pareto frontiers: final primary metric vs seconds/iteration, total training seconds, NFE, peak memory
  5. time per iteration split into phases (rollout, reward, advantage, update); NFE per scored sample
  6*. k/d ablation heatmaps (final reward, seconds/iteration, peak memory) for runs with algo.k and algo.d
  7*. window-size curves for runs whose algo.window (or algo.window_size) varies
  8. sample grids: eval images across checkpoints (first seed of each label)
  9. reward hacking: training vs held-out eval rewards per run, flagged windows shaded
 10*. sample grids of the flagged reward-hacking windows
 11. tables: final IQM +- 95% CI per eval reward, time/iteration, probability of improvement and
     speed-up vs the baseline ("X is N.Nx faster than Y to reach reward R")

Wall-clock pages and panels are replaced by a note when the runs ran on different devices; asking for
``x="seconds"`` with mixed devices is refused (load.check_comparable).
"""

from __future__ import annotations

import datetime as _dt
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.backends.backend_pdf import PdfPages

from bench.errors import UsageError
from reports import plots, stats
from reports.load import X_AXES, RunSet, check_comparable, comparability_problems, load
from reports.load import axis_label, modeled_profiles  # (cost) the modeled-seconds axis

PAGE_SIZE = (11.69, 8.27)  # A4 landscape, inches
WINDOW_KEYS = ("cfg.algo.window", "cfg.algo.window_size")
MAX_GRID_ROWS = 8
MAX_GRID_COLS = 6


@dataclass
class ReportOptions:
    x: str = "samples"               # budget axis of the learning curves: samples | nfe | seconds
    baseline: str | None = None      # label to compare against (default: dancegrpo if present, else first)
    metric: str | None = None        # eval key of the primary metric (default: eval/<training reward>)
    threshold: float | None = None   # reward R for time-to-threshold (default: baseline's final IQM)
    title: str = "treebench report"
    reps: int = 2000                 # bootstrap resamples
    points: int = 60                 # budget grid points per axis


# --------------------------------------------------------------------------------------- analysis

def final_scores(rs: RunSet, key: str) -> pd.DataFrame:
    """Per run: the metric at its last eval record (label, run, seed, value)."""
    if rs.evals.empty or key not in rs.evals:
        return pd.DataFrame(columns=["run", "label", "seed", "value"])
    ev = rs.evals.dropna(subset=[key]).sort_values(["run", "iteration"])
    last = ev.groupby("run", sort=False).tail(1)
    return last[["run", "label", "seed", key]].rename(columns={key: "value"})


def final_table(rs: RunSet, key: str, reps: int) -> pd.DataFrame:
    """Per label: IQM and 95% CI of the final metric over its runs."""
    fs = final_scores(rs, key)
    rows = []
    for lab in rs.labels:
        v = fs.loc[fs["label"] == lab, "value"].to_numpy(dtype=float)
        v = v[np.isfinite(v)]
        if v.size == 0:
            rows.append({"label": lab, "value": math.nan, "lo": math.nan, "hi": math.nan, "n": 0})
            continue
        p, lo, hi = stats.bootstrap_ci(v, stats.iqm, reps=reps)
        rows.append({"label": lab, "value": p, "lo": lo, "hi": hi, "n": int(v.size)})
    return pd.DataFrame(rows)


def cost_table(rs: RunSet) -> pd.DataFrame:
    """Per label: mean over runs of seconds/iteration, total training seconds, NFE, samples, peak memory
    and each phase's seconds/iteration."""
    cols = ["s_per_iter", "seconds_total", "nfe_total", "samples_total", "peak_mem_mb", "iterations",
            "t_rollout_s", "t_reward_s", "t_advantage_s", "t_update_s"]
    df = rs.runs[["label"] + cols].copy()
    for c in cols:
        df[c] = pd.to_numeric(df[c], errors="coerce")
    agg = df.groupby("label", sort=False)[cols].mean().reset_index()
    return agg.set_index("label").loc[rs.labels].reset_index()


def reward_hacking(rs: RunSet, window: int = 3) -> dict[str, list[bool]]:
    """run -> per-eval flags (stats.reward_hacking_flags, OR the run log's own ``reward_hacking``)."""
    out = {}
    if rs.evals.empty:
        return out
    train, held = rs.train_eval_key(), rs.heldout_keys()
    for run, g in rs.evals.sort_values("iteration").groupby("run", sort=False):
        recs = g.to_dict("records")
        flags = stats.reward_hacking_flags(recs, train, held, window=window)
        logged = [bool(r.get("reward_hacking")) if isinstance(r.get("reward_hacking"), (bool, np.bool_)) else False
                  for r in recs]
        out[run] = [a or b for a, b in zip(flags, logged)]
    return out


def _grid_runs(rs: RunSet, *keys: str) -> pd.DataFrame:
    cols = [k for k in keys if k in rs.runs]
    if len(cols) < len(keys):
        return rs.runs.iloc[0:0]
    return rs.runs.dropna(subset=cols)


def _fmt(v: float, digits: int = 3) -> str:
    return "-" if v is None or not np.isfinite(v) else f"{v:.{digits}g}"


def _fmt_ci(p: float, lo: float, hi: float) -> str:
    if not np.isfinite(p):
        return "-"
    return f"{p:.3f} [{lo:.3f}, {hi:.3f}]"


def _fmt_budget(v: float, axis: str) -> str:
    if not np.isfinite(v):
        return "not reached"
    if axis == "seconds":
        return f"{v:.1f} s" if v < 600 else f"{v / 60:.1f} min"
    if axis == "modeled":
        return f"{v:.1f} modeled s" if v < 600 else f"{v / 60:.1f} modeled min"
    return f"{v:.4g} {'samples' if axis == 'samples' else 'NFE'}"


# --------------------------------------------------------------------------------------- report

class _Writer:
    def __init__(self, pdf: PdfPages, title: str) -> None:
        self.pdf, self.title, self.pages = pdf, title, []

    def page(self, heading: str, nrows: int = 1, ncols: int = 1, **kw: Any):
        fig, axes = plt.subplots(nrows, ncols, figsize=PAGE_SIZE, squeeze=False, **kw)
        fig.suptitle(heading, fontsize=13, fontweight="bold", x=0.02, ha="left")
        return fig, axes

    def save(self, fig: plt.Figure, heading: str, tight: bool = True, rect_top: float = 0.95) -> None:
        self.pages.append(heading)
        fig.text(0.98, 0.01, f"{self.title} - page {len(self.pages)}", ha="right", fontsize=7, color="#777777")
        if tight:
            fig.tight_layout(rect=(0, 0.02, 1, rect_top))
        self.pdf.savefig(fig)
        plt.close(fig)


def build_report(
    runs: RunSet | Iterable[str | Path],
    out: str | Path,
    options: ReportOptions | None = None,
    **kw: Any,
) -> list[str]:
    """Write the PDF report to ``out``; returns the page headings in order."""
    opt = options or ReportOptions(**kw)
    rs = runs if isinstance(runs, RunSet) else load(runs)
    if rs.runs.empty:
        raise UsageError("no runs to report")
    if opt.x not in X_AXES:
        raise UsageError(f"unknown budget axis {opt.x!r}; choose one of {', '.join(X_AXES)}")
    check_comparable(rs.runs, wall_clock=(opt.x == "seconds"))
    profs = modeled_profiles(rs.runs)
    if opt.x == "modeled" and (None in profs or len(set(profs)) != 1):  # (cost)
        raise UsageError(f"--x modeled needs every run priced with one cost profile (run.cost_profile or "
                         f"run.clock); these runs have {sorted({str(p) for p in profs})}")
    wall_problems = comparability_problems(rs.runs, wall_clock=True)
    wall_ok = not wall_problems

    labels = rs.labels
    baseline = opt.baseline
    if baseline is None:
        baseline = next((lab for lab in labels if lab == "dancegrpo"), labels[0])
    elif baseline not in labels:
        cands = [lab for lab in labels if plots.algo_of(lab) == baseline]
        if len(cands) == 1:
            baseline = cands[0]
        else:
            raise UsageError(f"baseline {opt.baseline!r} is not among the compared runs; "
                             f"choose one of: {', '.join(labels)}")
    metric = opt.metric
    if metric is None:  # the training reward as evaluated; else the first eval reward logged
        metric = next((k for k in [rs.train_eval_key(), *rs.eval_keys()] if k in rs.evals), rs.train_eval_key())
    if metric not in rs.evals:
        raise UsageError(f"metric {metric!r} is not in the eval records; available: {', '.join(rs.eval_keys())}")

    ctx = _Context(rs, opt, baseline, metric, wall_ok, wall_problems)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    with PdfPages(tmp) as pdf:
        w = _Writer(pdf, opt.title)
        _title_page(w, ctx)
        _curves_page(w, ctx)
        _axes_page(w, ctx)
        _pareto_page(w, ctx)
        _timing_page(w, ctx)
        _kd_page(w, ctx)
        _window_page(w, ctx)
        _samples_page(w, ctx)
        _hacking_pages(w, ctx)
        _tables_page(w, ctx)
        d = pdf.infodict()
        d["Title"] = opt.title
        d["Subject"] = "treebench comparison of " + ", ".join(labels)
    tmp.replace(out)
    return w.pages


@dataclass
class _Context:
    rs: RunSet
    opt: ReportOptions
    baseline: str
    metric: str
    wall_ok: bool
    wall_problems: list[str]

    def __post_init__(self) -> None:
        self.final = final_table(self.rs, self.metric, self.opt.reps)
        self.costs = cost_table(self.rs)
        self.curves: dict[tuple[str, str], pd.DataFrame] = {}
        base_final = self.final.loc[self.final["label"] == self.baseline, "value"]
        thr = self.opt.threshold
        if thr is None:
            thr = float(base_final.iloc[0]) if len(base_final) else math.nan
        self.threshold = thr
        self.hacking = reward_hacking(self.rs)

    def curve(self, axis: str, key: str) -> pd.DataFrame:
        """Aggregated curve of ``key`` vs budget ``axis``: eval keys from evals, reward_mean from iterations."""
        if (axis, key) not in self.curves:
            frame = self.rs.iterations if key == "reward_mean" else self.rs.evals
            x = X_AXES[axis][0]
            if frame.empty or x not in frame or key not in frame:
                df = pd.DataFrame(columns=["label", "x", "value", "lo", "hi", "n"])
            else:
                df = stats.aggregate_curves(frame, x, key, points=self.opt.points, reps=self.opt.reps)
            self.curves[(axis, key)] = df
        return self.curves[(axis, key)]

    def axis_allowed(self, axis: str) -> bool:
        if axis == "modeled":  # (cost) one cost profile shared by every run
            profs = modeled_profiles(self.rs.runs)
            return bool(profs) and None not in profs and len(set(profs)) == 1
        return axis != "seconds" or self.wall_ok


def _reward_label(rs: RunSet, key: str) -> str:
    name = key.split("/", 1)[-1]
    versions = {r.get("version") for m in rs.manifests.values() for r in m.get("eval_rewards") or []
                if r.get("name") == name}
    v = f" v{versions.pop()}" if len(versions) == 1 else ""
    role = "training reward" if key == rs.train_eval_key() else "held-out"
    return f"{name}{v} ({role}, eval mean)"


def _unique(values: Iterable[Any]) -> list[str]:
    return list(dict.fromkeys(str(v) for v in values if v is not None and str(v) != "nan"))


def _title_page(w: _Writer, c: _Context) -> None:
    rs = c.rs
    r = rs.runs
    heading = c.opt.title
    fig, axes = w.page(heading)
    seeds = {lab: sorted(pd.to_numeric(r.loc[r["label"] == lab, "seed"], errors="coerce").dropna().astype(int))
             for lab in rs.labels}
    git = []
    for commit, dirty in dict.fromkeys(zip(r["git_commit"], r["git_dirty"])):
        git.append(f"{str(commit)[:12]}{' (dirty)' if dirty else ''}")
    pk = {}
    for m in rs.manifests.values():
        for name, ver in (m.get("packages") or {}).items():
            pk.setdefault(name, set()).add(str(ver))
    lines = [
        f"Compared:        {len(rs.labels)} method(s), {len(r)} run(s)",
    ]
    for lab in rs.labels:
        lines.append(f"  - {lab:<28} seeds {', '.join(map(str, seeds[lab])) or '?'}")
    lines += [
        "",
        f"Model:           {', '.join(_unique(r['model']))}",
        f"Training reward: {', '.join(_unique(r['reward'] + ' v' + r['reward_version']))}",
        f"Eval rewards:    {', '.join(_unique(r['eval_rewards']))}",
        f"Budgets:         {', '.join(_unique(r['budget_spec']))}",
        f"Stop reasons:    {', '.join(f'{k} x{v}' for k, v in r['stop_reason'].value_counts().items())}",
        f"Device(s):       {', '.join(_unique(r['device_type'].astype(str) + ':' + r['device_name'].astype(str) + ' x' + r['device_count'].astype(str)))}",
        f"Git commit(s):   {', '.join(git) or 'unknown'}",
        "Packages:        " + ", ".join(k + " " + "/".join(sorted(v)) for k, v in sorted(pk.items())),
        f"Run dates:       {', '.join(sorted(_unique(str(x)[:10] for x in r['created'])))}",
    ]
    if rs.trials is not None:
        states = rs.trials["state"].value_counts().to_dict() if "state" in rs.trials else {}
        lines.append(f"Sweep trials:    {len(rs.trials)} in trials.csv"
                     + (" (" + ", ".join(f"{k} x{v}" for k, v in states.items()) + ")" if states else ""))
    lines += [
        "",
        f"Budget axis:     {axis_label(c.rs.runs, c.opt.x)}",
        f"Primary metric:  {c.metric}  (final = value at each run's last evaluation)",
        f"Baseline:        {c.baseline}",
        f"Threshold R:     {_fmt(c.threshold, 4)}"
        + ("  (baseline's final IQM)" if c.opt.threshold is None else "  (given)"),
        f"Statistics:      IQM over seeds, 95% stratified-bootstrap CI ({c.opt.reps} resamples)",
        "",
        f"Report written:  {_dt.datetime.now(_dt.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
    ]
    notes = []
    if not c.wall_ok:
        notes.append("Wall-clock and memory panels are omitted: " + "; ".join(c.wall_problems))
    incomplete = r[~r["stop_reason"].astype(str).str.startswith("budget")]
    if len(incomplete):
        notes.append("Runs not stopped by their budget: "
                     + ", ".join(f"{a} ({b})" for a, b in zip(incomplete["run"], incomplete["stop_reason"])))
    if len(git) > 1:
        notes.append(f"The runs come from {len(git)} different code versions (git commits above); "
                     "differences between methods may partly be code changes.")
    elif any(bool(d) for d in r["git_dirty"].dropna()):
        notes.append("The runs come from a working tree with uncommitted changes (dirty).")
    flagged = [run for run, f in c.hacking.items() if any(f)]
    if flagged:
        notes.append("Reward hacking flagged in: " + ", ".join(flagged))
    if notes:
        lines += ["", "Notes:"] + [f"  * {n}" for n in notes]
    plots.text_block(axes[0, 0], _wrap(lines, 120), fontsize=9)
    w.save(fig, heading)


def _wrap(lines: Sequence[str], width: int) -> list[str]:
    import textwrap

    out = []
    for line in lines:
        indent = " " * (len(line) - len(line.lstrip()) + 4)
        out.extend(textwrap.wrap(line, width, subsequent_indent=indent) or [""])
    return out


def _curves_page(w: _Writer, c: _Context) -> None:
    axis = c.opt.x
    xlabel = axis_label(c.rs.runs, axis)
    keys = [("reward_mean", f"{c.rs.train_eval_key().split('/', 1)[-1]} (training batch mean per iteration)")] + [
        (k, _reward_label(c.rs, k)) for k in c.rs.eval_keys()]
    n = len(keys)
    ncols = 2 if n > 1 else 1
    nrows = math.ceil(n / ncols)
    heading = f"Learning curves vs {xlabel}"
    fig, axes = w.page(heading, nrows, ncols)
    for ax, (key, ylabel) in zip(axes.flat, keys):
        thr = c.threshold if key == c.metric else None
        plots.learning_curves(ax, c.curve(axis, key), xlabel, "reward", labels=c.rs.labels, threshold=thr,
                              title=ylabel)
    for ax in list(axes.flat)[n:]:
        ax.set_axis_off()
    w.save(fig, heading)


def _axes_page(w: _Writer, c: _Context) -> None:
    heading = f"{c.metric} vs each budget currency"
    fig, axes = w.page(heading, 1, 3)
    for ax, axis in zip(axes.flat, X_AXES):
        if not c.axis_allowed(axis):
            plots.note(ax, "wall-clock axis omitted:\n" + "\n".join(c.wall_problems))
            continue
        plots.learning_curves(ax, c.curve(axis, c.metric), X_AXES[axis][1], _reward_label(c.rs, c.metric),
                              labels=c.rs.labels, threshold=c.threshold)
    w.save(fig, heading)


def _pareto_page(w: _Writer, c: _Context) -> None:
    heading = f"Pareto frontiers: final {c.metric} (IQM, 95% CI) vs cost; filled = non-dominated"
    fig, axes = w.page(heading, 2, 2)
    costs = c.costs.set_index("label")
    specs = [("s_per_iter", "seconds per training iteration (s)", True),
             ("seconds_total", "total training seconds (s)", True),
             ("nfe_total", "total denoiser forward passes (NFE)", False),
             ("peak_mem_mb", "peak memory (MB)", True)]
    for ax, (col, label, wall) in zip(axes.flat, specs):
        if wall and not c.wall_ok:
            plots.note(ax, f"{label}: omitted, " + "; ".join(c.wall_problems))
            continue
        pts = c.final.copy()
        pts["cost"] = pts["label"].map(costs[col])
        pts["front"] = stats.pareto_mask(pts["value"], pts["cost"])
        plots.pareto(ax, pts, label, _reward_label(c.rs, c.metric), legend=False)
    handles = plots.legend_handles(c.rs.labels)
    fig.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, 0.955), ncol=min(len(handles), 8),
               fontsize=8, frameon=False)
    w.save(fig, heading, rect_top=0.92)


def _timing_page(w: _Writer, c: _Context) -> None:
    heading = "Where the time goes: seconds per iteration by phase"
    fig, axes = w.page(heading, 1, 2, gridspec_kw={"width_ratios": [2, 1]})
    if c.wall_ok:
        ph = c.costs[["label", *plots.PHASE_LABELS]].copy()
        s_iter = c.costs["s_per_iter"].to_numpy(dtype=float)
        other = s_iter - ph[list(plots.PHASE_LABELS)].fillna(0).sum(axis=1).to_numpy()
        if np.nanmax(np.abs(other), initial=0) > 1e-6 * max(np.nanmax(s_iter, initial=0), 1e-9):
            ph["other_s"] = np.clip(other, 0, None)
        plots.phase_breakdown(axes[0, 0], ph)
    else:
        plots.note(axes[0, 0], "timing omitted: " + "; ".join(c.wall_problems))
    ax = axes[0, 1]
    per = (c.costs["nfe_total"] / c.costs["samples_total"]).to_numpy(dtype=float)
    labs = list(c.costs["label"])[::-1]
    ax.barh(range(len(labs)), per[::-1], color=[plots.color(lab) for lab in labs], height=0.6)
    for y, v in enumerate(per[::-1]):
        ax.text(v, y, f" {_fmt(v)}", va="center", fontsize=8)
    ax.set_yticks(range(len(labs)), labs)
    for t in ax.get_yticklabels():
        t.set_color(plots.color(t.get_text()))
    ax.set_xlabel("denoiser forward passes (NFE) per scored sample")
    ax.set_xlim(0, np.nanmax(per, initial=1) * 1.25 if np.isfinite(per).any() else 1)
    ax.grid(axis="x", alpha=0.3)
    w.save(fig, heading)


def _kd_page(w: _Writer, c: _Context) -> None:
    g = _grid_runs(c.rs, "cfg.algo.k", "cfg.algo.d")
    if g.empty or len(g[["cfg.algo.k", "cfg.algo.d"]].drop_duplicates()) < 2:
        return
    fs = final_scores(c.rs, c.metric).set_index("run")["value"]
    g = g.assign(final=g["run"].map(fs))
    algos = list(dict.fromkeys(g["algo"]))
    heading = "k/d ablation: branching factor k x branching depth d"
    fig, axes = w.page(heading, len(algos), 3)
    for row, algo in zip(axes, algos):
        ga = g[g["algo"] == algo]
        cells = []
        for (k, d), cell in ga.groupby(["cfg.algo.k", "cfg.algo.d"]):
            v = cell["final"].dropna().to_numpy(dtype=float)
            cells.append({"k": k, "d": d, "reward": stats.iqm(v) if v.size else math.nan,
                          "s_iter": cell["s_per_iter"].mean(), "mem": cell["peak_mem_mb"].mean(),
                          "short": bool((~cell["stop_reason"].astype(str).str.startswith("budget")).any())})
        cf = pd.DataFrame(cells)
        specs = [("reward", f"{algo}: final {c.metric} (IQM)", c.metric, "{:.3f}", True, True),
                 ("s_iter", f"{algo}: seconds / iteration", "s / iteration", "{:.3g}", False, False),
                 ("mem", f"{algo}: peak memory", "MB", "{:.0f}", False, False)]
        for ax, (col, title, cbar, fmt, better_high, anywhere) in zip(row, specs):
            if not anywhere and not c.wall_ok:
                plots.note(ax, title + ": omitted (runs on different devices)")
                continue
            tab = cf.pivot(index="d", columns="k", values=col).sort_index().sort_index(axis=1)
            tab.index.name, tab.columns.name = "d (branching depth, SDE steps)", "k (branching factor)"
            marks = cf.pivot(index="d", columns="k", values="short").reindex_like(tab).fillna(False)
            plots.heatmap(ax, tab, title, cbar, fmt=fmt, higher_is_better=better_high, marks=marks)
    if (~g["stop_reason"].astype(str).str.startswith("budget")).any():
        fig.text(0.02, 0.01, "* includes runs that did not spend their whole budget (pruned, interrupted or "
                 "failed): their final values come from fewer iterations.", fontsize=8)
    w.save(fig, heading)


def _window_page(w: _Writer, c: _Context) -> None:
    key = next((k for k in WINDOW_KEYS if k in c.rs.runs and c.rs.runs[k].dropna().nunique() >= 2), None)
    if key is None:
        return
    g = c.rs.runs.dropna(subset=[key])
    fs = final_scores(c.rs, c.metric).set_index("run")["value"]
    g = g.assign(final=g["run"].map(fs))
    rows_r, rows_t = [], []
    for (algo, win), cell in g.groupby(["algo", key]):
        v = cell["final"].dropna().to_numpy(dtype=float)
        if v.size:
            p, lo, hi = stats.bootstrap_ci(v, reps=c.opt.reps)
            rows_r.append({"label": algo, "param": float(win), "value": p, "lo": lo, "hi": hi})
        t = cell["s_per_iter"].to_numpy(dtype=float)
        rows_t.append({"label": algo, "param": float(win), "value": np.nanmean(t), "lo": np.nanmin(t),
                       "hi": np.nanmax(t)})
    heading = f"Window size ({key.removeprefix('cfg.')})"
    fig, axes = w.page(heading, 1, 2)
    plots.param_curve(axes[0, 0], pd.DataFrame(rows_r), "window size (denoising steps)",
                      _reward_label(c.rs, c.metric), title=f"final {c.metric} (IQM, 95% CI)")
    if c.wall_ok:
        plots.param_curve(axes[0, 1], pd.DataFrame(rows_t), "window size (denoising steps)",
                          "seconds per iteration (s)", title="time per iteration (mean; bars: min-max)")
    else:
        plots.note(axes[0, 1], "time omitted: runs on different devices")
    w.save(fig, heading)


def _checkpoints(ev: pd.DataFrame, n: int) -> list[int]:
    idx = list(range(len(ev)))
    if len(idx) <= n:
        return idx
    return sorted({round(i) for i in np.linspace(0, len(idx) - 1, n)})


def _cell_label(c: _Context, ev: pd.DataFrame, i: int, keys: Sequence[str]) -> str:
    vals = [_fmt(ev.loc[i, k], 4) for k in keys if k in ev]
    return f"it {int(ev.loc[i, 'iteration'])}: " + " / ".join(vals)


def _sample_rows(c: _Context, runs: Sequence[str], pick: dict[str, Sequence[int]] | None = None,
                 keys: Sequence[str] | None = None) -> list:
    rows = []
    r = c.rs.runs.set_index("run")
    for run in runs:
        ev = c.rs.evals[c.rs.evals["run"] == run].sort_values("iteration").reset_index(drop=True)
        if "samples_png" not in ev:
            continue
        ev = ev.dropna(subset=["samples_png"]).reset_index(drop=True)
        if ev.empty:
            continue
        chosen = pick[run] if pick else _checkpoints(ev, MAX_GRID_COLS)
        base = Path(r.loc[run, "path"])
        cells = [(_cell_label(c, ev, i, keys or [c.metric]), base / str(ev.loc[i, "samples_png"]))
                 for i in chosen if i < len(ev)]
        lab = r.loc[run, "label"]
        rows.append((f"{lab} s{r.loc[run, 'seed']}", cells))
    return rows


def _samples_page(w: _Writer, c: _Context) -> None:
    first = c.rs.runs.drop_duplicates("label")["run"].tolist()
    for start in range(0, max(len(first), 1), MAX_GRID_ROWS):
        chunk = first[start:start + MAX_GRID_ROWS]
        heading = "Eval samples across checkpoints (fixed prompts and noise; first seed of each method)"
        if len(first) > MAX_GRID_ROWS:
            heading += f" ({start // MAX_GRID_ROWS + 1}/{math.ceil(len(first) / MAX_GRID_ROWS)})"
        fig, axes = w.page(heading)
        plots.image_grid(axes[0, 0], _sample_rows(c, chunk),
                         title=f"column labels: training iteration: {c.metric.split('/', 1)[-1]}")
        w.save(fig, heading)


def _hacking_pages(w: _Writer, c: _Context) -> None:
    flagged = [run for run, f in c.hacking.items() if any(f)]
    # flagged runs first, then the first seed of each label for context, four panels at most
    shown = list(dict.fromkeys(flagged[:4] + c.rs.runs.drop_duplicates("label")["run"].tolist()))[:4]
    heading = "Reward hacking: " + (f"FLAGGED in {len(flagged)} run(s)" if flagged else
                                    "not flagged" if c.rs.heldout_keys() else "no held-out reward to check")
    rule = ("Rule: over 3 consecutive evaluations the training reward's eval score rises at every step while "
            "some held-out reward falls at every step. Shaded: the flagged evaluation windows.")
    n = max(len(shown), 1)
    ncols = 2 if n > 1 else 1
    fig, axes = w.page(heading, math.ceil(n / ncols), ncols)
    train, held = c.rs.train_eval_key(), c.rs.heldout_keys()
    for ax, run in zip(axes.flat, shown):
        ev = c.rs.evals[c.rs.evals["run"] == run].sort_values("iteration")
        plots.reward_hacking_panel(ax, ev, train, held, c.hacking.get(run, []),
                                   title=f"{run}: FLAGGED" if run in flagged else f"{run}: not flagged")
    for ax in list(axes.flat)[len(shown):]:
        ax.set_axis_off()
    if not shown:
        plots.note(axes[0, 0], "no evaluation records")
    fig.text(0.02, 0.925, rule, fontsize=9, ha="left")
    w.save(fig, heading, rect_top=0.91)
    if flagged:
        pick = {}
        for run in flagged[:MAX_GRID_ROWS]:
            fl = c.hacking[run]
            idx = sorted({j for i, f in enumerate(fl) if f for j in range(max(0, i - 2), i + 1)})
            pick[run] = idx[-MAX_GRID_COLS:]
        heading = "Reward hacking: eval samples of the flagged windows"
        fig, axes = w.page(heading)
        plots.image_grid(axes[0, 0], _sample_rows(c, list(pick), pick, keys=c.rs.eval_keys()),
                         title="column labels: training iteration: "
                               + " / ".join(k.split("/", 1)[-1] for k in c.rs.eval_keys()))
        w.save(fig, heading)


def _final_rows(c: _Context) -> pd.DataFrame:
    """Final IQM [95% CI] per eval reward and P(improvement over the baseline) on the primary metric."""
    rs = c.rs
    keys = rs.eval_keys()
    fin = {k: (c.final if k == c.metric else final_table(rs, k, c.opt.reps)).set_index("label") for k in keys}
    fs = final_scores(rs, c.metric)
    base_scores = fs.loc[fs["label"] == c.baseline, "value"].to_numpy(dtype=float)
    rows = []
    for lab in rs.labels:
        row = {"method": lab, "runs": int(fin[c.metric].loc[lab, "n"])}
        for k in keys:
            f = fin[k].loc[lab]
            row[f"final {k} IQM [95% CI]"] = _fmt_ci(f["value"], f["lo"], f["hi"])
        mine = fs.loc[fs["label"] == lab, "value"].to_numpy(dtype=float)
        col = f"P(improve over baseline) on {c.metric} [95% CI]"
        if lab != c.baseline and mine.size and base_scores.size:
            p, lo, hi = stats.probability_of_improvement_ci(mine, base_scores, reps=c.opt.reps)
            row[col] = f"{p:.2f} [{lo:.2f}, {hi:.2f}]"
        else:
            row[col] = "-"
        rows.append(row)
    return pd.DataFrame(rows)


def _cost_rows(c: _Context) -> pd.DataFrame:
    rows = []
    wall = (lambda v, d=3: _fmt(v, d)) if c.wall_ok else (lambda v, d=3: "n/a")
    for _, r in c.costs.iterrows():
        rows.append({
            "method": r["label"],
            "s / iteration": wall(r["s_per_iter"]),
            "rollout s/it": wall(r["t_rollout_s"]),
            "reward s/it": wall(r["t_reward_s"]),
            "update s/it": wall(r["t_update_s"]),
            "iterations": _fmt(r["iterations"], 4),
            "samples": _fmt(r["samples_total"], 6),
            "NFE": _fmt(r["nfe_total"], 4),
            "NFE / sample": _fmt(r["nfe_total"] / r["samples_total"]),
            "train seconds": wall(r["seconds_total"], 4),
            "peak MB": wall(r["peak_mem_mb"], 4),
        })
    return pd.DataFrame(rows)


_AXIS_NAMES = {"samples": "samples", "nfe": "NFE", "seconds": "seconds", "modeled": "modeled s"}
_AXIS_WORDS = {"samples": "", "nfe": "", "seconds": " of training wall-clock", "modeled": " of modeled time"}


def _speedup_rows(c: _Context) -> tuple[pd.DataFrame, list[str]]:
    """Budget to reach R and speed-up vs the baseline per budget currency; plus one sentence per method
    on the wall-clock axis (or the chosen axis when wall-clock is not comparable)."""
    axes = [a for a in X_AXES if c.axis_allowed(a)]
    if not np.isfinite(c.threshold):
        return pd.DataFrame(), ["(no threshold: the baseline has no final evaluation)"]
    sp = {a: stats.speedups(c.curve(a, c.metric), c.baseline, c.threshold).set_index("label") for a in axes}
    rows = []
    for lab in c.rs.labels:
        row = {"method": lab}
        for a in axes:
            s = sp[a].loc[lab] if lab in sp[a].index else None
            row[f"{_AXIS_NAMES[a]} to reach R"] = _fmt_budget(s["budget_to_threshold"], a) if s is not None else "-"
            row[f"speed-up ({_AXIS_NAMES[a]})"] = (f"{s['speedup']:.2f}x" if s is not None and np.isfinite(s["speedup"])
                                      else "-")
        rows.append(row)
    sentence_axis = "seconds" if "seconds" in axes else c.opt.x
    lines = []
    for lab in c.rs.labels:
        if lab == c.baseline or lab not in sp[sentence_axis].index:
            continue
        s = sp[sentence_axis].loc[lab]
        if np.isfinite(s["speedup"]):
            word = "faster" if s["speedup"] >= 1 else "slower"
            factor = s["speedup"] if s["speedup"] >= 1 else 1 / s["speedup"]
            lines.append(f"{lab} is {factor:.1f}x {word} than {c.baseline} to reach reward {_fmt(c.threshold, 4)} "
                         f"({_fmt_budget(s['budget_to_threshold'], sentence_axis)} vs "
                         f"{_fmt_budget(s['baseline_budget'], sentence_axis)}{_AXIS_WORDS[sentence_axis]})")
        else:
            mine, base = s["budget_to_threshold"], s["baseline_budget"]
            lines.append(
                f"{lab} {'reaches' if np.isfinite(mine) else 'does not reach'} reward {_fmt(c.threshold, 4)}"
                + (f" ({_fmt_budget(mine, sentence_axis)}{_AXIS_WORDS[sentence_axis]})" if np.isfinite(mine) else "")
                + f"; {c.baseline} {'needs ' + _fmt_budget(base, sentence_axis) if np.isfinite(base) else 'does not'}")
    return pd.DataFrame(rows), lines


def _tables_page(w: _Writer, c: _Context) -> None:
    """Tables, packed top-down onto as few pages as fit: final rewards, cost, speed-up, sentences."""
    speed, lines = _speedup_rows(c)
    sections: list[tuple[str, Any]] = [
        (f"Final rewards at each run's last evaluation (IQM over seeds; baseline {c.baseline})", _final_rows(c)),
        ("Cost per method (mean over runs)", _cost_rows(c)),
        ((f"Budget to reach {c.metric} >= R = {_fmt(c.threshold, 4)} on the IQM curve; speed-up = the "
          f"baseline's ({c.baseline}) budget / the method's budget"), speed),
        ("In words:", _wrap(lines, 140)),
    ]
    title_pt, gap_pt, line_pt = 20.0, 16.0, 8 * 1.3
    page_h = PAGE_SIZE[1] * 72
    top, bottom = 0.92 * page_h, 0.05 * page_h

    def body_pt(body: Any) -> float:
        return plots.table_height_pt(body) if isinstance(body, pd.DataFrame) else line_pt * max(len(body), 1)

    pages: list[list[tuple[str, Any]]] = [[]]
    used = 0.0
    for sec in sections:
        need = title_pt + body_pt(sec[1]) + gap_pt
        if pages[-1] and used + need > top - bottom:
            pages.append([])
            used = 0.0
        pages[-1].append(sec)
        used += need
    for n, secs in enumerate(pages, 1):
        heading = f"Tables (baseline: {c.baseline})" + (f" ({n}/{len(pages)})" if len(pages) > 1 else "")
        fig = plt.figure(figsize=PAGE_SIZE)
        fig.suptitle(heading, fontsize=13, fontweight="bold", x=0.02, ha="left")
        y = top
        for title, body in secs:
            h = body_pt(body)
            y -= title_pt
            ax = fig.add_axes((0.04, (y - h) / page_h, 0.92, h / page_h))
            if isinstance(body, pd.DataFrame):
                plots.table(ax, body, title=title)
            else:
                ax.set_axis_off()
                ax.set_title(title, fontsize=10, loc="left")
                plots.text_block(ax, body, fontsize=8, top=1.0)
            y -= h + gap_pt
        w.save(fig, heading, tight=False)
