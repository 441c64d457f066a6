"""The verdict: who wins, by how much, and how sure, in one sentence per metric and per cost axis.

Every method is compared with the baseline:

* per eval metric, on the **paired gain** of each run over its own iteration-0 evaluation (with a
  shared ``eval.seed`` every run starts from the same iteration-0 score, so the gain is what training
  did): IQM difference with a 95% bootstrap CI when both sides have >= 3 seeds, else the values and
  "no interval"; when the CI covers 0 (or the difference is below the metric's resolution) the
  sentence says "no detectable difference" with the minimum detectable effect;
* per cost axis (the noise-free axes the runs logged: scored samples, NFE, modeled seconds; wall-clock
  only when asked for and said to be noisy), the cost to reach the baseline's final score on the
  primary metric, as a speed-up with a 95% bootstrap CI.

The sentences are the first thing on page 1 of the PDF and what ``bench compare`` / ``bench report``
print; ``verdict_frame`` holds the same numbers for the CSV/Markdown tables.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from reports import stats
from reports.load import NOISE_FREE_AXES, X_AXES, RunSet

UNITS = {"samples": "scored samples", "nfe": "NFE", "modeled": "modeled seconds",
         "seconds": "wall-clock seconds"}


@dataclass
class Verdict:
    lines: list[str]
    rows: list[dict] = field(default_factory=list)

    def frame(self) -> pd.DataFrame:
        return pd.DataFrame(self.rows)


# --------------------------------------------------------------------------------------- inputs

def gains(rs: RunSet, key: str) -> pd.DataFrame:
    """Per run: the metric at its first evaluation if that was iteration 0 (``start``), at its last
    (``final``) and the paired gain final - start (NaN without an iteration-0 evaluation)."""
    cols = ["run", "label", "seed", "start", "final", "gain"]
    if rs.evals.empty or key not in rs.evals:
        return pd.DataFrame(columns=cols)
    ev = rs.evals.dropna(subset=[key]).sort_values(["run", "iteration"])
    first = ev.groupby("run", sort=False).head(1).set_index("run")
    last = ev.groupby("run", sort=False).tail(1).set_index("run")
    start = first[key].where(first["iteration"] == 0)
    out = last[["label", "seed"]].assign(start=start, final=last[key])
    out["gain"] = out["final"] - out["start"]
    return out.reset_index()[cols]


def resolution(rs: RunSet, key: str) -> float:
    """The metric's resolution on this eval set: the standard error of an eval mean, std / sqrt(images),
    at iteration 0 (median over runs). Differences below it are within what the choice of eval prompts
    and noise alone moves. NaN when the records lack the std or image count."""
    std_key = f"{key}/std"
    if rs.evals.empty or std_key not in rs.evals:
        return math.nan
    ev = rs.evals.sort_values("iteration").groupby("run", sort=False).head(1)
    n = pd.to_numeric(ev["eval_images"], errors="coerce") if "eval_images" in ev else pd.Series(np.nan, ev.index)
    if n.isna().all():  # older run directories: one image per eval prompt
        n = ev["run"].map(lambda r: (rs.manifests[r].get("config") or {}).get("eval", {}).get("num_prompts"))
    se = pd.to_numeric(ev[std_key], errors="coerce") / np.sqrt(pd.to_numeric(n, errors="coerce"))
    se = se[np.isfinite(se)]
    return float(se.median()) if len(se) else math.nan


def metric_name(rs: RunSet, key: str) -> str:
    role = "training reward" if key == rs.train_eval_key() else "held-out"
    return f"{key.split('/', 1)[-1]} ({role})"


def cost_axes(rs: RunSet, budget: str | None, present: list[str], wall_ok: bool,
              include_wall: bool = False) -> list[str]:
    """Noise-free axes present, plus wall-clock seconds when the budget fixed it or it is asked for
    (and the runs share one device); the budget's own axis is kept (a speed-up on it is meaningful)."""
    axes = [a for a in present if a in NOISE_FREE_AXES]
    if "seconds" in present and wall_ok and (include_wall or budget == "seconds"):
        axes.append("seconds")
    return axes


# --------------------------------------------------------------------------------------- sentences

def _n_text(nx: int, nb: int) -> str:
    return f"n = {nx}" if nx == nb else f"n = {nx} vs {nb}"


def metric_verdict(rs: RunSet, key: str, label: str, baseline: str, reps: int) -> dict:
    g = gains(rs, key)
    use = "gain" if g["gain"].notna().any() else "final"
    x = g.loc[g["label"] == label, use].to_numpy(dtype=float)
    b = g.loc[g["label"] == baseline, use].to_numpy(dtype=float)
    x, b = x[np.isfinite(x)], b[np.isfinite(b)]
    res = resolution(rs, key)
    sx, sb = stats.summarize(x, reps), stats.summarize(b, reps)
    what = "gain over iteration 0" if use == "gain" else "final score (no iteration-0 evaluation)"
    name = metric_name(rs, key)
    row = {"kind": "metric", "method": label, "baseline": baseline, "metric": key, "axis": "", "statistic": what,
           "n_method": sx.n, "n_baseline": sb.n, "method_value": sx.point, "baseline_value": sb.point,
           "resolution": res}
    if sx.n == 0 or sb.n == 0:
        row["sentence"] = f"{label} vs {baseline}, {name}: no evaluations to compare"
        return row
    diff, lo, hi = stats.difference_ci(x, b, reps=reps)
    mde = stats.min_detectable_effect(stats.pooled_sd([x, b]), sx.n, sb.n, res)
    row.update(difference=diff, lo=lo, hi=hi, mde=mde)
    if not (sx.has_interval and sb.has_interval):
        row["detectable"] = None
        row["sentence"] = (f"{label} vs {baseline}, {name} {what}: {sx.text(sign=True)} vs {sb.text(sign=True)}; "
                           f"too few seeds to call (an interval needs >= {stats.MIN_N_FOR_INTERVAL} per method)")
        return row
    p = stats.probability_of_improvement(x, b)
    row["p_improve"] = p
    detectable = (lo > 0 or hi < 0) and (not np.isfinite(res) or abs(diff) >= res)
    row["detectable"] = bool(detectable)
    ci = f"{diff:+.3f} [{lo:+.3f}, {hi:+.3f}]"
    if detectable:
        verb = "beats" if diff > 0 else "trails"
        row["sentence"] = (f"{label} {verb} {baseline} on {name}: {what} {sx.point:+.3f} vs {sb.point:+.3f}, "
                           f"difference {ci} (IQM, {_n_text(sx.n, sb.n)} seeds; P(improve) {p:.2f})".replace("n = ", ""))
    else:
        why = (f"; below the metric's resolution {res:.3f}" if (lo > 0 or hi < 0) else "")
        row["sentence"] = (f"{label} vs {baseline} on {name}: no detectable difference at this budget "
                           f"({_n_text(sx.n, sb.n)}; minimum detectable effect {mde:.3f}; difference {ci}{why})")
    return row


def axis_curves(rs: RunSet, axis: str, key: str, labels: list[str]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Shared grid (every budget any of these runs evaluated at) and per label [runs, grid] curves of
    ``key``, each run held at its final value after it stopped."""
    col = X_AXES[axis][0]
    ev = rs.evals[rs.evals["label"].isin(labels)].dropna(subset=[key])
    xs = pd.to_numeric(ev[col], errors="coerce").to_numpy(dtype=float)
    grid = np.unique(xs[np.isfinite(xs)])
    out = {}
    for lab in labels:
        _, c = stats.curves_on_grid(ev[ev["label"] == lab], col, key, grid, hold_last=True)
        out[lab] = c
    return grid, out


def _fmt_cost(v: float, axis: str) -> str:
    if not np.isfinite(v):
        return "-"
    return f"{v:.4g} {UNITS[axis]}" if v < 1e5 else f"{v:.3g} {UNITS[axis]}"


def cost_verdict(rs: RunSet, key: str, axis: str, label: str, baseline: str, reps: int) -> dict:
    grid, curves = axis_curves(rs, axis, key, [label, baseline])
    unit = UNITS[axis] + (" (wall clock on one machine: noisy)" if axis == "seconds" else "")
    name = metric_name(rs, key)
    row = {"kind": "cost", "method": label, "baseline": baseline, "metric": key, "axis": axis,
           "n_method": len(curves[label]), "n_baseline": len(curves[baseline])}
    if grid.size == 0 or not len(curves[label]) or not len(curves[baseline]):
        row["sentence"] = f"{label} vs {baseline}, cost in {unit}: no evaluations on this axis"
        return row
    sp = stats.speedup_ci(curves[baseline], curves[label], grid, reps=reps)
    row.update(speedup=sp["speedup"], lo=sp["lo"], hi=sp["hi"], budget=sp["budget"],
               baseline_budget=sp["baseline_budget"], threshold=sp["threshold"], reached=sp["reached"])
    thr, n = sp["threshold"], row["n_method"]
    target = f"{baseline}'s final {key.split('/', 1)[-1]} ({thr:.3f})"
    seeds = f"{n} seeds" if n == row["n_baseline"] else f"{n} vs {row['n_baseline']} seeds"
    if not np.isfinite(sp["baseline_budget"]) or sp["baseline_budget"] <= grid[0]:
        row["sentence"] = (f"{baseline}'s final {name} ({thr:.3f}) is not above its starting score: "
                           f"no cost to reach it to compare ({unit})")
    elif not np.isfinite(sp["budget"]):
        row["sentence"] = (f"{label} does not reach {target} within its budget "
                           f"({_fmt_cost(float(grid.max()), axis)}; {seeds})")
    else:
        s = sp["speedup"]
        word, f = ("fewer", s) if s >= 1 else ("more", 1 / s)
        head = f"{label} reaches {target} with {f:.1f}x {word} {unit}"
        spent = f"{_fmt_cost(sp['budget'], axis)} vs {_fmt_cost(sp['baseline_budget'], axis)}"
        if not np.isfinite(sp["lo"]):
            row["sentence"] = f"{head} ({spent}; {_n_text(n, row['n_baseline'])}, no interval)"
        else:
            lo, hi = (sp["lo"], sp["hi"]) if s >= 1 else (1 / max(sp["hi"], 1e-12), 1 / max(sp["lo"], 1e-12))
            hi_t = "never" if not np.isfinite(hi) or hi > 1e6 else f"{hi:.1f}"
            tail = "; no detectable difference in cost" if sp["lo"] <= 1 <= sp["hi"] else ""
            row["sentence"] = f"{label} reaches {target} with {f:.1f}x [{lo:.1f}, {hi_t}] {word} {unit} ({seeds}{tail})"
    return row


def build_verdict(rs: RunSet, metric: str, baseline: str, axes: list[str], reps: int = 2000,
                  code_problems: list[str] | None = None) -> Verdict:
    """Sentences for every method other than the baseline: each eval metric, then each cost axis."""
    lines, rows = [], []
    if code_problems:
        lines.append("WARNING: these runs do not come from one clean commit (" + "; ".join(code_problems)
                     + "): differences may be code changes")
    others = [lab for lab in rs.labels if lab != baseline]
    keys = [metric] + [k for k in rs.eval_keys() if k != metric and k in rs.evals]
    for lab in others:
        for k in keys:
            rows.append(metric_verdict(rs, k, lab, baseline, reps))
        for a in axes:
            rows.append(cost_verdict(rs, metric, a, lab, baseline, reps))
    if not others:
        lines.append(f"only one method ({baseline}): nothing to compare")
    lines += [r["sentence"] for r in rows]
    return Verdict(lines=lines, rows=rows)
