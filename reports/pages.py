"""The figure pages of the report, in order; each ``page(w, c)`` draws nothing when the runs lack
what it shows. ``c`` is a :class:`reports.context.Context`, ``w`` its :class:`Writer`."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from reports import panels, plots, stats
from reports.context import Context, Writer, final_scores, fmt, reward_label, varies, wrap
from reports.load import X_AXES, RunSet, axis_label

WINDOW_KEYS = ("cfg.algo.window", "cfg.algo.window_size")
LABELS_PER_SAMPLE_PAGE = 4


def _targets(c: Context, key: str) -> list[tuple[str, float]]:
    if key != c.metric:
        return []
    return [(f"{100 * f:g}% of {c.baseline}'s gain", y) for f, y in c.targets]


def curves_page(w: Writer, c: Context) -> None:
    axis = c.opt.x
    xlabel = axis_label(c.rs.runs, axis)
    keys = [("reward_mean", f"{c.rs.train_eval_key().split('/', 1)[-1]} (training batch mean per iteration)")] + [
        (k, reward_label(c.rs, k)) for k in c.rs.eval_keys()]
    ncols = 2 if len(keys) > 1 else 1
    heading = f"Learning curves vs {xlabel} (mean over seeds; 95% t band with >= 3 seeds)"
    fig, axes = w.page(heading, math.ceil(len(keys) / ncols), ncols)
    for ax, (key, ylabel) in zip(axes.flat, keys):
        plots.learning_curves(ax, c.curve(axis, key), xlabel, "reward", labels=c.rs.labels,
                              targets=_targets(c, key), title=ylabel, legend=False)
    for ax in list(axes.flat)[len(keys):]:
        ax.set_axis_off()
    top = plots.figure_legend(fig, plots.curve_handles(c.rs.labels, c.curve(axis, c.metric)))
    fig.text(0.02, 0.01, "Markers: evaluated points (lines between them are straight, not data).", fontsize=7,
             color="#555555")
    w.save(fig, heading, rect_top=top, rect_bottom=0.03)


def axes_page(w: Writer, c: Context) -> None:
    axes_shown = [a for a in X_AXES if a in c.present or (a == "seconds" and not c.wall_ok)]
    heading = f"{c.metric} vs each budget currency"
    fig, axes = w.page(heading, 1, len(axes_shown))
    for ax, axis in zip(axes.flat, axes_shown):
        if not c.axis_allowed(axis):
            plots.note(ax, "wall-clock axis omitted:\n" + "\n".join(c.wall_problems))
            continue
        title = "wall clock: noisy, machine-bound" if axis == "seconds" else None
        plots.learning_curves(ax, c.curve(axis, c.metric), X_AXES[axis][1], reward_label(c.rs, c.metric),
                              labels=c.rs.labels, targets=_targets(c, c.metric), title=title, legend=False)
    top = plots.figure_legend(fig, plots.curve_handles(c.rs.labels, c.curve(c.present[0], c.metric)
                                                       if c.present else None))
    w.save(fig, heading, rect_top=top)


#: Pareto cost columns: (column in runs / cost table, axis label, wall-clock bound, budget axis it is)
PARETO_COSTS = [("s_per_iter", "seconds per training iteration (s)", True, None),
                ("seconds_total", "total training seconds (s)", True, "seconds"),
                ("nfe_total", "total denoiser forward passes (NFE)", False, "nfe"),
                ("samples_total", "total scored samples", False, "samples"),
                ("modeled_seconds_total", "modeled seconds (cost model)", False, "modeled"),
                ("peak_mem_mb", "peak memory (MB)", True, None)]


def pareto_specs(c: Context) -> tuple[list[tuple[str, str]], list[str]]:
    """The cost axes worth a Pareto panel, and why the others were left out: never the quantity the
    budget fixed, nor one that does not vary between methods, nor wall-clock across devices; wall-clock
    time and memory of CPU runs (a shared, contended machine; process memory) only when asked for
    (``wall_pareto``)."""
    keep, why = [], []
    cpu = set(c.rs.runs["device_type"].astype(str)) <= {"cpu", "None", "nan"}
    for col, label, wall, budget in PARETO_COSTS:
        if col not in c.costs or not c.costs[col].notna().any():
            continue
        if budget is not None and budget == c.budget:
            why.append(f"{label}: fixed by the budget")
        elif wall and not c.wall_ok:
            why.append(f"{label}: runs on different devices")
        elif wall and cpu and not c.opt.wall_pareto:
            why.append(f"{label}: CPU runs (contended clock / process memory; --wall-pareto draws it)")
        else:
            ok, reason = varies(c.rs, col) if col in c.rs.runs else (True, "")
            (keep.append((col, label)) if ok else why.append(f"{label}: {reason}"))
    return keep, why


def pareto_page(w: Writer, c: Context) -> None:
    keep, why = pareto_specs(c)
    heading = f"Pareto frontiers: {c.metric} at the budget (mean; 95% t interval with >= 3 seeds) vs cost; filled = non-dominated"
    if not keep:
        fig, axes = w.page(heading)
        plots.note(axes[0, 0], "No Pareto panel: no cost differs between the methods beyond noise or was "
                               "left free by the budget.\n" + "\n".join(why))
        w.save(fig, heading)
        return
    ncols = min(len(keep), 2)
    fig, axes = w.page(heading, math.ceil(len(keep) / ncols), ncols)
    costs = c.costs.set_index("label")
    for ax, (col, label) in zip(axes.flat, keep):
        pts = c.final[["label", "value", "lo", "hi"]].copy()
        pts["cost"] = pts["label"].map(costs[col])
        pts["front"] = stats.pareto_mask(pts["value"], pts["cost"])
        plots.pareto(ax, pts, label, reward_label(c.rs, c.metric), legend=False)
    for ax in list(axes.flat)[len(keep):]:
        ax.set_axis_off()
    handles = plots.legend_handles(c.rs.labels)
    fig.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, 0.955), ncol=min(len(handles), 8),
               fontsize=8, frameon=False)
    note = "\n".join(wrap(["Left out: " + "; ".join(why)], 190)) if why else ""
    if note:
        fig.text(0.02, 0.03, note, fontsize=8, color="#555555", va="bottom")
    w.save(fig, heading, rect_top=0.92, rect_bottom=0.03 + 0.022 * (note.count("\n") + 1) if note else 0.02)


def tuning_kind(state: str, reason: str) -> str:
    """complete | rejected (pruned by --reject-hacking) | pruned | failed, from a trials.csv row."""
    if state == "COMPLETE":
        return "complete"
    if state == "PRUNED":
        return "rejected" if "possible reward hacking" in reason else "pruned"
    return "failed"


def tuning_rows(c: Context) -> pd.DataFrame:
    """One row per tuned algorithm: what was tried, how each trial ended and what the tuned arm runs."""
    rows = []
    for algo in [a for a in dict.fromkeys(c.rs.runs["algo"].astype(str)) if a in c.rs.tuning]:
        info, trials = c.rs.tuning[algo]["tuned"], c.rs.tuning[algo]["trials"]
        kinds: dict[str, int] = {}
        if trials is not None:
            for st, rs in zip(trials["state"].astype(str), trials.get("reason", pd.Series([""] * len(trials)))):
                k = tuning_kind(st, "" if pd.isna(rs) else str(rs))
                kinds[k] = kinds.get(k, 0) + 1
        else:
            kinds = {k.lower(): v for k, v in (info.get("states") or {}).items()}
        space = info.get("grid") or info.get("ranges") or {}
        tried = "; ".join(f"{k} {', '.join(map(str, v))}" if info.get("grid") else f"{k} {v[0]:g}..{v[1]:g}"
                          for k, v in space.items()) or ", ".join(info.get("space") or []) + " (built-in range)"
        over = info.get("overrides") or {}
        seeds = info.get("seeds") or [info.get("seed")]
        rows.append({"method": algo, "tried": tried,
                     "tuned": ", ".join(f"{k.split('.')[-1]} {v:g}" if isinstance(v, float) else f"{k}={v}"
                                        for k, v in over.items()) or "reference defaults (no trial completed)",
                     "best value": f"{info['best_value']:.3f}" if info.get("best_value") is not None else "-",
                     "trials": " / ".join(str(kinds.get(k, 0)) for k in ("complete", "rejected", "pruned", "failed")),
                     "budget per trial": str(info.get("budget_per_trial")),
                     "seeds": f"{seeds[0]}" if len(seeds) == 1 else f"{seeds[0]}-{seeds[-1]} (mean)"})
    return pd.DataFrame(rows)


def tuning_page(w: Writer, c: Context) -> None:
    """bench compare --tune: every algorithm's study (the same space, trials and budget per trial) and the
    settings its tuned arm runs."""
    table = tuning_rows(c)
    if table.empty:
        return
    infos = {a: c.rs.tuning[a]["tuned"] for a in table["method"]}
    first = next(iter(infos.values()))
    heading = "Tuning: the same budget for every method (bench compare --tune)"
    fig, axes = w.page(heading, 3, 1, gridspec_kw={"height_ratios": [3, 0.55, 1.6]})
    params = {tuple(i.get("space") or []) for i in infos.values()}
    param = next(iter(params))[0] if len(params) == 1 and len(next(iter(params))) == 1 else None
    studies = {}
    for algo, info in infos.items():
        t = c.rs.tuning[algo]["trials"]
        col = f"params_{param}" if param else None
        if t is None or col not in t:
            continue
        reasons = t["reason"].fillna("").astype(str) if "reason" in t else pd.Series([""] * len(t))
        studies[algo] = pd.DataFrame({
            "x": pd.to_numeric(t[col], errors="coerce"), "value": pd.to_numeric(t["value"], errors="coerce"),
            "kind": [tuning_kind(str(s), r) for s, r in zip(t["state"], reasons)],
            "best": t["number"] == info.get("best_trial")})
    ax = axes[0, 0]
    objective = str(first.get("objective"))
    if param and studies:
        xs = pd.concat([d["x"] for d in studies.values()]).dropna()
        log = param == "lr" or bool(len(xs) and xs.min() > 0 and xs.max() / xs.min() >= 10)
        plots.tuning_trials(ax, studies, param, f"{objective} on the validation prompts", log)
        many = any(len(i.get("seeds") or [0]) > 1 for i in infos.values())
        ax.set_title("each trial's final value" + (" (the mean over its seeds)" if many else ""), fontsize=9)
    else:
        plots.note(ax, "the trials table is missing or the studies tune more than one parameter: see the table "
                       "and DIR/tuning/<algo>/trials.csv")
    lines = [(f"Objective: {objective} at the end of each trial, on the validation prompts (eval prompts past the "
              f"held-out ones the verdict uses); a trial the whole-curve reward-hacking rule flags in any seed is "
              f"rejected. Sampler {first.get('sampler')}, pruner {first.get('pruner')}, evaluated every "
              f"{first.get('eval_every')}. The final comparison runs each method's tuned settings on fresh seeds."),
             "Trials: complete / rejected (reward hacking) / pruned / failed."]
    if first.get("objective_note"):
        lines.append(f"Note: {first['objective_note']}")
    panels.text_block(axes[1, 0], wrap(lines, 150), fontsize=8)
    panels.table(axes[2, 0], table)
    w.save(fig, heading)


def timing_page(w: Writer, c: Context) -> None:
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
    per = (c.costs["nfe_total"] / c.costs["samples_total"]).to_numpy(dtype=float)
    plots.bars(axes[0, 1], list(c.costs["label"]), per, "denoiser forward passes (NFE) per scored sample")
    w.save(fig, heading)


def _grid_runs(c: Context) -> pd.DataFrame:
    cols = ["cfg.algo.k", "cfg.algo.d"]
    if not all(k in c.rs.runs for k in cols):
        return c.rs.runs.iloc[0:0]
    return c.rs.runs.dropna(subset=cols)


def kd_cells(c: Context, g: pd.DataFrame, metric: str | None = None) -> pd.DataFrame:
    """Per (k, d): ``metric`` (default the report's) at the budget (mean [t interval]), NFE per iteration,
    s/iteration, peak memory, optimizer steps over the whole run (mean over seeds; NaN where the records lack
    them), seeds."""
    fs = final_scores(c.rs, metric or c.metric, c.schedule).set_index("run")["value"]
    its = c.rs.iterations
    steps = (pd.to_numeric(its["optimizer_steps"], errors="coerce").groupby(its["run"]).sum(min_count=1)
             if "optimizer_steps" in its else pd.Series(dtype=float))
    g = g.assign(final=g["run"].map(fs), nfe_iter=pd.to_numeric(g["nfe_total"], errors="coerce")
                 / pd.to_numeric(g["iterations"], errors="coerce").clip(lower=1), opt_steps=g["run"].map(steps))
    rows = []
    for (algo, k, d), cell in g.groupby(["algo", "cfg.algo.k", "cfg.algo.d"]):
        s = stats.summarize(cell["final"])
        rows.append({"algo": algo, "k": k, "d": d, "label": str(cell["label"].iloc[0]), "value": s.point,
                     "lo": s.lo, "hi": s.hi, "n": s.n, "nfe_iter": cell["nfe_iter"].mean(),
                     "s_iter": cell["s_per_iter"].mean(), "mem": cell["peak_mem_mb"].mean(),
                     "opt_steps": cell["opt_steps"].mean(),
                     "short": bool((~cell["stop_reason"].astype(str).str.startswith("budget")).any())})
    return pd.DataFrame(rows)


def steps_correlation(cells: pd.DataFrame) -> float | None:
    """Pearson r between the cells' metric and log(optimizer steps): on an equal budget a cheap configuration
    gets more updates, and a grid whose values track that (|r| near 1) ranks update counts as much as k and d.
    None with fewer than 3 cells that have both, or when either does not vary."""
    ok = cells[np.isfinite(cells["value"].astype(float)) & (cells["opt_steps"].astype(float) > 0)]
    if len(ok) < 3:
        return None
    x, y = np.log(ok["opt_steps"].to_numpy(dtype=float)), ok["value"].to_numpy(dtype=float)
    if np.ptp(x) == 0 or np.ptp(y) == 0:
        return None
    return float(np.corrcoef(x, y)[0, 1])


def kd_page(w: Writer, c: Context) -> None:
    """Heatmaps over k x d of the report's metric and of each held-out metric at the budget, of the cost per
    iteration and of the optimizer steps the budget bought; the Pareto front of the report's metric."""
    g = _grid_runs(c)
    if g.empty or len(g[["cfg.algo.k", "cfg.algo.d"]].drop_duplicates()) < 2:
        return
    metrics = [c.metric, *[k for k in held_keys(c) if k != c.metric]][:2]
    per_metric = {m: kd_cells(c, g, m) for m in metrics}
    cells = per_metric[c.metric]
    for algo, cf in cells.groupby("algo", sort=False):
        heading = f"{algo} k/d ablation: branching factor k x branching depth d (seeds per cell: " \
                  f"{'/'.join(map(str, sorted(set(cf['n']))))})"
        steps = bool(cf["opt_steps"].notna().any())
        # NFE per iteration (noise-free) unless the budget made it equal everywhere; the optimizer steps each
        # configuration got from the budget (the update count an equal budget confounds with k and d)
        flat = cf["nfe_iter"].nunique() <= 1 and c.wall_ok
        specs = [(per_metric[m][per_metric[m]["algo"] == algo], "value", f"{m} at the budget (mean)", "{:.3f}",
                  True, True) for m in metrics]
        specs.append((cf, "s_iter", "seconds / iteration", "{:.3g}", False, True) if flat else
                     (cf, "nfe_iter", "NFE per iteration", "{:.0f}", False, True))
        if steps:
            specs.append((cf, "opt_steps", "optimizer steps in the run (mean)", "{:.0f}", True, False))
        ncols = 3 if len(specs) + 1 > 4 else 2
        fig, axes = w.page(heading, 2, ncols)
        cells_axes = list(axes.flat)
        for ax, (frame, col, title, f, high, box) in zip(cells_axes, specs):
            tab = frame.pivot(index="d", columns="k", values=col).sort_index().sort_index(axis=1)
            tab.index.name, tab.columns.name = "d (branching depth, SDE steps)", "k (branching factor)"
            marks = frame.pivot(index="d", columns="k", values="short").reindex_like(tab).fillna(False)
            plots.heatmap(ax, tab, title, title, fmt=f, higher_is_better=high, marks=marks, box=box)
        front_ax = cells_axes[len(specs)]
        for ax in cells_axes[len(specs) + 1:]:
            ax.set_axis_off()
        # noise-free cost per iteration (the paper plots seconds per iteration; the heatmap shows that
        # when NFE per iteration is equal everywhere)
        cost, label = ("s_iter", "seconds per iteration (s; wall clock, noisy)") if flat else \
            ("nfe_iter", "NFE per iteration")
        pts = cf.assign(cost=cf[cost], label=[f"k={k} d={d}" for k, d in zip(cf["k"], cf["d"])])
        pts["front"] = stats.pareto_mask(pts["value"], pts["cost"])
        plots.pareto(front_ax, pts, label, reward_label(c.rs, c.metric), legend=False, annotate=True)
        front_ax.set_title(f"Pareto front across k/d, {c.metric} (filled: non-dominated)", fontsize=9)
        foot = []
        rs_ = {m: steps_correlation(per_metric[m][per_metric[m]["algo"] == algo]) for m in metrics}
        if any(r is not None for r in rs_.values()):
            foot.append(f"Correlation across the {int(cf['opt_steps'].notna().sum())} cells between the value at the "
                        "budget and log(optimizer steps): " + ", ".join(f"r = {r:+.2f} ({m})" for m, r in rs_.items()
                                                                       if r is not None)
                        + ". On an equal budget a cheaper iteration buys more updates: |r| near 1 means the grid "
                          "ranks update counts as much as k and d.")
        if cf["short"].any():
            foot.append("* includes runs that did not spend their whole budget (pruned, interrupted or failed): "
                        "their final values come from fewer iterations.")
        foot = wrap(foot, 175)
        if foot:
            fig.text(0.02, 0.03, "\n".join(foot), fontsize=8, va="bottom")
        w.save(fig, heading, rect_bottom=0.03 + 0.018 * len(foot))


def window_page(w: Writer, c: Context) -> None:
    key = next((k for k in WINDOW_KEYS if k in c.rs.runs and c.rs.runs[k].dropna().nunique() >= 2), None)
    if key is None:
        return
    g = c.rs.runs.dropna(subset=[key])
    fs = final_scores(c.rs, c.metric, c.schedule).set_index("run")["value"]
    g = g.assign(final=g["run"].map(fs))
    rows_r, rows_t = [], []
    for (algo, win), cell in g.groupby(["algo", key]):
        s = stats.summarize(cell["final"])
        if s.n:
            rows_r.append({"label": algo, "param": float(win), "value": s.point, "lo": s.lo, "hi": s.hi})
        t = cell["s_per_iter"].to_numpy(dtype=float)
        rows_t.append({"label": algo, "param": float(win), "value": np.nanmean(t), "lo": np.nanmin(t),
                       "hi": np.nanmax(t)})
    heading = f"Window size ({key.removeprefix('cfg.')})"
    fig, axes = w.page(heading, 1, 2)
    plots.param_curve(axes[0, 0], pd.DataFrame(rows_r), "window size (denoising steps)",
                      reward_label(c.rs, c.metric), title=f"{c.metric} at the budget (mean; 95% t interval with >= 3 seeds)")
    if c.wall_ok:
        plots.param_curve(axes[0, 1], pd.DataFrame(rows_t), "window size (denoising steps)",
                          "seconds per iteration (s)", title="time per iteration (mean; bars: min-max)")
    else:
        plots.note(axes[0, 1], "time omitted: runs on different devices")
    w.save(fig, heading)


def _checkpoints(n_evals: int, n: int = 3) -> list[int]:
    if n_evals <= n:
        return list(range(n_evals))
    return sorted({round(i) for i in np.linspace(0, n_evals - 1, n)})


def _prompts(ev: pd.Series) -> list[str]:
    p = ev.get("samples_prompts")
    if isinstance(p, str):
        p = json.loads(p) if p.startswith("[") else None
    return list(p) if isinstance(p, (list, tuple)) else []


def any_sample_grid(c: Context) -> bool:
    """Whether any run directory holds an eval sample grid its records name (run directories exported with
    records only, docs/results/runs, hold none: the report then leaves the sample pages out)."""
    ev = c.rs.evals
    if "samples_png" not in ev or ev.empty:
        return False
    paths = dict(zip(c.rs.runs["run"], c.rs.runs["path"]))
    return any((Path(paths[r]) / str(f)).is_file() for r, f in zip(ev["run"], ev["samples_png"])
               if isinstance(f, str) and r in paths)


def sample_picks(rs: RunSet) -> list[tuple[str, str, Any, Path, pd.DataFrame]]:
    """The evaluations the sample pages show: per method (label) its first run (run, label, seed, path) and
    the eval records at iteration 0, mid-run and the end that name a sample grid. ``scripts/export_runs.py
    --sample-grids`` ships exactly these grids with the exported records."""
    out = []
    for _, r in rs.runs.drop_duplicates("label").iterrows():
        ev = rs.evals[rs.evals["run"] == r["run"]].sort_values("iteration").reset_index(drop=True)
        ev = ev.dropna(subset=["samples_png"]) if "samples_png" in ev else ev.iloc[0:0]
        out.append((r["run"], r["label"], r["seed"], Path(r["path"]), ev.iloc[_checkpoints(len(ev))]))
    return out


def samples_pages(w: Writer, c: Context) -> None:
    """Eval sample grids of the first seed of each method at iteration 0, mid-run and the end, large,
    with each grid row's prompt beside it; none when no run directory holds its grids."""
    if not any_sample_grid(c):
        return
    runs = sample_picks(c.rs)
    chunks = [runs[i:i + LABELS_PER_SAMPLE_PAGE] for i in range(0, len(runs), LABELS_PER_SAMPLE_PAGE)]
    for n, chunk in enumerate(chunks, 1):
        heading = "Eval samples (same prompts and noise in every run; first seed of each method)"
        heading += f" ({n}/{len(chunks)})" if len(chunks) > 1 else ""
        fig, axes = w.page(heading, len(chunk), 3)
        for row, (_run, label, seed, path, picked) in zip(axes, chunk):
            for j, ax in enumerate(row):
                if j >= len(picked):
                    ax.set_axis_off()
                    continue
                e = picked.iloc[j]
                scores = " / ".join(fmt(e.get(k), 3) for k in c.rs.eval_keys() if k in e)
                panels.sample_image(ax, path / str(e["samples_png"]), _prompts(e) if j == 0 else [],
                                   title=f"it {int(e['iteration'])}: {scores}",
                                   ylabel=f"{label} s{seed}" if j == 0 else None)
        fig.text(0.02, 0.015, "Scores: " + " / ".join(k.split("/", 1)[-1] for k in c.rs.eval_keys())
                 + " over the whole eval set; each grid row is one prompt (several noise draws).", fontsize=8)
        w.save(fig, heading, raster=True)


def hacking_page(w: Writer, c: Context) -> None:
    """The reward-hacking judgement per method and held-out reward, with the numbers, and the eval
    curves of the flagged methods (or the first seed of each)."""
    h = c.hacking
    flagged = h[h["flagged"]] if not h.empty else h
    if not c.rs.heldout_keys():
        heading = "Reward hacking: no held-out reward to check"
    else:
        heading = ("Reward hacking: FLAGGED for " + ", ".join(sorted(set(flagged["label"]))) if len(flagged)
                   else "Reward hacking: not flagged")
    labels = list(dict.fromkeys(flagged["label"])) if len(flagged) else c.rs.labels
    shown = [c.rs.runs.loc[c.rs.runs["label"] == lab, "run"].iloc[0] for lab in labels[:4]]
    fig, axes = w.page(heading, 2, max(len(shown), 1), gridspec_kw={"height_ratios": [1, 1.4]})
    gs = axes[0, 0].get_gridspec()
    for ax in axes[0]:
        ax.remove()
    top = fig.add_subplot(gs[0, :])
    rule = ("Flag: in every seed (>= 2) the training reward's eval score rose and a held-out reward fell, "
            "each by more than its resolution (standard error of an eval mean), over the run's own iteration 0.")
    empty = "no held-out reward logged" if not held_keys(c) else "no evaluation records"
    lines = [rule, ""] + (list(h["text"]) if not h.empty else [empty])
    panels.text_block(top, _wrap_lines(lines, 150), fontsize=7)
    train, held = c.rs.train_eval_key(), c.rs.heldout_keys()
    for ax, run in zip(axes[1], shown):
        ev = c.rs.evals[c.rs.evals["run"] == run].sort_values("iteration")
        plots.reward_hacking_panel(ax, ev, train, held, [], title=run, legend=False)
    for ax in list(axes[1])[len(shown):]:
        ax.set_axis_off()
    handles = plots.hacking_handles(train, [k for k in held if k in c.rs.evals])
    fig.legend(handles=handles, loc="lower center", bbox_to_anchor=(0.5, 0.005), ncol=min(len(handles), 4),
               fontsize=8, frameon=False)  # one legend under every panel: none overprints an axis
    w.save(fig, heading, rect_bottom=0.07)


def held_keys(c: Context) -> list[str]:
    return [k for k in c.rs.heldout_keys() if k in c.rs.evals]


def _wrap_lines(lines: Sequence[str], width: int) -> list[str]:
    from reports.context import wrap

    return wrap(list(lines), width)
