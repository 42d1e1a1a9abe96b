"""fit_log_values_batched against scipy, row by row (fit_log_values is the scipy reference)."""
import math

import numpy as np
import pytest
import torch
from scipy import stats as sps

from attnstats.stats.lognormal import fit_log_values, fit_log_values_batched, fits_per_matrix

FIELDS = ["mu", "sigma", "ks_statistic", "ks_pvalue", "ad_statistic", "skew", "excess_kurtosis"]


def _samples(rng, n):
    """A normal, a skewed (log-normal) and a heavy-tailed (Student t, 3 dof) sample of size n."""
    return [rng.normal(-3.0, 1.5, n), rng.lognormal(0.0, 0.8, n), rng.standard_t(3, n) - 8.0]


EPS = np.finfo(np.float64).eps


def _tolerance(name, n):
    """(rel, abs) agreement of a float64 field with scipy's, from the arithmetic.

    Both sides are float64 and evaluate the same formulas; they differ only in the order of the sums
    (numpy's pairwise sum vs torch's) and in the last ulp of ndtr/log_ndtr. Means and central moments
    then agree to a few ulp (abs for skew and kurtosis, which are near 0 for normal samples); D to a
    few ulp of 1. The p-value kstwo.sf(D, n) has a relative slope |d ln p/dD| of about 4nD, so a
    D that moves by an ulp moves p by ≲ 1e-11 relative for n ≤ 1e5; where p is 1 − CDF (n ≤ 140, or a
    good fit: Durbin's formula here, Pomeranz's recursion or Durbin's in scipy), the two CDFs' rounding
    (≈ 1e-14) is divided by p ≥ 6e-4, up to ~2e-11 relative: hence test_kolmogorov's 1e-9. A² = -N - S with S ≈ -N is a
    cancellation of two numbers of size N: rounding of the N-term sums leaves an absolute error of
    order N·eps on either side, hence abs = 16·N·eps (observed ≈ 3·N·eps).
    """
    if name == "ad_statistic":
        return 1e-12, 16 * n * EPS
    if name == "ks_pvalue":
        return 1e-9, 1e-300
    return 1e-12, 1e-13


def _check(fit, i, v):
    ref = fit_log_values(v)  # scipy, one sample
    for name in FIELDS:
        got, want = float(getattr(fit, name)[i]), getattr(ref, name)
        rel, tol = _tolerance(name, v.size)
        assert got == pytest.approx(want, rel=rel, abs=tol), (name, i, got, want)
    assert int(fit.n[i]) == v.size


@pytest.mark.parametrize("n", [3, 4, 7, 50, 1000, 3136])
def test_equal_rows_match_scipy(n):
    rng = np.random.default_rng(n)
    rows = _samples(rng, n)
    fit = fit_log_values_batched(torch.tensor(np.stack(rows)))
    for i, v in enumerate(rows):
        _check(fit, i, v)


def test_large_n_matches_scipy():
    rng = np.random.default_rng(1)
    rows = _samples(rng, 100_000)
    fit = fit_log_values_batched(torch.tensor(np.stack(rows)))
    for i, v in enumerate(rows):
        _check(fit, i, v)


def _ragged(rng):
    sizes = [3, 5, 100, 2000, 17, 999]
    rows = [s for k in sizes for s in _samples(rng, k)]
    width = max(r.size for r in rows)
    padded = np.full((len(rows), width), np.nan)
    for i, r in enumerate(rows):
        padded[i, : r.size] = r
    return rows, padded


def test_ragged_nan_padding_and_counts():
    rows, padded = _ragged(np.random.default_rng(2))
    counts = torch.tensor([r.size for r in rows])
    by_nan = fit_log_values_batched(torch.tensor(padded))
    # with counts, whatever lies past a row's count is ignored: fill it with junk. On the CPU these rows are
    # fitted in groups of similar counts (3 to 2000 here: six groups), each at its own width
    junk = np.where(np.isnan(padded), 1e300, padded)
    by_count = fit_log_values_batched(torch.tensor(junk), counts)
    for i, v in enumerate(rows):
        _check(by_nan, i, v)
        _check(by_count, i, v)


def test_trusted_table_matches_scipy():
    # record(store="stats") fits its own sampler's table without the host checks (no syncs), on the
    # full width of a table wider than its longest row and with rows that admit no fit: the same
    # numbers as scipy for the others, NaN for those.
    from attnstats.stats.lognormal import _fit_batched

    rows, padded = _ragged(np.random.default_rng(3))
    rows = rows + [np.array([2.0, 2.0, 2.0]), np.array([1.0, 4.0])]
    padded = np.vstack([np.pad(padded, ((0, 0), (0, 7)), constant_values=np.nan),
                        np.full((2, padded.shape[1] + 7), np.nan)])
    padded[-2, :3], padded[-1, :2] = rows[-2], rows[-1]
    fit, bad = _fit_batched(torch.tensor(padded), torch.tensor([r.size for r in rows]), trusted=True)
    assert bad.tolist() == [False] * (len(rows) - 2) + [True, True]
    for i, v in enumerate(rows[:-2]):
        _check(fit, i, v)
    for name in FIELDS:
        assert torch.isnan(getattr(fit, name)[-2:]).all()


def test_no_fit_rows_are_nan_with_one_warning():
    x = torch.tensor([[1.0, 2.0, 4.0, 5.0], [2.0, 2.0, 2.0, 2.0], [1.0, 3.0, math.nan, math.nan], [0.5, 1.0, 3.0, 9.0]])
    with pytest.warns(RuntimeWarning, match=r"2 rows .*\(rows 1, 2\)") as record:
        fit = fit_log_values_batched(x)
    assert len(record) == 1
    for name in FIELDS:
        t = getattr(fit, name)
        assert math.isnan(float(t[1])) and math.isnan(float(t[2]))
    assert fit.n.tolist() == [4, 4, 2, 4]
    _check(fit, 0, np.array([1.0, 2.0, 4.0, 5.0]))
    _check(fit, 3, np.array([0.5, 1.0, 3.0, 9.0]))


def test_float32_input_runs():
    rng = np.random.default_rng(3)
    rows = _samples(rng, 500)
    x32 = torch.tensor(np.stack(rows), dtype=torch.float32)
    fit = fit_log_values_batched(x32)
    assert fit.mu.dtype == torch.float64 and fit.mu.shape == (3,)
    for i in range(3):
        ref = fit_log_values(x32[i])  # the same float32 values, widened to float64 by both
        for name in FIELDS:
            rel, tol = _tolerance(name, 500)
            assert float(getattr(fit, name)[i]) == pytest.approx(getattr(ref, name), rel=rel, abs=tol)


def test_float32_table_gives_the_fit_of_its_float64_widening_exactly():
    # A float32 table (the GPU sampler's) is sorted in float32 and summed in float64: widening is exact and
    # keeps the order, so every field must equal the fit of the widened table bit for bit, with counts
    # (trusted, as record(store="stats") fits it) and without (NaN padding). (Which dtype the sort ran in
    # is not visible here; the sort timings are benchmarks/record_gpu.py's part `lognormal`.)
    from attnstats.stats.lognormal import _fit_batched

    rows, padded = _ragged(np.random.default_rng(5))
    x32 = torch.tensor(padded, dtype=torch.float32)
    counts = torch.tensor([r.size for r in rows])
    for cnt, trusted in ((counts, True), (None, False)):
        got, bad32 = _fit_batched(x32, cnt, trusted=trusted)
        want, bad64 = _fit_batched(x32.double(), cnt, trusted=trusted)
        assert torch.equal(bad32, bad64)
        for name in FIELDS + ["n"]:
            assert torch.equal(getattr(got, name), getattr(want, name)), name


def test_bad_input_names_argument():
    with pytest.raises(ValueError, match=r"values: expected finite values, found inf at row 1, column 0"):
        fit_log_values_batched(torch.tensor([[1.0, 2.0, 3.0], [math.inf, 1.0, 2.0]]))
    with pytest.raises(ValueError, match=r"counts: expected values in \[0, 3\], got 4 at row 0"):
        fit_log_values_batched(torch.ones(2, 3), torch.tensor([4, 1]))
    with pytest.raises(TypeError, match="counts"):
        fit_log_values_batched(torch.ones(2, 3), torch.tensor([1.0, 2.0]))
    with pytest.raises(TypeError, match="values"):
        fit_log_values_batched(torch.ones(3))


def _fits_per_matrix_loop(values, batch):
    """fits_per_matrix as it was: fit_log_values (scipy) once per matrix, NaN where no fit."""
    rows = []
    for v in values:
        if v.numel() < 3 or bool((v == v[0]).all()):
            rows.append([math.nan] * len(FIELDS))
        else:
            fit = fit_log_values(v)
            rows.append([getattr(fit, f) for f in FIELDS])
    return torch.tensor(rows, dtype=torch.float64).reshape(*batch, len(FIELDS))


def test_fits_per_matrix_equals_scipy_loop():
    rng = np.random.default_rng(4)
    values = [torch.tensor(r) for k in (3, 10, 300, 3136, 1) for r in _samples(rng, k)]
    values[4] = torch.full((6,), -1.5)  # all equal
    batch = (5, 3)
    with pytest.warns(RuntimeWarning) as record:
        fit = fits_per_matrix(values, batch)
    # one warning per matrix with no fit, as before: the all-equal one and the three of 1 value
    messages = sorted(str(w.message) for w in record)
    assert len(messages) == 4
    assert any("batch index (1, 1) has 6 valid entries all equal" in m for m in messages)
    assert sum("has 1 valid entries;" in m for m in messages) == 3
    want = _fits_per_matrix_loop(values, batch)
    got = torch.stack([getattr(fit, f) for f in FIELDS], -1)
    assert got.shape == want.shape
    assert torch.equal(torch.isnan(got), torch.isnan(want))
    ok = ~torch.isnan(want)
    n = torch.tensor([v.numel() for v in values], dtype=torch.float64).reshape(batch)
    for j, name in enumerate(FIELDS):  # the tolerances of _check, field by field
        for idx in ok[..., j].nonzero().tolist():
            rel, tol = _tolerance(name, int(n[tuple(idx)]))
            assert float(got[(*idx, j)]) == pytest.approx(float(want[(*idx, j)]), rel=rel, abs=tol), (name, idx)
    assert fit.n.tolist() == [[v.numel() for v in values[i * 3 : i * 3 + 3]] for i in range(5)]


def test_rows_sorted_on_the_cpu_as_torch_sorts_them():
    # numpy over threads on the CPU: the same order as torch.sort, NaN (padding past a row's count) last
    from attnstats.stats.lognormal import _sorted_rows

    g = torch.Generator().manual_seed(0)
    x = torch.randn(37, 500, generator=g, dtype=torch.float64)
    x[::3, 200:] = float("nan")
    x[1, :50] = x[1, 50:100]  # ties
    want = torch.sort(x, dim=1).values
    got = _sorted_rows(x)
    assert torch.equal(torch.isnan(got), torch.isnan(want))
    assert torch.equal(got.nan_to_num(), want.nan_to_num())
