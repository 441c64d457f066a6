"""``bench report RUNS... --out report.pdf``: build the PDF report from run directories."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from bench.errors import UsageError
from reports.load import X_AXES


def build_parser(prog: str = "bench report") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description="Build a PDF report (learning curves, Pareto frontiers, timing, k/d ablations, sample "
                    "grids, reward hacking, tables) from run directories. Each RUN may be a run directory "
                    "or any directory containing run directories (a `bench compare` output, a sweep).")
    p.add_argument("runs", nargs="+", metavar="RUNS", help="run directories or directories containing them")
    p.add_argument("--out", default="report.pdf", help="output PDF path (default: report.pdf)")
    p.add_argument("--baseline", default=None,
                   help="method every claim compares against (default: dancegrpo if present, else the first method)")
    p.add_argument("--x", default="samples", choices=tuple(X_AXES),
                   help="budget axis of the learning curves (default: samples)")
    p.add_argument("--metric", default=None,
                   help="eval key of the primary metric, e.g. eval/shapes_attr "
                        "(default: the training reward's eval key)")
    add_verdict_args(p)
    p.add_argument("--title", default="treebench report", help="title printed on every page")
    p.add_argument("--tuning", action="append", default=[], metavar="DIR",
                   help="a folder of tuning studies (<algo>/tuned.json and trials.csv, as bench compare --tune "
                        "writes in DIR/tuning) for the tuning page, when they are not under the runs' DIR/tuning "
                        "(e.g. docs/results/tuning beside the exported runs); repeatable")
    p.add_argument("--reps", type=int, default=20000,
                   help="Monte-Carlo draws of a permutation p-value when there are more than 200,000 splits of "
                        "the seeds to enumerate (default 20000)")
    p.add_argument("--wall-verdict", action="store_true",
                   help="also state cost claims in wall-clock seconds (noisy; said so in every sentence)")
    p.add_argument("--wall-pareto", action="store_true",
                   help="also draw Pareto panels on wall-clock time and memory of CPU runs (contended clock, "
                        "process memory: left out by default)")
    p.add_argument("--no-files", action="store_true",
                   help="write only the PDF (no <report>_files/ with per-page images and CSV/Markdown tables)")
    p.add_argument("--formats", default="png,svg",
                   help="image formats of the per-page files, comma-separated (default png,svg; SVG is skipped "
                        "for sample-grid pages)")
    return p


def add_verdict_args(p: argparse.ArgumentParser) -> None:
    """The verdict's options, shared by ``bench report`` and ``bench compare``."""
    p.add_argument("--sesoi", action="append", default=[], metavar="METRIC=VALUE",
                   help="smallest effect of interest of an eval metric (shapes_attr=0.01) or of costs (cost=0.1: "
                        "ratios within 1.1x are equivalent); repeatable or comma-separated; defaults in "
                        "docs/REPORTS.md")
    p.add_argument("--targets", default=None,
                   help="cost-to-target targets as fractions of the baseline's gain, comma-separated "
                        "(default 0.5,0.75)")


def parse_fractions(text: str | None, what: str, default: tuple[float, ...]) -> tuple[float, ...]:
    if text is None:
        return default
    try:
        out = tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        out = ()
    if not out or not all(0 < f <= 1 for f in out):
        raise UsageError(f"{what} {text!r}: give fractions in (0, 1], comma-separated, e.g. 0.5,0.75")
    return out


def verdict_options(args: argparse.Namespace) -> dict:
    """ReportOptions fields from the verdict arguments (UsageError on bad input)."""
    from reports.claims import TARGET_FRACTIONS
    from reports.verdict import parse_sesoi

    return {"sesoi": parse_sesoi(args.sesoi), "targets": parse_fractions(args.targets, "--targets", TARGET_FRACTIONS)}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    if args.reps < 100:
        print("error: --reps must be at least 100", file=sys.stderr)
        return 2
    formats = tuple(f.strip().lower() for f in args.formats.split(",") if f.strip())
    bad = [f for f in formats if f not in ("png", "svg", "pdf")]
    if bad or not formats:
        print(f"error: --formats {args.formats!r}: choose from png, svg, pdf", file=sys.stderr)
        return 2
    try:
        from reports.pdf import ReportOptions, report

        rep = report(args.runs, args.out, ReportOptions(
            x=args.x, baseline=args.baseline, metric=args.metric, title=args.title, reps=args.reps,
            wall_verdict=args.wall_verdict, wall_pareto=args.wall_pareto, figures=not args.no_files,
            figure_formats=formats, tuning=tuple(args.tuning), **verdict_options(args)))
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print_verdict(rep.verdict)
    print(f"wrote {args.out} ({len(rep.pages)} pages: {'; '.join(rep.pages)}) and {rep.verdict_json}")
    return 0


def print_verdict(lines: Sequence[str]) -> None:
    """The headline, then one line per claim (rendered from verdict.json)."""
    print("verdict:")
    for line in lines:
        print(f"  * {line}")


def compare_report(out_dir: str | Path, report_path: str | Path, *, baseline: str | None = None,
                   x: str = "samples", title: str = "bench compare", allow_mixed_code: bool = False,
                   reps: int = 20000, sesoi: Sequence[str] = (), targets: str | None = None,
                   files: bool = True) -> list[str]:
    """The report step of ``bench compare`` (named by a string in bench.fleet.compare): the PDF of every run
    under ``out_dir`` and ``verdict.json`` beside it, its verdict printed; ``files``: also the per-page images
    and tables (``<report>_files/``, ``--no-report-files`` leaves them out). Runs from different commits or
    dirty trees are refused unless ``allow_mixed_code`` (then the report marks them on its first page)."""
    from reports.load import code_version_problems, load
    from reports.pdf import ReportOptions, report

    opts = verdict_options(argparse.Namespace(sesoi=list(sesoi or ()), targets=targets))
    rs = load([out_dir])
    problems = code_version_problems(rs.runs)
    if problems and not allow_mixed_code:
        raise UsageError("the runs do not come from one clean commit: " + "; ".join(problems)
                         + ". Rerun them from one commit (--overwrite) or pass --allow-mixed-code")
    rep = report(rs, report_path, ReportOptions(x=x, baseline=baseline, title=title, reps=reps, figures=files, **opts))
    print_verdict(rep.verdict)
    return rep.pages


if __name__ == "__main__":
    sys.exit(main())
