"""What every report page shares: the options, the analysis of one RunSet (scores at the budget, costs,
curves, verdict, reward-hacking table) and the page writer (PDF page + the same figure as PNG/SVG)."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from reports import claims, stats
from reports.hacking import hacking_table
from reports.load import X_AXES, RunSet, axes_present, budget_axis, code_version_problems
from reports.verdict import Verdict, build_verdict, cost_axes

PAGE_SIZE = (11.69, 8.27)  # A4 landscape, inches


@dataclass
class ReportOptions:
    x: str = "samples"               # budget axis of the learning curves: samples | nfe | modeled | seconds
    baseline: str | None = None      # label to compare against (default: dancegrpo if present, else first)
    metric: str | None = None        # eval key of the primary metric (default: eval/<training reward>)
    title: str = "treebench report"
    reps: int = 20000                # Monte-Carlo draws of a permutation p-value beyond 200,000 splits
    points: int = 60                 # budget grid points per axis
    sesoi: dict[str, float] = field(default_factory=dict)  # smallest effects of interest: {metric | "cost": v}
    targets: tuple[float, ...] = claims.TARGET_FRACTIONS     # cost-to-target: fractions of the baseline's gain
    fractions: tuple[float, ...] = claims.BUDGET_FRACTIONS   # matched fractions of the budget
    wall_verdict: bool = False       # also state cost claims in (noisy) wall-clock seconds
    wall_pareto: bool = False        # Pareto panels on wall-clock time and CPU process memory too
    figures: bool = True             # write each page as an image file and the tables as CSV/Markdown
    figure_formats: tuple[str, ...] = ("png", "svg")  # page file formats (SVG skipped for raster pages)
    tuning: tuple[str, ...] = ()     # more folders of tuning studies (<algo>/tuned.json) than the runs' DIR/tuning


# --------------------------------------------------------------------------------------- analysis

def final_scores(rs: RunSet, key: str, sched: claims.Schedule | None = None) -> pd.DataFrame:
    """Per run: the metric at the budget (label, run, seed, value, gain): the evaluation at the
    schedule's full budget (reports.claims.matched: less than one iteration past it), or, without a
    schedule, the run's last evaluation."""
    ev = claims.eval_table(rs, key)
    if ev.empty:
        return pd.DataFrame(columns=["run", "label", "seed", "value", "gain"])
    if sched is not None:
        ev = claims.matched(ev, sched.column, sched.budget, claims.boundaries(rs, sched.column))
    else:
        ev = ev.groupby("run", sort=False).tail(1)
    return ev[["run", "label", "seed", "value", "gain"]].reset_index(drop=True)


def final_table(rs: RunSet, key: str, sched: claims.Schedule | None = None) -> pd.DataFrame:
    """Per label: the mean of the metric at the budget over its runs and its 95% t interval (NaN bounds
    below 3 runs); ``summary`` the score, ``gain`` the gain over iteration 0 (Summary objects)."""
    fs = final_scores(rs, key, sched)
    rows = []
    for lab in rs.labels:
        s = stats.summarize(fs.loc[fs["label"] == lab, "value"])
        g = stats.summarize(fs.loc[fs["label"] == lab, "gain"])
        rows.append({"label": lab, "value": s.point, "lo": s.lo, "hi": s.hi, "n": s.n, "summary": s, "gain": g})
    return pd.DataFrame(rows)


def cost_table(rs: RunSet) -> pd.DataFrame:
    """Per label: mean over runs of seconds/iteration, total training seconds, NFE, samples, peak memory,
    modeled seconds (when logged) and each phase's seconds/iteration."""
    cols = ["s_per_iter", "seconds_total", "nfe_total", "samples_total", "peak_mem_mb", "iterations",
            "t_rollout_s", "t_reward_s", "t_advantage_s", "t_update_s"]
    df = rs.runs[["label"] + cols].copy()
    for c in cols:
        df[c] = pd.to_numeric(df[c], errors="coerce")
    if "modeled_seconds_total" in rs.iterations:
        last = rs.iterations.sort_values("iteration").groupby("run")["modeled_seconds_total"].last()
        df["modeled_seconds_total"] = rs.runs["run"].map(last).astype(float)
    agg = df.groupby("label", sort=False).mean(numeric_only=True).reset_index()
    return agg.set_index("label").loc[rs.labels].reset_index()


def varies(rs: RunSet, col: str, rel: float = 0.05) -> tuple[bool, str]:
    """Whether a per-run quantity differs between methods enough to rank them on: the spread of the
    label means must exceed ``rel`` of their mean and twice the largest within-label std."""
    v = pd.to_numeric(rs.runs[col], errors="coerce") if col in rs.runs else None
    if v is None or not v.notna().any():
        return False, "not logged"
    means = v.groupby(rs.runs["label"]).mean().dropna()
    sds = v.groupby(rs.runs["label"]).std(ddof=1).fillna(0.0)
    spread = float(means.max() - means.min()) if len(means) else 0.0
    scale = float(abs(means).mean()) if len(means) else 0.0
    if len(means) < 2:
        return False, "only one method"
    if spread <= rel * max(scale, 1e-12):
        return False, f"methods within {100 * spread / max(scale, 1e-12):.1f}% of each other"
    if spread <= 2 * float(sds.max()):
        return False, "method differences within seed-to-seed spread"
    return True, ""


@dataclass
class Context:
    rs: RunSet
    opt: ReportOptions
    baseline: str
    metric: str
    wall_ok: bool
    wall_problems: list[str]
    curves: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.costs = cost_table(self.rs)
        self.present = [a for a in axes_present(self.rs) if self.axis_allowed(a)]
        self.budget = budget_axis(self.rs)
        self.schedule = claims.schedule(self.rs, self.opt.x)
        self.final = final_table(self.rs, self.metric, self.schedule)
        self.code_problems = code_version_problems(self.rs.runs)
        axes = cost_axes(self.rs, self.budget, self.present, self.wall_ok, self.opt.wall_verdict)
        self.verdict: Verdict = build_verdict(self.rs, self.metric, self.baseline, self.schedule, axes,
                                              self.opt.sesoi, self.code_problems, self.opt.fractions,
                                              self.opt.targets, self.opt.reps)
        self.targets = self._target_levels()
        self.hacking = hacking_table(self.rs)

    def _target_levels(self) -> list[tuple[float, float]]:
        """(fraction, score) of each cost-to-target target on the primary metric: the baseline's mean
        iteration-0 score plus the fraction of its mean gain at the budget."""
        gain = self.verdict.notes.get("baseline_gain", math.nan)
        ev = claims.eval_table(self.rs, self.metric)
        start = ev.loc[(ev["label"] == self.baseline) & (ev["iteration"] == 0), "value"]
        if not (np.isfinite(gain) and gain > 0 and len(start)):
            return []
        return [(f, float(start.mean()) + f * gain) for f in self.opt.targets]

    def curve(self, axis: str, key: str) -> pd.DataFrame:
        """Aggregated curve of ``key`` vs budget ``axis``: eval keys from evals, reward_mean from iterations."""
        if (axis, key) not in self.curves:
            frame = self.rs.iterations if key == "reward_mean" else self.rs.evals
            x = X_AXES[axis][0]
            if frame.empty or x not in frame or key not in frame:
                df = pd.DataFrame(columns=["label", "x", "value", "lo", "hi", "n"])
            else:
                df = stats.aggregate_curves(frame, x, key, points=self.opt.points)
                if key == "reward_mean":  # a record every iteration: no markers
                    df["evaluated"] = False
            self.curves[(axis, key)] = df
        return self.curves[(axis, key)]

    def axis_allowed(self, axis: str) -> bool:
        return axis != "seconds" or self.wall_ok


# --------------------------------------------------------------------------------------- formatting

def fmt(v: Any, digits: int = 3) -> str:
    try:
        v = float(v)
    except (TypeError, ValueError):
        return "-"
    return "-" if not np.isfinite(v) else f"{v:.{digits}g}"


def reward_label(rs: RunSet, key: str) -> str:
    name = key.split("/", 1)[-1]
    versions = {r.get("version") for m in rs.manifests.values() for r in m.get("eval_rewards") or []
                if r.get("name") == name}
    v = f" v{versions.pop()}" if len(versions) == 1 else ""
    role = "training reward" if key == rs.train_eval_key() else "held-out"
    return f"{name}{v} ({role}, eval mean)"


def wrap(lines: list[str], width: int) -> list[str]:
    import textwrap

    out = []
    for line in lines:
        indent = " " * (len(line) - len(line.lstrip()) + 4)
        out.extend(textwrap.wrap(line, width, subsequent_indent=indent) or [""])
    return out


# --------------------------------------------------------------------------------------- writer

class Writer:
    """Saves each page to the PDF and, when ``figures_dir`` is set, the same figure as
    ``NN_<slug>.png`` (and ``.svg`` for pages without raster images) there."""

    def __init__(self, pdf: Any, title: str, figures_dir: Path | None = None,
                 formats: tuple[str, ...] = ("png", "svg")) -> None:
        self.pdf, self.title, self.pages, self.figures_dir = pdf, title, [], figures_dir
        self.formats = formats
        self.files: list[Path] = []

    def page(self, heading: str, nrows: int = 1, ncols: int = 1, **kw: Any):
        fig, axes = plt.subplots(nrows, ncols, figsize=PAGE_SIZE, squeeze=False, **kw)
        fig.suptitle(heading, fontsize=13, fontweight="bold", x=0.02, ha="left")
        return fig, axes

    def save(self, fig: plt.Figure, heading: str, tight: bool = True, rect_top: float = 0.95,
             raster: bool = False, rect_bottom: float = 0.02) -> None:
        self.pages.append(heading)
        fig.text(0.98, 0.01, f"{self.title} - page {len(self.pages)}", ha="right", fontsize=7, color="#777777")
        if tight:
            fig.tight_layout(rect=(0, rect_bottom, 1, rect_top))
        self.pdf.savefig(fig)
        if self.figures_dir is not None:
            slug = re.sub(r"[^a-z0-9]+", "_", heading.lower()).strip("_")[:60] or "page"
            stem = self.figures_dir / f"{len(self.pages):02d}_{slug}"
            for fmt_ in self.formats:
                if fmt_ == "svg" and raster:  # an SVG of embedded images is just larger
                    continue
                fig.savefig(stem.with_suffix("." + fmt_), dpi=110)
                self.files.append(stem.with_suffix("." + fmt_))
        plt.close(fig)
