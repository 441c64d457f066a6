"""Statistics for comparing runs under equal budgets. Pure functions of arrays/frames.

Aggregation follows the rliable protocol (Agarwal et al., "Deep RL at the Edge of the Statistical
Precipice", NeurIPS 2021, arXiv 2108.13264), implemented here because the ``rliable`` package pulls in
arch/statsmodels/seaborn:

* interquartile mean (IQM): the mean of the middle 50% of all run x task scores, i.e.
  ``scipy.stats.trim_mean(scores, 0.25)`` (``int(0.25 * n)`` values cut from each end);
* stratified bootstrap: resample runs with replacement independently within each task, recompute the
  statistic; 95% confidence interval = the 2.5th and 97.5th percentiles (rliable's default "percentile"
  method);
* probability of improvement P(X > Y) = mean over tasks of the Mann-Whitney U statistic / (n_x * n_y)
  (ties count 1/2), with a CI from independent stratified bootstraps of X and Y.

A "task" here is one score column (e.g. one eval reward or one grid point); a single 1-D array of
per-seed scores is one task.

Small samples: with fewer than ``MIN_N_FOR_INTERVAL`` (3) runs a bootstrap "interval" is only the
min-max of the values (n = 2) or a point (n = 1), so ``summarize`` gives no interval there and says so,
and ``probability_of_improvement`` is not reported unless both sides have at least 3 runs. The
minimum detectable effect (``min_detectable_effect``) is the difference a two-sided test at 5% finds
with 80% power given the seed-to-seed spread, floored at the metric's resolution.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

Statistic = Callable[..., np.ndarray]

#: Fewest runs per side for a confidence interval or a probability of improvement.
MIN_N_FOR_INTERVAL = 3
#: z_{1 - alpha/2} + z_{power} for a two-sided 5% test with 80% power (1.959964 + 0.841621).
MDE_Z = 2.801585


@dataclass(frozen=True)
class Summary:
    """A sample of per-run values: IQM and its 95% CI, or (n < 3) the values and no interval."""

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


def summarize(values: Any, reps: int = 2000, seed: int = 0) -> Summary:
    """IQM + stratified-bootstrap 95% CI when there are at least 3 finite values; else the values with
    NaN bounds (an "interval" from 2 runs is their min-max and reads as certainty)."""
    v = np.asarray(values, dtype=float).reshape(-1)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return Summary((), math.nan, math.nan, math.nan)
    if v.size < MIN_N_FOR_INTERVAL:
        return Summary(tuple(float(x) for x in v), float(iqm(v)), math.nan, math.nan)
    p, lo, hi = bootstrap_ci(v, iqm, reps=reps, seed=seed)
    return Summary(tuple(float(x) for x in v), p, lo, hi)


def difference_ci(x: Any, y: Any, reps: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """(IQM(x) - IQM(y), lower, upper): independent stratified bootstraps of both samples (95%).
    NaN bounds unless both have at least 3 values."""
    a, b = (np.asarray(v, dtype=float).reshape(-1) for v in (x, y))
    a, b = a[np.isfinite(a)], b[np.isfinite(b)]
    if a.size == 0 or b.size == 0:
        return math.nan, math.nan, math.nan
    point = float(iqm(a) - iqm(b))
    if min(a.size, b.size) < MIN_N_FOR_INTERVAL:
        return point, math.nan, math.nan
    rng = np.random.default_rng(seed)
    ba = iqm(stratified_bootstrap(a, reps, rng)[:, :, 0], axis=1)
    bb = iqm(stratified_bootstrap(b, reps, rng)[:, :, 0], axis=1)
    lo, hi = np.percentile(ba - bb, [2.5, 97.5])
    return point, float(lo), float(hi)


def pooled_sd(groups: Sequence[Any]) -> float:
    """Within-group standard deviation pooled over groups (each with >= 2 finite values):
    sqrt(sum (n_i - 1) s_i^2 / sum (n_i - 1)); NaN when no group has two values."""
    num, den = 0.0, 0
    for g in groups:
        v = np.asarray(g, dtype=float).reshape(-1)
        v = v[np.isfinite(v)]
        if v.size >= 2:
            num += (v.size - 1) * float(np.var(v, ddof=1))
            den += v.size - 1
    return math.sqrt(num / den) if den else math.nan


def min_detectable_effect(sd: float, n_x: int, n_y: int, resolution: float = 0.0) -> float:
    """Smallest true difference of means a two-sided 5% test detects with 80% power:
    (z_0.975 + z_0.8) * sd * sqrt(1/n_x + 1/n_y) (normal approximation), never below ``resolution``
    (the metric cannot resolve smaller differences). NaN when sd is unknown or a side is empty."""
    if not (np.isfinite(sd) and n_x >= 1 and n_y >= 1):
        return math.nan
    mde = MDE_Z * float(sd) * math.sqrt(1.0 / n_x + 1.0 / n_y)
    return max(mde, float(resolution) if np.isfinite(resolution) else 0.0)


# --------------------------------------------------------------------------------------- aggregates

def iqm(scores: Any, axis: int | None = None) -> Any:
    """Interquartile mean: trimmed mean cutting ``int(0.25 * n)`` values from each end.
    ``axis=None`` flattens (all runs x tasks, as rliable does)."""
    a = np.asarray(scores, dtype=float)
    if axis is None:
        a, axis = a.reshape(-1), 0
    a = np.sort(np.moveaxis(a, axis, -1), axis=-1)
    n = a.shape[-1]
    if n == 0:
        raise ValueError("iqm of an empty array")
    cut = int(0.25 * n)
    return a[..., cut:n - cut].mean(axis=-1)


def mean(scores: Any, axis: int | None = None) -> Any:
    return np.mean(np.asarray(scores, dtype=float), axis=axis)


def median(scores: Any, axis: int | None = None) -> Any:
    return np.median(np.asarray(scores, dtype=float), axis=axis)


def _as_matrix(scores: Any) -> np.ndarray:
    a = np.asarray(scores, dtype=float)
    if a.ndim == 1:
        a = a[:, None]
    if a.ndim != 2 or a.shape[0] == 0:
        raise ValueError(f"scores must be [runs] or [runs, tasks] with at least one run, got {a.shape}")
    return a


def stratified_bootstrap(scores: Any, reps: int, rng: np.random.Generator) -> np.ndarray:
    """[reps, runs, tasks] resamples: runs drawn with replacement independently within each task."""
    a = _as_matrix(scores)
    n, t = a.shape
    idx = rng.integers(0, n, size=(reps, n, t))
    return np.take_along_axis(np.broadcast_to(a, (reps, n, t)), idx, axis=1)


def bootstrap_ci(
    scores: Any,
    statistic: Statistic = iqm,
    reps: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
) -> tuple[float, float, float]:
    """(point, lower, upper): statistic over all runs x tasks and its stratified-bootstrap percentile CI."""
    a = _as_matrix(scores)
    point = float(statistic(a, axis=None))
    boot = stratified_bootstrap(a, reps, np.random.default_rng(seed))
    values = statistic(boot.reshape(reps, -1), axis=1)
    alpha = (1.0 - confidence) / 2
    lo, hi = np.percentile(values, [100 * alpha, 100 * (1 - alpha)])
    return point, float(lo), float(hi)


def pointwise_ci(
    curves: Any,
    statistic: Statistic = iqm,
    reps: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For curves [runs, points]: (point [P], lower [P], upper [P]) treating each point as its own task
    (one bootstrap of the runs, shared across points, so the band is a coherent set of curves)."""
    a = np.asarray(curves, dtype=float)
    if a.ndim != 2 or a.shape[0] == 0:
        raise ValueError(f"curves must be [runs, points], got {a.shape}")
    point = statistic(a, axis=0)
    idx = np.random.default_rng(seed).integers(0, a.shape[0], size=(reps, a.shape[0]))
    boot = a[idx]  # [reps, runs, points]
    values = statistic(boot, axis=1)  # [reps, points]
    alpha = (1.0 - confidence) / 2
    lo, hi = np.percentile(values, [100 * alpha, 100 * (1 - alpha)], axis=0)
    return point, lo, hi


def probability_of_improvement(x: Any, y: Any) -> float:
    """P(X > Y): per task, the fraction of (x_i, y_j) pairs with x_i > y_j (ties 1/2), averaged over
    tasks. x: [runs_x] or [runs_x, tasks]; y likewise with the same tasks."""
    a, b = _as_matrix(x), _as_matrix(y)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"x and y need the same tasks, got {a.shape[1]} and {b.shape[1]}")
    diff = a[:, None, :] - b[None, :, :]  # [nx, ny, tasks]
    u = (diff > 0).sum(axis=(0, 1)) + 0.5 * (diff == 0).sum(axis=(0, 1))
    return float(np.mean(u / (a.shape[0] * b.shape[0])))


def probability_of_improvement_ci(
    x: Any, y: Any, reps: int = 2000, confidence: float = 0.95, seed: int = 0
) -> tuple[float, float, float]:
    """(P(X > Y), lower, upper) with independent stratified bootstraps of X and Y."""
    a, b = _as_matrix(x), _as_matrix(y)
    rng = np.random.default_rng(seed)
    ba, bb = stratified_bootstrap(a, reps, rng), stratified_bootstrap(b, reps, rng)
    diff = ba[:, :, None, :] - bb[:, None, :, :]  # [reps, nx, ny, tasks]
    u = (diff > 0).sum(axis=(1, 2)) + 0.5 * (diff == 0).sum(axis=(1, 2))
    values = (u / (a.shape[0] * b.shape[0])).mean(axis=1)
    alpha = (1.0 - confidence) / 2
    lo, hi = np.percentile(values, [100 * alpha, 100 * (1 - alpha)])
    return probability_of_improvement(a, b), float(lo), float(hi)


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


def aggregate_curves(
    frame: pd.DataFrame, x: str, y: str, points: int = 60, reps: int = 2000, seed: int = 0,
    statistic: Statistic = iqm,
) -> pd.DataFrame:
    """Tidy learning curves: per label and grid point the IQM over runs and its 95% CI.

    Each run is interpolated linearly between its records and holds its final value after it stopped
    (a run that spent less of the budget keeps its final policy), up to the label's longest run; a grid
    point is kept only where every run of the label has started (so the aggregate never silently drops
    seeds). The last point is therefore the IQM of the runs' final values.
    Columns: label, x, value, lo, hi, n."""
    if frame.empty or y not in frame:
        return pd.DataFrame(columns=["label", "x", "value", "lo", "hi", "n"])
    shared = budget_grid(frame, x, points)
    out = []
    for label, g in frame.groupby("label", sort=False):
        # the shared grid plus every budget at which one of this label's runs logged a record, so
        # a curve ends exactly at its final value and short runs (a few records) are not lost between
        # grid points
        xs = pd.to_numeric(g[x], errors="coerce").to_numpy(dtype=float)
        xs = xs[np.isfinite(xs)]
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
        value, lo, hi = pointwise_ci(curves[:, full], statistic, reps=reps, seed=seed)
        out.append(pd.DataFrame({"label": label, "x": grid[full], "value": value, "lo": lo, "hi": hi,
                                 "n": curves.shape[0]}))
    return pd.concat(out, ignore_index=True) if out else pd.DataFrame(
        columns=["label", "x", "value", "lo", "hi", "n"])


# --------------------------------------------------------------------------------------- thresholds

def time_to_threshold(xs: Any, ys: Any, threshold: float, rtol: float = 1e-9) -> float:
    """The first budget x at which the piecewise-linear curve (xs, ys) reaches ``threshold``
    (linear interpolation inside the crossing segment); NaN if it never does. Values within
    ``rtol * |threshold|`` below it count as reaching it (a curve reaches its own final value despite
    rounding in the aggregation)."""
    xs, ys = np.asarray(xs, dtype=float), np.asarray(ys, dtype=float)
    threshold = float(threshold) - rtol * max(abs(float(threshold)), 1e-12)
    ok = np.isfinite(xs) & np.isfinite(ys)
    xs, ys = xs[ok], ys[ok]
    order = np.argsort(xs, kind="stable")
    xs, ys = xs[order], ys[order]
    for i in range(len(xs)):
        if ys[i] >= threshold:
            if i == 0:
                return float(xs[0])
            x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
            return float(x0 + (threshold - y0) * (x1 - x0) / (y1 - y0))
    return math.nan


def _first_crossing(grid: np.ndarray, curves: np.ndarray, thr: np.ndarray) -> np.ndarray:
    """Per row of curves [R, P] on grid [P]: the first x where the piecewise-linear curve reaches
    thr [R] (within a relative 1e-9, as time_to_threshold), NaN if never."""
    thr = thr - 1e-9 * np.maximum(np.abs(thr), 1e-12)
    hit = np.isfinite(curves) & (curves >= thr[:, None])
    out = np.full(curves.shape[0], np.nan)
    any_hit = hit.any(axis=1)
    j = np.argmax(hit, axis=1)
    for r in np.flatnonzero(any_hit):  # one interpolation per row; the search above is vectorised
        k = j[r]
        if k == 0:
            out[r] = grid[0]
        else:
            y0, y1 = curves[r, k - 1], curves[r, k]
            out[r] = grid[k - 1] + (thr[r] - y0) * (grid[k] - grid[k - 1]) / (y1 - y0)
    return out


def speedup_ci(
    base: Any, other: Any, grid: Any, threshold: float | None = None, reps: int = 2000, seed: int = 0
) -> dict[str, float]:
    """Cost to reach a threshold, as a ratio with a bootstrap CI.

    ``base`` [n_b, P] and ``other`` [n_x, P]: per-run curves on the shared budget ``grid`` [P] (held
    at their final value after a run stopped). Threshold R = ``threshold`` or, when None, the
    baseline's final IQM (recomputed in every resample). budget = first x where the IQM curve reaches
    R; speed-up = baseline budget / other budget (> 1: ``other`` needs less). The 95% CI resamples runs
    within each side; a resample where ``other`` never reaches R counts as speed-up 0 (it is slower
    than any finite factor). Bounds are NaN unless both sides have >= 3 runs.
    Returns speedup, lo, hi, budget, baseline_budget, threshold, reached (fraction of resamples)."""
    g = np.asarray(grid, dtype=float)
    a, b = np.asarray(base, dtype=float), np.asarray(other, dtype=float)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != g.size or b.shape[1] != g.size or not len(a) or not len(b):
        raise ValueError(f"curves must be [runs, {g.size}] with at least one run, got {a.shape} and {b.shape}")

    def ratio(ca: np.ndarray, cb: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        ia, ib = iqm(ca, axis=1), iqm(cb, axis=1)  # [R, P]
        thr = np.full(ia.shape[0], float(threshold)) if threshold is not None else ia[:, -1]
        ta, tb = _first_crossing(g, ia, thr), _first_crossing(g, ib, thr)
        with np.errstate(divide="ignore", invalid="ignore"):
            r = np.where(np.isfinite(tb) & (tb > 0), ta / tb, np.where(np.isfinite(tb), np.inf, 0.0))
        return r, ta, tb, thr

    r, ta, tb, thr = ratio(a[None], b[None])
    out = {"speedup": float(r[0]) if np.isfinite(tb[0]) else math.nan, "lo": math.nan, "hi": math.nan,
           "budget": float(tb[0]), "baseline_budget": float(ta[0]), "threshold": float(thr[0]),
           "reached": math.nan}
    if min(len(a), len(b)) >= MIN_N_FOR_INTERVAL:
        rng = np.random.default_rng(seed)
        ia = rng.integers(0, len(a), size=(reps, len(a)))
        ib = rng.integers(0, len(b), size=(reps, len(b)))
        rb, _, tbb, _ = ratio(a[ia], b[ib])
        out["lo"], out["hi"] = (float(v) for v in np.percentile(rb, [2.5, 97.5]))
        out["reached"] = float(np.mean(np.isfinite(tbb)))
    return out


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
