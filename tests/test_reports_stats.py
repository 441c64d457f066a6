"""Known-answer tests of reports.stats (means with t intervals, learning curves on a budget grid, the
Pareto set). Comparisons between methods are tested in test_reports_inference.py."""

import math

import numpy as np
import pandas as pd
import pytest

from reports import stats

T975 = {2: 4.302653, 3: 3.182446}  # t_{0.975} quantiles (printed tables)


def test_pointwise_t_per_point():
    curves = np.array([[0.0, 1.0, 2.0], [0.0, 3.0, 2.0], [0.0, 2.0, 5.0]])
    point, lo, hi = stats.pointwise_t(curves)
    np.testing.assert_allclose(point, [0.0, 2.0, 3.0])
    # sd per point: 0, 1, sqrt(3); half-width t_{0.975,2} sd / sqrt(3)
    np.testing.assert_allclose(hi - point, [0.0, T975[2] / math.sqrt(3), T975[2]], rtol=1e-6)
    np.testing.assert_allclose(point - lo, hi - point)
    p2, lo2, _ = stats.pointwise_t(curves[:2])
    assert np.isnan(lo2).all() and np.allclose(p2, [0.0, 2.0, 2.0])  # two runs: no band
    with pytest.raises(ValueError, match="runs, points"):
        stats.pointwise_t(np.zeros(3))


def test_interpolate_no_extrapolation():
    out = stats.interpolate([0, 10, 20], [0, 1, 4], [-1, 0, 5, 15, 20, 25])
    np.testing.assert_allclose(out, [np.nan, 0, 0.5, 2.5, 4, np.nan])
    out = stats.interpolate([10, 0, 20], [1, 0, 4], [-1, 0, 5, 15, 20, 25], hold_last=True)
    np.testing.assert_allclose(out, [np.nan, 0, 0.5, 2.5, 4, 4])


def test_aggregate_curves_ends_at_each_label_budget_and_marks_evaluated_points():
    rows = []
    for run, slope in [("a0", 1.0), ("a1", 3.0)]:
        for x in (0, 10, 20):
            rows.append({"run": run, "label": "a", "x": x, "y": slope * x})
    rows.append({"run": "a2", "label": "a", "x": 5, "y": 10.0})  # one record, then holds 10
    rows.append({"run": "a2", "label": "a", "x": 15, "y": 10.0})
    for x in (0, 10, 30):  # label b reaches further: the shared grid is [0, 30]
        rows.append({"run": "b0", "label": "b", "x": x, "y": -x})
    df = stats.aggregate_curves(pd.DataFrame(rows), "x", "y", points=4)
    a = df[df["label"] == "a"]
    # shared grid 0,10,20,30 + a's record budgets 5, 15; up to a's end (20); from a2's start (5)
    np.testing.assert_allclose(a["x"], [5, 10, 15, 20])
    # mean of 3 runs: (x + 3x + 10) / 3; a2 holds 10 after x = 15
    np.testing.assert_allclose(a["value"], [(5 + 15 + 10) / 3, (10 + 30 + 10) / 3, (15 + 45 + 10) / 3,
                                            (20 + 60 + 10) / 3])
    assert (a["lo"] <= a["value"]).all() and (a["value"] <= a["hi"]).all()
    assert (a["n"] == 3).all() and a["evaluated"].tolist() == [True, True, True, True]
    b = df[df["label"] == "b"]
    np.testing.assert_allclose(b["value"], [0, -10, -20, -30])
    assert b["evaluated"].tolist() == [True, True, False, True]  # 20 is a grid point, not an evaluation
    assert b["lo"].isna().all()  # one run: no band


def test_pareto_mask_hand_made():
    #            A     B    C    D     E    F (= B)  G (NaN)
    reward = [1.0, 0.8, 0.7, 1.0, 0.5, 0.8, float("nan")]
    cost = [10.0, 5.0, 6.0, 12.0, 1.0, 5.0, 1.0]
    # C is dominated by B (more reward, less cost); D by A (same reward, less cost)
    assert stats.pareto_mask(reward, cost).tolist() == [True, True, False, False, True, True, False]


def test_summarize_gives_no_interval_below_three_runs():
    s = stats.summarize([0.1, 0.3])
    assert s.n == 2 and not s.has_interval and s.point == pytest.approx(0.2)
    assert math.isnan(s.lo) and math.isnan(s.hi)
    assert s.text() == "0.100, 0.300 (n = 2, no interval)"
    assert stats.summarize([0.617]).text() == "0.617 (n = 1, no interval)"
    s3 = stats.summarize([0.2, 0.2, 0.2])
    assert s3.has_interval and (s3.point, s3.lo, s3.hi) == pytest.approx((0.2, 0.2, 0.2))
    assert s3.text(sign=True) == "+0.200 [+0.200, +0.200]"
    s4 = stats.summarize([1.0, 2.0, 3.0, 6.0])  # mean 3, sd sqrt(14/3)
    assert s4.point == 3.0 and s4.hi - 3.0 == pytest.approx(T975[3] * math.sqrt(14 / 3) / 2, rel=1e-6)
    assert stats.summarize([float("nan")]).text() == "-"
