"""Report tables as CSV and Markdown files (no extra dependency: a small Markdown writer)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd


def markdown(frame: pd.DataFrame) -> str:
    """A GitHub-flavoured Markdown table of the frame's cells as strings (pipes escaped)."""
    def cell(v: object) -> str:
        return str(v).replace("|", "\\|").replace("\n", " ")

    cols = [cell(c) for c in frame.columns]
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join(lines) + "\n"


def write_tables(tables: dict[str, pd.DataFrame], folder: Path) -> list[Path]:
    """``<name>.csv`` and ``<name>.md`` per table; returns the paths written."""
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for name, frame in tables.items():
        csv, md = folder / f"{name}.csv", folder / f"{name}.md"
        frame.to_csv(csv, index=False)
        md.write_text(markdown(frame))
        out += [csv, md]
    return out
