"""The verdict: every claim's outcome by one rule, multiplicity control, and the sentences readers see.

* Claims come from :mod:`reports.claims` (reward at matched fractions of the budget; cost to reach a
  fraction of the baseline's gain), statistics from :mod:`reports.inference`.
* **One rule** for every claim (``inference.outcome``): *better* / *worse* when the deciding interval
  excludes 0, *equivalent* when it lies inside (-SESOI, +SESOI), *inconclusive* otherwise. For a cost
  claim the interval is of log(method cost / baseline cost) (lower is better) and the SESOI a ratio.
* **SESOI**, the smallest effect of interest, is declared per metric: ``DEFAULT_SESOI`` for the shapes
  rewards; for any other reward 0.05 x its per-image standard deviation at iteration 0 (before any
  training, so it cannot be tuned to a result); for costs a factor of 1.25. ``--sesoi name=value``
  overrides any of them (``cost=0.1`` for a factor of 1.1).
* **Multiplicity**: Holm's step-down over the *confirmatory* claims of one report (reward at the full
  budget on every eval metric, cost to the targets on the primary metric along the budget's axis): each
  is decided by its Holm-adjusted interval (``inference.holm_levels``), which excludes 0 exactly when
  Holm rejects. Other budget fractions and cost axes are *exploratory*: decided by their unadjusted 95%
  intervals and labelled so. Controls are judged unadjusted (a check of the comparison, not a result).
* **Controls** (``bench compare --controls``): ``<baseline>-frozen`` must come out *worse* than the
  baseline on the primary metric; when it does not, the comparison has no power at this budget: the
  headline says so and no ranking is printed (the claims stay in verdict.json with ``withheld``).
  ``<baseline>-aa`` should not come out better or worse.

``Verdict.rows`` is ``verdict.json`` (a list of objects, docs/REPORTS.md); the headline, the page-1
sentences and the terminal print are rendered from it (:mod:`reports.sentences`).
"""

from __future__ import annotations

import json
import math
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from bench.errors import UsageError
from reports import claims as cl
from reports import inference as inf
from reports.load import NOISE_FREE_AXES, RunSet, control_of
from reports.sentences import UNITS, fmt_cost, headline, metric_name, sentence

__all__ = ["UNITS", "Verdict", "build_verdict", "cost_axes", "decide", "fmt_cost", "gains", "metric_name",
           "parse_sesoi", "resolution", "sesoi_for", "to_json", "write_json"]


#: Smallest effects of interest of the shapes rewards (eval mean, score units). shapes_pref: 0.005 is
#: about a third of a standard error of one eval mean over 128 images and about 0.03 per-image standard
#: deviations; shapes_attr (a fraction of attributes right, in quarters per image): 0.01, five quanta
#: of a 128-image mean.
DEFAULT_SESOI = {"shapes_pref": 0.005, "shapes_attr": 0.01}
#: Any other reward: this fraction of its per-image standard deviation at iteration 0.
SESOI_SD_FRACTION = 0.05
#: Costs: ratios within [1 / (1 + COST_SESOI), 1 + COST_SESOI] are "equivalent".
COST_SESOI = 0.25


@dataclass
class Verdict:
    rows: list[dict]                      # verdict.json
    headline: str = ""
    headline_parts: list[str] = field(default_factory=list)
    lines: list[str] = field(default_factory=list)  # what the terminal prints: headline, then sentences
    power: bool | None = None             # frozen control worse than the baseline (None: no frozen control)
    notes: dict[str, Any] = field(default_factory=dict)

    def frame(self) -> pd.DataFrame:
        return pd.DataFrame(self.rows)

    def sentences(self) -> list[str]:
        """Page-1 sentences: confirmatory claims (unless withheld) and controls."""
        return [r["sentence"] for r in self.rows if r["role"] in ("confirmatory", "control") and not r["withheld"]]


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
    """The standard error of one eval mean, std / sqrt(images), at iteration 0 (median over runs): what
    the choice of eval prompts and noise alone moves an *unpaired* score (the reward-hacking rule uses
    it per run; paired differences between runs do not carry it). NaN without the std or image count."""
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


def image_sd(rs: RunSet, key: str) -> float:
    """Per-image standard deviation of ``key`` at iteration 0 (median over runs), from the per-image
    scores, else from the eval records' ``/std``; NaN when neither exists."""
    sc = rs.scores
    if not sc.empty and key in sc:
        at0 = sc[sc["iteration"] == 0].dropna(subset=[key])
        if len(at0):
            return float(at0.groupby("run")[key].std(ddof=0).median())
    std_key = f"{key}/std"
    if not rs.evals.empty and std_key in rs.evals:
        v = pd.to_numeric(rs.evals.loc[rs.evals["iteration"] == 0, std_key], errors="coerce").dropna()
        if len(v):
            return float(v.median())
    return math.nan


def cost_axes(rs: RunSet, budget: str | None, present: list[str], wall_ok: bool,
              include_wall: bool = False) -> list[str]:
    """Noise-free axes present, plus wall-clock seconds when the budget fixed it or it is asked for
    (and the runs share one device)."""
    axes = [a for a in present if a in NOISE_FREE_AXES]
    if "seconds" in present and wall_ok and (include_wall or budget == "seconds"):
        axes.append("seconds")
    return axes


# --------------------------------------------------------------------------------------- SESOI

def parse_sesoi(items: Any) -> dict[str, float]:
    """``["shapes_attr=0.01", "cost=0.1,shapes_pref=0.003"]`` -> {name: value}; UsageError on bad input."""
    if items is None:
        return {}
    if isinstance(items, str):
        items = [items]
    out: dict[str, float] = {}
    for item in items:
        for part in str(item).split(","):
            part = part.strip()
            if not part:
                continue
            name, eq, value = part.partition("=")
            name = name.strip().removeprefix("eval/")
            try:
                v = float(value)
            except ValueError:
                v = math.nan
            if not eq or not name or not (np.isfinite(v) and v > 0):
                raise UsageError(f"--sesoi {part!r}: expected METRIC=VALUE with a positive VALUE, e.g. "
                                 f"shapes_attr=0.01 (or cost=0.1 for a cost ratio within 1.1x)")
            out[name] = v
    return out


def sesoi_for(rs: RunSet, key: str, given: dict[str, float]) -> tuple[float, str]:
    """(SESOI of eval key ``key``, where it comes from)."""
    name = key.split("/", 1)[-1]
    if name in given:
        return given[name], "given (--sesoi)"
    if name in DEFAULT_SESOI:
        return DEFAULT_SESOI[name], "default"
    sd = image_sd(rs, key)
    if np.isfinite(sd) and sd > 0:
        return SESOI_SD_FRACTION * sd, f"default: {SESOI_SD_FRACTION:g} x per-image sd at iteration 0"
    return math.nan, "none (no per-image spread to scale a default from): equivalence not assessed"


def check_sesoi_names(rs: RunSet, given: dict[str, float]) -> None:
    known = [k.split("/", 1)[-1] for k in rs.eval_keys()]
    bad = [n for n in given if n != "cost" and n not in known]
    if bad:
        raise UsageError(f"--sesoi {', '.join(bad)}: not an eval metric of these runs; choose from "
                         f"{', '.join(known + ['cost'])}")


def _json_num(v: Any) -> Any:
    if isinstance(v, (float, np.floating)):
        return float(v) if np.isfinite(v) else None
    if isinstance(v, np.integer):
        return int(v)
    return v


# --------------------------------------------------------------------------------------- decisions

def decide(claims: list[cl.Claim], sesoi: dict[str, tuple[float, str]], cost_sesoi: float,
           alpha: float = inf.ALPHA) -> list[dict]:
    """Outcome, p-values and intervals of every claim (module docstring); one row per claim."""
    p = np.array([c.test.p_value() if c.test is not None else math.nan for c in claims])
    conf_idx = [i for i, c in enumerate(claims) if c.role == "confirmatory"]
    p_holm = np.full(len(claims), np.nan)
    level = np.full(len(claims), float(alpha))
    if conf_idx:
        p_holm[conf_idx] = inf.holm(p[conf_idx])
        level[conf_idx] = inf.holm_levels(p[conf_idx], alpha)
    family = int(np.isfinite(p[conf_idx]).sum()) if conf_idx else 0
    rows = []
    for i, c in enumerate(claims):
        cost = c.axis == "cost_to_target"
        s, s_src = (cost_sesoi, "cost ratio") if cost else sesoi.get(c.metric, (math.nan, "none"))
        margin = math.log1p(s) if cost else s
        if c.test is not None:
            lo, hi = c.test.interval(1 - alpha)
            lo_a, hi_a = c.test.interval(1 - level[i])
        else:
            lo = hi = lo_a = hi_a = math.nan
        out = inf.outcome(lo_a, hi_a, margin, higher_is_better=not cost)
        negligible = bool(out in ("better", "worse") and np.isfinite(margin) and -margin < lo_a and hi_a < margin)
        est = c.test.estimate if c.test is not None else c.info.get("estimate", math.nan)
        if cost:  # report ratios method / baseline
            est, lo, hi, lo_a, hi_a = (math.exp(v) if not math.isnan(v) else math.nan
                                       for v in (est, lo, hi, lo_a, hi_a))
        row = {"method": c.method, "baseline": c.baseline, "metric": c.metric, "axis": c.axis, "outcome": out,
               "estimate": est, "lo": lo, "hi": hi, "n": c.n, "n_baseline": c.n_baseline,
               "p": p[i], "p_holm": p_holm[i], "p_perm": c.info.get("p_perm", math.nan),
               "p_perm_exact": c.info.get("p_perm_exact"), "sesoi": s, "sesoi_source": s_src,
               "role": c.role, "family_size": family if c.role == "confirmatory" else None,
               "level": level[i], "lo_adj": lo_a, "hi_adj": hi_a,
               "scale": "ratio" if cost else "difference", "basis": c.basis, "cost_axis": c.cost_axis,
               "budget_fraction": c.budget_fraction, "budget": c.budget,
               "target_fraction": c.target_fraction, "target": c.target, "data": c.data, "paired": c.paired,
               "negligible": negligible,
               "withheld": False}
        if not cost:
            t = c.test
            row.update(se=t.se if t is not None else math.nan, df=t.df if t is not None else math.nan,
                       mde=t.mde(alpha) if t is not None else math.nan,
                       prompt_variance=dict(t.parts).get("prompts", math.nan) if t is not None else math.nan,
                       seeds_above=c.info.get("seeds_above"), method_value=c.info.get("method_value", math.nan),
                       baseline_value=c.info.get("baseline_value", math.nan),
                       method_values=c.info.get("method_values", []), baseline_values=c.info.get("baseline_values", []),
                       cost_method=c.info.get("cost_method", math.nan),
                       cost_baseline=c.info.get("cost_baseline", math.nan), prompts=c.info.get("prompts"),
                       note=c.info.get("note") or c.info.get("why_not_per_image"))
        else:
            ms, bs = c.info["method_side"], c.info["baseline_side"]
            row.update(reached=ms["reached"], reached_baseline=bs["reached"], bracket=[ms["lo"], ms["hi"]],
                       bracket_baseline=[bs["lo"], bs["hi"]], brackets=ms["brackets"],
                       brackets_baseline=bs["brackets"])
        rows.append(row)
    return rows


# --------------------------------------------------------------------------------------- build

def build_verdict(rs: RunSet, metric: str, baseline: str, sched: cl.Schedule | None, axes: list[str],
                  sesoi: dict[str, float] | None = None, code_problems: list[str] | None = None,
                  fractions: tuple[float, ...] = cl.BUDGET_FRACTIONS,
                  targets: tuple[float, ...] = cl.TARGET_FRACTIONS, reps: int = 20_000) -> Verdict:
    """Every claim of a report, decided; the headline and sentences rendered from the rows."""
    given = dict(sesoi or {})
    check_sesoi_names(rs, given)
    warn = []
    if code_problems:
        warn.append("WARNING: these runs do not come from one clean commit (" + "; ".join(code_problems)
                    + "): differences may be code changes")
    others = [lab for lab in rs.labels if lab != baseline]
    if not others:
        msg = f"only one method ({baseline}): nothing to compare"
        return Verdict([], msg, [msg], warn + [msg])
    if sched is None:
        msg = "no cost axis logged in the evaluation records: nothing can be compared at matched cost"
        return Verdict([], msg, [msg], warn + [msg])
    claims, notes = cl.build_claims(rs, metric, baseline, sched, axes, tuple(fractions), tuple(targets), reps)
    sesoi_map = {k: sesoi_for(rs, k, given) for k in dict.fromkeys(c.metric for c in claims)}
    rows = decide(claims, sesoi_map, given.get("cost", COST_SESOI))
    frozen = next((r for r in rows if r["role"] == "control" and r["metric"] == metric
                   and control_of(r["method"]) == ("frozen", baseline)), None)
    power = None if frozen is None else frozen["outcome"] == "worse"
    for r in rows:
        r["withheld"] = power is False and r["role"] != "control"
        r["sentence"] = sentence(r, rs)
    parts = headline(rows, rs, baseline, metric, sched, notes, power)
    head = " ".join(parts)
    v = Verdict([{k: v for k, v in r.items()} for r in rows], head, parts, [], power, notes)
    v.lines = warn + [head] + v.sentences()
    if power is False:
        v.lines.append("(claims withheld: no power; their numbers are in verdict.json and the tables)")
    return v


def to_json(v: Verdict) -> list[dict]:
    """verdict.json: the rows with non-finite numbers as null (an unbounded cost-ratio bound included)."""
    def clean(x: Any) -> Any:
        if isinstance(x, dict):
            return {k: clean(y) for k, y in x.items()}
        if isinstance(x, (list, tuple)):
            return [clean(y) for y in x]
        return _json_num(x)

    return [clean(r) for r in v.rows]


def write_json(v: Verdict, path: str | Path) -> Path:
    path = Path(path)
    # a temporary name of this writer only: two report steps into one directory never share it
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        tmp.write_text(json.dumps(to_json(v), indent=1) + "\n")
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path
