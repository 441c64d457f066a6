"""Small-sample inference for comparing methods on a shared evaluation set. Pure functions of arrays.

The design (docs/REPORTS.md, "Statistics"):

* **What is compared.** Every run of a comparison scores the same eval prompts x noise, so a method's
  score and the baseline's are *paired by image*. For each run the per-image gains over its own
  iteration 0 are averaged per prompt: ``Z[run, prompt]``. The estimate is the difference of the two
  methods' means over seeds and prompts.
* **Which interval.** Welch-t on the per-seed means (each seed's mean over the shared prompt x image
  set) *plus a prompt term*. Why this and not a bootstrap: with 3-10 seeds a percentile bootstrap of
  seeds under-covers badly (72% at n = 3 and 76% at n = 5 for a nominal 95% under the coverage
  model; it cannot produce a resample more extreme than the data), a studentized bootstrap over seeds
  is unstable with 3 values, and a two-level (seed, prompt) bootstrap inherits the same seed-level
  problem. The t interval is exact for normal seed effects and robust enough at these n; its coverage
  under a realistic model is checked by :func:`reports.coverage.coverage_simulation` (a test runs it).
  The variance has three parts::

      V = s_x^2 / n_x + s_b^2 / n_b + sigma_delta^2 / P

  s^2 are the variances of per-seed means over seeds (they already hold the within-run image noise
  averaged over P prompts). The prompt term generalises from these P eval prompts to the prompt
  population: sigma_delta^2 is the variance over prompts of the *method x prompt interaction* (prompt
  effects both methods share cancel in the paired difference and add nothing). It is estimated from
  the per-prompt differences d_p = mean_s Z_x[s, p] - mean_s Z_b[s, p]:
  E[var_p(d_p)] = sigma_delta^2 + MS_x / n_x + MS_b / n_b, where MS is a method's seed x prompt
  residual mean square (two-way layout), so sigma_delta^2 = max(0, var_p(d_p) - MS_x/n_x - MS_b/n_b)
  (a method-of-moments estimate, as in a two-way random-effects ANOVA). Degrees of freedom:
  Welch-Satterthwaite over the three parts (n_x - 1, n_b - 1, P - 1).
  Without per-image scores (older run directories) only per-seed eval means exist: plain Welch, no
  prompt term, and the report says so.
* **Paired seeds.** When two arms are paired seed by seed (the frozen control shares the baseline's
  rollouts, rewards and NFE seed for seed), the same construction runs on the per-seed differences:
  a one-sample t interval plus the prompt term (``paired=True``).
* **Exact permutation p-values** over seeds: label permutation of the per-seed values (unpaired),
  sign flips of per-seed differences (paired); every split enumerated up to ``MAX_EXACT`` splits,
  else a seeded Monte-Carlo estimate (stated in the p-value's record).
* **Holm** (step-down, Holm 1979) adjusts a family's p-values; :func:`holm_levels` gives each claim
  the confidence level whose interval excludes 0 exactly when Holm rejects, so one interval decides.
* **Outcome rule** (:func:`outcome`): better/worse when the interval excludes 0; equivalent when it lies
  inside (-SESOI, +SESOI) (two one-sided tests, TOST, each at the interval's one-sided level alpha/2,
  so one interval decides every outcome; the textbook TOST at alpha uses the 90% interval and is less
  conservative); inconclusive otherwise.
* **MDE** with t: (t_{1-alpha/2, df} + t_{power, df}) x SE (two-sided test at alpha, power 80%).
* **Cost to a target** is interval-censored: a run reaches the target somewhere between two evaluations.
  :class:`CensoredLogRatio` bounds the log cost ratio by Welch intervals of the bracket ends (the lower
  bound uses the method's lower ends against the baseline's upper ends, and vice versa), so it covers
  whatever the crossings inside the brackets were; a run that never reaches makes the bound unbounded.

The Student-t distribution is :mod:`reports.tdist`; the coverage check of the intervals is
:mod:`reports.coverage`.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from reports.tdist import t_ppf, t_sf

#: Two-sided level of every interval and test.
ALPHA = 0.05
#: Power of the minimum detectable effect.
POWER = 0.8
#: Fewest seeds per side for an interval, a p-value or an outcome other than "inconclusive".
MIN_SEEDS = 3
#: Largest number of splits / sign patterns enumerated exactly; beyond it a seeded Monte-Carlo estimate.
MAX_EXACT = 200_000

# --------------------------------------------------------------------------------------- t intervals

@dataclass(frozen=True)
class TDifference:
    """An estimate with a t reference distribution: estimate +- t_{(1+conf)/2, df} x se.

    ``se == 0`` (every seed identical) gives a point interval; NaN se or df: no interval (too few
    seeds). ``parts`` keeps the variance components (seed terms, prompt term) for the record."""

    estimate: float
    se: float
    df: float
    parts: tuple[tuple[str, float], ...] = ()

    @property
    def ok(self) -> bool:
        return bool(np.isfinite(self.estimate) and np.isfinite(self.se) and self.se >= 0 and self.df > 0)

    def interval(self, conf: float = 1 - ALPHA) -> tuple[float, float]:
        if not self.ok:
            return math.nan, math.nan
        if self.se == 0:
            return self.estimate, self.estimate
        q = float(t_ppf((1 + conf) / 2, self.df))
        return self.estimate - q * self.se, self.estimate + q * self.se

    def p_value(self) -> float:
        """Two-sided p of H0: difference = 0."""
        if not self.ok:
            return math.nan
        if self.se == 0:
            return 0.0 if self.estimate != 0 else 1.0
        return min(1.0, 2.0 * float(t_sf(abs(self.estimate) / self.se, self.df)))

    def tost_p(self, margin: float) -> float:
        """TOST p-value of H0: |difference| >= margin (the larger of the two one-sided p-values)."""
        if not self.ok or not np.isfinite(margin) or margin <= 0:
            return math.nan
        if self.se == 0:
            return 0.0 if abs(self.estimate) < margin else 1.0
        p_low = float(t_sf((self.estimate + margin) / self.se, self.df))
        p_high = float(t_sf((margin - self.estimate) / self.se, self.df))
        return max(p_low, p_high)

    def mde(self, alpha: float = ALPHA, power: float = POWER) -> float:
        """Minimum detectable effect: (t_{1-alpha/2} + t_{power}) x se (Student t, not z)."""
        if not self.ok:
            return math.nan
        return float((t_ppf(1 - alpha / 2, self.df) + t_ppf(power, self.df)) * self.se)


def welch_df(parts: Sequence[tuple[float, float]]) -> float:
    """Welch-Satterthwaite degrees of freedom of a sum of variance terms [(variance term, its df)]."""
    total = sum(v for v, _ in parts)
    den = sum(v * v / d for v, d in parts if v > 0 and d > 0 and np.isfinite(d))
    if total <= 0:
        return float(sum(d for _, d in parts if np.isfinite(d))) or math.inf
    return total * total / den if den > 0 else math.inf


def seeds_needed(sd_x: float, sd_b: float, effect: float, prompt_var: float = 0.0, alpha: float = ALPHA,
                 power: float = POWER, max_n: int = 100) -> int | None:
    """Power calculation for choosing the number of seeds: the smallest n (seeds per arm) whose MDE with t,
    ``(t_{1-alpha/2, df} + t_{power, df}) x SE``, is at most ``effect``, where SE^2 = sd_x^2/n + sd_b^2/n +
    ``prompt_var`` (the prompt term, which more seeds do not shrink) and df is Welch-Satterthwaite over the
    two seed terms (n - 1 each). ``sd_*``: the seed-to-seed standard deviations of each arm's per-seed mean
    gain (from a pilot). None when even ``max_n`` seeds cannot resolve ``effect`` (the prompt term alone
    is too large: more eval prompts or images are needed, not more seeds)."""
    if effect <= 0 or not np.isfinite(effect):
        raise ValueError(f"effect must be a positive number, got {effect}")
    for n in range(2, max_n + 1):
        parts = [(sd_x * sd_x / n, n - 1), (sd_b * sd_b / n, n - 1)]
        se = math.sqrt(sum(v for v, _ in parts) + prompt_var)
        df = welch_df(parts + ([(prompt_var, math.inf)] if prompt_var > 0 else []))
        if (t_ppf(1 - alpha / 2, df) + t_ppf(power, df)) * se <= effect:
            return n
    return None


def _clean(v: Any) -> np.ndarray:
    a = np.asarray(v, dtype=float).reshape(-1)
    return a[np.isfinite(a)]


def welch(x: Any, b: Any) -> TDifference:
    """mean(x) - mean(b) with Welch's t (per-seed values; no prompt term). NaN se below 2 values a side."""
    x, b = _clean(x), _clean(b)
    if x.size == 0 or b.size == 0:
        return TDifference(math.nan, math.nan, math.nan)
    est = float(x.mean() - b.mean())
    if x.size < 2 or b.size < 2:
        return TDifference(est, math.nan, math.nan)
    vx, vb = float(np.var(x, ddof=1)) / x.size, float(np.var(b, ddof=1)) / b.size
    df = welch_df([(vx, x.size - 1), (vb, b.size - 1)])
    return TDifference(est, math.sqrt(vx + vb), df, (("seeds_method", vx), ("seeds_baseline", vb)))


def one_sample(d: Any) -> TDifference:
    """mean(d) with a one-sample t (paired per-seed differences)."""
    d = _clean(d)
    if d.size == 0:
        return TDifference(math.nan, math.nan, math.nan)
    if d.size < 2:
        return TDifference(float(d.mean()), math.nan, math.nan)
    v = float(np.var(d, ddof=1)) / d.size
    return TDifference(float(d.mean()), math.sqrt(v), d.size - 1.0, (("seeds_paired", v),))


def _residual_ms(z: np.ndarray) -> np.ndarray:
    """Seed x prompt residual mean square of z [..., n, P] (two-way layout, one value per cell)."""
    n, p = z.shape[-2], z.shape[-1]
    r = z - z.mean(axis=-1, keepdims=True) - z.mean(axis=-2, keepdims=True) + z.mean(axis=(-2, -1), keepdims=True)
    return (r * r).sum(axis=(-2, -1)) / ((n - 1) * (p - 1))


def prompt_welch_arrays(zx: np.ndarray, zb: np.ndarray, prompt_term: bool = True
                        ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Vectorised core: zx [..., n_x, P], zb [..., n_b, P] per-seed per-prompt mean gains (the same
    prompts in the same order) -> (estimate, se, df, prompt variance term), each [...]."""
    nx, nb, p = zx.shape[-2], zb.shape[-2], zx.shape[-1]
    mx, mb = zx.mean(axis=-1), zb.mean(axis=-1)  # per-seed means over the shared set
    est = mx.mean(axis=-1) - mb.mean(axis=-1)
    vx = mx.var(axis=-1, ddof=1) / nx
    vb = mb.var(axis=-1, ddof=1) / nb
    if prompt_term and p > 1:
        d = zx.mean(axis=-2) - zb.mean(axis=-2)  # [..., P] per-prompt difference of method means
        sig = d.var(axis=-1, ddof=1) - _residual_ms(zx) / nx - _residual_ms(zb) / nb
        vp = np.maximum(sig, 0.0) / p
    else:
        vp = np.zeros_like(vx)
    total = vx + vb + vp
    den = vx ** 2 / (nx - 1) + vb ** 2 / (nb - 1) + (vp ** 2 / (p - 1) if p > 1 else 0.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        df = np.where(den > 0, total ** 2 / np.where(den > 0, den, 1.0), nx + nb - 2.0)
    return est, np.sqrt(total), df, vp


def paired_prompt_arrays(zx: np.ndarray, zb: np.ndarray, prompt_term: bool = True
                         ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Like :func:`prompt_welch_arrays` for arms paired seed by seed (zx, zb [..., n, P], row s of each
    from the same seed): a one-sample t on per-seed differences plus the prompt term."""
    dz = zx - zb
    n, p = dz.shape[-2], dz.shape[-1]
    ds = dz.mean(axis=-1)
    est = ds.mean(axis=-1)
    vs = ds.var(axis=-1, ddof=1) / n
    if prompt_term and p > 1:
        sig = dz.mean(axis=-2).var(axis=-1, ddof=1) - _residual_ms(dz) / n
        vp = np.maximum(sig, 0.0) / p
    else:
        vp = np.zeros_like(vs)
    total = vs + vp
    den = vs ** 2 / (n - 1) + (vp ** 2 / (p - 1) if p > 1 else 0.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        df = np.where(den > 0, total ** 2 / np.where(den > 0, den, 1.0), n - 1.0)
    return est, np.sqrt(total), df, vp


def prompt_difference(zx: Any, zb: Any, paired: bool = False, prompt_term: bool = True) -> TDifference:
    """Difference of two arms' mean gains on a shared prompt set, from per-seed per-prompt means
    zx [n_x, P] and zb [n_b, P]: Welch over seeds plus the prompt term (module docstring); ``paired``
    (rows are the same seeds, n_x = n_b): one-sample t on the per-seed differences plus the prompt term."""
    zx, zb = np.asarray(zx, dtype=float), np.asarray(zb, dtype=float)
    if zx.ndim != 2 or zb.ndim != 2 or zx.shape[1] != zb.shape[1]:
        raise ValueError(f"need [seeds, prompts] arrays with the same prompts, got {zx.shape} and {zb.shape}")
    if paired and zx.shape[0] != zb.shape[0]:
        raise ValueError(f"paired arms need the same seeds, got {zx.shape[0]} and {zb.shape[0]}")
    if min(zx.shape[0], zb.shape[0]) < 2:
        est = float(zx.mean() - zb.mean()) if zx.size and zb.size else math.nan
        return TDifference(est, math.nan, math.nan)
    core = paired_prompt_arrays if paired else prompt_welch_arrays
    est, se, df, vp = core(zx, zb, prompt_term)
    seeds = float(se) ** 2 - float(vp)
    return TDifference(float(est), float(se), float(df), (("seeds", seeds), ("prompts", float(vp))))


# --------------------------------------------------------------------------------------- cost brackets

@dataclass(frozen=True)
class CensoredLogRatio:
    """log(method cost / baseline cost) to reach a target, from interval-censored crossings.

    Per run, the crossing lies in the bracket (lo, hi] between the last evaluation below the target and
    the first at or above it (lo = 0 when the first evaluation after iteration 0 reaches it; hi = inf when
    the run never does). The interval's lower end is the Welch lower bound of mean(log lo_x) -
    mean(log hi_b), its upper end the Welch upper bound of mean(log hi_x) - mean(log lo_b): it covers the
    difference for any crossings inside the brackets. The estimate uses bracket midpoints (NaN when a
    run never reached the target)."""

    estimate: float
    lower: TDifference   # log lo_x vs log hi_b (NaN estimate: unbounded below)
    upper: TDifference   # log hi_x vs log lo_b (NaN estimate: unbounded above)
    lower_unbounded: bool
    upper_unbounded: bool

    def interval(self, conf: float = 1 - ALPHA) -> tuple[float, float]:
        lo = -math.inf if self.lower_unbounded else self.lower.interval(conf)[0]
        hi = math.inf if self.upper_unbounded else self.upper.interval(conf)[1]
        return lo, hi

    def p_value(self) -> float:
        """Two-sided p of H0: ratio = 1, consistent with :meth:`interval` (it excludes 0 at level conf
        exactly when p < 1 - conf)."""
        p = 1.0
        if not self.upper_unbounded and self.upper.ok and self.upper.estimate < 0:
            p = min(p, self.upper.p_value())
        if not self.lower_unbounded and self.lower.ok and self.lower.estimate > 0:
            p = min(p, self.lower.p_value())
        if not (self.upper_unbounded or self.upper.ok) or not (self.lower_unbounded or self.lower.ok):
            return math.nan
        return p


def censored_log_ratio(lo_x: Any, hi_x: Any, lo_b: Any, hi_b: Any) -> CensoredLogRatio:
    """:class:`CensoredLogRatio` from per-run brackets (lo, hi] of each arm (lo >= 0, hi <= inf)."""
    lx, hx, lb, hb = (np.asarray(v, dtype=float).reshape(-1) for v in (lo_x, hi_x, lo_b, hi_b))
    with np.errstate(divide="ignore"):
        llx, lhx, llb, lhb = np.log(lx), np.log(hx), np.log(lb), np.log(hb)
    low_unb = bool(np.any(np.isneginf(llx)) or np.any(np.isposinf(lhb)))
    up_unb = bool(np.any(np.isposinf(lhx)) or np.any(np.isneginf(llb)))
    lower = TDifference(math.nan, math.nan, math.nan) if low_unb else welch(llx, lhb)
    upper = TDifference(math.nan, math.nan, math.nan) if up_unb else welch(lhx, llb)
    if np.all(np.isfinite(hx)) and np.all(np.isfinite(hb)) and hx.size and hb.size:
        est = float(np.mean(np.log((lx + hx) / 2)) - np.mean(np.log((lb + hb) / 2)))
    else:
        est = math.nan
    return CensoredLogRatio(est, lower, upper, low_unb, up_unb)


# --------------------------------------------------------------------------------------- permutation

@dataclass(frozen=True)
class PermutationP:
    p: float
    exact: bool
    count: int  # splits / sign patterns enumerated (exact) or drawn (Monte Carlo)


def permutation_pvalue(x: Any, y: Any, max_exact: int = MAX_EXACT, reps: int = 20_000, seed: int = 0
                       ) -> PermutationP:
    """Two-sided label-permutation p-value of mean(x) - mean(y) over every split of the pooled seeds
    into groups of the two sizes (exact), or ``reps`` seeded random splits ((hits + 1) / (reps + 1))."""
    x, y = _clean(x), _clean(y)
    if x.size == 0 or y.size == 0:
        return PermutationP(math.nan, True, 0)
    pooled = np.concatenate([x, y])
    n, k = pooled.size, x.size
    total = pooled.sum()
    obs = abs(x.mean() - y.mean())
    tol = 1e-12 * max(1.0, float(np.abs(pooled).max()))
    splits = math.comb(n, k)
    if splits <= max_exact:
        idx = np.array(list(itertools.combinations(range(n), k)), dtype=int)
        sx = pooled[idx].sum(axis=1)
        stat = np.abs(sx / k - (total - sx) / (n - k))
        return PermutationP(float(np.mean(stat >= obs - tol)), True, splits)
    rng = np.random.default_rng(seed)
    perm = np.argsort(rng.random((reps, n)), axis=1)[:, :k]
    sx = pooled[perm].sum(axis=1)
    stat = np.abs(sx / k - (total - sx) / (n - k))
    return PermutationP(float((np.sum(stat >= obs - tol) + 1) / (reps + 1)), False, reps)


def signflip_pvalue(d: Any, max_exact: int = MAX_EXACT, reps: int = 20_000, seed: int = 0) -> PermutationP:
    """Two-sided sign-flip p-value of mean(d) = 0 for paired per-seed differences: every one of the 2^n
    sign patterns (exact), or ``reps`` seeded random patterns ((hits + 1) / (reps + 1))."""
    d = _clean(d)
    if d.size == 0:
        return PermutationP(math.nan, True, 0)
    n = d.size
    obs = abs(d.mean())
    tol = 1e-12 * max(1.0, float(np.abs(d).max()))
    if 2 ** n <= max_exact:
        signs = 1.0 - 2.0 * ((np.arange(2 ** n)[:, None] >> np.arange(n)) & 1)
        stat = np.abs((signs * d).mean(axis=1))
        return PermutationP(float(np.mean(stat >= obs - tol)), True, 2 ** n)
    signs = np.random.default_rng(seed).choice([-1.0, 1.0], size=(reps, n))
    stat = np.abs((signs * d).mean(axis=1))
    return PermutationP(float((np.sum(stat >= obs - tol) + 1) / (reps + 1)), False, reps)


# --------------------------------------------------------------------------------------- multiplicity

def holm(pvalues: Sequence[float]) -> np.ndarray:
    """Holm step-down adjusted p-values (NaN entries stay NaN and are not counted in the family)."""
    p = np.asarray(pvalues, dtype=float)
    out = np.full(p.shape, np.nan)
    ok = np.flatnonzero(np.isfinite(p))
    m = ok.size
    if m == 0:
        return out
    order = ok[np.argsort(p[ok], kind="stable")]
    adj = np.maximum.accumulate((m - np.arange(m)) * p[order])
    out[order] = np.minimum(adj, 1.0)
    return out


def holm_levels(pvalues: Sequence[float], alpha: float = ALPHA) -> np.ndarray:
    """Per claim, the two-sided level a such that its (1 - a) interval excludes 0 exactly when Holm
    rejects it at family level ``alpha``: alpha / (m - k + 1) for the claim of rank k before the first
    non-rejection, and that first non-rejection's level for every claim from it on. NaN p: alpha."""
    p = np.asarray(pvalues, dtype=float)
    out = np.full(p.shape, float(alpha))
    ok = np.flatnonzero(np.isfinite(p))
    m = ok.size
    order = ok[np.argsort(p[ok], kind="stable")]
    stop = None
    for k, i in enumerate(order):
        level = alpha / (m - k)
        if stop is None and p[i] >= level:
            stop = level
        out[i] = level if stop is None else stop
    return out


# --------------------------------------------------------------------------------------- outcomes

OUTCOMES = ("better", "worse", "equivalent", "inconclusive")


def outcome(lo: float, hi: float, sesoi: float, higher_is_better: bool = True) -> str:
    """The one rule: better/worse when [lo, hi] excludes 0 (the sign says which, given the direction);
    equivalent when it lies inside (-sesoi, +sesoi); inconclusive otherwise (or without an interval)."""
    if not (np.isfinite(lo) or np.isfinite(hi)) or math.isnan(lo) or math.isnan(hi):
        return "inconclusive"
    if lo > 0:
        return "better" if higher_is_better else "worse"
    if hi < 0:
        return "worse" if higher_is_better else "better"
    if np.isfinite(sesoi) and sesoi > 0 and -sesoi < lo and hi < sesoi:
        return "equivalent"
    return "inconclusive"


def seeds_above(x: Any, b: Any) -> tuple[int, int]:
    """(k, n): how many of the method's n per-seed values lie above the baseline's mean."""
    x, b = _clean(x), _clean(b)
    if x.size == 0 or b.size == 0:
        return 0, int(x.size)
    return int(np.sum(x > b.mean())), int(x.size)


def mean_interval(v: Any, conf: float = 1 - ALPHA) -> tuple[float, float, float]:
    """(mean, lower, upper): one-sample t interval of per-seed values; NaN bounds below MIN_SEEDS."""
    v = _clean(v)
    if v.size == 0:
        return math.nan, math.nan, math.nan
    if v.size < MIN_SEEDS:
        return float(v.mean()), math.nan, math.nan
    lo, hi = one_sample(v).interval(conf)
    return float(v.mean()), lo, hi
