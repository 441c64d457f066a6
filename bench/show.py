"""``bench show RUN_OR_DIR...``: a table of runs (algorithm, seed, budget, iterations, samples, NFE,
seconds, final and best evaluation) read from run directories only (docs/RUNDIR.md). A directory that is
not a run is searched for runs below it. ``--json`` and ``--markdown`` for scripts and notes."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Sequence

from bench.errors import UsageError
from bench.run.progress import eval_means, table
from bench.rundir import layout
from bench.rundir.layout import EVALS, FINAL, MANIFEST

COLUMNS = ["run", "algorithm", "seed", "budget", "stop", "iterations", "samples", "nfe", "seconds",
           "final_eval", "best_eval"]


def find_runs(paths: Sequence[str]) -> list[Path]:
    """Run directories (holding manifest.json) named by ``paths`` or found below them, in order."""
    runs: list[Path] = []
    for p in map(Path, paths):
        if not p.exists():
            raise UsageError(f"{p}: no such run directory")
        found = layout.find_runs(p)
        if not found:
            raise UsageError(f"{p}: not a run directory and no run directory below it (no manifest.json)")
        runs.extend(found)
    return list(dict.fromkeys(runs))


def _last_eval(run: Path) -> dict[str, Any] | None:
    try:  # a killed run may leave a partial last line: dropped by the reader
        evals, _ = layout.read_jsonl(run / EVALS, strict=False)
    except OSError:
        return None
    return evals[-1] if evals else None


def summarize(run: Path) -> dict[str, Any]:
    """One row: the manifest, final.json (absent while a run trains or after a kill) and the evaluations."""
    man = layout.read_json_or_none(run / MANIFEST) or {}
    final = layout.read_json_or_none(run / FINAL) or {}
    ev = final.get("final_eval") or _last_eval(run)
    best = final.get("best_eval") or None
    return {"run": str(run), "algorithm": (man.get("algorithm") or {}).get("name"), "seed": man.get("seed"),
            "budget": (man.get("budget") or {}).get("spec"), "stop": final.get("stop_reason", "(running or killed)"),
            "iterations": final.get("iterations"), "samples": final.get("samples_total"),
            "nfe": final.get("nfe_total"), "seconds": final.get("seconds_total"),
            "final_eval": eval_means(ev) if ev else None,
            "best_eval": ({"reward": best["key"][5:], "value": best["value"], "iteration": best["iteration"]}
                          if best else None)}


def _cell(row: dict[str, Any], col: str) -> str:
    v = row[col]
    if v is None:
        return "-"
    if col == "final_eval":
        return ", ".join(f"{k} {x:.4f}" for k, x in v.items()) or "-"
    if col == "best_eval":
        return f"{v['reward']} {v['value']:.4f} @ it {v['iteration']}"
    if col == "seconds":
        return f"{v:.1f}"
    return str(v)


def markdown(rows: Sequence[dict[str, Any]]) -> str:
    out = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    out += ["| " + " | ".join(_cell(r, c).replace("|", "\\|") for c in COLUMNS) + " |" for r in rows]
    return "\n".join(out)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench show", description="A table of runs read from their run directories.")
    p.add_argument("paths", nargs="+", metavar="RUN_OR_DIR", help="run directories, or directories holding runs")
    fmt = p.add_mutually_exclusive_group()
    fmt.add_argument("--json", action="store_true", help="one JSON list of rows")
    fmt.add_argument("--markdown", action="store_true", help="a Markdown table")
    a = p.parse_args(argv)
    rows = [summarize(r) for r in find_runs(a.paths)]
    if a.json:
        json.dump(rows, sys.stdout, indent=2)
        print()
    elif a.markdown:
        print(markdown(rows))
    else:
        print(table(COLUMNS, [[_cell(r, c) for c in COLUMNS] for r in rows]))
    return 0
