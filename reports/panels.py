"""Panels that are not charts: eval sample images with their prompts, tables and text blocks.
Like reports.plots, ``f(ax, data) -> ax``; they draw on a given Axes and never save."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from reports.plots import color, note

# --------------------------------------------------------------------------------------- images

def _load_image(path: Path) -> np.ndarray | None:
    try:
        from PIL import Image

        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0
    except (OSError, ValueError):
        return None


def sample_image(ax: plt.Axes, path: Path, row_prompts: Sequence[str], title: str | None = None,
                 ylabel: str | None = None) -> plt.Axes:
    """One eval sample grid, large, nearest-neighbour; ``row_prompts`` (the prompt of each image in
    grid order) label the grid rows on the left when given."""
    im = _load_image(Path(path))
    if im is None:
        return note(ax, f"missing image {Path(path).name}")
    ax.imshow(im, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    if row_prompts:  # one label per grid row: the row's first image's prompt
        ncol = max(1, round(len(row_prompts) / max(1, _grid_rows(len(row_prompts), im))))
        rows = [row_prompts[i] for i in range(0, len(row_prompts), ncol)]
        h = im.shape[0] / len(rows)
        ax.set_yticks([h * (i + 0.5) for i in range(len(rows))], [textwrap_short(p) for p in rows], fontsize=7)
    if ylabel:
        ax.set_ylabel(ylabel, fontsize=9, color=color(ylabel))
    if title:
        ax.set_title(title, fontsize=8)
    return ax


def _grid_rows(n_images: int, im: np.ndarray) -> int:
    """Rows of a saved grid of n square tiles from its aspect ratio (tiles have a 1-px border each)."""
    ratio = im.shape[1] / im.shape[0]  # = ncol / nrow
    best = min(range(1, n_images + 1), key=lambda r: abs(math.ceil(n_images / r) / r - ratio))
    return best


def textwrap_short(text: str, width: int = 34) -> str:
    import textwrap

    return "\n".join(textwrap.wrap(str(text), width)[:2])


# --------------------------------------------------------------------------------------- tables

HEADER_WRAP = 26  # characters per header line
ROW_SCALE = 1.35  # table row height in text heights


def table_height_pt(frame: pd.DataFrame, fontsize: int = 8) -> float:
    """Height in points that ``table`` draws for this frame (header lines + rows)."""
    import textwrap

    row = 10 * 1.2 * ROW_SCALE  # matplotlib sizes default cells from Table.FONTSIZE (10), not the set size
    lines = max([len(textwrap.wrap(str(c), HEADER_WRAP)) or 1 for c in frame.columns] or [1])
    return row * (0.6 + 0.55 * lines) + row * len(frame)


def table(ax: plt.Axes, frame: pd.DataFrame, title: str | None = None, col_widths: Sequence[float] | None = None,
          fontsize: int = 8) -> plt.Axes:
    """A DataFrame as a table filling the axes (all cells as given: format numbers beforehand)."""
    ax.set_axis_off()
    if title:
        ax.set_title(title, fontsize=10, loc="left")
    if frame.empty:
        return note(ax, "nothing to tabulate")
    import textwrap

    cells = frame.astype(str).to_numpy()
    headers = ["\n".join(textwrap.wrap(str(c), HEADER_WRAP)) or " " for c in frame.columns]
    if col_widths is None:  # proportional to the longest line in each column
        lens = [max([len(x) for x in cells[:, j]] + [max(len(x) for x in headers[j].split("\n"))])
                for j in range(cells.shape[1])]
        lens = [n + 3 for n in lens]  # cell padding
        col_widths = [n / sum(lens) for n in lens]
    tab = ax.table(cellText=cells, colLabels=headers, loc="upper center",
                   cellLoc="center", colLoc="center", colWidths=col_widths)
    tab.auto_set_font_size(False)
    tab.set_fontsize(fontsize)
    tab.scale(1, ROW_SCALE)
    header_lines = max(h.count("\n") + 1 for h in headers)
    for (r, c), cell in tab.get_celld().items():
        if r == 0:
            cell.set_facecolor("#e8e8e8")
            cell.set_text_props(weight="bold")
            cell.set_height(cell.get_height() * (0.6 + 0.55 * header_lines))
        elif c == 0:
            cell.get_text().set_color(color(cell.get_text().get_text()))
    return ax


def text_block(ax: plt.Axes, lines: Sequence[str] | Mapping[str, str], fontsize: int = 9, top: float = 1.0) -> plt.Axes:
    """Left-aligned text lines (or key: value pairs) for title and notes pages."""
    ax.set_axis_off()
    if isinstance(lines, Mapping):
        lines = [f"{k}: {v}" for k, v in lines.items()]
    ax.text(0.0, top, "\n".join(lines), ha="left", va="top", fontsize=fontsize, family="monospace",
            transform=ax.transAxes, wrap=True)
    return ax
