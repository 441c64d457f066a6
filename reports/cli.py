"""``bench report RUNS... --out report.pdf``: build the PDF report from run directories."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from bench.errors import UsageError


def build_parser(prog: str = "bench report") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description="Build a PDF report (learning curves, Pareto frontiers, timing, k/d ablations, sample "
                    "grids, reward hacking, tables) from run directories. Each RUN may be a run directory "
                    "or any directory containing run directories (a `bench compare` output, a sweep).")
    p.add_argument("runs", nargs="+", metavar="RUNS", help="run directories or directories containing them")
    p.add_argument("--out", default="report.pdf", help="output PDF path (default: report.pdf)")
    p.add_argument("--baseline", default=None,
                   help="method the speed-up and probability-of-improvement tables compare against "
                        "(default: dancegrpo if present, else the first method)")
    p.add_argument("--x", default="samples", choices=("samples", "nfe", "seconds", "modeled"),
                   help="budget axis of the learning curves (default: samples)")
    p.add_argument("--metric", default=None,
                   help="eval key of the primary metric, e.g. eval/shapes_attr "
                        "(default: the training reward's eval key)")
    p.add_argument("--threshold", type=float, default=None,
                   help="reward R for 'N.Nx faster to reach R' (default: the baseline's final IQM)")
    p.add_argument("--title", default="treebench report", help="title printed on every page")
    p.add_argument("--reps", type=int, default=2000, help="bootstrap resamples for the 95%% CIs (default 2000)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    if args.reps < 100:
        print("error: --reps must be at least 100", file=sys.stderr)
        return 2
    try:
        from reports.pdf import ReportOptions, build_report

        pages = build_report(args.runs, args.out, ReportOptions(
            x=args.x, baseline=args.baseline, metric=args.metric, threshold=args.threshold,
            title=args.title, reps=args.reps))
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.out} ({len(pages)} pages: {'; '.join(pages)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
