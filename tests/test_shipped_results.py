"""The shipped canonical results (docs/results/) recompute from the per-run data shipped beside them: every
claim of each comparison's verdict.json, from docs/results/runs/<part>/ with the report options
scripts/results.sh used. Fails when the per-run data is missing (it once was: .gitignore hid it) or when the
decision rules changed without the shipped results being redrawn (`bench report docs/results/runs/<part>
--x nfe --baseline B --tuning docs/results/tuning`, then copy verdict.json and the PDF)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from reports.context import Context, ReportOptions
from reports.load import comparability_problems, load
from reports.pdf import _resolve
from reports.verdict import to_json

RESULTS = Path(__file__).resolve().parents[1] / "docs" / "results"
#: part of results.json -> (the runs' folder, the report's baseline as scripts/results.sh passes it)
PARTS = {"main": ("compare_shapes", None), "rivals": ("compare_rivals", None), "kd": ("kd", "treegrpo k=3 d=3")}


def _close(a, b, path="") -> list[str]:
    """Differences between two JSON trees: numbers within float64 rounding of their scale (1e-9 relative, the
    statistics are sums of a few hundred terms), everything else exactly."""
    if isinstance(a, dict) and isinstance(b, dict):
        return ([f"{path}: keys {sorted(set(a) ^ set(b))}"] if set(a) != set(b) else []) + \
            [d for k in a if k in b for d in _close(a[k], b[k], f"{path}.{k}")]
    if isinstance(a, list) and isinstance(b, list):
        return [f"{path}: {len(a)} vs {len(b)} items"] if len(a) != len(b) else \
            [d for i, (x, y) in enumerate(zip(a, b)) for d in _close(x, y, f"{path}[{i}]")]
    if isinstance(a, float) and isinstance(b, (int, float)) and not isinstance(b, bool):
        return [] if math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12) or (math.isnan(a) and math.isnan(b)) \
            else [f"{path}: {a!r} vs {b!r}"]
    return [] if a == b else [f"{path}: {a!r} vs {b!r}"]


@pytest.mark.parametrize("part", sorted(PARTS))
def test_shipped_verdict_recomputes_from_the_shipped_runs(part):
    record = json.loads((RESULTS / "results.json").read_text())["parts"][part]
    folder, baseline = PARTS[part]
    runs = RESULTS / "runs" / folder
    assert record["runs"] == f"runs/{folder}"
    assert runs.is_dir() and any(runs.rglob("manifest.json")), f"{runs}: the shipped per-run data is missing"
    rs = load([runs])
    opt = ReportOptions(x="nfe", baseline=baseline or record["baseline"])
    base, metric = _resolve(rs, opt)
    wall = comparability_problems(rs.runs, wall_clock=True)
    got = json.loads(json.dumps(to_json(Context(rs, opt, base, metric, not wall, wall).verdict)))
    shipped = json.loads((RESULTS / (Path(record["report"]).stem + "_files") / "verdict.json").read_text())
    diffs = _close(got, shipped)
    assert not diffs, f"{len(diffs)} difference(s), first: {diffs[:3]}"


def test_close_tells_rounding_from_a_change():
    assert _close({"a": [0.1 + 0.2, "x"]}, {"a": [0.3, "x"]}) == []
    assert _close({"a": [0.3001]}, {"a": [0.3]}) == [".a[0]: 0.3001 vs 0.3"]
    assert _close({"a": "WORSE"}, {"a": "INCONCLUSIVE"}) and _close({"a": 1}, {"b": 1})
