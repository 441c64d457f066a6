"""The report writer (the only module that writes files): run directories -> one PDF, plus each page
as PNG/SVG and the tables as CSV/Markdown in ``<report>_files/`` next to it.

Fixed page order (pages marked * appear only when the runs contain what they show):
  1. the headline (who is ahead on what, by how much, how sure, at what budget, what the controls
     show), what was compared, and the claims' sentences, all rendered from verdict.json
  2. setup details: model, rewards, devices, packages, stop reasons, learning rate per arm, notes
  2b*. tuning (bench compare --tune): each method's study (the same space, trials and budget per trial),
     its trials against the tuned parameter and the settings its tuned arm runs
  3. learning curves on the chosen budget axis (IQM over seeds; CI bands only with >= 3 seeds)
  4. the primary metric vs every budget currency the runs logged
  5. Pareto frontiers, only on costs the budget left free that differ between methods beyond noise
  6. time per iteration by phase; NFE per scored sample
  7*. k/d ablation: heatmaps and the Pareto front across configurations
  8*. window-size curves
  9*. eval sample grids (iteration 0, mid-run, end) with their prompts (left out, with a note on the setup page,
     when the run directories hold no grids: exported runs)
 10. reward hacking: the judgement per method with its numbers, eval curves
 11. tables: reward at matched fractions of the budget (the primary table), cost to the targets,
     scores and gains at the budget, costs, every claim in numbers

``verdict.json`` (reports.verdict) is written beside the PDF and into ``<report>_files/``.

Wall-clock pages and panels are replaced by a note when the runs ran on different devices; asking for
``x="seconds"`` with mixed devices is refused (load.check_comparable).
"""

from __future__ import annotations

import datetime as _dt
import math
import os
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.backends.backend_pdf import PdfPages

from bench.errors import UsageError
from bench.rundir import failpoints
from reports import inference, pages, panels, plots
from reports.context import (
    PAGE_SIZE,
    Context,
    ReportOptions,
    Writer,
    final_table,
    fmt,
    wrap,
)
from reports.export import write_tables
from reports.load import (
    X_AXES,
    RunSet,
    check_comparable,
    comparability_problems,
    control_of,
    load,
    modeled_profiles,
    read_tuning,
)
from reports.verdict import UNITS, Verdict, fmt_cost, sesoi_for, write_json

__all__ = ["Report", "ReportOptions", "build_report", "final_table", "report"]


@dataclass
class Report:
    pages: list[str]
    verdict: list[str]                  # the printed lines: headline, then the sentences
    files: list[Path] = field(default_factory=list)
    verdict_json: Path | None = None
    claims: Verdict | None = None


def build_report(runs: RunSet | Iterable[str | Path], out: str | Path, options: ReportOptions | None = None,
                 **kw: Any) -> list[str]:
    """Write the PDF report to ``out``; returns the page headings in order."""
    return report(runs, out, options, **kw).pages


def _resolve(rs: RunSet, opt: ReportOptions) -> tuple[str, str]:
    labels = rs.labels
    baseline = opt.baseline
    if baseline is None:
        methods = [lab for lab in labels if control_of(lab) is None] or labels
        baseline = next((lab for lab in methods if lab == "dancegrpo"), methods[0])
    elif baseline not in labels:
        cands = [lab for lab in labels if plots.algo_of(lab) == baseline]
        if len(cands) != 1:
            raise UsageError(f"baseline {opt.baseline!r} is not among the compared runs; "
                             f"choose one of: {', '.join(labels)}")
        baseline = cands[0]
    metric = opt.metric
    if metric is None:  # the training reward as evaluated; else the first eval reward logged
        metric = next((k for k in [rs.train_eval_key(), *rs.eval_keys()] if k in rs.evals), rs.train_eval_key())
    if metric not in rs.evals:
        raise UsageError(f"metric {metric!r} is not in the eval records; available: {', '.join(rs.eval_keys())}")
    return baseline, metric


def report(runs: RunSet | Iterable[str | Path], out: str | Path, options: ReportOptions | None = None,
           **kw: Any) -> Report:
    """Write the PDF (and, with ``options.figures``, ``<stem>_files/``); return pages and verdict."""
    opt = options or ReportOptions(**kw)
    rs = runs if isinstance(runs, RunSet) else load(runs)
    if rs.runs.empty:
        raise UsageError("no runs to report")
    if opt.tuning:
        for d in opt.tuning:
            if not Path(d).is_dir():
                raise UsageError(f"--tuning {d}: no such directory (a folder of <algo>/tuned.json, e.g. DIR/tuning)")
        found = read_tuning(opt.tuning, set(rs.runs["algo"].astype(str)))
        if not found:
            raise UsageError(f"--tuning {', '.join(map(str, opt.tuning))}: no tuning study (<algo>/tuned.json) of "
                             f"the reported algorithms ({', '.join(sorted(set(rs.runs['algo'].astype(str))))})")
        rs.tuning = {**rs.tuning, **found}
    if opt.x not in X_AXES:
        raise UsageError(f"unknown budget axis {opt.x!r}; choose one of {', '.join(X_AXES)}")
    profs = modeled_profiles(rs.runs)
    if opt.x == "modeled" and (None in profs or len(set(profs)) != 1):
        raise UsageError(f"--x modeled needs every run priced with one cost profile (run.cost_profile or "
                         f"run.clock); these runs have {sorted({str(p) for p in profs})}")
    check_comparable(rs.runs, wall_clock=(opt.x == "seconds"))
    wall_problems = comparability_problems(rs.runs, wall_clock=True)
    baseline, metric = _resolve(rs, opt)
    c = Context(rs, opt, baseline, metric, not wall_problems, wall_problems)
    if opt.x not in c.present:
        raise UsageError(f"budget axis {opt.x!r} ({X_AXES[opt.x][0]}) is not logged by these runs; "
                         f"choose one of {', '.join(c.present)}")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    files_dir = out.with_name(out.stem + "_files") if opt.figures else None
    if files_dir is not None:
        files_dir.mkdir(exist_ok=True)
        for old in files_dir.glob("*"):  # a rebuilt report never keeps pages of an older one
            if old.is_file() and old.suffix in (".png", ".svg", ".csv", ".md", ".json"):
                old.unlink()
    # a temporary name of this writer only (two report steps at once never share it), renamed over ``out``
    fd, tmp_name = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(tmp_name)
    os.chmod(tmp, 0o644)  # mkstemp's 0600 would make the report private
    try:
        w, tables = _write_pdf(tmp, out, c, opt, rs, files_dir)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    files = list(w.files)
    vj = write_json(c.verdict, out.parent / "verdict.json")
    if files_dir is not None:
        files += write_tables(tables, files_dir)
        files.append(write_json(c.verdict, files_dir / "verdict.json"))
    return Report(pages=w.pages, verdict=c.verdict.lines, files=files, verdict_json=vj, claims=c.verdict)


def _write_pdf(tmp: Path, out: Path, c: Any, opt: Any, rs: Any, files_dir: Path | None) -> tuple[Any, Any]:
    with PdfPages(tmp) as pdf:
        w = Writer(pdf, opt.title, files_dir, opt.figure_formats)
        title_page(w, c)
        setup_page(w, c)
        pages.tuning_page(w, c)
        pages.curves_page(w, c)
        pages.axes_page(w, c)
        pages.pareto_page(w, c)
        pages.timing_page(w, c)
        pages.kd_page(w, c)
        pages.window_page(w, c)
        pages.samples_pages(w, c)
        pages.hacking_page(w, c)
        tables = table_frames(c)
        tables_pages(w, c, tables)
        d = pdf.infodict()
        d["Title"] = opt.title
        d["Subject"] = "treebench comparison of " + ", ".join(rs.labels)
    failpoints.hit("report", out)
    tmp.replace(out)
    return w, tables


# --------------------------------------------------------------------------------------- page 1-2

def _seeds(c: Context) -> dict[str, list[int]]:
    r = c.rs.runs
    return {lab: sorted(pd.to_numeric(r.loc[r["label"] == lab, "seed"], errors="coerce").dropna().astype(int))
            for lab in c.rs.labels}


def _eval_setup(c: Context) -> str:
    ev = [(m.get("config") or {}).get("eval") or {} for m in c.rs.manifests.values()]
    combos = {(e.get("num_prompts"), e.get("images_per_prompt", 1), e.get("seed", "run seed")) for e in ev}
    return "; ".join(f"{p} prompts x {k} images, eval seed {s}" for p, k, s in sorted(combos, key=str))


def _statistics_line(c: Context) -> str:
    sesoi = ", ".join(f"{k.split('/', 1)[-1]} {v:.3g}" for k, (v, _) in
                      ((k, sesoi_for(c.rs, k, c.opt.sesoi)) for k in c.rs.eval_keys()) if np.isfinite(v))
    return ("Statistics: mean over seeds; method - baseline paired per image (shared eval prompts x noise), "
            "Welch-t over seeds plus a prompt term, 95% intervals (t, not bootstrap); better/worse = interval "
            f"excludes 0, equivalent = inside +-SESOI ({sesoi or 'none'}; costs "
            f"{1 + c.opt.sesoi.get('cost', 0.25):.3g}x), else inconclusive; page-1 claims Holm-adjusted; "
            f"intervals need >= {inference.MIN_SEEDS} seeds a side (here "
            f"{'/'.join(map(str, sorted({len(v) for v in _seeds(c).values()})))})")


def _schedule_line(c: Context) -> str:
    s = c.schedule
    if s is None:
        return "Matched cost: no cost axis logged"
    src = "the runs' budget" if s.source == "budget" else "the largest cost every run reached (not a common budget)"
    frac = ", ".join(f"{100 * f:g}%" for f in c.opt.fractions)
    return (f"Matched cost: {UNITS[s.axis]}, budget {fmt_cost(s.budget, s.axis)} ({src}); rewards compared at "
            f"{frac} of it, each run at its evaluation at most one iteration past the matched cost, never "
            f"interpolated; targets {', '.join(f'{100 * f:g}%' for f in c.opt.targets)} of {c.baseline}'s gain")


def title_page(w: Writer, c: Context) -> None:
    heading = c.opt.title
    fig = plt.figure(figsize=PAGE_SIZE)
    fig.suptitle(heading, fontsize=13, fontweight="bold", x=0.02, ha="left")
    seeds = _seeds(c)
    y = 0.93
    if c.code_problems:
        fig.text(0.02, y, "NOT ONE CLEAN COMMIT: " + "; ".join(c.code_problems)[:220], fontsize=9,
                 color="white", backgroundcolor="#c0392b", fontweight="bold", va="top")
        y -= 0.04
    head = wrap(c.verdict.headline_parts or [c.verdict.headline], 160)
    fig.text(0.02, y, "\n".join(head), fontsize=8.5, va="top",
             color="#c0392b" if c.verdict.power is False else "black")
    y -= 0.0205 * len(head) + 0.02
    setup = [f"Compared: {', '.join(f'{lab} ({len(s)} seeds)' for lab, s in seeds.items())}",
             (f"Budget: {', '.join(dict.fromkeys(map(str, c.rs.runs['budget_spec'])))}   Baseline: {c.baseline}"
              f"   Primary metric: {c.metric}"),
             _schedule_line(c),
             f"Evaluation: {_eval_setup(c)}; per-image scores: "
             + ("yes" if not c.rs.scores.empty else "no (older run directories: per-seed eval means)"),
             _statistics_line(c)]
    commits = list(dict.fromkeys(f"{str(cm)[:12]}{' (dirty)' if d else ''}"
                                 for cm, d in zip(c.rs.runs["git_commit"], c.rs.runs["git_dirty"])))
    setup.append(f"Code: {', '.join(commits)}")
    setup = wrap(setup, 170)
    fig.text(0.02, y, "\n".join(setup), fontsize=7, family="monospace", va="top", color="#333333")
    y -= 0.016 * len(setup) + 0.02
    fig.text(0.02, y, "Claims", fontsize=11, fontweight="bold", va="top")
    sent = c.verdict.sentences()
    lines = wrap([f"* {s}" for s in sent] if sent else ["(no claims)"], 175)
    if c.verdict.power is False:
        lines.append("  (method claims withheld: no power at this budget; numbers in verdict.json and the tables)")
    room = int((y - 0.05) / 0.0145)
    shown = lines[:room] if len(lines) <= room else lines[:room - 1] + [
        "  (more claims: the tables pages and verdict.json)"]
    fig.text(0.02, y - 0.03, "\n".join(shown), fontsize=6.8, family="monospace", va="top")
    w.save(fig, heading, tight=False)


def setup_page(w: Writer, c: Context) -> None:
    r = c.rs.runs
    heading = "Setup"
    fig, axes = w.page(heading)
    u = lambda vals: ", ".join(dict.fromkeys(str(v) for v in vals if v is not None and str(v) != "nan"))
    pk: dict[str, set] = {}
    for m in c.rs.manifests.values():
        for name, ver in (m.get("packages") or {}).items():
            pk.setdefault(name, set()).add(str(ver))
    lrs = {lab: u(sorted(set(g.dropna()))) for lab, g in r.groupby("label")["lr"]} if "lr" in r else {}
    lines = [f"  - {lab:<28} seeds {', '.join(map(str, s)) or '?':<22}" + (f" lr {lrs[lab]}" if lrs.get(lab) else "")
             for lab, s in _seeds(c).items()]
    lines = [f"Compared:        {len(c.rs.labels)} method(s), {len(r)} run(s)", *lines, "",
             f"Model:           {u(r['model'])}",
             f"Training reward: {u(r['reward'] + ' v' + r['reward_version'])}",
             f"Eval rewards:    {u(r['eval_rewards'])}",
             f"Budgets:         {u(r['budget_spec'])}   (budget axis: {c.budget or 'iterations / mixed'})",
             f"Stop reasons:    {', '.join(f'{k} x{v}' for k, v in r['stop_reason'].value_counts().items())}",
             f"Device(s):       {u(r['device_type'].astype(str) + ':' + r['device_name'].astype(str))}",
             f"Git commit(s):   {u(r['git_commit'].astype(str).str[:12] + r['git_dirty'].map(lambda d: ' (dirty)' if d is True else ''))}",
             "Packages:        " + ", ".join(k + " " + "/".join(sorted(v)) for k, v in sorted(pk.items())),
             f"Run dates:       {u(sorted(str(x)[:10] for x in r['created']))}",
             f"Cost axes:       {', '.join(UNITS[a] for a in c.present)}; the verdict uses noise-free axes"
             + (" and wall-clock seconds (noisy)" if c.opt.wall_verdict else ""),
             f"Permutation p:   exact up to {inference.MAX_EXACT:,} splits, else {c.opt.reps:,} seeded draws",
             f"Report written:  {_dt.datetime.now(_dt.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}"]
    if c.rs.trials is not None:
        states = c.rs.trials["state"].value_counts().to_dict() if "state" in c.rs.trials else {}
        lines.append(f"Sweep trials:    {len(c.rs.trials)} in trials.csv"
                     + (" (" + ", ".join(f"{k} x{v}" for k, v in states.items()) + ")" if states else ""))
    notes = list(c.code_problems)
    if not pages.any_sample_grid(c):
        notes.append("No eval sample grids in these run directories (runs exported with their records only, as "
                     "under docs/results/runs, keep none): the sample pages are left out.")
    if not c.wall_ok:
        notes.append("Wall-clock and memory panels are omitted: " + "; ".join(c.wall_problems))
    short = r[~r["stop_reason"].astype(str).str.startswith("budget")]
    if len(short):
        notes.append("Runs not stopped by their budget: "
                     + ", ".join(f"{a} ({b})" for a, b in zip(short["run"], short["stop_reason"])))
    if notes:
        lines += ["", "Notes:"] + [f"  * {n}" for n in notes]
    panels.text_block(axes[0, 0], wrap(lines, 120), fontsize=9)
    w.save(fig, heading)


# --------------------------------------------------------------------------------------- tables

def _ci(v: float, lo: float, hi: float, d: int = 3) -> str:
    if not np.isfinite(v):
        return "-"
    if not (np.isfinite(lo) and np.isfinite(hi)):
        return f"{v:+.{d}f}"
    return f"{v:+.{d}f} [{lo:+.{d}f}, {hi:+.{d}f}]"


def _final_rows(c: Context) -> pd.DataFrame:
    """Per method: the score and the gain over iteration 0 at the budget on every eval metric."""
    rs = c.rs
    fin = {k: final_table(rs, k, c.schedule).set_index("label") for k in rs.eval_keys()}
    rows = []
    for lab in rs.labels:
        row = {"method": lab, "runs": int(fin[c.metric].loc[lab, "n"])}
        for k in rs.eval_keys():
            name = k.split("/", 1)[-1]
            row[f"{name} at the budget, mean [95% CI]"] = fin[k].loc[lab, "summary"].text(3)
            row[f"{name} gain over it 0"] = fin[k].loc[lab, "gain"].text(3, sign=True)
        rows.append(row)
    return pd.DataFrame(rows)


def _matched_rows(c: Context) -> pd.DataFrame:
    """The primary table: per metric, budget fraction and method, the mean gain [95% t interval] and the
    difference from the baseline [95% CI] with its outcome."""
    rows = []
    reward = [r for r in c.verdict.rows if r["axis"] == "reward@budget"]
    for r0 in reward:
        if r0["method"] != reward[0]["method"]:
            continue  # one baseline row per (metric, fraction)
        b = inference.mean_interval(r0["baseline_values"])
        rows.append({"method": c.baseline, "metric": r0["metric"].split("/", 1)[-1],
                     "budget": f"{100 * r0['budget_fraction']:g}%", "gain over it 0 [95% CI]": _ci(*b),
                     "vs baseline [95% CI]": "-",
                     "outcome": "(baseline)", "seeds above": "-", "n": len(r0["baseline_values"])})
    for r in reward:
        m = inference.mean_interval(r["method_values"])
        rows.append({"method": r["method"], "metric": r["metric"].split("/", 1)[-1],
                     "budget": f"{100 * r['budget_fraction']:g}%", "gain over it 0 [95% CI]": _ci(*m),
                     "vs baseline [95% CI]": _ci(r["estimate"], r["lo"], r["hi"]),
                     "outcome": r["outcome"] + ("" if r["role"] == "confirmatory" else f" ({r['role']})"),
                     "seeds above": f"{r['seeds_above']}/{r['n']}" if r["seeds_above"] is not None else "-",
                     "n": r["n"]})
    if not rows:
        return pd.DataFrame()
    df = pd.DataFrame(rows)
    order = {m: i for i, m in enumerate(c.rs.labels)}
    keys = {k.split("/", 1)[-1]: i for i, k in enumerate([c.metric] + c.rs.eval_keys())}
    df["_k"], df["_m"], df["_b"] = (df["metric"].map(keys), df["method"].map(order),
                                    df["budget"].str.rstrip("%").astype(float))
    return (df.sort_values(["_k", "_b", "_m"], kind="stable").drop(columns=["_k", "_m", "_b"])
            .reset_index(drop=True))


def _bracket_cell(b: list[float], k: int, n: int, axis: str) -> str:
    return f"{k}/{n}: " + (f"{fmt_cost(b[0], axis)} .. {fmt_cost(b[1], axis)}" if np.isfinite(b[1])
                           else f"> {fmt_cost(b[0], axis)}")


def _ratio_cell(v: float) -> str:
    return "inf" if v == math.inf else (f"{v:.2f}" if np.isfinite(v) else "-")


def _cost_target_rows(c: Context) -> pd.DataFrame:
    rows = []
    for r in c.verdict.rows:
        if r["axis"] != "cost_to_target":
            continue
        ax, ratio = r["cost_axis"], _ratio_cell
        rows.append({"method": r["method"], "target": f"{100 * r['target_fraction']:g}% ({r['target']:+.4f})",
                     "axis": UNITS[ax], "reached, median bracket": _bracket_cell(r["bracket"], r["reached"], r["n"], ax),
                     "baseline": _bracket_cell(r["bracket_baseline"], r["reached_baseline"], r["n_baseline"], ax),
                     "cost ratio [95% CI]": f"{ratio(r['estimate'])} [{ratio(r['lo'])}, {ratio(r['hi'])}]",
                     "outcome": r["outcome"] + ("" if r["role"] == "confirmatory" else f" ({r['role']})")})
    return pd.DataFrame(rows)


def _cost_rows(c: Context) -> pd.DataFrame:
    rows = []
    wall = (lambda v, d=3: fmt(v, d)) if c.wall_ok else (lambda v, d=3: "n/a")
    for _, r in c.costs.iterrows():
        row = {"method": r["label"], "s / iteration": wall(r["s_per_iter"]), "rollout s/it": wall(r["t_rollout_s"]),
               "reward s/it": wall(r["t_reward_s"]), "update s/it": wall(r["t_update_s"]),
               "iterations": fmt(r["iterations"], 4), "samples": fmt(r["samples_total"], 6),
               "NFE": fmt(r["nfe_total"], 4), "NFE / sample": fmt(r["nfe_total"] / r["samples_total"])}
        if "modeled_seconds_total" in r:
            row["modeled s"] = fmt(r["modeled_seconds_total"], 4)
        row["train seconds"] = wall(r["seconds_total"], 4)
        row["peak MB"] = wall(r["peak_mem_mb"], 4)
        rows.append(row)
    return pd.DataFrame(rows)


def _verdict_rows(c: Context) -> pd.DataFrame:
    """Every claim in numbers (verdict.json, formatted)."""
    v = c.verdict.frame()
    if v.empty:
        return v
    g = lambda x, d=3: fmt(x, d)
    where = [f"{100 * r['budget_fraction']:g}% budget" if r["axis"] == "reward@budget"
             else f"{100 * r['target_fraction']:g}% gain, {UNITS[r['cost_axis']]}" for _, r in v.iterrows()]
    return pd.DataFrame({
        "method": v["method"], "vs": v["baseline"], "metric": v["metric"].str.split("/").str[-1], "where": where,
        "role": v["role"], "outcome": v["outcome"], "estimate": v["estimate"].map(g),
        "95% CI": v["lo"].map(g) + " .. " + v["hi"].map(g),
        "adjusted CI": np.where(v["role"] == "confirmatory", v["lo_adj"].map(g) + " .. " + v["hi_adj"].map(g), "-"),
        "p": v["p"].map(lambda x: fmt(x, 2)), "p Holm": v["p_holm"].map(lambda x: fmt(x, 2)),
        "p perm": v["p_perm"].map(lambda x: fmt(x, 2)), "SESOI": v["sesoi"].map(g),
        "MDE": v["mde"].map(g) if "mde" in v else "-", "n": v["n"].astype(str) + " vs " + v["n_baseline"].astype(str)})


def table_frames(c: Context) -> dict[str, pd.DataFrame]:
    """Every table of the report (formatted strings), also written as CSV/Markdown."""
    out = {"matched_budget": _matched_rows(c), "cost_to_target": _cost_target_rows(c), "final": _final_rows(c),
           "costs": _cost_rows(c), "verdict": _verdict_rows(c)}
    if not c.hacking.empty:
        out["reward_hacking"] = c.hacking.drop(columns=["text"]).round(4)
    return out


def tables_pages(w: Writer, c: Context, tables: dict[str, pd.DataFrame]) -> None:
    """Tables, packed top-down onto as few pages as fit: reward at matched budgets, cost to targets, scores
    at the budget, costs (every claim in numbers is in verdict.json and verdict.csv, not drawn)."""
    sections: list[tuple[str, Any]] = [
        ((f"Reward at matched fractions of the budget: gain over iteration 0 (mean, 95% t) and difference from "
         f"{c.baseline} (paired per image)"), tables["matched_budget"]),
        ((f"Cost to reach a fraction of {c.baseline}'s gain (brackets between evaluations; ratio method / "
         f"baseline, < 1: cheaper)"), tables["cost_to_target"]),
        ("Scores and gains at the budget (mean over seeds, 95% t interval)", tables["final"]),
        ("Cost per method (mean over runs)", tables["costs"]),
        (("Every claim with its p-values, adjusted interval, SESOI and MDE: verdict.json and "
          "<report>_files/verdict.csv"), []),
    ]
    sections = [(t, b) for t, b in sections if not (isinstance(b, pd.DataFrame) and b.empty)]
    title_pt, gap_pt, line_pt = 20.0, 16.0, 8 * 1.3
    page_h = PAGE_SIZE[1] * 72
    top, bottom = 0.92 * page_h, 0.05 * page_h

    def body_pt(body: Any) -> float:
        return panels.table_height_pt(body) if isinstance(body, pd.DataFrame) else line_pt * max(len(body), 1)

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
                panels.table(ax, body, title=title)
            else:
                ax.set_axis_off()
                ax.set_title(title, fontsize=10, loc="left")
                panels.text_block(ax, body, fontsize=8, top=1.0)
            y -= h + gap_pt
        w.save(fig, heading, tight=False)
