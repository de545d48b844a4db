"""xft.stats: closed forms, limits, inverses and Monte Carlo checks of the t machinery and the paired study."""

import dataclasses
import math
import random
from statistics import NormalDist

import pytest

from xft.stats import (
    binomial_two_sided_p, correlation_ci, fmt_paired, holm, mcnemar, mde, mde_approx, mean_ci, nct_cdf, paired,
    paired_power, power_sentence, proportion_ci, sign_flip_p, sign_test_p, t_cdf, t_quantile,
)

DFS = [0.5, 1, 2, 3.7, 9, 30, 250, 1000]
PS = [1e-9, 1e-4, 0.025, 0.2, 0.4999, 0.6, 0.8, 0.975, 1 - 1e-6]
XS = [-1e4, -40, -5, -1.96, -0.7, -1e-7, 0.0, 0.3, 1, 2.5, 12.7, 300]


def _mc_tolerance(p: float, draws: int) -> float:
    """4.5 standard errors of a Monte Carlo proportion: a chance failure has probability ~7e-6."""
    return 4.5 * math.sqrt(p * (1 - p) / draws)


# ---------------------------------------------------------------- central t

@pytest.mark.parametrize("df", DFS)
def test_quantile_inverts_cdf(df):
    for p in PS:
        assert t_cdf(t_quantile(p, df), df) == pytest.approx(p, abs=1e-12)


@pytest.mark.parametrize("df", DFS)
def test_symmetry(df):
    for x in XS:
        assert t_cdf(-x, df) == pytest.approx(1 - t_cdf(x, df), abs=1e-15)
    for p in PS:
        q = 1 - p  # 1 - q == p may not hold in floating point; 1 - (1 - q) == q does for q ≥ 0.5
        assert t_quantile(q, df) == -t_quantile(1 - q, df)


def test_df1_is_cauchy_and_df2_closed_form():
    for x in XS + [1e-12, 7.25, -123.4]:
        assert t_cdf(x, 1) == pytest.approx(0.5 + math.atan(x) / math.pi, abs=1e-14)
        assert t_cdf(x, 2) == pytest.approx(0.5 + x / (2 * math.sqrt(2 + x * x)), abs=1e-14)
    for p in PS:
        # tan(π(p - ½)) written as ∓cot(π·min(p, 1-p)), which is well conditioned in the tails
        cauchy = 1 / math.tan(math.pi * min(p, 1 - p))
        assert t_quantile(p, 1) == pytest.approx(-cauchy if p < 0.5 else cauchy, rel=1e-9)
        assert t_quantile(p, 2) == pytest.approx((2 * p - 1) / math.sqrt(2 * p * (1 - p)), rel=1e-9)


@pytest.mark.parametrize("df", [100, 1e4, 1e6])
def test_large_df_approaches_the_normal(df):
    # t_cdf - Φ ≈ φ(x)(x³ + x)/(4 df), at most ~0.16/df; the quantiles differ by ≈ (z³ + z)/(4 df).
    normal = NormalDist()
    for x in [i / 10 for i in range(-80, 81)]:
        assert abs(t_cdf(x, df) - normal.cdf(x)) < 0.2 / df
    for p in [i / 100 for i in range(1, 100)]:
        assert abs(t_quantile(p, df) - normal.inv_cdf(p)) < 5 / df


def test_t_cdf_against_mpmath_betainc():
    mp = pytest.importorskip("mpmath")
    mp.mp.dps = 30
    for df in DFS:
        for x in XS:
            z = mp.mpf(df) / (df + mp.mpf(x) ** 2)
            ref = 0.5 + mp.sign(x) * 0.5 * (1 - mp.betainc(mp.mpf(df) / 2, 0.5, 0, z, regularized=True))
            assert t_cdf(x, df) == pytest.approx(float(ref), abs=1e-13)


def test_rejects_bad_arguments():
    for bad in [0, -1, math.nan, math.inf]:
        with pytest.raises(ValueError, match="degrees of freedom"):
            t_cdf(1.0, bad)
    for p in [0.0, 1.0, -0.1, math.nan]:
        with pytest.raises(ValueError, match="0 < p < 1"):
            t_quantile(p, 3)
    with pytest.raises(ValueError, match="beyond"):  # heavy tails: the quantile is past any float we can evaluate
        t_quantile(1e-20, 0.05)


# ---------------------------------------------------------------- noncentral t

@pytest.mark.parametrize("df", DFS)
def test_noncentral_at_zero_is_central(df):
    for x in XS:
        assert nct_cdf(x, df, 0.0) == pytest.approx(t_cdf(x, df), abs=1e-14)


def test_noncentral_large_df_is_a_shifted_normal():
    # With df → ∞ the denominator is 1: T' → Z + nc. The gap is O(1/df) like the central case.
    normal = NormalDist()
    for nc in [-30, -2.5, 0.4, 3, 12]:
        for x in [nc - 3, nc - 0.5, nc, nc + 1.7]:
            assert nct_cdf(x, 1e6, nc) == pytest.approx(normal.cdf(x - nc), abs=1e-4)


def test_noncentral_decreases_in_noncentrality():
    for df in [1, 4, 50]:
        for x in [-3.0, 0.0, 2.0, 12.7]:
            values = [nct_cdf(x, df, nc / 2) for nc in range(-20, 41)]
            assert all(a >= b - 1e-13 for a, b in zip(values, values[1:]))  # up to rounding where it is ~0 or ~1


def test_noncentral_against_mpmath_quadrature():
    # Independent route: P(T' ≤ x) = E[Φ(x·√(V/df) - nc)], V ~ χ²_df, integrated by mpmath at 30 digits.
    mp = pytest.importorskip("mpmath")
    mp.mp.dps = 30

    def reference(x, df, nc):
        x, df, nc = mp.mpf(x), mp.mpf(df), mp.mpf(nc)
        log_c = -df / 2 * mp.log(2) - mp.loggamma(df / 2)

        def integrand(v):
            return mp.exp(log_c + (df / 2 - 1) * mp.log(v) - v / 2) * mp.ncdf(x * mp.sqrt(v / df) - nc)

        # Split where the chi-square mass sits and where Φ's argument crosses 0.
        splits = {df / 4, df, 4 * df}
        if x != 0 and nc / x > 0:
            splits |= {df * (nc / x) ** 2 / 4, df * (nc / x) ** 2, 4 * df * (nc / x) ** 2}
        return float(mp.quad(integrand, [0] + sorted(splits) + [mp.inf]))

    for x, df, nc in [(2.3, 1, 2.8), (-1, 4, -3), (12.7, 1, 16.3), (4.3, 2, 0.7), (0.5, 9, 5),
                      (-4, 29, 0.5), (60, 200, 35), (95, 50, 100), (3, 0.5, 2)]:
        assert nct_cdf(x, df, nc) == pytest.approx(reference(x, df, nc), abs=1e-10)


def test_noncentral_monte_carlo():
    rng = random.Random(1)
    df, nc, draws = 3, 1.5, 20000
    samples = [(rng.gauss(0, 1) + nc) / math.sqrt(rng.gammavariate(df / 2, 2) / df) for _ in range(draws)]
    for x in [0.0, 1.0, 2.5, 6.0]:
        p = nct_cdf(x, df, nc)
        assert sum(s <= x for s in samples) / draws == pytest.approx(p, abs=_mc_tolerance(p, draws))


# ---------------------------------------------------------------- power and mde

@pytest.mark.parametrize("n", [2, 3, 5, 20])
def test_power_at_mde_is_the_asked_power(n):
    for level, power in [(0.95, 0.8), (0.9, 0.95), (0.99, 0.5)]:
        assert paired_power(mde(1.0, n, level, power), 1.0, n, level) == pytest.approx(power, abs=1e-8)


def test_power_at_mde_monte_carlo():
    # Simulate whole studies: n = 3 seed pairs whose differences are N(mde, sd²); count two-sided rejections.
    rng = random.Random(2)
    n, sd, draws = 3, 2.0, 20000
    delta = mde(sd, n)
    crit = (2 * 0.975 - 1) / math.sqrt(2 * 0.975 * 0.025)  # t_{0.975} for df = 2, closed form
    rejections = 0
    for _ in range(draws):
        d = [rng.gauss(delta, sd) for _ in range(n)]
        m = sum(d) / n
        s = math.sqrt(sum((v - m) ** 2 for v in d) / (n - 1))
        rejections += abs(m) / (s / math.sqrt(n)) > crit
    assert rejections / draws == pytest.approx(0.8, abs=_mc_tolerance(0.8, draws))
    # The shortcut undershoots for few seeds: its design has visibly less than 80% power.
    assert paired_power(mde_approx(sd, n), sd, n) < 0.78


def test_mde_shrinks_with_n_and_scales_with_sd():
    values = [mde(1.0, n) for n in range(2, 41)]
    assert all(a > b for a, b in zip(values, values[1:]))
    for n in [2, 5, 17]:
        assert mde(3.7, n) == pytest.approx(3.7 * mde(1.0, n), rel=1e-12)
        assert mde(0.0, n) == 0.0
    assert mde_approx(1.0, 200) == pytest.approx(mde(1.0, 200), rel=1e-3)  # the shortcut is asymptotically exact


def test_mde_rejects_bad_designs():
    with pytest.raises(ValueError, match="at least 2"):
        mde(1.0, 1)
    with pytest.raises(ValueError, match="power must lie"):
        mde(1.0, 5, level=0.95, power=0.04)  # below the test's size: δ = 0 already rejects 5% of the time
    with pytest.raises(ValueError, match="sd must be"):
        mde(-1.0, 5)


# ---------------------------------------------------------------- intervals and paired claims

def test_mean_ci_of_one_value_has_no_interval():
    ci = mean_ci([0.42])
    assert (ci.mean, ci.n) == (0.42, 1)
    assert ci.half_width is None and ci.lo is None and ci.hi is None and ci.sd is None
    with pytest.raises(ValueError, match="at least one"):
        mean_ci([])


def test_mean_ci_coverage_monte_carlo():
    # n = 3: a normal-quantile interval would cover only ~80%; Student's t must give the nominal 95%.
    rng = random.Random(3)
    draws, mu = 20000, 0.3
    covered = 0
    for _ in range(draws):
        ci = mean_ci([rng.gauss(mu, 0.1) for _ in range(3)])
        covered += ci.lo <= mu <= ci.hi
    assert covered / draws == pytest.approx(0.95, abs=_mc_tolerance(0.95, draws))


def test_identical_methods_are_unresolved():
    scores = [0.41, 0.37, 0.45, 0.39]
    p = paired(scores, list(scores))
    assert (p.mean, p.sd, p.half_width, p.lo, p.hi) == (0.0, 0.0, 0.0, 0.0, 0.0)
    assert (p.p_value, p.verdict, p.mde, p.mde_approx) == (1.0, "unresolved", 0.0, 0.0)


def test_constant_nonzero_difference_is_decisive():
    # sd = 0 with a nonzero mean: the interval is the point itself, so the claim holds (or reverses) with p = 0.
    a, b = [1.0, 2.0, 3.0], [0.5, 1.5, 2.5]  # differences exactly 0.5
    assert (paired(a, b).verdict, paired(a, b).p_value) == ("holds", 0.0)
    assert (paired(b, a).verdict, paired(b, a).p_value) == ("reversed", 0.0)


def test_clear_verdicts():
    rng = random.Random(4)
    base = [rng.uniform(0.3, 0.5) for _ in range(5)]
    better = [s + 0.05 + rng.gauss(0, 0.005) for s in base]
    noisy = [s + rng.gauss(0, 0.05) for s in base]
    assert paired(better, base).verdict == "holds"
    assert paired(base, better).verdict == "reversed"
    assert paired(better, base).p_value < 1e-3
    assert paired(noisy, [s + 0.2 for s in noisy]).verdict == "reversed"
    assert paired([0.4, 0.5, 0.3], [0.5, 0.3, 0.4]).verdict == "unresolved"


def test_p_value_matches_the_interval():
    # Duality: the interval at level 1 - p has an endpoint at 0, and p < 1 - level exactly when the verdict is
    # not "unresolved".
    rng = random.Random(5)
    for _ in range(50):
        n = rng.randint(2, 8)
        a = [rng.gauss(0.5, 0.1) for _ in range(n)]
        b = [x + rng.gauss(0.03, 0.05) for x in a]
        p = paired(a, b)
        assert (p.p_value < 0.05) == (p.verdict != "unresolved")
        ci = mean_ci(p.diffs, 1 - p.p_value)
        assert min(abs(ci.lo), abs(ci.hi)) < 1e-9


def test_paired_rejects_bad_input():
    with pytest.raises(ValueError, match="differ in length"):
        paired([0.1, 0.2, 0.3], [0.1, 0.2])
    with pytest.raises(ValueError, match="at least 2"):
        paired([0.1], [0.2])
    with pytest.raises(ValueError, match="non-finite"):
        paired([0.1, math.nan], [0.2, 0.3])


def test_formatting():
    p = dataclasses.replace(paired([0.5, 0.6], [0.4, 0.55]), mean=0.048, half_width=0.031, mde=0.062, power=0.8)
    assert fmt_paired(p) == "+4.8 ± 3.1 points"
    assert fmt_paired(p, scale=1000.0, unit="") == "+48.0 ± 31.0"
    assert fmt_paired(dataclasses.replace(p, mean=-0.048)) == "-4.8 ± 3.1 points"
    assert power_sentence(p) == "detects ≥ 6.2 points at 80% power"


# ---------------------------------------------------------------- scipy, where installed

def test_against_scipy():
    st = pytest.importorskip("scipy.stats")
    for df in DFS:
        for p in PS:
            assert t_quantile(p, df) == pytest.approx(st.t.ppf(p, df), rel=1e-9)
    for df in [1, 2, 4, 9, 29, 200, 1000]:
        for nc in [-20, -3, 0, 0.7, 2.8, 5, 16]:
            for x in [-30, -4, -1, 0, 0.5, 2.3, 4.3, 12.7, 60]:
                ref = st.nct.cdf(x, df, nc)
                if math.isfinite(ref):  # scipy answers nan in some far tails (e.g. x = -12.7, df = 1, nc = 16)
                    assert nct_cdf(x, df, nc) == pytest.approx(ref, abs=1e-9)


# ---------------------------------------------------------------- exact tests, family-wise adjustment, correlations

def _brute_sign_flip(diffs):
    """The definition: the share of all 2^n sign patterns whose |sum| reaches the observed |sum|."""
    import itertools

    observed = abs(sum(diffs))
    flips = [abs(sum(s * d for s, d in zip(signs, diffs))) for signs in itertools.product((1, -1), repeat=len(diffs))]
    return sum(f >= observed - 1e-12 for f in flips) / len(flips)


@pytest.mark.parametrize("seed", range(6))
def test_sign_flip_p_is_the_exact_permutation_distribution(seed):
    rng = random.Random(seed)
    n = rng.randint(1, 11)
    diffs = [rng.choice([-0.0125, 0.0, 0.0025, 0.005, 0.0175, -0.03]) for _ in range(n)]  # pass@1 steps: ties
    assert sign_flip_p(diffs) == pytest.approx(_brute_sign_flip(diffs), abs=1e-15)


def test_sign_flip_p_limits():
    assert sign_flip_p([0.1] * 8) == 2 / 256  # all positive: only the observed pattern and its mirror
    assert sign_flip_p([0.0, 0.0]) == 1.0
    with pytest.raises(ValueError, match="enumerates"):
        sign_flip_p([0.1] * 23)


def test_holm_equals_closed_testing_with_bonferroni_local_tests():
    # Holm's adjusted p for H_i is max over every subset S ∋ i of |S|·min_{j∈S} p_j (closed testing principle).
    import itertools

    rng = random.Random(3)
    for _ in range(20):
        ps = [rng.choice([rng.random(), rng.random() ** 4, 0.05]) for _ in range(rng.randint(1, 6))]
        want = [min(1.0, max(len(s) * min(ps[j] for j in s) for r in range(1, len(ps) + 1)
                             for s in itertools.combinations(range(len(ps)), r) if i in s)) for i in range(len(ps))]
        assert holm(ps) == pytest.approx(want, abs=1e-15)
    with pytest.raises(ValueError):
        holm([0.5, 1.5])


def test_exact_tests_against_scipy():
    st = pytest.importorskip("scipy.stats")
    for n in range(0, 31):
        for k in range(n + 1):
            want = st.binomtest(k, n, 0.5).pvalue if n else 1.0
            assert binomial_two_sided_p(k, n) == pytest.approx(want, abs=1e-12)
    assert mcnemar(3, 12) == pytest.approx(st.binomtest(3, 15, 0.5).pvalue, abs=1e-12)
    diffs = [0.02, -0.005, 0.0, 0.0125, 0.03, 0.01, -0.0025, 0.0175]
    assert sign_test_p(diffs) == pytest.approx(st.binomtest(5, 7, 0.5).pvalue, abs=1e-12)  # the tie dropped
    perm = st.permutation_test((diffs,), lambda x: sum(x), permutation_type="samples", n_resamples=math.inf)
    assert sign_flip_p(diffs) == pytest.approx(min(1.0, perm.pvalue), abs=1e-12)
    p = paired([d + 0.3 for d in diffs], [0.3] * len(diffs))
    assert p.p_value == pytest.approx(st.ttest_rel([d + 0.3 for d in diffs], [0.3] * len(diffs)).pvalue, abs=1e-10)
    assert (p.p_permutation, p.p_sign, p.wins, p.ties) == (sign_flip_p(p.diffs), sign_test_p(p.diffs), 5, 1)


def test_intervals_against_scipy():
    st = pytest.importorskip("scipy.stats")
    xs = [0.31, 0.28, 0.35, 0.30, 0.27, 0.33, 0.29, 0.36, 0.32, 0.30, 0.31]  # 11 seeds: 10 df, past any table
    ci = mean_ci(xs)
    lo, hi = st.t.interval(0.95, len(xs) - 1, loc=ci.mean, scale=st.sem(xs))
    assert (ci.lo, ci.hi) == (pytest.approx(lo, abs=1e-12), pytest.approx(hi, abs=1e-12))
    assert proportion_ci(0.3, 400) == pytest.approx(st.norm.ppf(0.975) * math.sqrt(0.3 * 0.7 / 400), abs=1e-15)
    rng = random.Random(0)
    x = [rng.gauss(0, 1) for _ in range(30)]
    y = [a + rng.gauss(0, 2) for a in x]
    ref = st.pearsonr(x, y)
    r, lo, hi = correlation_ci(x, y)
    want = ref.confidence_interval(0.95)
    assert (r, lo, hi) == (pytest.approx(ref.statistic, abs=1e-12), pytest.approx(want.low, abs=1e-12),
                           pytest.approx(want.high, abs=1e-12))


def test_run_report_interval_uses_t_at_every_seed_count():
    # The run report's mean ± CI over seeds is mean_ci's (no table that falls back to 1.96 from 10 df).
    from xft.pipeline.report import Row

    for n in (2, 5, 11, 40):
        scores = [0.3 + 0.01 * ((7 * i) % 5) for i in range(n)]
        assert Row("sft", scores).ci95 == mean_ci(scores).half_width
    assert Row("sft", [0.3]).ci95 is None
