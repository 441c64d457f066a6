"""Descriptive statistics of runs under equal budgets: per-method means with t intervals, learning
curves on a shared budget grid, the Pareto set. Pure functions of arrays/frames.

Comparisons between methods (paired differences, permutation p-values, Holm, the outcome rule, cost
brackets) are in :mod:`reports.inference`; this module describes one method at a time, with the same
conventions: the **mean over seeds** and a **Student-t 95% interval** (one-sample, df = n - 1), only
with at least ``MIN_N_FOR_INTERVAL`` (3) runs. (The interquartile mean and percentile bootstrap of the
rliable protocol were dropped: at 3-10 seeds the IQM is the mean or nearly, and a percentile
bootstrap of 3 seeds covers about 72% for a nominal 95%: docs/REPORTS.md.)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from reports.inference import MIN_SEEDS, mean_interval
from reports.tdist import t_ppf

#: Fewest runs per side for a confidence interval.
MIN_N_FOR_INTERVAL = MIN_SEEDS


@dataclass(frozen=True)
class Summary:
    """A sample of per-run values: mean and its 95% t interval, or (n < 3) the values and no interval."""

    values: tuple[float, ...]
    point: float
    lo: float
    hi: float

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def has_interval(self) -> bool:
        return self.n >= MIN_N_FOR_INTERVAL

    def text(self, digits: int = 3, sign: bool = False) -> str:
        f = f"{{:{'+' if sign else ''}.{digits}f}}"
        if self.n == 0:
            return "-"
        if self.has_interval:
            return f"{f.format(self.point)} [{f.format(self.lo)}, {f.format(self.hi)}]"
        vals = ", ".join(f.format(v) for v in self.values)
        return f"{vals} (n = {self.n}, no interval)"


def summarize(values: Any) -> Summary:
    """Mean + one-sample t 95% interval when there are at least 3 finite values; else the values with
    NaN bounds (an "interval" from 2 runs reads as more certain than it is)."""
    v = np.asarray(values, dtype=float).reshape(-1)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return Summary((), math.nan, math.nan, math.nan)
    point, lo, hi = mean_interval(v)
    return Summary(tuple(float(x) for x in v), point, lo, hi)


def pointwise_t(curves: Any, confidence: float = 0.95) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For curves [runs, points]: (mean [P], lower [P], upper [P]) with a one-sample t interval at each
    point (NaN bounds below 3 runs)."""
    a = np.asarray(curves, dtype=float)
    if a.ndim != 2 or a.shape[0] == 0:
        raise ValueError(f"curves must be [runs, points], got {a.shape}")
    point = a.mean(axis=0)
    n = a.shape[0]
    if n < MIN_N_FOR_INTERVAL:
        nan = np.full(a.shape[1], np.nan)
        return point, nan, nan.copy()
    half = float(t_ppf((1 + confidence) / 2, n - 1)) * a.std(axis=0, ddof=1) / math.sqrt(n)
    return point, point - half, point + half


# --------------------------------------------------------------------------------------- budget grid

def interpolate(xs: Any, ys: Any, grid: Any, hold_last: bool = False) -> np.ndarray:
    """Piecewise-linear y on ``grid``; NaN before min(xs) and (unless ``hold_last``, which keeps the
    final value: a stopped run keeps its final policy) after max(xs); no other extrapolation.
    Non-finite points are dropped; repeated x keeps the last record."""
    xs, ys, grid = (np.asarray(v, dtype=float) for v in (xs, ys, grid))
    ok = np.isfinite(xs) & np.isfinite(ys)
    xs, ys = xs[ok], ys[ok]
    out = np.full(grid.shape, np.nan)
    if xs.size == 0:
        return out
    order = np.argsort(xs, kind="stable")
    xs, ys = xs[order], ys[order]
    keep = np.append(xs[1:] != xs[:-1], True)  # last of each repeated x
    xs, ys = xs[keep], ys[keep]
    inside = (grid >= xs[0]) & ((grid <= xs[-1]) | hold_last)
    out[inside] = np.interp(grid[inside], xs, ys)  # np.interp holds the end values outside
    return out


def budget_grid(frame: pd.DataFrame, x: str, points: int = 60) -> np.ndarray:
    """Shared grid from 0 to the largest budget any run reached on column ``x``."""
    top = pd.to_numeric(frame[x], errors="coerce").max() if len(frame) else float("nan")
    if not np.isfinite(top) or top <= 0:
        return np.zeros(1)
    return np.linspace(0.0, float(top), points)


def curves_on_grid(frame: pd.DataFrame, x: str, y: str, grid: Any, hold_last: bool = False
                   ) -> tuple[list[str], np.ndarray]:
    """(run ids, [runs, points]) of column y interpolated onto grid, one row per run."""
    runs, rows = [], []
    for run, g in frame.groupby("run", sort=False):
        if y not in g:
            continue
        runs.append(run)
        rows.append(interpolate(pd.to_numeric(g[x], errors="coerce"), pd.to_numeric(g[y], errors="coerce"),
                                grid, hold_last))
    return runs, (np.vstack(rows) if rows else np.empty((0, len(np.asarray(grid)))))


def aggregate_curves(frame: pd.DataFrame, x: str, y: str, points: int = 60) -> pd.DataFrame:
    """Tidy learning curves: per label and grid point the mean over runs and its 95% t interval.

    Each run is interpolated linearly between its records and holds its final value after it stopped
    (a run that spent less of the budget keeps its final policy), up to the label's longest run; a grid
    point is kept only where every run of the label has started (so the aggregate never silently drops
    seeds). The last point is therefore the mean of the runs' final values. ``evaluated`` marks the grid
    points where one of the label's runs has a record (the curve between them is a straight line).
    Columns: label, x, value, lo, hi, n, evaluated."""
    cols = ["label", "x", "value", "lo", "hi", "n", "evaluated"]
    if frame.empty or y not in frame:
        return pd.DataFrame(columns=cols)
    shared = budget_grid(frame, x, points)
    out = []
    for label, g in frame.groupby("label", sort=False):
        # the shared grid plus every budget at which one of this label's runs logged a record, so
        # a curve ends exactly at its final value and short runs (a few records) are not lost between
        # grid points
        xs = pd.to_numeric(g[x], errors="coerce").to_numpy(dtype=float)
        xs = xs[np.isfinite(xs) & pd.to_numeric(g[y], errors="coerce").notna().to_numpy()]
        if xs.size == 0:
            continue
        grid = np.union1d(shared, xs)
        grid = grid[grid <= xs.max()]
        _, curves = curves_on_grid(g, x, y, grid, hold_last=True)
        if curves.shape[0] == 0:
            continue
        full = np.all(np.isfinite(curves), axis=0)
        if not full.any():
            continue
        value, lo, hi = pointwise_t(curves[:, full])
        out.append(pd.DataFrame({"label": label, "x": grid[full], "value": value, "lo": lo, "hi": hi,
                                 "n": curves.shape[0], "evaluated": np.isin(grid[full], xs)}))
    return pd.concat(out, ignore_index=True) if out else pd.DataFrame(columns=cols)


# --------------------------------------------------------------------------------------- Pareto

def pareto_mask(reward: Sequence[float], cost: Sequence[float]) -> np.ndarray:
    """True for non-dominated points (maximise reward, minimise cost). A point is dominated when
    another has reward >= and cost <= with at least one strict; NaN points are never on the front."""
    r, c = np.asarray(reward, dtype=float), np.asarray(cost, dtype=float)
    ok = np.isfinite(r) & np.isfinite(c)
    mask = np.zeros(r.shape, dtype=bool)
    for i in np.flatnonzero(ok):
        better_or_eq = ok & (r >= r[i]) & (c <= c[i])
        strictly = (r > r[i]) | (c < c[i])
        mask[i] = not np.any(better_or_eq & strictly)
    return mask
