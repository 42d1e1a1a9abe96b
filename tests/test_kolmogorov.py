"""The batched two-sided KS p-value against scipy's kstwo.sf, regime by regime."""
import math

import numpy as np
import pytest
import torch
from scipy import special, stats as sps

from attnstats.stats.kolmogorov import kolmogorov_sf, smirnov_sf

# Each term of the one-sided sum is exp(ln C(n, j) + ...), where ln C(n, j) comes from lgamma values
# of size up to ln n! (2.8e5 at n = 3e4): rounding of about eps·ln n! ≈ 6e-11 in the exponent, a
# relative error of that size in the sum; 1e-9 leaves room for the few operations around it.
RTOL = 1e-9
# Below the smallest normal float64 a p-value keeps only the subnormals' absolute spacing.
ATOL = np.finfo(np.float64).tiny


def draws(n, rng):
    root = math.sqrt(n)
    return np.concatenate([
        rng.uniform(0.0, 1.0, 20),  # every regime, d ≥ 1/2 included
        rng.uniform(0.2 / root, 1.5 / root, 20),  # a good fit: n·d² < 2.2 (scipy's other methods)
        rng.uniform(1.49 / root, 19.2 / root, 40),  # 2.2 ≤ n·d² < 370: the batched one-sided sum
        rng.uniform(19.3 / root, 30 / root, 10),  # n·d² ≥ 370: 0
        [1 / (2 * n), 0.9 / n, 1.5 / n, 1 - 1.5 / n, 0.0, 1.0],  # the closed forms at both ends
    ]).clip(0.0, 1.0)


@pytest.mark.parametrize("n", [1, 2, 7, 60, 140, 141, 500, 4096, 30000])
def test_matches_scipy_kstwo(n):
    rng = np.random.default_rng(n)
    d = draws(n, rng)
    got = kolmogorov_sf(d, n)
    want = sps.kstwo.sf(d, n)
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)


def test_mixed_sizes_in_one_call_and_shape():
    rng = np.random.default_rng(0)
    n = rng.integers(1, 6000, size=(7, 9))
    d = rng.uniform(0.0, 0.3, size=(7, 9))
    got = kolmogorov_sf(d, n)
    assert got.shape == (7, 9)
    np.testing.assert_allclose(got, sps.kstwo.sf(d, n), rtol=RTOL, atol=ATOL)


def test_one_sided_sum_matches_scipy_smirnov():
    rng = np.random.default_rng(1)
    n = rng.integers(2, 20000, size=60)
    d = rng.uniform(0.01, 0.99, size=60)
    np.testing.assert_allclose(smirnov_sf(n, d), special.smirnov(n, d), rtol=RTOL, atol=ATOL)


def test_nan_statistic_gives_nan_and_bad_sizes_are_refused():
    assert np.isnan(kolmogorov_sf([np.nan], 10)[0])
    with pytest.raises(ValueError, match="n: expected sample sizes >= 1, got 0"):
        kolmogorov_sf([0.1], 0)
    with pytest.raises(ValueError, match="n: expected integer sample sizes"):
        kolmogorov_sf([0.1], 2.5)


# Durbin's formula multiplies matrices of non-negative entries (no cancellation): the CDF carries about
# log2(n)·m·eps of rounding (m ≤ 117 here) plus eps·ln n! from the lgamma factor; 1 − CDF is ≥ 6e-4 in
# the regimes where it is used for the p-value, so the p-value's relative error stays far below RTOL.
@pytest.mark.parametrize("n", [3, 16, 55, 136, 140, 141, 1000, 3136, 20000, 100000])
def test_durbin_regimes_match_scipy(n):
    """Every test in scipy's Durbin and Pomeranz branches (n ≤ 140 with n·d² ≤ 4; a good fit at larger n),
    batched: the p-value and the CDF itself against scipy, one test at a time."""
    from attnstats.stats.kolmogorov import durbin_cdf

    if n <= 140:
        nx2 = np.linspace(0.02, 4.0, 60)
        d = np.sqrt(nx2 / n)
    else:  # scipy's Durbin branch there: n·d^1.5 ≤ 1.4, and n·d > 1 (the closed form below)
        d = np.linspace(1.01 / n, (1.39 / n) ** (2 / 3), 40)  # inside: at 1.4 itself scipy may round either way
    d = d[(n * d > 1.0) & (n * d < n - 1) & (d < 0.5)]
    assert d.size
    np.testing.assert_allclose(kolmogorov_sf(d, n), sps.kstwo.sf(d, n), rtol=RTOL, atol=ATOL)
    cdf = durbin_cdf(torch.full((d.size,), n), torch.as_tensor(d))
    np.testing.assert_allclose(cdf.numpy(), sps.kstwo.cdf(d, n), rtol=RTOL, atol=ATOL)


# The Pelz–Good series sums at most ⌈16z/π⌉ ≤ 8 terms per K_i (z = √n·d < √2.2) of size ≲ 10, in another
# order than scipy's Horner scheme and with exp(−π²m²/(8z²)) computed directly where scipy takes powers:
# the CDF differs by a few ulp of those terms, and the p-value 1 − CDF is ≥ 0.02 when n·d² < 2.2, so its
# relative error stays below ~1e-13, far below RTOL.
@pytest.mark.parametrize("n", [141, 150, 1000, 4096, 100001, 10**6])
def test_pelz_good_regime_matches_scipy(n):
    """scipy's Pelz–Good branch (n > 140, n·d² < 2.2, outside Durbin's: n·d^1.5 > 1.4 or n > 100000),
    batched: the p-value and the CDF against scipy, one test at a time; also where z is so small that the
    series is 0 (t = n·d just above 1 at large n)."""
    from attnstats.stats.kolmogorov import pelz_good_cdf

    lo = (1.41 / n) ** (2 / 3) if n <= 100000 else 1.001 / n
    d = np.linspace(lo, math.sqrt(2.19 / n), 40)
    d = d[(n * d > 1.0) & (d < 0.5)]
    assert d.size
    np.testing.assert_allclose(kolmogorov_sf(d, n), sps.kstwo.sf(d, n), rtol=RTOL, atol=ATOL)
    cdf = pelz_good_cdf(torch.full((d.size,), n), torch.as_tensor(d))
    np.testing.assert_allclose(cdf.numpy(), sps.kstwo.cdf(d, n), rtol=RTOL, atol=1e-15)
