"""Copy the recomputable part of every run under SRC to the same relative place under DST
(bench.rundir.layout.export_run: manifest, final.json, evals, iteration records, per-image scores
gzip-compressed; no checkpoints, sample grids or traces), so that `bench report DST` reproduces every number
of the report made from SRC. Used by scripts/results.sh to ship the canonical runs under docs/results/.

    python scripts/export_runs.py runs/results/compare docs/results/runs/compare [--skip tuning]
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
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"exported {len(runs)} runs from {src} to {dst} ({size / 1e6:.1f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
