"""The claims a comparison can make, computed from a RunSet (statistics: reports.inference).

Two kinds of claim, method vs baseline:

* ``reward@budget``: the gain over each run's own iteration 0 on an eval metric at a matched fraction
  of the budget (25%, 50%, 100%). Each run contributes the evaluation *at* the matched cost (on the
  first iteration boundary at or past it, i.e. less than one iteration past it, which is where an
  ``eval.every=<amount>nfe`` schedule puts it) or, when there is none, the last one before it;
  never an interpolation between evaluations, and never a run's last point merely because it is last
  (a run that overshot the budget is compared at the budget). With per-image scores the difference is
  paired per image (shared prompts x noise) and its interval includes the prompt term; without them,
  per-seed eval means (Welch), said so in the claim's ``data``.
* ``cost_to_target``: the cost to reach a target, a fraction (50%, 75%) of the baseline's mean gain at
  the full budget. Per run, the crossing is interval-censored between the evaluation before and the
  first at or above the target (evaluations up to the budget only); the claim is a log cost ratio
  (method / baseline) with bounds that cover any crossing inside the brackets, and counts how many
  seeds reach it.

The axis and amount of "the budget" (:class:`Schedule`): the budget's own currency when every run had
the same one (samples, NFE, modeled seconds, or wall-clock seconds, the last said to be noisy), else
(iteration budgets) the report's axis with the largest cost every run reached.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from reports import inference as inf
from reports.load import NOISE_FREE_AXES, X_AXES, RunSet, control_of

#: Matched fractions of the budget (reward@budget claims); 1.0 is the confirmatory one.
BUDGET_FRACTIONS = (0.25, 0.5, 1.0)
#: Targets of the cost claims: fractions of the baseline's mean gain at the full budget.
TARGET_FRACTIONS = (0.5, 0.75)


@dataclass(frozen=True)
class Schedule:
    """The cost axis the claims match on and the amount of the budget on it."""

    axis: str          # samples | nfe | modeled | seconds
    budget: float      # the budget on that axis
    source: str        # "budget" (the runs' common budget) or "reached" (largest cost every run reached)

    @property
    def column(self) -> str:
        return X_AXES[self.axis][0]


@dataclass
class Claim:
    """One comparison of ``method`` with ``baseline``; :mod:`reports.verdict` decides its outcome."""

    method: str
    baseline: str
    metric: str
    axis: str                      # reward@budget | cost_to_target
    role: str                      # confirmatory | exploratory | control
    test: Any = None               # inference.TDifference | inference.CensoredLogRatio | None
    n: int = 0
    n_baseline: int = 0
    cost_axis: str = ""
    budget_fraction: float | None = None
    budget: float | None = None    # the matched cost (reward@budget) or the budget (cost_to_target)
    target_fraction: float | None = None
    target: float | None = None    # the target gain over iteration 0 (cost_to_target)
    data: str = ""                 # per-image | eval means
    paired: bool = False           # seeds paired (frozen control)
    basis: str = "gain"            # gain (over the run's own iteration 0) | score (no iteration-0 evaluation)
    info: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------------------- schedule

def schedule(rs: RunSet, preferred: str) -> Schedule | None:
    """The comparison's budget axis and amount (module docstring); None when no cost axis is logged."""
    kinds = set()
    for m in rs.manifests.values():
        b = m.get("budget") or {}
        present = [k for k in ("seconds", "samples", "nfe") if b.get(k) is not None]
        if len(present) != 1:
            kinds.add(None)
            continue
        k = present[0]
        if k == "seconds" and b.get("clock") not in (None, "wall"):
            k = "modeled"
        kinds.add((k, float(b["seconds" if k == "modeled" else k])))
    logged = [a for a in X_AXES if X_AXES[a][0] in rs.evals and rs.evals[X_AXES[a][0]].notna().any()]
    if len(kinds) == 1 and None not in kinds:
        axis, amount = kinds.pop()
        if axis in logged:
            return Schedule(axis, amount, "budget")
    order = [preferred] + [a for a in ("nfe", "samples", "modeled") if a != preferred]
    axis = next((a for a in order if a in logged and a in NOISE_FREE_AXES), None)
    if axis is None:
        return None
    col = X_AXES[axis][0]
    reached = pd.to_numeric(rs.evals[col], errors="coerce").groupby(rs.evals["run"]).max()
    return Schedule(axis, float(reached.min()), "reached") if len(reached) else None


def boundaries(rs: RunSet, column: str) -> dict[Any, np.ndarray]:
    """Per run: the cumulative cost on ``column`` at every iteration boundary, from 0 (sorted)."""
    it = rs.iterations
    if it.empty or column not in it:
        return {}
    it = it.sort_values(["run", "iteration"])
    out = {}
    for run, g in it.groupby("run", sort=False):
        v = pd.to_numeric(g[column], errors="coerce").to_numpy(dtype=float)
        out[run] = np.unique(np.r_[0.0, v[np.isfinite(v)]])
    return out


def eval_table(rs: RunSet, key: str) -> pd.DataFrame:
    """Eval records with ``key``: run, label, seed, iteration, the cost columns, value, start, gain (over
    the run's own iteration-0 evaluation; NaN without one)."""
    if rs.evals.empty or key not in rs.evals:
        return pd.DataFrame(columns=["run", "label", "seed", "iteration", "value", "start", "gain"])
    cols = ["run", "label", "seed", "iteration"] + [c for c, _ in X_AXES.values() if c in rs.evals]
    ev = rs.evals.dropna(subset=[key])[cols + [key]].rename(columns={key: "value"})
    ev = ev.sort_values(["run", "iteration"], kind="stable")
    start = ev[ev["iteration"] == 0].drop_duplicates("run", keep="last").set_index("run")["value"]
    ev["start"] = ev["run"].map(start)
    ev["gain"] = ev["value"] - ev["start"]
    return ev.reset_index(drop=True)


def at_cost(ev: pd.DataFrame, column: str, cost: float, bounds: dict[Any, np.ndarray]) -> pd.Series:
    """Which evaluations count as "at or before ``cost``": cost <= it, or the evaluation lies on the first
    iteration boundary past it (the previous boundary is below it: at most one iteration past)."""
    c = pd.to_numeric(ev[column], errors="coerce").to_numpy(dtype=float)
    eps = 1e-9 * max(abs(cost), 1.0)
    ok = c <= cost + eps
    for i, (run, e) in enumerate(zip(ev["run"], c)):
        if ok[i] or not np.isfinite(e):
            continue
        b = bounds.get(run)
        if b is not None and b.size:
            j = int(np.searchsorted(b, e - eps, side="left"))  # b[j]: the boundary the evaluation is on
            ok[i] = j > 0 and b[j - 1] < cost - eps
    return pd.Series(ok, index=ev.index)


def matched(ev: pd.DataFrame, column: str, cost: float, bounds: dict[Any, np.ndarray]) -> pd.DataFrame:
    """Per run, the evaluation at ``cost`` on ``column`` (:func:`at_cost`; the latest one that counts)."""
    if ev.empty or column not in ev:
        return ev.iloc[0:0].assign(cost_used=[])
    ok = at_cost(ev, column, cost, bounds)
    sel = ev[ok].assign(cost_used=pd.to_numeric(ev.loc[ok, column], errors="coerce"))
    sel = sel.sort_values(["run", "cost_used", "iteration"], kind="stable")
    return sel.groupby("run", sort=False).tail(1).reset_index(drop=True)


# --------------------------------------------------------------------------------------- per image

class ImageTable:
    """The per-image scores of one eval key, grouped by (run, iteration), images sorted by
    (prompt_index, image_index): ``ids`` [images] (prompt_index * 2^20 + image_index), ``values``,
    ``prompts`` (the text of each image's prompt)."""

    SHIFT = 1 << 20

    def __init__(self, rs: RunSet, key: str) -> None:
        self.key = key
        self.groups: dict[tuple[Any, int], tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        sc = rs.scores
        if sc.empty or key not in sc:
            return
        sc = sc[["run", "iteration", "prompt_index", "image_index", "prompt", key]].dropna(subset=[key])
        sc = sc.sort_values(["run", "iteration", "prompt_index", "image_index"], kind="stable")
        ids = sc["prompt_index"].to_numpy(dtype=np.int64) * self.SHIFT + sc["image_index"].to_numpy(dtype=np.int64)
        vals = sc[key].to_numpy(dtype=float)
        texts = sc["prompt"].to_numpy(dtype=object)
        for (run, it), idx in sc.groupby(["run", "iteration"], sort=False).indices.items():
            self.groups[(run, int(it))] = (ids[idx], vals[idx], texts[idx])

    def __bool__(self) -> bool:
        return bool(self.groups)


def prompt_gains(table: ImageTable, picks: pd.DataFrame, use_gain: bool) -> tuple[pd.DataFrame | None, str]:
    """Per-run per-prompt mean (gain | score) on the images every picked run scored: a frame
    [runs x prompt_index], or None with the reason when the per-image scores cannot be paired."""
    if not table:
        return None, "no per-image scores (eval_scores.jsonl)"
    per_run: dict[Any, tuple[np.ndarray, np.ndarray]] = {}
    texts: dict[int, str] = {}
    for run, it in zip(picks["run"], picks["iteration"]):
        g = table.groups.get((run, int(it)))
        if g is None:
            return None, f"{run} has no per-image scores at iteration {int(it)}"
        ids, vals, tx = g
        if use_gain:
            g0 = table.groups.get((run, 0))
            if g0 is None:
                return None, f"{run} has no per-image scores at iteration 0"
            common, i1, i0 = np.intersect1d(ids, g0[0], assume_unique=True, return_indices=True)
            ids, vals, tx = common, vals[i1] - g0[1][i0], tx[i1]
        per_run[run] = (ids, vals)
        first = np.r_[True, ids[1:] // ImageTable.SHIFT != ids[:-1] // ImageTable.SHIFT]
        for pi, text in zip(ids[first] // ImageTable.SHIFT, tx[first]):
            if texts.setdefault(int(pi), text) != text:
                return None, f"eval prompt {int(pi)} differs between runs"
    shared = None
    for ids, _ in per_run.values():
        shared = ids if shared is None else np.intersect1d(shared, ids, assume_unique=True)
    if shared is None or shared.size == 0:
        return None, "the runs share no evaluated image"
    prompt = shared // ImageTable.SHIFT
    starts = np.flatnonzero(np.r_[True, prompt[1:] != prompt[:-1]])
    counts = np.diff(np.r_[starts, prompt.size])
    rows = {}
    for run, (ids, vals) in per_run.items():
        v = vals[np.searchsorted(ids, shared)]
        rows[run] = np.add.reduceat(v, starts) / counts
    return pd.DataFrame.from_dict(rows, orient="index", columns=prompt[starts]), ""


# --------------------------------------------------------------------------------------- claims

def _paired(rs: RunSet, method: str, baseline: str, xs: pd.DataFrame, bs: pd.DataFrame) -> bool:
    c = control_of(method)
    return (c is not None and c == ("frozen", baseline) and len(xs) == len(bs)
            and sorted(xs["seed"].tolist()) == sorted(bs["seed"].tolist()))


def reward_claim(rs: RunSet, ev: pd.DataFrame, images: ImageTable, key: str, method: str, baseline: str,
                 fraction: float, sched: Schedule, bounds: dict, role: str, reps: int = 20_000) -> Claim:
    """The gain on ``key`` at ``fraction`` of the budget, ``method`` - ``baseline``."""
    cost = fraction * sched.budget
    picks = matched(ev[ev["label"].isin([method, baseline])], sched.column, cost, bounds)
    use_gain = bool(len(picks)) and picks["start"].notna().all()
    col = "gain" if use_gain else "value"
    xs = picks[picks["label"] == method].sort_values("seed", kind="stable")
    bs = picks[picks["label"] == baseline].sort_values("seed", kind="stable")
    claim = Claim(method, baseline, key, "reward@budget", role, n=len(xs), n_baseline=len(bs),
                  cost_axis=sched.axis, budget_fraction=fraction, budget=cost,
                  basis="gain" if use_gain else "score")
    claim.paired = _paired(rs, method, baseline, xs, bs)
    if xs.empty or bs.empty:
        claim.info["note"] = "no evaluation at or before this cost" if len(picks) else "no evaluations"
        return claim
    z, why = prompt_gains(images, pd.concat([xs, bs]), use_gain)
    if z is not None:
        zx, zb = z.loc[xs["run"]].to_numpy(), z.loc[bs["run"]].to_numpy()
        vx, vb = zx.mean(axis=1), zb.mean(axis=1)
        claim.data = "per-image"
        claim.info["prompts"] = int(z.shape[1])
        if min(len(vx), len(vb)) >= inf.MIN_SEEDS:
            claim.test = inf.prompt_difference(zx, zb, paired=claim.paired)
    else:
        vx, vb = xs[col].to_numpy(dtype=float), bs[col].to_numpy(dtype=float)
        claim.data = "eval means"
        claim.info["why_not_per_image"] = why
        if min(len(vx), len(vb)) >= inf.MIN_SEEDS:
            claim.test = inf.one_sample(vx - vb) if claim.paired else inf.welch(vx, vb)
    claim.info.update(estimate=float(np.mean(vx) - np.mean(vb)),
                      method_values=[float(v) for v in vx], baseline_values=[float(v) for v in vb],
                      method_value=float(np.mean(vx)), baseline_value=float(np.mean(vb)),
                      cost_method=float(xs["cost_used"].mean()), cost_baseline=float(bs["cost_used"].mean()),
                      seeds_above=inf.seeds_above(vx, vb)[0])
    if min(len(vx), len(vb)) >= inf.MIN_SEEDS:
        perm = (inf.signflip_pvalue(vx - vb, reps=reps) if claim.paired
                else inf.permutation_pvalue(vx, vb, reps=reps))
        claim.info.update(p_perm=perm.p, p_perm_exact=perm.exact)
    return claim


def brackets(ev: pd.DataFrame, column: str, budget_column: str, budget: float, bounds: dict,
             target: float) -> pd.DataFrame:
    """Per run: the bracket (lo, hi] on ``column`` in which its gain first reaches ``target``, among its
    evaluations up to the budget (on ``budget_column``); hi = inf when it never does."""
    rows = []
    ev = ev[at_cost(ev, budget_column, budget, bounds)] if len(ev) else ev
    for run, g in ev.groupby("run", sort=False):
        g = g.sort_values("iteration")
        cost = pd.to_numeric(g[column], errors="coerce").to_numpy(dtype=float)
        gain = g["gain"].to_numpy(dtype=float)
        hit = np.flatnonzero(gain >= target - 1e-12 * max(abs(target), 1e-12))
        if len(gain) == 0:
            continue
        if hit.size:
            k = hit[0]
            lo, hi = (cost[k - 1] if k > 0 else 0.0), cost[k]
        else:
            lo, hi = cost[-1], math.inf
        rows.append({"run": run, "label": g["label"].iloc[0], "seed": g["seed"].iloc[0], "lo": float(lo),
                     "hi": float(hi), "reached": bool(hit.size)})
    return pd.DataFrame(rows, columns=["run", "label", "seed", "lo", "hi", "reached"])


def baseline_gain(ev: pd.DataFrame, baseline: str, sched: Schedule, bounds: dict) -> tuple[float, int]:
    """(mean gain of the baseline's seeds at the full budget, seeds)."""
    picks = matched(ev[ev["label"] == baseline], sched.column, sched.budget, bounds)
    g = picks["gain"].to_numpy(dtype=float)
    g = g[np.isfinite(g)]
    return (float(g.mean()) if g.size else math.nan), int(g.size)


def cost_claim(ev: pd.DataFrame, key: str, method: str, baseline: str, fraction: float, base_gain: float,
               axis: str, sched: Schedule, bounds: dict, role: str) -> Claim:
    """The cost on ``axis`` to reach ``fraction`` of the baseline's gain: a log ratio method / baseline."""
    target = fraction * base_gain
    br = brackets(ev[ev["label"].isin([method, baseline])], X_AXES[axis][0], sched.column, sched.budget, bounds,
                  target)
    bx, bb = br[br["label"] == method], br[br["label"] == baseline]
    claim = Claim(method, baseline, key, "cost_to_target", role, n=len(bx), n_baseline=len(bb), cost_axis=axis,
                  budget=sched.budget if axis == sched.axis else None, target_fraction=fraction, target=target,
                  data="eval means")

    def side(b: pd.DataFrame) -> dict:
        return {"reached": int(b["reached"].sum()), "lo": float(b["lo"].median()) if len(b) else math.nan,
                "hi": float(b["hi"].median()) if len(b) else math.nan,
                "brackets": [[float(lo), float(hi)] for lo, hi in zip(b["lo"], b["hi"])]}

    claim.info.update(method_side=side(bx), baseline_side=side(bb))
    if min(len(bx), len(bb)) >= inf.MIN_SEEDS:
        claim.test = inf.censored_log_ratio(bx["lo"], bx["hi"], bb["lo"], bb["hi"])
    return claim


def build_claims(rs: RunSet, primary: str, baseline: str, sched: Schedule, cost_axes: list[str],
                 fractions: tuple[float, ...] = BUDGET_FRACTIONS, targets: tuple[float, ...] = TARGET_FRACTIONS,
                 reps: int = 20_000) -> tuple[list[Claim], dict[str, Any]]:
    """Every claim of a report and notes about them (the baseline's gain, why no cost claims...).

    Confirmatory: reward@budget at the full budget on every eval metric, and cost_to_target on the primary
    metric along the schedule's axis. Exploratory: the other budget fractions and cost axes. Control:
    the control arms of this baseline at the full budget."""
    bounds = boundaries(rs, sched.column)
    notes: dict[str, Any] = {}
    keys = [primary] + [k for k in rs.eval_keys() if k != primary and k in rs.evals]
    tables = {k: eval_table(rs, k) for k in keys}
    images = {k: ImageTable(rs, k) for k in keys}
    controls = [lab for lab in rs.labels if control_of(lab) is not None and control_of(lab)[1] == baseline]
    methods = [lab for lab in rs.labels if lab != baseline and control_of(lab) is None]
    claims: list[Claim] = []
    for lab in methods + controls:
        role = "control" if lab in controls else None
        for k in keys:
            for f in fractions:
                if role == "control" and f != 1.0:
                    continue
                r = role or ("confirmatory" if f == 1.0 else "exploratory")
                claims.append(reward_claim(rs, tables[k], images[k], k, lab, baseline, f, sched, bounds, r, reps))
    ev = tables[primary]
    gain, nb = baseline_gain(ev, baseline, sched, bounds)
    notes["baseline_gain"], notes["baseline_gain_n"] = gain, nb
    if ev["start"].isna().all() if len(ev) else True:
        notes["no_cost_claims"] = "no iteration-0 evaluation: no gain to take a fraction of"
    elif not (np.isfinite(gain) and gain > 0):
        notes["no_cost_claims"] = (f"{baseline}'s mean gain on {primary} at the budget is not positive "
                                   f"({gain:+.4g}): no target to reach")
    else:
        # the confirmatory cost axis: the schedule's own when noise-free, else the first noise-free one
        main = sched.axis if sched.axis in NOISE_FREE_AXES else next(
            (a for a in cost_axes if a in NOISE_FREE_AXES), None)
        axes = ([main] if main else []) + [a for a in cost_axes if a != main]
        for lab in methods:
            for a in axes:
                if X_AXES[a][0] not in ev:
                    continue
                for f in targets:
                    role = "confirmatory" if a == main else "exploratory"
                    claims.append(cost_claim(ev, primary, lab, baseline, f, gain, a, sched, bounds, role))
    return claims, notes
