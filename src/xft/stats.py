"""Every interval and test xft prints: run reports, the study, the merge gap.

    p = paired(scores_a, scores_b)       # same seeds, same order: a_i - b_i per seed
    p.verdict, p.lo, p.hi, p.p_value     # "holds" / "reversed" / "unresolved"; paired t
    p.p_permutation, p.p_sign            # exact sign-flip permutation and sign-test p-values
    fmt_paired(p), power_sentence(p)     # "+4.8 ± 3.1 points", "detects ≥ 6.2 points at 80% power"
    mean_ci(xs), proportion_ci(p, n)     # a mean over seeds (t), a pass rate over tasks (normal)
    holm(p_values), mcnemar(b, c)        # family-wise adjustment; exact McNemar on discordant tasks
    correlation_ci(x, y)                 # Pearson r with its Fisher-z interval

Pure Python (`math` only), so reports need neither numpy nor scipy; the tests
check it against scipy and against exact enumerations.

* Student's t CDF: the regularized incomplete beta function, evaluated by its
  continued fraction (DLMF 8.17.22) with the modified Lentz method; its
  inverse by Newton steps kept inside a bisection bracket.
* Noncentral t CDF: the Poisson-weighted series of incomplete beta functions
  (Lenth 1989, AS 243), summed outward from the largest Poisson weight with
  the beta functions' recurrences, as Benton & Krishnamoorthy (2003) do, so a
  large noncentrality neither underflows nor needs thousands of terms from 0.
  The series is truncated at an absolute error below 1e-14; against mpmath
  quadrature the CDF agrees to ≤ 3e-12 absolute for df in [1, 1000] and
  |nc| ≤ 100 (tests/test_stats.py checks 1e-10).
* `mde`: the true mean difference a two-sided t test at `level` detects with
  probability `power` given the differences' sd, solved exactly from the
  noncentral t power function by bisection. `mde_approx` is the textbook
  normal-style shortcut `(t_{1-α/2} + t_{power}) · sd/√n`, which slightly
  understates it for few seeds.

Accuracy is absolute: tiny tail probabilities come out near 0, not to full
relative precision.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

_EPS = 1e-15  # relative convergence of the continued fraction and the root finders
_TINY = 1e-300  # stands in for a zero denominator in Lentz's method
_MAX_TERMS = 100_000


# ---------------------------------------------------------------- central t

def _betainc(a: float, b: float, x: float, y: float) -> float:
    """Regularized incomplete beta I_x(a, b), with y = 1 - x passed exactly by the caller."""
    if x <= 0.0:
        return 0.0
    if y <= 0.0:
        return 1.0
    # The continued fraction converges fast only left of the mode; the right side is 1 - I_y(b, a).
    if x > (a + 1.0) / (a + b + 2.0):
        return 1.0 - _betainc(b, a, y, x)
    return _beta_term(a, b, x, y) * _beta_cf(a, b, x)


def _beta_term(a: float, b: float, x: float, y: float) -> float:
    """x^a y^b / (a B(a, b)), y = 1 - x: the factor in front of the continued fraction."""
    # log1p(-y) keeps log x accurate when x is near 1 and a is large (the t CDF with many df).
    log_x = math.log(x) if x < 0.5 else math.log1p(-y)
    log_y = math.log(y) if y < 0.5 else math.log1p(-x)
    return math.exp(a * log_x + b * log_y - _log_beta(a, b)) / a


def _log_beta(a: float, b: float) -> float:
    """log B(a, b), without the cancellation in lgamma(a) - lgamma(a + b) when one argument is huge."""
    s, big = min(a, b), max(a, b)
    if big < 1e6:
        return math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b)
    # Stirling's series: lgamma(big + s) - lgamma(big), its 1/(12 z) terms kept, the next (1/z³) below 1e-18.
    diff = s * math.log(big) + (big + s - 0.5) * math.log1p(s / big) - s + 1 / (12 * (big + s)) - 1 / (12 * big)
    return math.lgamma(s) - diff


def _beta_cf(a: float, b: float, x: float) -> float:
    """1 / (1 + d1 / (1 + d2 / (1 + ...))) of DLMF 8.17.22, by the modified Lentz method."""
    f, c, d = _TINY, _TINY, 0.0  # value, and Lentz's ratios C_j and D_j, of the fraction 0 + 1/(1 + ...)
    for j in range(_MAX_TERMS):
        if j == 0:
            num = 1.0
        elif j % 2 == 0:
            m = j // 2
            num = m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m))
        else:
            m = j // 2
            num = -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))
        d = 1.0 + num * d
        d = 1.0 / (d if d != 0.0 else _TINY)
        c = 1.0 + num / c
        c = c if c != 0.0 else _TINY
        f *= c * d
        if abs(c * d - 1.0) < _EPS:
            return f
    raise ArithmeticError(f"incomplete beta continued fraction did not converge (a={a}, b={b}, x={x})")


def _check_df(df: float) -> None:
    if not df > 0 or math.isinf(df):
        raise ValueError(f"degrees of freedom must be a finite number > 0, got {df}")


def t_cdf(x: float, df: float) -> float:
    """P(T ≤ x) for Student's t with `df` > 0 degrees of freedom (any real df)."""
    _check_df(df)
    if math.isnan(x):
        return math.nan
    if math.isinf(x):
        return 1.0 if x > 0 else 0.0
    # P(|T| > |x|) = I_z(df/2, 1/2) with z = df / (df + x²); 1 - z is passed separately to keep it exact.
    tail = 0.5 * _betainc(0.5 * df, 0.5, df / (df + x * x), x * x / (df + x * x))
    return 1.0 - tail if x > 0 else tail


def t_pdf(x: float, df: float) -> float:
    """Density of Student's t with `df` > 0 degrees of freedom at `x`."""
    _check_df(df)
    log_norm = math.lgamma(0.5 * (df + 1)) - math.lgamma(0.5 * df) - 0.5 * math.log(df * math.pi)
    return math.exp(log_norm - 0.5 * (df + 1) * math.log1p(x * x / df))


def t_quantile(p: float, df: float) -> float:
    """The x with t_cdf(x, df) = p, for 0 < p < 1."""
    _check_df(df)
    if not 0.0 < p < 1.0:
        raise ValueError(f"t_quantile needs 0 < p < 1, got {p}")
    if p == 0.5:
        return 0.0
    # Solve in the lower tail, where t_cdf is accurate for small probabilities; 1 - p is exact for p ≥ 0.5.
    q = min(p, 1.0 - p)
    hi = -1.0
    while t_cdf(hi, df) < q:  # ends: hi shrinks towards 0, where t_cdf is 0.5 > q
        hi *= 0.5
    lo = 2.0 * hi
    while t_cdf(lo, df) > q:
        if lo < -1e150:  # x² would soon overflow in t_cdf: only p within ~1e-150·df of 0 or 1 (heavy tails) get here
            raise ValueError(f"t quantile of p={p} with df={df} lies beyond ±1e150")
        lo, hi = 2.0 * lo, lo
    x = _newton_in_bracket(lambda v: t_cdf(v, df) - q, lambda v: t_pdf(v, df), lo, hi)
    return x if p < 0.5 else -x


def _newton_in_bracket(f, fprime, lo: float, hi: float) -> float:
    """A root of increasing `f` in [lo, hi], f(lo) ≤ 0 ≤ f(hi): Newton, bisecting when a step leaves the bracket."""
    x = 0.5 * (lo + hi)
    for _ in range(500):
        fx = f(x)
        if fx == 0.0:
            return x
        if fx < 0:
            lo = x
        else:
            hi = x
        slope = fprime(x)
        step = fx / slope if slope > 0 else math.inf
        new = x - step
        if not lo < new < hi:
            new = 0.5 * (lo + hi)
        if abs(new - x) <= _EPS * abs(x) or hi - lo <= _EPS * max(abs(lo), abs(hi)):
            return new
        x = new
    raise ArithmeticError("root finder did not converge")


def _normal_cdf(x: float) -> float:
    return 0.5 * math.erfc(-x / math.sqrt(2.0))


def normal_quantile(p: float) -> float:
    """The x with Φ(x) = p, for 0 < p < 1."""
    from statistics import NormalDist

    if not 0.0 < p < 1.0:
        raise ValueError(f"normal_quantile needs 0 < p < 1, got {p}")
    return NormalDist().inv_cdf(p)


# ---------------------------------------------------------------- noncentral t

def nct_cdf(x: float, df: float, nc: float) -> float:
    """P(T' ≤ x) for the noncentral t, T' = (Z + nc) / sqrt(χ²_df / df), to ~1e-12 absolute."""
    _check_df(df)
    if math.isnan(x) or math.isnan(nc):
        return math.nan
    if x < 0:
        return 1.0 - nct_cdf(-x, df, -nc)  # T' ≤ x  ⇔  -T' ≥ -x, and -T' is noncentral with -nc
    if math.isinf(x):
        return 1.0
    if x == 0:
        return _normal_cdf(-nc)
    return min(1.0, max(0.0, _normal_cdf(-nc) + 0.5 * _nct_series(x, df, nc)))


def _nct_series(x: float, df: float, nc: float) -> float:
    """Σ_j P_j I_u(j+½, df/2) + nc/√2 · Q_j I_u(j+1, df/2) for x > 0, u = x²/(df+x²) (AS 243's series).

    P_j = e^{-λ} λ^j / j! and Q_j = e^{-λ} λ^j / Γ(j+3/2), λ = nc²/2. Summed from the largest P_j outward;
    I_u(a, b) then follows from I_u(a+1, b) = I_u(a, b) - u^a (1-u)^b / (a B(a, b)), each such term computed
    afresh from logs: a running product of them would underflow to 0 for large a and small u.
    """
    u, v = x * x / (df + x * x), df / (df + x * x)  # v = 1 - u, exact
    b = 0.5 * df
    lam = 0.5 * nc * nc
    w = nc / math.sqrt(2.0)

    k = int(lam)
    log_lam = math.log(lam) if lam > 0 else 0.0  # λ = 0 leaves only j = 0
    p0 = math.exp(-lam + k * log_lam - math.lgamma(k + 1.0))
    q0 = math.exp(-lam + k * log_lam - math.lgamma(k + 1.5))
    ip0, iq0 = _betainc(k + 0.5, b, u, v), _betainc(k + 1.0, b, u, v)
    total = p0 * ip0 + w * q0 * iq0

    # Forward (j > k): I_u ≤ 1 and the weights fall by a factor r ≤ λ/(j+1) per step, so the rest is at most
    # (P_j + |w| Q_j) · r/(1 - r).
    p, q, ip, iq = p0, q0, ip0, iq0
    for j in range(k + 1, k + _MAX_TERMS):
        ip, iq = ip - _beta_term(j - 0.5, b, u, v), iq - _beta_term(j, b, u, v)
        p, q = p * lam / j, q * lam / (j + 0.5)
        total += p * ip + w * q * iq
        r = lam / (j + 1.0)
        if r < 1.0 and (p + abs(w) * q) * r / (1.0 - r) < 1e-15:
            break
    else:
        raise ArithmeticError(f"noncentral t series did not converge (x={x}, df={df}, nc={nc})")
    # Backward (j < k): likewise with r = (j + ½)/λ < 1.
    p, q, ip, iq = p0, q0, ip0, iq0
    for j in range(k - 1, -1, -1):
        ip, iq = ip + _beta_term(j + 0.5, b, u, v), iq + _beta_term(j + 1.0, b, u, v)
        p, q = p * (j + 1) / lam, q * (j + 1.5) / lam
        total += p * ip + w * q * iq
        r = (j + 0.5) / lam
        if (p + abs(w) * q) * r / (1.0 - r) < 1e-15:
            break
    return total


# ---------------------------------------------------------------- power of the paired t test

def _check_design(n: int, level: float, power: float | None = None, sd: float = 0.0) -> None:
    if n < 2:
        raise ValueError(f"a t interval needs at least 2 values, got {n}")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must lie in (0, 1), got {level}")
    if power is not None and not 1.0 - level < power < 1.0:
        raise ValueError(f"power must lie between the test's size 1 - level = {1 - level:g} and 1, got {power}")
    if not 0.0 <= sd < math.inf:
        raise ValueError(f"sd must be finite and ≥ 0, got {sd}")


def _rejection(nc: float, df: float, crit: float) -> float:
    """P(|T'| > crit) for the noncentral t with `df` and noncentrality `nc`."""
    return 1.0 - nct_cdf(crit, df, nc) + nct_cdf(-crit, df, nc)


def paired_power(delta: float, sd: float, n: int, level: float = 0.95) -> float:
    """Probability that a two-sided paired t test at `level` on n pairs rejects, when the differences have true
    mean `delta` and sd `sd` > 0."""
    _check_design(n, level, sd=sd)
    if sd == 0:
        raise ValueError("paired_power needs sd > 0")
    return _rejection(delta * math.sqrt(n) / sd, n - 1, t_quantile(0.5 + 0.5 * level, n - 1))


def mde(sd: float, n: int, level: float = 0.95, power: float = 0.8) -> float:
    """Smallest true mean difference a two-sided paired t test at `level` on n pairs detects with probability
    `power` (exact, from the noncentral t); 0 when sd is 0."""
    _check_design(n, level, power, sd)
    df = n - 1
    crit = t_quantile(0.5 + 0.5 * level, df)
    # The power depends on delta only through nc = delta·√n/sd and grows with it: bisect for nc, then scale.
    lo, hi = 0.0, crit + t_quantile(power, df)
    while _rejection(hi, df, crit) < power:
        lo, hi = hi, 2.0 * hi
    while hi - lo > 1e-10 * hi:
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if _rejection(mid, df, crit) < power else (lo, mid)
    return 0.5 * (lo + hi) * sd / math.sqrt(n)


def mde_approx(sd: float, n: int, level: float = 0.95, power: float = 0.8) -> float:
    """The shortcut (t_{(1+level)/2} + t_{power}) · sd/√n, df = n-1, that `mde` computes exactly."""
    _check_design(n, level, power, sd)
    df = n - 1
    return (t_quantile(0.5 + 0.5 * level, df) + t_quantile(power, df)) * sd / math.sqrt(n)


# ---------------------------------------------------------------- intervals and paired claims

@dataclass(frozen=True)
class Interval:
    """A mean with its Student's t interval; half_width, lo, hi and sd are None for one value."""

    mean: float
    half_width: float | None
    lo: float | None
    hi: float | None
    n: int
    sd: float | None  # sample standard deviation (n - 1 in the denominator)


def _finite(values: Sequence[float], name: str) -> list[float]:
    xs = [float(v) for v in values]
    bad = [v for v in xs if not math.isfinite(v)]
    if bad:
        raise ValueError(f"{name} has non-finite values: {bad}")
    return xs


def mean_ci(values: Sequence[float], level: float = 0.95) -> Interval:
    """Mean of `values` and its two-sided Student's t interval at `level` (n - 1 df)."""
    xs = _finite(values, "values")
    n = len(xs)
    if n == 0:
        raise ValueError("mean_ci needs at least one value")
    mean = math.fsum(xs) / n
    if n == 1:  # one value has no spread; None fails loudly where nan would propagate
        return Interval(mean, None, None, None, 1, None)
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must lie in (0, 1), got {level}")
    sd = math.sqrt(math.fsum((x - mean) ** 2 for x in xs) / (n - 1))
    hw = t_quantile(0.5 + 0.5 * level, n - 1) * sd / math.sqrt(n)
    return Interval(mean, hw, mean - hw, mean + hw, n, sd)


@dataclass(frozen=True)
class Paired:
    """Method A vs method B over the same seeds: the per-seed differences a_i - b_i and what they support."""

    diffs: tuple[float, ...]
    mean: float
    half_width: float
    lo: float
    hi: float
    sd: float
    n: int
    level: float
    p_value: float  # two-sided, paired t test of mean difference 0
    verdict: str  # "holds" (lo > 0), "reversed" (hi < 0) or "unresolved" (the interval contains 0)
    power: float
    mde: float  # smallest true difference detected with probability `power` (noncentral t, exact)
    mde_approx: float  # (t_{1-α/2} + t_{power}) · sd/√n, for comparison
    p_permutation: float = math.nan  # two-sided exact sign-flip permutation test of the mean difference
    p_sign: float = math.nan  # two-sided exact sign test (ties dropped)
    wins: int = 0  # seeds where a > b
    ties: int = 0  # seeds where a == b


def paired(a: Sequence[float], b: Sequence[float], level: float = 0.95, power: float = 0.8) -> Paired:
    """Compare a against b seed by seed (a[i] and b[i] share seed i).

    With all differences equal (sd = 0) the interval collapses onto their mean: p = 1 and "unresolved" when
    that mean is 0, else p = 0 and "holds"/"reversed"; mde is 0.
    """
    xs, ys = _finite(a, "a"), _finite(b, "b")
    if len(xs) != len(ys):
        raise ValueError(f"paired samples differ in length: {len(xs)} vs {len(ys)} seeds")
    _check_design(len(xs), level, power)
    diffs = tuple(x - y for x, y in zip(xs, ys))
    ci = mean_ci(diffs, level)
    n, df = ci.n, ci.n - 1
    if ci.sd > 0:
        p_value = min(1.0, 2.0 * t_cdf(-abs(ci.mean) / (ci.sd / math.sqrt(n)), df))
    else:
        p_value = 1.0 if ci.mean == 0 else 0.0
    verdict = "holds" if ci.lo > 0 else "reversed" if ci.hi < 0 else "unresolved"
    return Paired(diffs, ci.mean, ci.half_width, ci.lo, ci.hi, ci.sd, n, level, p_value, verdict, power,
                  mde(ci.sd, n, level, power), mde_approx(ci.sd, n, level, power),
                  sign_flip_p(diffs), sign_test_p(diffs), sum(d > 0 for d in diffs), sum(d == 0 for d in diffs))


# ---------------------------------------------------------------- exact tests

_MAX_EXACT = 22  # sign flips enumerated exactly up to 2^22 (~4M sums, a few seconds in pure Python)


def sign_flip_p(diffs: Sequence[float]) -> float:
    """Two-sided exact permutation p-value of mean(diffs) = 0: the share of the 2^n sign flips whose
    |sum| is at least the observed |sum| (the observed one included, so p ≥ 2^-n).

    Sums are compared after rounding to 1e-9 of the largest |d|, so that floating-point noise in equal
    sums neither adds nor drops a flip. ValueError past 2^22 flips (22 seeds).
    """
    ds = _finite(diffs, "diffs")
    n = len(ds)
    if n > _MAX_EXACT:
        raise ValueError(f"sign_flip_p enumerates 2^n flips exactly; n = {n} > {_MAX_EXACT}")
    if n == 0:
        raise ValueError("sign_flip_p needs at least one difference")
    scale = max((abs(d) for d in ds), default=0.0) or 1.0
    observed = abs(math.fsum(ds))
    total, extreme, signs = math.fsum(ds), 0, [1] * n
    # Gray code: consecutive sign patterns differ in one flip, so each new sum costs one addition.
    for k in range(1 << n):
        if k:
            i = (k & -k).bit_length() - 1
            total -= 2 * signs[i] * ds[i]
            signs[i] = -signs[i]
        extreme += abs(total) >= observed - 1e-9 * scale
    return extreme / (1 << n)


def binomial_two_sided_p(k: int, n: int) -> float:
    """Two-sided exact p-value of k successes in n fair trials: P(|X - n/2| ≥ |k - n/2|), X ~ Bin(n, ½)."""
    if not 0 <= k <= n:
        raise ValueError(f"binomial_two_sided_p needs 0 ≤ k ≤ n, got k={k}, n={n}")
    if n == 0:
        return 1.0
    far = abs(2 * k - n)
    return min(1.0, sum(math.comb(n, j) for j in range(n + 1) if abs(2 * j - n) >= far) / 2.0 ** n)


def sign_test_p(diffs: Sequence[float]) -> float:
    """Two-sided exact sign test: are positive and negative differences equally likely? Ties are dropped."""
    ds = _finite(diffs, "diffs")
    return binomial_two_sided_p(sum(d > 0 for d in ds), sum(d != 0 for d in ds))


def mcnemar(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value from the discordant counts (b: only A right, c: only B right)."""
    return binomial_two_sided_p(b, b + c)


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values (same order as given): reject H_i at family-wise level α iff
    adjusted_i ≤ α. Controls the family-wise error under any dependence between the tests."""
    ps = [float(p) for p in p_values]
    if any(not 0.0 <= p <= 1.0 for p in ps):
        raise ValueError(f"p-values must lie in [0, 1], got {ps}")
    m, running, out = len(ps), 0.0, [0.0] * len(ps)
    for rank, i in enumerate(sorted(range(m), key=lambda j: ps[j])):
        running = max(running, min(1.0, (m - rank) * ps[i]))
        out[i] = running
    return out


# ---------------------------------------------------------------- pass rates and correlations

def proportion_ci(p: float, n: int, level: float = 0.95) -> float:
    """Half-width of the normal-approximation interval of a pass rate `p` over `n` tasks (nan for n = 0)."""
    if not n:
        return math.nan
    return normal_quantile(0.5 + 0.5 * level) * math.sqrt(max(p * (1 - p), 0.0) / n)


def pearson(x: Sequence[float], y: Sequence[float]) -> float:
    """Pearson correlation of two equally long lists (nan when either is constant)."""
    n = len(x)
    mx, my = math.fsum(x) / n, math.fsum(y) / n
    sxy = math.fsum((a - mx) * (b - my) for a, b in zip(x, y))
    sx, sy = math.sqrt(math.fsum((a - mx) ** 2 for a in x)), math.sqrt(math.fsum((b - my) ** 2 for b in y))
    return sxy / (sx * sy) if sx and sy else math.nan


def correlation_ci(x: Sequence[float], y: Sequence[float], level: float = 0.95,
                   groups: Sequence | None = None) -> tuple[float, float, float]:
    """Pearson r of x and y with its Fisher-z interval (normal approximation); nan where undefined.

    `groups` (one label per point): the pooled within-group correlation instead — x and y centred on their
    group's means, the interval's degrees of freedom reduced by the g − 1 means removed.
    """
    x, y, controls = list(x), list(y), 0
    if groups is not None:
        groups = list(groups)

        def centred(v):
            means = {g: math.fsum(a for a, h in zip(v, groups) if h == g) / groups.count(g) for g in set(groups)}
            return [a - means[g] for a, g in zip(v, groups)]

        x, y, controls = centred(x), centred(y), len(set(groups)) - 1
    r, n = pearson(x, y), len(x)
    if math.isnan(r) or n - 3 - controls < 1 or abs(r) >= 1:
        return r, math.nan, math.nan
    z, half = math.atanh(r), normal_quantile(0.5 + level / 2) / math.sqrt(n - 3 - controls)
    return r, math.tanh(z - half), math.tanh(z + half)


def fmt_paired(p: Paired, scale: float = 100.0, unit: str = "points") -> str:
    """The mean difference and its interval's half-width, e.g. "+4.8 ± 3.1 points" (values × `scale`)."""
    text = f"{p.mean * scale:+.1f} ± {p.half_width * scale:.1f}"
    return f"{text} {unit}" if unit else text


def power_sentence(p: Paired, scale: float = 100.0, unit: str = "points") -> str:
    """What the design can see, e.g. "detects ≥ 6.2 points at 80% power" (values × `scale`)."""
    size = f"{p.mde * scale:.1f} {unit}" if unit else f"{p.mde * scale:.1f}"
    return f"detects ≥ {size} at {p.power:.0%} power"
