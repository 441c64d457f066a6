"""Known-answer tests of reports.inference, reports.tdist and reports.coverage: the t distribution
(against scipy, an independent implementation), Welch and the prompt term by hand, exact permutation and sign-flip p-values by hand,
Holm, the outcome rule, TOST, MDE with t, the interval-censored cost ratio, and the coverage simulation."""

import math

import numpy as np
import pytest

from reports import coverage, tdist
from reports import inference as inf

# --------------------------------------------------------------------------------------- Student t


def test_t_distribution_matches_scipy():
    st = pytest.importorskip("scipy.stats")
    for df in (1, 2, 2.7, 3, 4.5, 8, 30, 300, 1e5):
        for p in (1e-9, 0.025, 0.5, 0.6, 0.8, 0.975, 0.999, 0.99999):
            want = st.t.ppf(p, df)
            assert tdist.t_ppf(p, df) == pytest.approx(want, rel=1e-9, abs=1e-12)
            if df < 1000:  # the vectorised path (coverage simulation) serves small df
                assert tdist.t_ppf(np.array([p]), df)[0] == pytest.approx(want, rel=1e-9, abs=1e-12)
        for t in (-3.0, -0.5, 0.0, 0.1, 1.0, 2.5, 10.0, 100.0):
            assert tdist.t_sf(t, df) == pytest.approx(st.t.sf(t, df), rel=1e-9, abs=1e-15)


def test_t_closed_forms():
    # df = 2: P(T > t) = (1 - t / sqrt(t^2 + 2)) / 2; df = 1 (Cauchy): 1/2 - atan(t) / pi
    for t in (0.3, 1.0, 4.0):
        assert tdist.t_sf(t, 2) == pytest.approx(0.5 * (1 - t / math.sqrt(t * t + 2)), rel=1e-12)
        assert tdist.t_sf(t, 1) == pytest.approx(0.5 - math.atan(t) / math.pi, rel=1e-12)
    # quantiles from printed tables: t_{0.975}(4) = 2.776, t_{0.8}(4) = 0.941, z_{0.975} = 1.960
    assert tdist.t_ppf(0.975, 4) == pytest.approx(2.776, abs=5e-4)
    assert tdist.t_ppf(0.8, 4) == pytest.approx(0.941, abs=5e-4)
    assert tdist.t_ppf(0.975, math.inf) == pytest.approx(1.960, abs=5e-4)


# --------------------------------------------------------------------------------------- Welch, prompt term

def test_welch_known_answer():
    d = inf.welch([1, 2, 3], [0, 0, 0])
    # var(x) = 1 -> 1/3; baseline constant -> df = (1/3)^2 / ((1/3)^2 / 2) = 2
    assert (d.estimate, d.se, d.df) == pytest.approx((2.0, math.sqrt(1 / 3), 2.0))
    t = 2.0 / math.sqrt(1 / 3)
    assert d.p_value() == pytest.approx(1 - t / math.sqrt(t * t + 2), rel=1e-10)  # 2 x the df = 2 tail
    lo, hi = d.interval()
    assert (lo + hi) / 2 == pytest.approx(2.0) and hi - lo == pytest.approx(2 * 4.302653 * math.sqrt(1 / 3), rel=1e-6)
    # equal variances and sizes: df = 2 (n - 1)
    assert inf.welch([1, 2, 3], [4, 5, 6]).df == pytest.approx(4.0)
    # one value a side: an estimate and no interval
    assert math.isnan(inf.welch([1.0], [0.0, 1.0]).se) and math.isnan(inf.welch([1.0], [0.0]).interval()[0])


def test_prompt_term_by_hand():
    # zx[s, p] = 1 + u_s + delta_p (additive: no seed x prompt residual), zb = 0
    u, delta = np.array([0.0, 0.3, 0.6]), np.array([-1.0, 0.0, 1.0])
    zx = 1 + u[:, None] + delta[None, :]
    d = inf.prompt_difference(zx, np.zeros((3, 3)))
    vx, vp = 0.09 / 3, 1.0 / 3  # var(u) / n; var(delta) / P
    assert d.estimate == pytest.approx(1.3)
    assert d.se == pytest.approx(math.sqrt(vx + vp))
    assert d.df == pytest.approx((vx + vp) ** 2 / (vx ** 2 / 2 + vp ** 2 / 2))
    assert dict(d.parts)["prompts"] == pytest.approx(vp)
    # a prompt effect both arms share cancels: no prompt term
    assert inf.prompt_difference(zx, 0.5 + delta[None, :] + np.zeros((3, 1))).parts[1][1] == pytest.approx(0.0)
    # seed x prompt noise alone is not taken for an interaction: var_p(d_p) = 0 < MS_x / n
    z = np.array([[1.0, 0.0], [0.0, 1.0]])  # residual mean square 1, per-seed means equal
    d = inf.prompt_difference(z, np.zeros((2, 2)))
    assert d.se == 0.0 and d.estimate == pytest.approx(0.5) and d.interval() == (0.5, 0.5)
    with pytest.raises(ValueError, match="same prompts"):
        inf.prompt_difference(np.zeros((3, 2)), np.zeros((3, 3)))


def test_paired_seeds():
    zb = np.array([[0.1, 0.3], [0.2, 0.4], [0.5, 0.1]])
    d = inf.prompt_difference(zb + 0.25, zb, paired=True)  # every seed moved by the same amount
    assert d.estimate == pytest.approx(0.25) and d.se == pytest.approx(0.0, abs=1e-15)
    diffs = np.array([0.1, 0.2, 0.6])
    d = inf.prompt_difference(zb + diffs[:, None], zb, paired=True)
    assert d.estimate == pytest.approx(0.3) and d.df == pytest.approx(2.0)
    assert d.se == pytest.approx(np.std(diffs, ddof=1) / math.sqrt(3))
    with pytest.raises(ValueError, match="same seeds"):
        inf.prompt_difference(zb, zb[:2], paired=True)


# --------------------------------------------------------------------------------------- permutation

def test_permutation_p_exact_by_hand():
    # 20 splits of {1..6} into 3 + 3; only {1,2,3} | {4,5,6} and its mirror reach |mean diff| 3
    r = inf.permutation_pvalue([1, 2, 3], [4, 5, 6])
    assert (r.p, r.exact, r.count) == (pytest.approx(0.1), True, 20)
    # x = [3], y = [0, 1, 2]: splits give |x - mean(rest)| = 2, 2, 2/3, 2/3 -> 2 of 4 reach 2
    assert inf.permutation_pvalue([3], [0, 1, 2]).p == pytest.approx(0.5)
    # 5 vs 5 completely separated: 2 of C(10, 5) = 252 splits
    assert inf.permutation_pvalue(range(5), range(10, 15)).p == pytest.approx(2 / 252)
    # Monte Carlo when enumeration is capped: close to the exact value, and never 0
    mc = inf.permutation_pvalue([1, 2, 3], [4, 5, 6], max_exact=0, reps=20_000)
    assert not mc.exact and mc.p == pytest.approx(0.1, abs=0.01)


def test_signflip_p_exact_by_hand():
    # 8 sign patterns of [1, 2, 3]: only +++ and --- reach |mean| 2
    assert inf.signflip_pvalue([1, 2, 3]).p == pytest.approx(0.25)
    # [1, -1, 2] (sum 2): signed sums 2, -2, 4, 0, 0, -4, 2, -2 -> 6 of 8 reach |sum| 2
    assert inf.signflip_pvalue([1, -1, 2]).p == pytest.approx(0.75)
    # 5 positive seeds: the smallest possible two-sided p is 2 / 32
    assert inf.signflip_pvalue([0.1, 0.2, 0.3, 0.4, 0.5]).p == pytest.approx(2 / 32)


# --------------------------------------------------------------------------------------- Holm

def test_holm_by_hand():
    p = [0.01, 0.04, 0.03, 0.005]
    # sorted 0.005, 0.01, 0.03, 0.04 x (4, 3, 2, 1) = 0.02, 0.03, 0.06, 0.04 -> running max
    np.testing.assert_allclose(inf.holm(p), [0.03, 0.06, 0.06, 0.02])
    # levels: 0.05/4 and 0.05/3 reject; 0.03 >= 0.05/2 stops: it and every later claim get 0.025
    np.testing.assert_allclose(inf.holm_levels(p), [0.05 / 3, 0.025, 0.025, 0.0125])
    out = inf.holm([0.01, float("nan"), 0.02])  # NaN is not a member of the family
    assert math.isnan(out[1]) and out[0] == pytest.approx(0.02) and out[2] == pytest.approx(0.02)


def test_holm_levels_decide_exactly_as_holm_rejects():
    rng = np.random.default_rng(3)
    for _ in range(200):
        m = int(rng.integers(1, 9))
        tests = [inf.TDifference(float(rng.normal(0, 2.5)), 1.0, float(rng.uniform(2, 30))) for _ in range(m)]
        p = np.array([t.p_value() for t in tests])
        adj, levels = inf.holm(p), inf.holm_levels(p)
        for t, a, lev in zip(tests, adj, levels):
            lo, hi = t.interval(1 - lev)
            assert (lo > 0 or hi < 0) == (a < 0.05)


# --------------------------------------------------------------------------------------- outcome rule

def test_outcome_rule_on_hand_made_intervals():
    assert inf.outcome(0.1, 0.2, 0.05) == "better"
    assert inf.outcome(-0.2, -0.1, 0.05) == "worse"
    assert inf.outcome(-0.01, 0.02, 0.05) == "equivalent"
    assert inf.outcome(-0.01, 0.06, 0.05) == "inconclusive"
    assert inf.outcome(0.01, 0.02, 0.05) == "better"  # excluding 0 comes first (a negligible difference)
    assert inf.outcome(-0.05, 0.01, 0.05) == "inconclusive"  # the margin is strict (TOST)
    assert inf.outcome(-0.01, 0.02, math.nan) == "inconclusive"  # no SESOI: no equivalence
    assert inf.outcome(math.nan, math.nan, 0.05) == "inconclusive"
    assert inf.outcome(-math.inf, -0.1, 0.05) == "worse"
    assert inf.outcome(-math.inf, math.inf, 0.05) == "inconclusive"
    assert inf.outcome(-0.3, -0.1, 0.05, higher_is_better=False) == "better"  # costs: lower is better


def test_tost_agrees_with_the_interval():
    for est in (-0.04, -0.01, 0.0, 0.02, 0.045):
        d = inf.TDifference(est, 0.01, 6.0)
        lo, hi = d.interval(0.95)
        inside = -0.05 < lo and hi < 0.05
        assert (d.tost_p(0.05) < 0.025) == inside


def test_mde_uses_t_not_z():
    d = inf.TDifference(0.0, 1.0, 4.0)
    assert d.mde() == pytest.approx(2.776445 + 0.940965, abs=1e-5)  # t_{0.975,4} + t_{0.8,4}
    assert d.mde() > (1.959964 + 0.841621) * 1.0


def test_seeds_above_and_mean_interval():
    assert inf.seeds_above([0.3, 0.1, 0.5], [0.1, 0.3]) == (2, 3)  # baseline mean 0.2
    m, lo, hi = inf.mean_interval([1.0, 2.0, 3.0])
    assert m == 2.0 and 2.0 - lo == pytest.approx(hi - 2.0) and hi - 2.0 == pytest.approx(4.302653 / math.sqrt(3), abs=1e-5)  # t_{0.975,2} x sd 1 / sqrt(3)
    assert math.isnan(inf.mean_interval([1.0, 2.0])[1])


# --------------------------------------------------------------------------------------- cost brackets

def test_censored_log_ratio_known_answers():
    # every seed brackets at the same evaluations: (2000, 4000] vs (8000, 10000] -> ratio within [0.2, 0.5]
    c = inf.censored_log_ratio([2000] * 3, [4000] * 3, [8000] * 3, [10000] * 3)
    lo, hi = c.interval()
    assert (math.exp(lo), math.exp(hi)) == pytest.approx((0.2, 0.5))
    assert math.exp(c.estimate) == pytest.approx(3000 / 9000) and c.p_value() == 0.0
    # reached before the first evaluation after iteration 0: no lower bound on the ratio
    c = inf.censored_log_ratio([0] * 3, [2000] * 3, [8000] * 3, [10000] * 3)
    assert c.lower_unbounded and c.interval()[0] == -math.inf and math.exp(c.interval()[1]) == pytest.approx(0.25)
    # a method seed never reaches the target: no upper bound, no point estimate
    c = inf.censored_log_ratio([2000, 2000, 20000], [4000, 4000, math.inf], [8000] * 3, [10000] * 3)
    assert c.upper_unbounded and c.interval()[1] == math.inf and math.isnan(c.estimate)
    assert c.p_value() == 1.0  # cannot show "cheaper"; "dearer" not supported either (lower part < 0)
    # the p-value and the interval agree
    rng = np.random.default_rng(0)
    for _ in range(50):
        lx = rng.uniform(1, 5, 4)
        lb = rng.uniform(1, 5, 4) * rng.uniform(0.3, 3)
        c = inf.censored_log_ratio(lx, lx * 1.5, lb, lb * 1.5)
        lo, hi = c.interval(0.95)
        assert (lo > 0 or hi < 0) == (c.p_value() < 0.05)


# --------------------------------------------------------------------------------------- coverage

def test_coverage_of_the_difference_interval_at_small_n():
    # 2000 simulated comparisons each (binomial standard error about 0.005 at 95%)
    assert coverage.coverage_simulation(5, reps=2000, seed=1) >= 0.92
    assert coverage.coverage_simulation(3, reps=2000, seed=2) >= 0.90


def test_the_prompt_term_is_what_keeps_coverage_under_a_method_prompt_interaction():
    strong = {"interaction_sd": 0.03}  # the interaction dominates the seed spread
    assert coverage.coverage_simulation(5, reps=1500, seed=4, prompt_term=False, **strong) < 0.85
    assert coverage.coverage_simulation(5, reps=1500, seed=4, **strong) >= 0.92


@pytest.mark.slow
def test_coverage_over_three_to_ten_seeds_many_replicates():
    for n in (3, 4, 5, 7, 10):
        for model in ({}, {"interaction_sd": 0.03}, {"seed_sd": 0.01, "interaction_sd": 0.0}):
            cov = coverage.coverage_simulation(n, reps=20_000, seed=10 + n, **model)
            assert cov >= (0.92 if n >= 5 else 0.90), (n, model, cov)


def test_seeds_needed_known_answers():
    # equal seed sds 1, no prompt term: df = 2(n - 1). n = 5: (t_.975,8 2.306 + t_.8,8 0.889) x sqrt(2/5)
    # = 2.021 > 2.0; n = 6: (2.228 + 0.879) x sqrt(2/6) = 1.794 <= 2.0 (t quantiles from printed tables)
    from reports.inference import seeds_needed

    assert seeds_needed(1.0, 1.0, 2.0) == 6
    assert seeds_needed(1.0, 1.0, 2.03) == 5
    # n = 3: (t_.975,4 2.776 + t_.8,4 0.941) x sqrt(2/3) = 3.035
    assert seeds_needed(1.0, 1.0, 3.04) == 3 and seeds_needed(1.0, 1.0, 3.03) == 4
    # a prompt term that alone exceeds the effect cannot be beaten by seeds
    assert seeds_needed(0.1, 0.1, 0.5, prompt_var=0.25) is None
    with pytest.raises(ValueError):
        seeds_needed(1.0, 1.0, 0.0)
