"""Sentences and the headline of the verdict, rendered from verdict.json rows (reports.verdict)."""

from __future__ import annotations

import math

import numpy as np

from reports import claims as cl
from reports import inference as inf
from reports.load import RunSet, control_of

UNITS = {"samples": "scored samples", "nfe": "NFE", "modeled": "modeled seconds",
         "seconds": "wall-clock seconds"}


def metric_name(rs: RunSet, key: str) -> str:
    role = "training reward" if key == rs.train_eval_key() else "held-out"
    return f"{key.split('/', 1)[-1]} ({role})"


# --------------------------------------------------------------------------------------- formatting

def fmt_cost(v: float, axis: str) -> str:
    if v is None or not np.isfinite(v):
        return "never" if v == math.inf else "-"
    text = f"{v:,.0f}" if abs(v) >= 100 or float(v).is_integer() else f"{v:.3g}"
    return f"{text} {UNITS[axis]}"


def _f(v: float, digits: int = 3, sign: bool = True) -> str:
    if v is None or not np.isfinite(v):
        return "-" if v is None or math.isnan(v) else ("+inf" if v > 0 else "-inf")
    return f"{v:{'+' if sign else ''}.{digits}f}"


def _ratio(v: float) -> str:
    if v is None or math.isnan(v):
        return "-"
    if v == math.inf:
        return "inf"
    return f"{v:.2f}" if v < 10 else f"{v:.3g}"


def _where(fraction: float | None, cost: float | None, axis: str) -> str:
    if fraction is None:
        return ""
    head = "the budget" if fraction == 1.0 else f"{100 * fraction:g}% of the budget"
    return f"{head} ({fmt_cost(cost, axis)})"


# --------------------------------------------------------------------------------------- sentences

def _reward_sentence(r: dict, rs: RunSet) -> str:
    name = metric_name(rs, r["metric"])
    where = _where(r["budget_fraction"], r["budget"], r["cost_axis"])
    head = f"{r['outcome'].upper()}: {r['method']} vs {r['baseline']} on {name} at {where}"
    what = "gain over iteration 0" if r["basis"] == "gain" else "score (no iteration-0 evaluation)"
    n = f"n = {r['n']} vs {r['n_baseline']}"
    if not np.isfinite(r["lo"]):
        if r["n"] == 0 or r["n_baseline"] == 0:
            return f"{head}: no evaluations to compare ({n})"
        vals = lambda v: ", ".join(_f(x) for x in v)
        return (f"{head}: too few seeds for an interval ({n}; needs >= {inf.MIN_SEEDS} a side): {what} "
                f"{vals(r['method_values'])} vs {vals(r['baseline_values'])}")
    text = f"{head}: {_f(r['estimate'])} [{_f(r['lo'])}, {_f(r['hi'])}] ({what}, mean over seeds; 95% CI"
    if r["role"] == "confirmatory":
        text += f"; Holm over {r['family_size']} claims: [{_f(r['lo_adj'])}, {_f(r['hi_adj'])}], p {r['p_holm']:.2g}"
    elif r["role"] == "exploratory":
        text += "; exploratory, not adjusted"
    else:
        text += "; control"
    text += ")"
    s = r["sesoi"]
    if r["outcome"] == "equivalent":
        text += f", inside +-{s:.3g} (SESOI)"
    elif r["negligible"]:
        text += f", though inside +-{s:.3g} (SESOI): a negligible difference"
    elif r["outcome"] == "inconclusive":
        text += f"; MDE {r['mde']:.3g}, SESOI {s:.3g}" if np.isfinite(s) else f"; MDE {r['mde']:.3g}, no SESOI"
    text += f"; {r['seeds_above']}/{r['n']} seeds above {r['baseline']}'s mean; {n}"
    if r["data"] == "eval means":
        text += "; per-seed eval means (no per-image scores: prompt variance not included)"
    if r["paired"]:
        text += "; seeds paired"
    cm, cb = r["cost_method"], r["cost_baseline"]
    if np.isfinite(cm) and np.isfinite(cb) and abs(cm - cb) > 0.05 * max(r["budget"] or 0, 1e-12):
        text += f"; evaluated at {fmt_cost(cm, r['cost_axis'])} vs {fmt_cost(cb, r['cost_axis'])} (mean)"
    return text


def _bracket_text(b: list[float], reached: int, n: int, axis: str) -> str:
    lo, hi = b
    if reached == 0:
        return f"0/{n} seeds reach it (up to {fmt_cost(lo, axis)})"
    span = f"between {fmt_cost(lo, axis)} and {fmt_cost(hi, axis)}" if np.isfinite(hi) else "not by the median seed"
    return f"{reached}/{n} seeds reach it, {span} (median bracket)"


def _cost_sentence(r: dict, rs: RunSet) -> str:
    axis, unit = r["cost_axis"], UNITS[r["cost_axis"]]
    name = r["metric"].split("/", 1)[-1]
    head = (f"{r['outcome'].upper()}: {r['method']} vs {r['baseline']}, {unit} to reach "
            f"{100 * r['target_fraction']:g}% of {r['baseline']}'s gain on {name} ({_f(r['target'], 4)})")
    if axis == "seconds":
        head += " (wall clock on one machine: noisy)"
    sides = (f"{r['method']}: {_bracket_text(r['bracket'], r['reached'], r['n'], axis)}; "
             f"{r['baseline']}: {_bracket_text(r['bracket_baseline'], r['reached_baseline'], r['n_baseline'], axis)}")
    if math.isnan(r["lo"]) and math.isnan(r["hi"]):
        return f"{head}: too few seeds for an interval (n = {r['n']} vs {r['n_baseline']}); {sides}"
    est = f"{_ratio(r['estimate'])}x" if np.isfinite(r["estimate"]) else "not estimable (a seed never reaches it)"
    text = f"{head}: cost ratio {est} [{_ratio(r['lo'])}, {_ratio(r['hi'])}] (method / baseline; 95%"
    if r["role"] == "confirmatory":
        text += f"; Holm over {r['family_size']} claims: [{_ratio(r['lo_adj'])}, {_ratio(r['hi_adj'])}]"
    elif r["role"] == "exploratory":
        text += "; exploratory, not adjusted"
    text += f"; SESOI {1 + r['sesoi']:.3g}x); {sides}"
    return text


def sentence(r: dict, rs: RunSet) -> str:
    return _reward_sentence(r, rs) if r["axis"] == "reward@budget" else _cost_sentence(r, rs)


# --------------------------------------------------------------------------------------- headline

def _short(r: dict) -> str:
    if r["axis"] == "cost_to_target":
        est = f"{_ratio(r['estimate'])}x " if np.isfinite(r["estimate"]) else ""
        return f"{r['method']} {est}[{_ratio(r['lo_adj'])}, {_ratio(r['hi_adj'])}]"
    return f"{r['method']} {_f(r['estimate'])} [{_f(r['lo_adj'])}, {_f(r['hi_adj'])}]"


def headline(rows: list[dict], rs: RunSet, baseline: str, primary: str, sched: cl.Schedule | None,
             notes: dict, power: bool | None) -> list[str]:
    """Who is ahead on what, by how much, how sure, at what budget, and what the controls show: one
    sentence per topic (joined into one paragraph for the terminal, one line each on page 1)."""
    parts = []
    ctrl = [r for r in rows if r["role"] == "control" and r["metric"] == primary]
    frozen = next((r for r in ctrl if control_of(r["method"]) == ("frozen", baseline)), None)
    aa = next((r for r in ctrl if control_of(r["method"]) == ("aa", baseline)), None)
    if sched is not None:
        where = ("the budget" if sched.source == "budget" else "the largest cost every run reached")
        parts.append(f"At {where} ({fmt_cost(sched.budget, sched.axis)}, runs compared at matched cost), "
                     f"vs {baseline} (its mean gain on {primary.split('/', 1)[-1]}: "
                     f"{_f(notes.get('baseline_gain', math.nan), 4)}):")
    if power is False:
        parts.append(f"NO POWER at this budget: {frozen['method']} (the baseline with frozen weights) is "
                     f"{frozen['outcome']}, not worse, than {baseline} ({_f(frozen['estimate'])} "
                     f"[{_f(frozen['lo'])}, {_f(frozen['hi'])}]): this comparison cannot see the baseline's "
                     f"own learning, so it ranks nothing.")
    else:
        conf = [r for r in rows if r["role"] == "confirmatory"]
        keys = list(dict.fromkeys(r["metric"] for r in conf if r["axis"] == "reward@budget"))
        for k in keys:
            rk = [r for r in conf if r["axis"] == "reward@budget" and r["metric"] == k]
            groups = {o: [r for r in rk if r["outcome"] == o] for o in inf.OUTCOMES}
            bits = []
            if groups["better"]:
                bits.append("ahead: " + "; ".join(_short(r) + f" ({r['seeds_above']}/{r['n']} seeds above)"
                                                  for r in sorted(groups["better"], key=lambda r: -r["estimate"])))
            if groups["equivalent"]:
                bits.append("equivalent (within +-" + f"{groups['equivalent'][0]['sesoi']:.3g}): "
                            + ", ".join(r["method"] for r in groups["equivalent"]))
            if groups["inconclusive"]:
                bits.append("not distinguishable: " + ", ".join(r["method"] for r in groups["inconclusive"]))
            if groups["worse"]:
                bits.append("behind: " + "; ".join(_short(r) for r in sorted(groups["worse"], key=lambda r: r["estimate"])))
            parts.append(f"{metric_name(rs, k)}: " + "; ".join(bits) + ".")
        cost = [r for r in conf if r["axis"] == "cost_to_target"]
        if cost:
            unit = UNITS[cost[0]["cost_axis"]]
            for f in dict.fromkeys(r["target_fraction"] for r in cost):
                rf = [r for r in cost if r["target_fraction"] == f]
                cheaper = [r for r in rf if r["outcome"] == "better"]
                dearer = [r for r in rf if r["outcome"] == "worse"]
                txt = f"{unit} to {100 * f:g}% of {baseline}'s gain (method / baseline): "
                txt += "; ".join(filter(None, [
                    ("less: " + "; ".join(_short(r) for r in cheaper)) if cheaper else "",
                    ("more: " + "; ".join(_short(r) for r in dearer)) if dearer else "",
                    (f"{len(rf) - len(cheaper) - len(dearer)} not distinguishable or equivalent"
                     if len(rf) > len(cheaper) + len(dearer) else "")]))
                parts.append(txt + ".")
        elif notes.get("no_cost_claims"):
            parts.append(f"No cost-to-target claims: {notes['no_cost_claims']}.")
        fam = next((r["family_size"] for r in conf), 0)
        if fam:
            parts.append(f"Intervals are Holm-adjusted over the {fam} claims above (95% family-wise).")
    if frozen is None and aa is None:
        parts.append("No controls (bench compare --controls adds them): power and false positives unchecked.")
    else:
        if frozen is not None and power:
            parts.append(f"Control {frozen['method']} is worse than {baseline} ({_f(frozen['estimate'])} "
                         f"[{_f(frozen['lo'])}, {_f(frozen['hi'])}]): the comparison sees the baseline's own learning.")
        elif frozen is None:
            parts.append(f"No frozen control: whether this budget can detect {baseline}'s learning is unchecked.")
        if aa is not None:
            if aa["outcome"] in ("better", "worse"):
                parts.append(f"WARNING: control {aa['method']} (the baseline algorithm, other seeds) came out "
                             f"{aa['outcome']} ({_f(aa['estimate'])} [{_f(aa['lo'])}, {_f(aa['hi'])}]): identical "
                             f"methods differ here, so treat every outcome with suspicion.")
            else:
                parts.append(f"Control {aa['method']} (other seeds) is {aa['outcome']} ({_f(aa['estimate'])} "
                             f"[{_f(aa['lo'])}, {_f(aa['hi'])}]): no false difference between identical methods.")
    return parts
