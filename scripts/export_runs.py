"""Copy the recomputable part of every run under SRC to the same relative place under DST
(bench.rundir.layout.export_run: manifest, final.json, evals, iteration records, per-image scores
gzip-compressed; no checkpoints, sample grids or traces), so that `bench report DST` reproduces every number
of the report made from SRC. Used by scripts/results.sh to ship the canonical runs under docs/results/.

    python scripts/export_runs.py runs/results/compare docs/results/runs/compare [--skip tuning] [--sample-grids]

``--sample-grids`` also copies the eval sample grids the report's sample pages show (each method's first
run at iteration 0, mid-run and the end: ``reports.pages.sample_picks``; about 150 KB a method), so that
the redrawn report has those pages too; without them it leaves them out.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from bench.errors import UsageError
from bench.rundir.layout import export_run, find_runs


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("--skip", action="append", default=[], help="leave out runs below a folder of this name")
    p.add_argument("--sample-grids", action="store_true",
                   help="also copy the sample grids the report's sample pages show (3 per method)")
    a = p.parse_args(argv)
    src, dst = Path(a.src), Path(a.dst)
    runs = [r for r in find_runs(src) if not set(a.skip) & set(r.relative_to(src).parts)]
    if not runs:
        print(f"error: no run directories under {src}", file=sys.stderr)
        return 2
    if dst.exists():
        shutil.rmtree(dst)  # the export is regenerated as a whole: no run of an earlier export survives
    size = 0
    try:
        for r in runs:
            size += sum(f.stat().st_size for f in export_run(r, dst / r.relative_to(src)))
        grids = sample_grids(src, runs) if a.sample_grids else []
        for f in grids:
            out = dst / f.relative_to(src)
            out.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(f, out)
            size += f.stat().st_size
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"exported {len(runs)} runs from {src} to {dst} ({size / 1e6:.1f} MB"
          + (f", {len(grids)} sample grids" if a.sample_grids else "") + ")")
    return 0


def sample_grids(src: Path, runs: list[Path]) -> list[Path]:
    """The sample grid files under ``src`` that the report of ``runs`` shows (those that exist)."""
    from reports.load import load
    from reports.pages import sample_picks

    rs = load(runs)
    files = []
    for _run, _label, _seed, path, picked in sample_picks(rs):
        for name in picked["samples_png"]:
            f = Path(path) / str(name)
            if f.is_file() and f.resolve().is_relative_to(src.resolve()):
                files.append(f)
    return files


if __name__ == "__main__":
    sys.exit(main())
