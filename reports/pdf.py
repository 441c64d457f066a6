"""The report writer (the only module that writes files): run directories -> one PDF, plus each page
as PNG/SVG and the tables as CSV/Markdown in ``<report>_files/`` next to it.

Fixed page order (pages marked * appear only when the runs contain what they show):
  1. the verdict (one sentence per metric and cost axis, method vs baseline, with its uncertainty)
     and what was compared: methods and seeds, budget, evaluation, metric resolutions, code version
  2. setup details: model, rewards, devices, packages, stop reasons, notes
  3. learning curves on the chosen budget axis (IQM over seeds; CI bands only with >= 3 seeds)
  4. the primary metric vs every budget currency the runs logged
  5. Pareto frontiers, only on costs the budget left free that differ between methods beyond noise
  6. time per iteration by phase; NFE per scored sample
  7*. k/d ablation: heatmaps and the Pareto front across configurations
  8*. window-size curves
  9. eval sample grids (iteration 0, mid-run, end) with their prompts
 10. reward hacking: the judgement per method with its numbers, eval curves
 11. tables: final scores and gains over iteration 0, resolution, P(improve) (>= 3 seeds per side),
     costs, the verdict with its numbers

Wall-clock pages and panels are replaced by a note when the runs ran on different devices; asking for
``x="seconds"`` with mixed devices is refused (load.check_comparable).
"""

from __future__ import annotations

import datetime as _dt
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
from reports import pages, panels, plots, stats
from reports.context import (
    PAGE_SIZE,
    Context,
    ReportOptions,
    Writer,
    final_scores,
    final_table,
    fmt,
    gain_table,
    wrap,
)
from reports.export import write_tables
from reports.load import X_AXES, RunSet, check_comparable, comparability_problems, load, modeled_profiles
from reports.verdict import UNITS, resolution

__all__ = ["Report", "ReportOptions", "build_report", "final_table", "report"]


@dataclass
class Report:
    pages: list[str]
    verdict: list[str]
    files: list[Path] = field(default_factory=list)


def build_report(runs: RunSet | Iterable[str | Path], out: str | Path, options: ReportOptions | None = None,
                 **kw: Any) -> list[str]:
    """Write the PDF report to ``out``; returns the page headings in order."""
    return report(runs, out, options, **kw).pages


def _resolve(rs: RunSet, opt: ReportOptions) -> tuple[str, str]:
    labels = rs.labels
    baseline = opt.baseline
    if baseline is None:
        baseline = next((lab for lab in labels if lab == "dancegrpo"), labels[0])
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
            if old.is_file() and old.suffix in (".png", ".svg", ".csv", ".md"):
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
    if files_dir is not None:
        files += write_tables(tables, files_dir)
    return Report(pages=w.pages, verdict=c.verdict.lines, files=files)


def _write_pdf(tmp: Path, out: Path, c: Any, opt: Any, rs: Any, files_dir: Path | None) -> tuple[Any, Any]:
    with PdfPages(tmp) as pdf:
        w = Writer(pdf, opt.title, files_dir, opt.figure_formats)
        title_page(w, c)
        setup_page(w, c)
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


def title_page(w: Writer, c: Context) -> None:
    heading = c.opt.title
    fig = plt.figure(figsize=PAGE_SIZE)
    fig.suptitle(heading, fontsize=13, fontweight="bold", x=0.02, ha="left")
    seeds = _seeds(c)
    n = sorted({len(v) for v in seeds.values()})
    head = [f"Compared: {', '.join(f'{lab} ({len(s)} seeds)' for lab, s in seeds.items())}",
            (f"Budget: {', '.join(dict.fromkeys(map(str, c.rs.runs['budget_spec'])))}"
             f"   Baseline: {c.baseline}   Primary metric: {c.metric} (final = last evaluation)"),
            f"Evaluation: {_eval_setup(c)}; resolution (standard error of an eval mean): "
            + ", ".join(f"{k.split('/', 1)[-1]} {fmt(resolution(c.rs, k), 2)}" for k in c.rs.eval_keys()),
            (f"Statistics: IQM over seeds; 95% stratified-bootstrap CIs and P(improve) only with >= "
             f"{stats.MIN_N_FOR_INTERVAL} seeds per method (here {'/'.join(map(str, n))}); gains are paired "
             f"differences from each run's own iteration 0")]
    commits = list(dict.fromkeys(f"{str(cm)[:12]}{' (dirty)' if d else ''}"
                                 for cm, d in zip(c.rs.runs["git_commit"], c.rs.runs["git_dirty"])))
    head.append(f"Code: {', '.join(commits)}")
    y = 0.93
    if c.code_problems:
        fig.text(0.02, y, "NOT ONE CLEAN COMMIT: " + "; ".join(c.code_problems)[:220], fontsize=9,
                 color="white", backgroundcolor="#c0392b", fontweight="bold", va="top")
        y -= 0.04
    fig.text(0.02, y, "\n".join(wrap(head, 150)), fontsize=8, family="monospace", va="top")
    y -= 0.02 + 0.0175 * len(wrap(head, 150))
    fig.text(0.02, y, "Verdict", fontsize=12, fontweight="bold", va="top")
    lines = wrap([f"* {s}" for s in c.verdict.lines], 140)
    room = int((y - 0.06) / 0.0175)
    shown = lines[:room] if len(lines) <= room else lines[:room - 1] + ["  (continued on the tables page)"]
    fig.text(0.02, y - 0.035, "\n".join(shown), fontsize=8, family="monospace", va="top")
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
    lines = [f"  - {lab:<28} seeds {', '.join(map(str, s)) or '?'}" for lab, s in _seeds(c).items()]
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
             f"Bootstrap:       {c.opt.reps} resamples",
             f"Report written:  {_dt.datetime.now(_dt.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}"]
    if c.rs.trials is not None:
        states = c.rs.trials["state"].value_counts().to_dict() if "state" in c.rs.trials else {}
        lines.append(f"Sweep trials:    {len(c.rs.trials)} in trials.csv"
                     + (" (" + ", ".join(f"{k} x{v}" for k, v in states.items()) + ")" if states else ""))
    notes = list(c.code_problems)
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

def _final_rows(c: Context) -> pd.DataFrame:
    rs = c.rs
    fs = final_scores(rs, c.metric)
    base = fs.loc[fs["label"] == c.baseline, "value"].to_numpy(dtype=float)
    fin = {k: final_table(rs, k, c.opt.reps).set_index("label") for k in rs.eval_keys()}
    gain = {k: gain_table(rs, k, c.opt.reps).set_index("label") for k in rs.eval_keys()}
    rows = []
    for lab in rs.labels:
        row = {"method": lab, "runs": int(fin[c.metric].loc[lab, "n"])}
        for k in rs.eval_keys():
            name = k.split("/", 1)[-1]
            row[f"final {name} IQM [95% CI]"] = fin[k].loc[lab, "summary"].text(3)
            row[f"{name} gain over it 0"] = gain[k].loc[lab, "summary"].text(3, sign=True)
        mine = fs.loc[fs["label"] == lab, "value"].to_numpy(dtype=float)
        col = f"P(improve over {c.baseline}) on {c.metric.split('/', 1)[-1]} [95% CI]"
        if lab == c.baseline:
            row[col] = "-"
        elif min(mine.size, base.size) < stats.MIN_N_FOR_INTERVAL:
            row[col] = f"n = {min(mine.size, base.size)}: needs >= {stats.MIN_N_FOR_INTERVAL} per side"
        else:
            p, lo, hi = stats.probability_of_improvement_ci(mine, base, reps=c.opt.reps)
            row[col] = f"{p:.2f} [{lo:.2f}, {hi:.2f}]"
        rows.append(row)
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
    v = c.verdict.frame()
    if v.empty:
        return v
    def num(col: str, d: int = 3) -> pd.Series:
        return v[col].map(lambda x: fmt(x, d)) if col in v else pd.Series("-", index=v.index)
    return pd.DataFrame({"method": v["method"], "vs": v["baseline"], "metric": v["metric"].str.split("/").str[-1],
                         "axis": v["axis"].map(lambda a: UNITS.get(a, "")), "n": v["n_method"].astype(str)
                         + " vs " + v["n_baseline"].astype(str), "difference / speed-up":
                         np.where(v["kind"] == "cost", num("speedup"), num("difference")),
                         "95% CI": num("lo") + " .. " + num("hi"), "MDE": num("mde"),
                         "P(improve)": num("p_improve", 2)})


def table_frames(c: Context) -> dict[str, pd.DataFrame]:
    """Every table of the report (formatted strings), also written as CSV/Markdown."""
    out = {"final": _final_rows(c), "costs": _cost_rows(c), "verdict": _verdict_rows(c)}
    if not c.hacking.empty:
        out["reward_hacking"] = c.hacking.drop(columns=["text"]).round(4)
    if not c.verdict.frame().empty:
        out["verdict_numbers"] = c.verdict.frame().round(5)
    return out


def tables_pages(w: Writer, c: Context, tables: dict[str, pd.DataFrame]) -> None:
    """Tables, packed top-down onto as few pages as fit: final scores, costs, verdict, sentences."""
    sections: list[tuple[str, Any]] = [
        ((f"Final scores at each run's last evaluation and gains over its own iteration 0 (IQM over seeds; "
          f"baseline {c.baseline})"), tables["final"]),
        ("Cost per method (mean over runs)", tables["costs"]),
        (("Verdict in numbers (difference: IQM of gains; speed-up: baseline cost / method cost to reach the "
          "baseline's final score; MDE: minimum detectable effect)"), tables["verdict"]),
        ("Verdict:", wrap(c.verdict.lines, 150)),
    ]
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
