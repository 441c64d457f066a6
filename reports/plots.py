"""Plot functions: ``f(ax, data, ...) -> ax``. They draw on a given matplotlib Axes and never save.

Every algorithm has a fixed colour on every page (``color``). Variants of one algorithm that differ in
one setting share its hue in shades from dark to light and differ by line style / marker; a grid over two
settings (k x d) gets one hue per value of the first (k) and one lightness, line style and marker per
value of the second (d). Control arms (``<baseline>-aa``: the baseline's hue, light and dotted;
``<baseline>-frozen``: grey, dashed) are told apart from methods at a glance.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from bench.registry import ALGORITHMS
from reports.load import control_of

#: The fixed colour of every registered algorithm (``bench.registry.ALGORITHMS``: one place to add one).
COLORS = {name: e.color for name, e in ALGORITHMS.items() if e.color}
_OTHER_COLORS = ("#7f7f7f", "#bcbd22", "#393b79", "#637939", "#8c6d31", "#843c39", "#7b4173")
_LINESTYLES = ("-", "--", "-.", ":")
_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
#: Hues of the first setting of a two-setting grid (k of a k x d grid), distinguishable side by side.
GRID_HUES = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf", "#bcbd22")
FROZEN_COLOR = "#7f7f7f"

PHASE_LABELS = {
    "t_rollout_s": "rollout",
    "t_reward_s": "reward",
    "t_advantage_s": "advantage",
    "t_update_s": "update",
}
PHASE_COLORS = {"t_rollout_s": "#4c72b0", "t_reward_s": "#dd8452", "t_advantage_s": "#55a868",
                "t_update_s": "#c44e52"}


#: Label suffix of the reference-defaults arm of a tuned comparison (``bench compare --tune``): it is drawn
#: as a variant of its algorithm (same hue, another shade and line style), not as another algorithm.
DEFAULT_ARM = "-default"


def algo_of(label: str) -> str:
    first = str(label).split(" ")[0]
    return first[: -len(DEFAULT_ARM)] if first.endswith(DEFAULT_ARM) and len(first) > len(DEFAULT_ARM) else first


def color(label: str) -> str:
    """Fixed colour of the label's algorithm (first word); unknown algorithms hash to a stable colour;
    a control arm takes its baseline's colour (the frozen arm grey)."""
    ctrl = control_of(label)
    if ctrl is not None:
        return FROZEN_COLOR if ctrl[0] == "frozen" else shade(color(ctrl[1]), 0.45)
    algo = algo_of(label)
    if algo in COLORS:
        return COLORS[algo]
    return _OTHER_COLORS[zlib.crc32(algo.encode()) % len(_OTHER_COLORS)]


def shade(base: str, t: float) -> str:
    """The base colour darkened (t < 0, towards black) or lightened (t > 0, towards white) by |t|."""
    from matplotlib.colors import to_hex, to_rgb

    rgb = np.array(to_rgb(base))
    target = np.ones(3) if t > 0 else np.zeros(3)
    return to_hex(rgb + abs(t) * (target - rgb))


def _settings(label: str) -> dict[str, str]:
    """``treegrpo k=3 d=2`` -> {"k": "3", "d": "2"}."""
    return dict(tok.split("=", 1) for tok in str(label).split(" ")[1:] if "=" in tok)


def _value_key(v: str) -> Any:
    try:
        return (0, float(v), "")
    except ValueError:
        return (1, 0.0, v)


def styles(labels: Sequence[str]) -> dict[str, dict[str, Any]]:
    """label -> {color, linestyle, marker} (module docstring: shades for one setting, hue x lightness
    for a two-setting grid, controls light/dotted and grey/dashed)."""
    groups: dict[str, list[str]] = {}
    for lab in labels:
        if control_of(lab) is None:
            groups.setdefault(algo_of(lab), []).append(lab)
    out: dict[str, dict[str, Any]] = {}
    for labs in groups.values():
        sets = {lab: _settings(lab) for lab in labs}
        names = list(dict.fromkeys(k for s_ in sets.values() for k in s_))
        varying = [k for k in names if len({s_.get(k) for s_ in sets.values()}) > 1]
        if len(labs) > 1 and len(varying) >= 2:
            first, second = varying[0], varying[1]
            v1 = sorted({sets[lab].get(first, "") for lab in labs}, key=_value_key)
            v2 = sorted({sets[lab].get(second, "") for lab in labs}, key=_value_key)
            for lab in labs:
                i, j = v1.index(sets[lab].get(first, "")), v2.index(sets[lab].get(second, ""))
                t = 0.0 if len(v2) == 1 else -0.35 + 0.8 * j / (len(v2) - 1)
                out[lab] = {"color": shade(GRID_HUES[i % len(GRID_HUES)], t),
                            "linestyle": _LINESTYLES[j % len(_LINESTYLES)], "marker": _MARKERS[j % len(_MARKERS)]}
            continue
        m = len(labs)
        for n, lab in enumerate(labs):
            t = 0.0 if m == 1 else -0.45 + 0.95 * n / (m - 1)
            out[lab] = {"color": shade(color(lab), t), "linestyle": _LINESTYLES[n % len(_LINESTYLES)],
                        "marker": _MARKERS[n % len(_MARKERS)]}
    for lab in labels:
        ctrl = control_of(lab)
        if ctrl is not None:
            out[lab] = {"color": color(lab), "linestyle": "--" if ctrl[0] == "frozen" else ":",
                        "marker": "X" if ctrl[0] == "frozen" else "P"}
    return out


def readable_x(ax: plt.Axes, nbins: int = 5) -> None:
    """At most ``nbins`` x ticks in engineering notation (60k, 1.2M) so large budgets never collide."""
    from matplotlib.ticker import EngFormatter, MaxNLocator

    if ax.get_xscale() == "linear":
        ax.xaxis.set_major_locator(MaxNLocator(nbins=nbins))
        ax.xaxis.set_major_formatter(EngFormatter(sep=""))


def _legend(ax: plt.Axes, **kw: Any) -> None:
    handles, _ = ax.get_legend_handles_labels()
    if handles:
        ax.legend(fontsize=kw.pop("fontsize", 8), framealpha=0.85, **kw)


def note(ax: plt.Axes, text: str, width: int | None = None) -> plt.Axes:
    """An empty panel that says why it is empty (text wrapped to the panel's width)."""
    import textwrap

    ax.set_axis_off()
    if width is None:  # ~ characters of 9 pt text that fit the panel
        width = max(20, int(ax.get_position().width * ax.figure.get_figwidth() * 72 / 5.6))
    wrapped = "\n".join(textwrap.fill(par, width) for par in text.split("\n"))
    ax.text(0.5, 0.5, wrapped, ha="center", va="center", fontsize=9, transform=ax.transAxes, color="#555555")
    return ax


# --------------------------------------------------------------------------------------- curves

def learning_curves(
    ax: plt.Axes,
    curves: pd.DataFrame,
    xlabel: str,
    ylabel: str,
    title: str | None = None,
    labels: Sequence[str] | None = None,
    targets: Sequence[tuple[str, float]] = (),
    legend: bool = True,
) -> plt.Axes:
    """Mean curve per label with its 95% t band; markers at the evaluated points (column ``evaluated``:
    the line between them is a straight line, not data); dotted horizontal lines at ``targets``
    [(name, y)]. ``curves``: label, x, value, lo, hi, n[, evaluated] (stats.aggregate_curves)."""
    labels = list(labels) if labels is not None else list(dict.fromkeys(curves["label"]))
    st = styles(labels)
    for lab in labels:
        g = curves[curves["label"] == lab]
        if g.empty:
            continue
        s = st[lab]
        n = int(g["n"].iloc[0])
        ax.plot(g["x"], g["value"], color=s["color"], linestyle=s["linestyle"], lw=1.6, label=f"{lab} (n={n})")
        if "evaluated" in g and g["evaluated"].any():
            e = g[g["evaluated"].astype(bool)]
            ax.plot(e["x"], e["value"], color=s["color"], linestyle="none", marker=s["marker"], ms=4)
        ax.fill_between(g["x"], g["lo"], g["hi"], color=s["color"], alpha=0.18, lw=0)
    for name, y in targets:
        if y is not None and np.isfinite(y):
            ax.axhline(y, color="#444444", lw=0.8, ls=":")
            ax.annotate(name, (1.0, y), xycoords=("axes fraction", "data"), xytext=(-2, 2),
                        textcoords="offset points", ha="right", va="bottom", fontsize=7, color="#444444")
    ax.set_xlabel(xlabel)
    readable_x(ax)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    if curves.empty:
        return note(ax, "no data for this axis")
    if legend:
        _legend(ax, loc="best")
    return ax


def curve_handles(labels: Sequence[str], curves: pd.DataFrame | None = None) -> list:
    """Legend entries (line + marker) for learning curves, for one legend shared by a figure's panels."""
    from matplotlib.lines import Line2D

    st = styles(labels)
    out = []
    for lab in labels:
        n = ""
        if curves is not None and not curves.empty and (curves["label"] == lab).any():
            n = f" (n={int(curves.loc[curves['label'] == lab, 'n'].iloc[0])})"
        out.append(Line2D([], [], color=st[lab]["color"], linestyle=st[lab]["linestyle"],
                          marker=st[lab]["marker"], ms=4, label=f"{lab}{n}"))
    return out


def figure_legend(fig: plt.Figure, handles: list, top: float = 0.945, ncol: int = 6) -> float:
    """One legend for the whole figure under its title; returns the figure y below it (for tight_layout)."""
    if not handles:
        return top
    ncol = max(1, min(ncol, len(handles)))
    rows = math.ceil(len(handles) / ncol)
    fig.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, top), ncol=ncol, fontsize=8,
               frameon=False)
    return top - 0.028 * rows - 0.01


def pareto(
    ax: plt.Axes,
    points: pd.DataFrame,
    cost_label: str,
    reward_label: str,
    log_x: bool = False,
    legend: bool = True,
    annotate: bool = False,
) -> plt.Axes:
    """Final reward (IQM, 95% CI bars) vs cost per label; the non-dominated set (column ``front``)
    drawn filled and joined by a step line, dominated points hollow. ``points``: label, cost,
    value, lo, hi, front."""
    pts = points[np.isfinite(points["cost"].astype(float)) & np.isfinite(points["value"].astype(float))]
    if pts.empty:
        return note(ax, f"no finite {cost_label} values")
    st = styles(list(pts["label"]))
    for _, r in pts.iterrows():
        s = st[r["label"]]
        if np.isfinite(r["lo"]) and np.isfinite(r["hi"]):  # no bar below 3 seeds
            yerr = np.array([[r["value"] - r["lo"]], [r["hi"] - r["value"]]])
            ax.errorbar(r["cost"], r["value"], yerr=np.clip(yerr, 0, None), color=s["color"], capsize=3, lw=1,
                        zorder=2)
        if annotate:
            ax.annotate(str(r["label"]), (r["cost"], r["value"]), textcoords="offset points", xytext=(4, 4),
                        fontsize=7)
        ax.scatter(r["cost"], r["value"], s=70 if r["front"] else 45, marker=s["marker"], zorder=3,
                   facecolors=s["color"] if r["front"] else "white", edgecolors=s["color"], linewidths=1.6,
                   label=r["label"])
    front = pts[pts["front"]].sort_values("cost")
    if len(front) > 1:
        ax.step(front["cost"], front["value"], where="post", color="#333333", lw=1, ls="--", zorder=1,
                label="Pareto front")
    ax.set_xlabel(cost_label)
    ax.set_ylabel(reward_label)
    if log_x:
        ax.set_xscale("log")
    readable_x(ax)
    ax.grid(alpha=0.3)
    ax.margins(x=0.15, y=0.15)
    if legend:
        _legend(ax, loc="best", fontsize=7)
    return ax


def legend_handles(labels: Sequence[str], front: bool = True) -> list:
    """Proxy legend entries (one marker per label, + the Pareto-front line) for a shared figure legend."""
    from matplotlib.lines import Line2D

    st = styles(labels)
    hs = [Line2D([], [], color=st[lab]["color"], marker=st[lab]["marker"], linestyle="none", markersize=7,
                 label=lab) for lab in labels]
    if front:
        hs.append(Line2D([], [], color="#333333", lw=1, ls="--", label="Pareto front"))
        hs.append(Line2D([], [], color="#777777", marker="o", markerfacecolor="white", linestyle="none",
                         label="hollow: dominated"))
    return hs


def phase_breakdown(ax: plt.Axes, phases: pd.DataFrame) -> plt.Axes:
    """Horizontal stacked bars: mean seconds per iteration in each phase, one bar per label.
    ``phases``: label + the four ``t_*_s`` columns (+ optional ``other_s``)."""
    if phases.empty:
        return note(ax, "no timing records")
    labels = list(phases["label"])[::-1]  # first label on top
    y = np.arange(len(labels))
    left = np.zeros(len(labels))
    cols = [c for c in PHASE_LABELS if c in phases] + (["other_s"] if "other_s" in phases else [])
    for c in cols:
        vals = phases.set_index("label").loc[labels, c].astype(float).fillna(0.0).to_numpy()
        ax.barh(y, vals, left=left, color=PHASE_COLORS.get(c, "#bbbbbb"), label=PHASE_LABELS.get(c, "other"),
                edgecolor="white", height=0.6)
        left += vals
    for yi, total in zip(y, left):
        ax.text(total, yi, f" {total:.3g} s", va="center", fontsize=8)
    ax.set_yticks(y, labels)
    for t in ax.get_yticklabels():
        t.set_color(color(t.get_text()))
    ax.set_xlabel("seconds per training iteration (mean over iterations and seeds)")
    ax.set_xlim(0, max(left.max(), 1e-9) * 1.18)
    ax.grid(axis="x", alpha=0.3)
    ax.legend(loc="lower left", bbox_to_anchor=(0.0, 1.01), ncol=len(cols), fontsize=8, frameon=False)
    return ax


def bars(ax: plt.Axes, labels: Sequence[str], values: Sequence[float], xlabel: str) -> plt.Axes:
    """Horizontal bars, one per label (first on top), coloured by algorithm, with the value printed."""
    vals = np.asarray(values, dtype=float)[::-1]
    labs = list(labels)[::-1]
    ax.barh(range(len(labs)), vals, color=[color(lab) for lab in labs], height=0.6)
    for y, v in enumerate(vals):
        ax.text(v, y, f" {v:.3g}", va="center", fontsize=8)
    ax.set_yticks(range(len(labs)), labs)
    for t in ax.get_yticklabels():
        t.set_color(color(t.get_text()))
    ax.set_xlabel(xlabel)
    ax.set_xlim(0, np.nanmax(vals, initial=1) * 1.25 if np.isfinite(vals).any() else 1)
    ax.grid(axis="x", alpha=0.3)
    return ax


def heatmap(
    ax: plt.Axes,
    table: pd.DataFrame,
    title: str,
    cbar_label: str,
    fmt: str = "{:.3g}",
    cmap: str = "viridis",
    higher_is_better: bool = True,
    marks: pd.DataFrame | None = None,
    box: bool = True,
) -> plt.Axes:
    """Annotated heatmap of a pivot table (index = rows, e.g. d; columns = e.g. k); the best cell is boxed
    (``box``). ``marks`` (same shape, bool) appends a "*" to the marked cells' numbers."""
    if table.empty:
        return note(ax, "no grid data")
    vals = table.to_numpy(dtype=float)
    im = ax.imshow(vals, cmap=cmap if higher_is_better else cmap + "_r", aspect="auto", origin="lower")
    ax.set_xticks(range(len(table.columns)), [str(c) for c in table.columns])
    ax.set_yticks(range(len(table.index)), [str(i) for i in table.index])
    ax.set_xlabel(str(table.columns.name))
    ax.set_ylabel(str(table.index.name))
    ax.set_title(title, fontsize=10)
    finite = np.isfinite(vals)
    lo, hi = (np.nanmin(vals), np.nanmax(vals)) if finite.any() else (0, 1)
    for (i, j), v in np.ndenumerate(vals):
        if not np.isfinite(v):
            ax.text(j, i, "-", ha="center", va="center", fontsize=8, color="#888888")
            continue
        frac = (v - lo) / (hi - lo) if hi > lo else 0.5
        dark = frac < 0.5 if higher_is_better else frac > 0.5
        star = "*" if marks is not None and bool(marks.to_numpy()[i, j]) else ""
        ax.text(j, i, fmt.format(v) + star, ha="center", va="center", fontsize=8,
                color="white" if dark else "black")
    if box and finite.any():
        bi, bj = np.unravel_index(np.nanargmax(vals) if higher_is_better else np.nanargmin(vals), vals.shape)
        ax.add_patch(plt.Rectangle((bj - 0.5, bi - 0.5), 1, 1, fill=False, ec="black", lw=2))
    cb = ax.figure.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    cb.set_label(cbar_label, fontsize=8)
    return ax


def param_curve(ax: plt.Axes, data: pd.DataFrame, xlabel: str, ylabel: str, title: str | None = None) -> plt.Axes:
    """Final metric (IQM with CI bars) vs a scalar parameter (e.g. window size), one line per label.
    ``data``: label, param, value, lo, hi."""
    if data.empty:
        return note(ax, "no data")
    labels = list(dict.fromkeys(data["label"]))
    st = styles(labels)
    for lab in labels:
        g = data[data["label"] == lab].sort_values("param")
        s = st[lab]
        ax.errorbar(g["param"], g["value"], yerr=[g["value"] - g["lo"], g["hi"] - g["value"]],
                    color=s["color"], marker=s["marker"], linestyle=s["linestyle"], capsize=3, label=lab)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    _legend(ax, loc="best")
    return ax


def tuning_trials(ax: plt.Axes, studies: dict[str, pd.DataFrame], param: str, ylabel: str, log: bool) -> plt.Axes:
    """The tuning trials of each algorithm against one parameter: ``studies`` maps an algorithm to rows of
    ``x``, ``value`` (NaN when the trial has none), ``kind`` (complete | rejected | pruned | failed) and
    ``best``. Completed trials are joined per algorithm, the chosen one ringed; trials without a value
    are drawn on the lower edge (red x: rejected for reward hacking; hollow: stopped by the pruner; grey x:
    failed). Algorithms are nudged apart along x so that shared grid values stay readable."""
    n = len(studies)
    if not n or all(df.empty for df in studies.values()):
        return note(ax, "no trials")
    for i, (algo, df) in enumerate(studies.items()):
        c = color(algo)
        nudge = (1.02 ** (i - (n - 1) / 2)) if log else 1.0
        xs = df["x"].astype(float) * nudge
        done = df["kind"] == "complete"
        g = df[done].assign(x=xs[done]).sort_values("x")
        ax.plot(g["x"], g["value"], color=c, marker="o", linestyle="-", label=algo, markersize=5)
        best = df[df["best"].astype(bool)]
        ax.plot(xs[best.index], best["value"], linestyle="none", marker="o", markersize=12, markerfacecolor="none",
                markeredgecolor=c, markeredgewidth=1.6)
        edge = ax.get_xaxis_transform()  # x in data, y in axes fraction
        for kind, mk in (("rejected", {"marker": "x", "color": "#d62728"}),
                         ("pruned", {"marker": "o", "markerfacecolor": "none", "color": c}),
                         ("failed", {"marker": "x", "color": "#7f7f7f"})):
            k = df["kind"] == kind
            if k.any():
                ax.plot(xs[k], [0.03] * int(k.sum()), linestyle="none", transform=edge, markersize=7, **mk)
    if log:
        ax.set_xscale("log")
    ax.set_xlabel(param)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    from matplotlib.lines import Line2D

    handles = ax.get_legend_handles_labels()[0] + [
        Line2D([], [], linestyle="none", marker="o", markersize=10, markerfacecolor="none", color="k",
               label="chosen (tuned arm)"),
        Line2D([], [], linestyle="none", marker="x", color="#d62728", label="rejected: reward hacking"),
        Line2D([], [], linestyle="none", marker="o", markerfacecolor="none", color="k", label="pruned"),
        Line2D([], [], linestyle="none", marker="x", color="#7f7f7f", label="failed")]
    ax.legend(handles=handles, fontsize=7, loc="best")
    return ax


# --------------------------------------------------------------------------------------- reward hacking

def reward_hacking_panel(
    ax: plt.Axes,
    evals: pd.DataFrame,
    train_key: str,
    heldout_keys: Sequence[str],
    flags: Sequence[bool],
    title: str | None = None,
    x: str = "iteration",
    xlabel: str = "training iteration",
    window: int = 3,
    legend: bool = True,
) -> plt.Axes:
    """Training reward (left axis, solid) and held-out rewards (right axis, dashed) at each eval;
    eval windows that triggered the reward-hacking rule are shaded."""
    if evals.empty or train_key not in evals:
        return note(ax, "no evaluation records")
    xs = evals[x].to_numpy(dtype=float)
    ax.plot(xs, evals[train_key], color="#222222", marker="o", ms=3, lw=1.5, label=f"{train_key} (training reward)")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(f"{train_key} (training reward)", fontsize=8)
    if x == "iteration":
        from matplotlib.ticker import MaxNLocator

        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    held = [h for h in heldout_keys if h in evals and h != train_key]
    if not held:
        if legend:
            ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.2), frameon=False)
        ax.text(0.5, 0.5, "no held-out eval reward logged:\nreward hacking cannot be detected", ha="center",
                va="center", transform=ax.transAxes, fontsize=8, color="#777777")
        ax.grid(alpha=0.3)
        if title:
            ax.set_title(title, fontsize=9)
        return ax
    ax2 = ax.twinx()
    for i, k in enumerate(held):
        ax2.plot(xs, evals[k], color=HELD_PALETTE[i % len(HELD_PALETTE)], marker="s", ms=3, lw=1.2, ls="--",
                 label=f"{k} (held-out)")
    ax2.set_ylabel("held-out reward", fontsize=8)
    for k, (lo, hi) in enumerate(flag_spans(xs, flags, window)):
        ax.axvspan(lo, hi, color="#ffcc00", alpha=0.3, lw=0, label=None if k else "reward hacking flagged")
    if legend:
        h1, l1 = ax.get_legend_handles_labels()
        h2, l2 = ax2.get_legend_handles_labels()
        ax2.legend(h1 + h2, l1 + l2, fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2,
                   frameon=False)
    ax.grid(alpha=0.3)
    if title:
        ax.set_title(title, fontsize=9)
    return ax


HELD_PALETTE = ("#d62728", "#1f77b4", "#2ca02c", "#9467bd")


def hacking_handles(train_key: str, heldout_keys: Sequence[str]) -> list:
    """Legend entries matching reward_hacking_panel's lines, for one legend under all panels."""
    from matplotlib.lines import Line2D

    hs = [Line2D([], [], color="#222222", marker="o", ms=3, lw=1.5, label=f"{train_key} (training reward, left axis)")]
    hs += [Line2D([], [], color=HELD_PALETTE[i % len(HELD_PALETTE)], marker="s", ms=3, lw=1.2, ls="--",
                  label=f"{k} (held-out, right axis)") for i, k in enumerate(heldout_keys)]
    return hs


def flag_spans(xs: Sequence[float], flags: Sequence[bool], window: int = 3) -> list[tuple[float, float]]:
    """Merged x-intervals covered by flagged windows (a flag at eval i covers evals i-window+1 .. i)."""
    spans: list[tuple[float, float]] = []
    for i, f in enumerate(flags):
        if not f:
            continue
        lo, hi = float(xs[max(0, i - window + 1)]), float(xs[i])
        if spans and lo <= spans[-1][1]:
            spans[-1] = (spans[-1][0], max(hi, spans[-1][1]))
        else:
            spans.append((lo, hi))
    return spans
