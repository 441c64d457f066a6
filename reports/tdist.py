"""Student's t distribution: survival function, density and quantiles, scalar and elementwise.

Implemented here so that reports need no scipy: the regularized incomplete beta function by the
modified Lentz continued fraction (Numerical Recipes, 3rd ed., section 6.4, eq. 6.4.5), P(T > t) =
I_{df/(df + t^2)}(df/2, 1/2) / 2, and quantiles by Newton's method on the tail probability, safeguarded
by bisection, from a Cornish-Fisher start. Non-integer df (Welch-Satterthwaite) are fine; above
``_DF_NORMAL`` degrees of freedom the normal distribution is used. A test checks everything against
scipy.stats.t.
"""

from __future__ import annotations

import math
from statistics import NormalDist
from typing import Any

import numpy as np

#: Degrees of freedom above which the t distribution is taken as normal.
_DF_NORMAL = 1e7



def _betacf(a: np.ndarray, b: np.ndarray, x: np.ndarray, iters: int = 10_000) -> np.ndarray:
    """Continued fraction of the incomplete beta function (modified Lentz; NR 3rd ed. eq. 6.4.5)."""
    tiny = 1e-300
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c = np.ones_like(x)
    d = 1.0 - qab * x / qap
    d = np.where(np.abs(d) < tiny, tiny, d)
    d = 1.0 / d
    h = d.copy()
    active = np.ones(x.shape, dtype=bool)
    for m in range(1, iters + 1):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = np.where(np.abs(d) < tiny, tiny, d)
        c = 1.0 + aa / c
        c = np.where(np.abs(c) < tiny, tiny, c)
        d = 1.0 / d
        h = np.where(active, h * d * c, h)
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = np.where(np.abs(d) < tiny, tiny, d)
        c = 1.0 + aa / c
        c = np.where(np.abs(c) < tiny, tiny, c)
        d = 1.0 / d
        delta = d * c
        h = np.where(active, h * delta, h)
        active &= np.abs(delta - 1.0) > 3e-16
        if not active.any():
            break
    return h


def _lgamma(v: np.ndarray) -> np.ndarray:
    return np.vectorize(math.lgamma, otypes=[float])(v)


def _betainc(a: np.ndarray, b: np.ndarray, x: np.ndarray) -> np.ndarray:
    out = np.where(x <= 0, 0.0, 1.0).astype(float)
    inner = (x > 0) & (x < 1)
    if not inner.any():
        return out
    ai, bi, xi = a[inner], b[inner], x[inner]
    log_bt = _lgamma(ai + bi) - _lgamma(ai) - _lgamma(bi) + ai * np.log(xi) + bi * np.log1p(-xi)
    bt = np.exp(log_bt)
    direct = xi < (ai + 1.0) / (ai + bi + 2.0)
    res = np.empty_like(xi)
    if direct.any():
        res[direct] = bt[direct] * _betacf(ai[direct], bi[direct], xi[direct]) / ai[direct]
    flip = ~direct
    if flip.any():
        res[flip] = 1.0 - bt[flip] * _betacf(bi[flip], ai[flip], 1.0 - xi[flip]) / bi[flip]
    out[inner] = res
    return out


def _betacf_scalar(a: float, b: float, x: float) -> float:
    """:func:`_betacf` for one value, in plain floats (fast for the report's scalar calls)."""
    tiny = 1e-300
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) >= tiny else tiny)
    h = d
    for m in range(1, 10_001):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) >= tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) >= tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) >= tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) >= tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1.0) <= 3e-16:
            break
    return h


def _t_sf_scalar(t: float, df: float) -> float:
    if math.isnan(t) or not df > 0:
        return math.nan
    if math.isinf(t):
        return 0.0 if t > 0 else 1.0
    if df > _DF_NORMAL:
        return 0.5 * math.erfc(t / math.sqrt(2.0))
    a, b, x = df / 2.0, 0.5, df / (df + t * t)
    if x >= 1.0:
        half = 0.5
    else:
        log_bt = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
        if x < (a + 1.0) / (a + b + 2.0):
            ib = math.exp(log_bt) * _betacf_scalar(a, b, x) / a
        else:
            ib = 1.0 - math.exp(log_bt) * _betacf_scalar(b, a, 1.0 - x) / b
        half = 0.5 * ib
    return half if t >= 0 else 1.0 - half


def _t_pdf_scalar(t: float, df: float) -> float:
    if df > _DF_NORMAL:
        return math.exp(-0.5 * t * t) / math.sqrt(2 * math.pi)
    log_c = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)
    return math.exp(log_c - (df + 1) / 2 * math.log1p(t * t / df))


def _t_ppf_scalar(p: float, df: float) -> float:
    if math.isnan(p) or not df > 0 or not 0 <= p <= 1:
        return math.nan
    if p in (0.0, 1.0):
        return math.inf if p == 1.0 else -math.inf
    if p == 0.5:
        return 0.0
    q, sign = (1.0 - p, 1.0) if p > 0.5 else (p, -1.0)
    z = NormalDist().inv_cdf(1.0 - q)
    nu = max(df, 1.0)
    t = max(0.0, z + (z ** 3 + z) / (4 * nu) + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * nu ** 2))
    lo, hi = 0.0, max(2 * t, 1.0)
    while _t_sf_scalar(hi, df) > q:
        hi *= 4
    t = min(max(t, lo), hi)
    for _ in range(200):
        s = _t_sf_scalar(t, df)
        if s > q:
            lo = t
        else:
            hi = t
        if abs(s - q) <= 1e-14 * q or hi - lo <= 1e-13 * max(1.0, hi):
            break
        new = t + (s - q) / max(_t_pdf_scalar(t, df), 1e-300)
        t = new if (math.isfinite(new) and lo < new < hi) else 0.5 * (lo + hi)
    return sign * t


def t_sf(t: Any, df: Any) -> Any:
    """P(T > t) for Student's t with ``df`` degrees of freedom (df = inf: the normal), elementwise."""
    if np.ndim(t) == 0 and np.ndim(df) == 0:
        return _t_sf_scalar(float(t), float(df))
    t, df = np.broadcast_arrays(np.asarray(t, dtype=float), np.asarray(df, dtype=float))
    t, df = t.astype(float), df.astype(float)
    out = np.full(t.shape, np.nan)
    ok = np.isfinite(t) & (df > 0)
    normal = ok & (df > _DF_NORMAL)
    if normal.any():
        out[normal] = 0.5 * np.vectorize(math.erfc)(t[normal] / math.sqrt(2.0))
    tdist = ok & ~normal
    if tdist.any():
        tt, nu = t[tdist], df[tdist]
        half = 0.5 * _betainc(nu / 2.0, np.full_like(nu, 0.5), nu / (nu + tt * tt))  # P(T > |t|)
        out[tdist] = np.where(tt >= 0, half, 1.0 - half)
    out[np.isposinf(t) & (df > 0)] = 0.0
    out[np.isneginf(t) & (df > 0)] = 1.0
    return out if out.ndim else float(out)


def t_cdf(t: Any, df: Any) -> Any:
    """P(T <= t)."""
    s = t_sf(t, df)
    return 1.0 - s


def t_pdf(t: Any, df: Any) -> np.ndarray:
    t, nu = np.broadcast_arrays(np.asarray(t, dtype=float), np.asarray(df, dtype=float))
    big = nu > _DF_NORMAL
    nu_ = np.where(big, 1.0, nu)
    log_c = _lgamma((nu_ + 1) / 2) - _lgamma(nu_ / 2) - 0.5 * np.log(nu_ * math.pi)
    dens = np.exp(log_c - (nu_ + 1) / 2 * np.log1p(t * t / nu_))
    return np.where(big, np.exp(-0.5 * t * t) / math.sqrt(2 * math.pi), dens)


def t_ppf(p: Any, df: Any) -> Any:
    """The p-quantile of Student's t with ``df`` degrees of freedom, elementwise (safeguarded Newton on
    the tail probability; df = inf: the normal quantile)."""
    if np.ndim(p) == 0 and np.ndim(df) == 0:
        return _t_ppf_scalar(float(p), float(df))
    p, df = np.broadcast_arrays(np.asarray(p, dtype=float), np.asarray(df, dtype=float))
    p, df = p.astype(float), df.astype(float)
    out = np.full(p.shape, np.nan)
    ok = (p > 0) & (p < 1) & (df > 0)
    out[(p == 1) & (df > 0)] = math.inf
    out[(p == 0) & (df > 0)] = -math.inf
    if not ok.any():
        return out if out.ndim else float(out)
    pp, nu = p[ok], df[ok]
    q = np.where(pp > 0.5, 1.0 - pp, pp)  # solve P(T > t) = q for t >= 0
    sign = np.where(pp > 0.5, 1.0, -1.0)
    z = np.array([NormalDist().inv_cdf(1.0 - v) for v in q])
    nu_s = np.maximum(nu, 1.0)
    t = z + (z ** 3 + z) / (4 * nu_s) + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * nu_s ** 2)  # Cornish-Fisher
    t = np.maximum(t, 0.0)
    lo, hi = np.zeros_like(t), np.maximum(2 * t, 1.0)
    while True:  # bracket: P(T > hi) <= q
        s_hi = t_sf(hi, nu)
        grow = s_hi > q
        if not grow.any():
            break
        hi = np.where(grow, hi * 4, hi)
    t = np.clip(t, lo, hi)
    for _ in range(200):
        s = t_sf(t, nu)
        lo = np.where(s > q, t, lo)
        hi = np.where(s <= q, t, hi)
        step = (s - q) / np.maximum(t_pdf(t, nu), 1e-300)
        new = t + step
        bad = ~np.isfinite(new) | (new <= lo) | (new >= hi)
        new = np.where(bad, 0.5 * (lo + hi), new)
        done = (np.abs(s - q) <= 1e-14 * q) | (hi - lo <= 1e-13 * np.maximum(1.0, hi))
        t = np.where(done, t, new)
        if done.all():
            break
    out[ok] = np.where(q == 0.5, 0.0, sign * t)
    return out if out.ndim else float(out)
