"""What a run prints while it trains and when it ends: progress (a tqdm bar on a terminal, one plain line
per iteration or every N seconds otherwise, e.g. in a SLURM log or behind ``| tee``), one line per held-out
evaluation, and a start -> end table at the end. The run directory stays the record; this is the view."""

from __future__ import annotations

import os
import sys
import time
from typing import Any, Mapping, Sequence, TextIO


def is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def _duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


class Progress:
    """Budget progress. On a terminal a tqdm bar (carriage returns); otherwise plain lines, at most one per
    ``every_s`` seconds (env ``TREEBENCH_PROGRESS_EVERY``, default 0 = every iteration), each with the
    budget fraction and an ETA from the training seconds so far."""

    def __init__(self, stream: TextIO | None = None, tty: bool | None = None, every_s: float | None = None):
        self.stream = stream if stream is not None else sys.stderr
        self.tty = is_terminal(self.stream) if tty is None else tty
        if every_s is None:
            every_s = float(os.environ.get("TREEBENCH_PROGRESS_EVERY", "0") or 0)
        self.every_s, self._last = every_s, float("-inf")
        self.t0 = time.perf_counter()
        self.bar = None
        if self.tty:
            from tqdm import tqdm

            self.bar = tqdm(total=1000, desc="budget", unit="‰", dynamic_ncols=True, file=self.stream,
                            bar_format="{desc} {percentage:3.0f}%|{bar}| [{elapsed}<{remaining}] {postfix}")

    def update(self, fraction: float, rec: Mapping[str, Any]) -> None:
        fraction = min(max(fraction, 0.0), 1.0)
        note = f"it {rec['iteration']} reward {rec['reward_mean']:.4f} nfe {rec['nfe_total']}"
        if self.bar is not None:
            self.bar.update(max(0, int(1000 * fraction) - self.bar.n))
            self.bar.set_postfix_str(note)
            return
        now = time.perf_counter()
        if now - self._last < self.every_s and fraction < 1.0:
            return
        self._last = now
        elapsed = now - self.t0
        eta = _duration(elapsed * (1 - fraction) / fraction) if fraction > 0 else "?"
        print(f"[{fraction * 100:5.1f}% budget] {note} samples {rec['samples_total']} elapsed "
              f"{_duration(elapsed)} eta {eta}", file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def eval_means(rec: Mapping[str, Any]) -> dict[str, float]:
    """{reward name: mean} of an evaluation record (keys ``eval/NAME``, not std or components)."""
    return {k[5:]: v for k, v in rec.items() if k.startswith("eval/") and k.count("/") == 1
            and isinstance(v, (int, float))}


def eval_line(rec: Mapping[str, Any], first: Mapping[str, Any] | None) -> str:
    """``eval @ it 5: shapes_attr 0.4120 (+0.0310), ...`` (change from the run's first evaluation)."""
    base = eval_means(first) if first is not None else {}
    parts = []
    for name, v in eval_means(rec).items():
        delta = f" ({v - base[name]:+.4f})" if name in base and first is not rec else ""
        parts.append(f"{name} {v:.4f}{delta}")
    return f"eval @ it {rec['iteration']}: " + (", ".join(parts) or "(no eval rewards)")


def table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain aligned text table."""
    cells = [[str(c) for c in header]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def end_summary(evals: Sequence[Mapping[str, Any]], final: Mapping[str, Any], out: Any) -> str:
    """The end-of-run block: evaluation rewards start -> end (and best), stop reason, totals."""
    lines = [f"run finished ({final['stop_reason']}): {final['iterations']} iterations, "
             f"{final['samples_total']} samples, {final['nfe_total']} NFE, {final['seconds_total']:.1f} s training"
             + (f" ({final['modeled_seconds_total']:.1f} modeled s, profile {final['cost_profile']})"
                if final.get("cost_profile") else "")]
    if evals:
        first, last = evals[0], evals[-1]
        start, end = eval_means(first), eval_means(last)
        rows = []
        for name in end:
            best = max(evals, key=lambda e: e.get(f"eval/{name}", float("-inf")))
            s = start.get(name)
            rows.append([name, f"{s:.4f}" if s is not None else "-", f"{end[name]:.4f}",
                         f"{end[name] - s:+.4f}" if s is not None else "-",
                         f"{best[f'eval/{name}']:.4f} @ it {best['iteration']}"])
        lines.append(table([f"eval reward (it {first['iteration']} -> {last['iteration']})", "start", "end",
                            "change", "best"], rows))
    else:
        lines.append("no held-out evaluation")
    if final.get("error"):
        lines.append(f"error: {final['error']}")
    lines.append(f"run directory: {out}   (bench show {out})")
    return "\n".join(lines)
