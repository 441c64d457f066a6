"""Known-answer tests of reports.stats (IQM, stratified bootstrap, probability of improvement, budget
grid, time-to-threshold, Pareto set, reward-hacking rule)."""

import math

import numpy as np
import pandas as pd
import pytest

from reports import stats

# --------------------------------------------------------------------------------------- IQM

def test_iqm_hand_computed():
    assert stats.iqm([1, 2, 3, 4, 5, 6, 7, 8]) == pytest.approx(4.5)  # cut 2 each side: mean(3,4,5,6)
    assert stats.iqm([10, 1, 2, 3]) == pytest.approx(2.5)  # sorted 1,2,3,10 -> mean(2,3)
    assert stats.iqm([[1, 2], [3, 100]]) == pytest.approx(2.5)  # all runs x tasks flattened
    assert stats.iqm([0.2, 0.4, 0.9]) == pytest.approx(0.5)  # n=3: int(0.75)=0 cut -> plain mean
    np.testing.assert_allclose(stats.iqm([[1, 5], [2, 6], [3, 7], [100, 8]], axis=0), [2.5, 6.5])


def test_iqm_matches_scipy_trim_mean():
    scipy_stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(0)
    for n in (1, 2, 3, 4, 5, 7, 10, 13):
        a = rng.normal(size=n)
        assert stats.iqm(a) == pytest.approx(scipy_stats.trim_mean(a, 0.25))


# --------------------------------------------------------------------------------------- bootstrap

def test_bootstrap_ci_constant_scores_is_a_point():
    assert stats.bootstrap_ci([0.3, 0.3, 0.3, 0.3], reps=500) == pytest.approx((0.3, 0.3, 0.3))


def test_bootstrap_ci_two_values():
    # resampled means of {0, 1}: 0 (p=1/4), 0.5 (1/2), 1 (1/4); both tails hold > 2.5% -> CI [0, 1]
    assert stats.bootstrap_ci([0.0, 1.0], stats.mean, reps=2000) == pytest.approx((0.5, 0.0, 1.0))


def test_bootstrap_is_stratified_per_task():
    # [[0, 0], [1, 1]]: resampling runs independently per task gives 4 independent draws of {0, 1},
    # so the mean is Binomial(4, 1/2) / 4 -- 0.25 with p = 4/16. Resampling whole rows would never
    # produce 0.25 (only 0, 0.5, 1).
    boot = stats.stratified_bootstrap([[0, 0], [1, 1]], reps=4000, rng=np.random.default_rng(1))
    assert boot.shape == (4000, 2, 2)
    means = boot.reshape(4000, -1).mean(axis=1)
    for value, p in [(0.0, 1 / 16), (0.25, 4 / 16), (0.5, 6 / 16), (0.75, 4 / 16), (1.0, 1 / 16)]:
        assert np.mean(np.isclose(means, value)) == pytest.approx(p, abs=0.03)


def test_bootstrap_ci_stratified_two_tasks():
    # task 1 constant 10; task 2 resamples {0, 1}: mean over 4 = (20 + a + b) / 4, a + b in {0, 1, 2}
    p, lo, hi = stats.bootstrap_ci([[10, 0], [10, 1]], stats.mean, reps=2000)
    assert (p, lo, hi) == pytest.approx((5.25, 5.0, 5.5))


def test_pointwise_ci_per_point():
    curves = np.array([[0.0, 1.0, 2.0], [0.0, 3.0, 2.0]])
    point, lo, hi = stats.pointwise_ci(curves, stats.mean, reps=1000)
    np.testing.assert_allclose(point, [0.0, 2.0, 2.0])
    np.testing.assert_allclose(lo, [0.0, 1.0, 2.0])
    np.testing.assert_allclose(hi, [0.0, 3.0, 2.0])


# --------------------------------------------------------------------------------------- P(improvement)

def test_probability_of_improvement_hand_computed():
    assert stats.probability_of_improvement([1, 2, 3], [0, 0, 0]) == 1.0
    assert stats.probability_of_improvement([1, 2, 3], [1, 2, 3]) == 0.5
    # pairs: (1,2)=0 (1,0)=1 (2,2)=1/2 (2,0)=1 -> 2.5/4
    assert stats.probability_of_improvement([1, 2], [2, 0]) == pytest.approx(0.625)
    # two tasks: P=1 on the first, 0 on the second -> mean 0.5
    assert stats.probability_of_improvement([[1, 0], [1, 0]], [[0, 1], [0, 1]]) == pytest.approx(0.5)


def test_probability_of_improvement_ci_separated():
    assert stats.probability_of_improvement_ci([5, 6, 7], [1, 2], reps=300) == pytest.approx((1.0, 1.0, 1.0))
    p, lo, hi = stats.probability_of_improvement_ci([1, 2], [2, 0], reps=2000)
    assert p == pytest.approx(0.625) and 0.0 <= lo <= p <= hi <= 1.0


def test_probability_of_improvement_mismatched_tasks():
    with pytest.raises(ValueError, match="same tasks"):
        stats.probability_of_improvement([[1, 2]], [[1, 2, 3]])


# --------------------------------------------------------------------------------------- budget grid

def test_interpolate_no_extrapolation():
    out = stats.interpolate([0, 10, 20], [0, 1, 4], [-1, 0, 5, 15, 20, 25])
    np.testing.assert_allclose(out, [np.nan, 0, 0.5, 2.5, 4, np.nan])
    out = stats.interpolate([10, 0, 20], [1, 0, 4], [-1, 0, 5, 15, 20, 25], hold_last=True)
    np.testing.assert_allclose(out, [np.nan, 0, 0.5, 2.5, 4, 4])


def test_aggregate_curves_ends_at_each_label_budget():
    rows = []
    for run, slope in [("a0", 1.0), ("a1", 3.0)]:
        for x in (0, 10, 20):
            rows.append({"run": run, "label": "a", "x": x, "y": slope * x})
    rows.append({"run": "a2", "label": "a", "x": 5, "y": 10.0})  # one record, then holds 10
    rows.append({"run": "a2", "label": "a", "x": 15, "y": 10.0})
    for x in (0, 10, 30):  # label b reaches further: the shared grid is [0, 30]
        rows.append({"run": "b0", "label": "b", "x": x, "y": -x})
    df = stats.aggregate_curves(pd.DataFrame(rows), "x", "y", points=4, reps=200)
    a = df[df["label"] == "a"]
    # shared grid 0,10,20,30 + a's record budgets 5, 15; up to a's end (20); from a2's start (5)
    np.testing.assert_allclose(a["x"], [5, 10, 15, 20])
    # IQM of 3 runs = mean: (x + 3x + 10) / 3; a2 holds 10 after x = 15
    np.testing.assert_allclose(a["value"], [(5 + 15 + 10) / 3, (10 + 30 + 10) / 3, (15 + 45 + 10) / 3,
                                            (20 + 60 + 10) / 3])
    assert (a["lo"] <= a["value"]).all() and (a["value"] <= a["hi"]).all()
    assert (a["n"] == 3).all()
    np.testing.assert_allclose(df[df["label"] == "b"]["value"], [0, -10, -20, -30])


def test_time_to_threshold():
    assert stats.time_to_threshold([0, 10, 20], [0, 0.5, 1.0], 0.75) == pytest.approx(15.0)
    assert stats.time_to_threshold([0, 10, 20], [0.8, 0.9, 1.0], 0.75) == 0.0
    assert math.isnan(stats.time_to_threshold([0, 10, 20], [0, 0.5, 0.7], 0.75))
    # a curve reaches its own final value
    assert stats.time_to_threshold([0, 3], [0.1, 0.1 + 0.2], 0.30000000000000004) == pytest.approx(3.0)


def test_pareto_mask_hand_made():
    #            A     B    C    D     E    F (= B)  G (NaN)
    reward = [1.0, 0.8, 0.7, 1.0, 0.5, 0.8, float("nan")]
    cost = [10.0, 5.0, 6.0, 12.0, 1.0, 5.0, 1.0]
    # C is dominated by B (more reward, less cost); D by A (same reward, less cost)
    assert stats.pareto_mask(reward, cost).tolist() == [True, True, False, False, True, True, False]


# --------------------------------------------------------------------------------------- small samples

def test_summarize_gives_no_interval_below_three_runs():
    s = stats.summarize([0.1, 0.3])
    assert s.n == 2 and not s.has_interval and s.point == pytest.approx(0.2)
    assert math.isnan(s.lo) and math.isnan(s.hi)
    assert s.text() == "0.100, 0.300 (n = 2, no interval)"
    assert stats.summarize([0.617]).text() == "0.617 (n = 1, no interval)"
    s3 = stats.summarize([0.2, 0.2, 0.2], reps=200)
    assert s3.has_interval and (s3.point, s3.lo, s3.hi) == pytest.approx((0.2, 0.2, 0.2))
    assert s3.text(sign=True) == "+0.200 [+0.200, +0.200]"
    assert stats.summarize([float("nan")]).text() == "-"


def test_difference_ci_known_answers():
    assert stats.difference_ci([1, 1, 1], [0, 0, 0], reps=200) == pytest.approx((1.0, 1.0, 1.0))
    d, lo, hi = stats.difference_ci([1, 2], [0, 0, 0])
    assert d == pytest.approx(1.5) and math.isnan(lo) and math.isnan(hi)
    # x resamples {0, 3, 6}: IQM (= mean for n = 3) of a resample lies in [0, 6]; y constant 1
    d, lo, hi = stats.difference_ci([0, 3, 6], [1, 1, 1], reps=2000)
    assert d == pytest.approx(2.0) and -1.0 <= lo < 2.0 < hi <= 5.0


def test_pooled_sd_and_minimum_detectable_effect_hand_computed():
    # variances 1 (n=3) and 2 (n=2): sqrt((2 * 1 + 1 * 2) / 3)
    assert stats.pooled_sd([[1, 2, 3], [2, 4], [7]]) == pytest.approx(math.sqrt(4 / 3))
    assert math.isnan(stats.pooled_sd([[1], [2]]))
    # 2.801585 * 0.01 * sqrt(1/5 + 1/5) = 2.801585 * 0.00632456
    assert stats.min_detectable_effect(0.01, 5, 5) == pytest.approx(0.0177188, rel=1e-5)
    assert stats.min_detectable_effect(0.01, 5, 5, resolution=0.05) == 0.05  # floored at the resolution
    assert math.isnan(stats.min_detectable_effect(float("nan"), 5, 5))


def test_speedup_ci_known_answers():
    grid = [0.0, 50.0, 100.0]
    base = [[0.0, 0.5, 1.0]] * 3
    # threshold = base's final IQM 1.0, reached at 100; other's mean curve [0, 1.5, 1.5] reaches 1.0 at
    # 50 / 1.5 = 33.3 -> 3.0x; resampled mid values lie in [1, 2] -> budgets [25, 50] -> CI within [2, 4]
    other = [[0.0, 2.0, 2.0], [0.0, 1.0, 1.0], [0.0, 1.5, 1.5]]
    sp = stats.speedup_ci(base, other, grid, reps=1000)
    assert sp["threshold"] == 1.0 and sp["baseline_budget"] == pytest.approx(100.0)
    assert sp["budget"] == pytest.approx(100 / 3) and sp["speedup"] == pytest.approx(3.0)
    assert 2.0 - 1e-9 <= sp["lo"] < 3.0 < sp["hi"] <= 4.0 + 1e-9 and sp["reached"] == 1.0
    # identical curves: 1.0x with a point interval; a given threshold
    sp = stats.speedup_ci(base, base, grid, threshold=0.5, reps=200)
    assert (sp["speedup"], sp["lo"], sp["hi"], sp["budget"]) == pytest.approx((1.0, 1.0, 1.0, 50.0))
    # two runs a side: the point, no interval
    sp = stats.speedup_ci(base[:2], other[:2], grid)
    assert sp["speedup"] == pytest.approx(100 / (50 / 1.5)) and math.isnan(sp["lo"])
    # never reaches: NaN speed-up; resamples count as 0
    sp = stats.speedup_ci(base, [[0.0, 0.1, 0.2]] * 3, grid, reps=200)
    assert math.isnan(sp["speedup"]) and math.isnan(sp["budget"]) and sp["hi"] == 0.0 and sp["reached"] == 0.0
    with pytest.raises(ValueError, match="curves must be"):
        stats.speedup_ci(base, [[0.0, 1.0]], grid)
