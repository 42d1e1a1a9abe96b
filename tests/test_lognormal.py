import math

import numpy as np
import pytest
import torch
from scipy import stats as sps

import attnstats
from attnstats.stats.lognormal import fit_log_values, log_entries
from helpers import gaussian_qk, softmax_attention


def scipy_reference(values):
    v = np.asarray(values, dtype=np.float64)
    mu, sigma = v.mean(), v.std()
    ks = sps.kstest(v, sps.norm(mu, sigma).cdf)
    # Anderson–Darling statistic computed by hand (Stephens' A² for a normal with estimated mean/std, ddof=1)
    z = np.sort((v - v.mean()) / v.std(ddof=1))
    n = v.size
    i = np.arange(1, n + 1)
    logcdf, logsf = sps.norm.logcdf(z), sps.norm.logsf(z)
    a2 = -n - np.sum((2 * i - 1) / n * (logcdf + logsf[::-1]))
    return mu, sigma, ks.statistic, ks.pvalue, a2, sps.skew(v), sps.kurtosis(v)


def test_fit_matches_scipy_on_the_same_values():
    q, k = gaussian_qk((2,), 40, 16, seed=0)
    mask = torch.ones(40, 40, dtype=torch.bool).tril()
    p = softmax_attention(q, k, mask)
    fit = attnstats.lognormal_fit(p, mask)
    for b in range(2):
        vals = np.log(p[b].numpy()[mask.numpy()])  # independent: numpy log of the valid entries
        mu, sigma, ks, ksp, a2, skew, kurt = scipy_reference(vals)
        assert fit.n[b].item() == vals.size == 40 * 41 // 2
        assert math.isclose(fit.mu[b].item(), mu, rel_tol=1e-12)
        assert math.isclose(fit.sigma[b].item(), sigma, rel_tol=1e-12)
        assert math.isclose(fit.ks_statistic[b].item(), ks, rel_tol=1e-9)
        assert math.isclose(fit.ks_pvalue[b].item(), ksp, rel_tol=1e-6)
        assert math.isclose(fit.ad_statistic[b].item(), a2, rel_tol=1e-6)
        assert math.isclose(fit.skew[b].item(), skew, rel_tol=1e-9)
        assert math.isclose(fit.excess_kurtosis[b].item(), kurt, rel_tol=1e-9)


def test_gaussian_softmax_is_close_to_log_normal():
    # Proposition 3.1 inside its regime: ln P is nearly normal with log-variance ≈ σ² = 1
    q, k = gaussian_qk((), 512, 64, seed=1)
    fit = attnstats.lognormal_fit(softmax_attention(q, k), max_samples=20_000)
    assert abs(fit.sigma.item() ** 2 - 1.0) < 0.05
    assert abs(fit.skew.item()) < 0.1 and abs(fit.excess_kurtosis.item()) < 0.2
    assert fit.ks_statistic.item() < 0.02


def test_subsample_is_uniform_reproducible_and_bounded():
    q, k = gaussian_qk((3,), 64, 8, seed=2)
    p = softmax_attention(q, k)
    a = log_entries(p, max_samples=500, seed=7)
    b = log_entries(p, max_samples=500, seed=7)
    c = log_entries(p, max_samples=500, seed=8)
    assert [v.numel() for v in a] == [500, 500, 500]
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a[0], c[0])
    # every sampled value is an entry of p[0] (rows are renormalised first: equal to rounding)
    full = np.sort(np.log(p[0].numpy().ravel()))
    pos = np.clip(np.searchsorted(full, a[0].numpy()), 1, full.size - 1)
    assert np.minimum(np.abs(full[pos] - a[0].numpy()), np.abs(full[pos - 1] - a[0].numpy())).max() < 1e-12
    fit = attnstats.lognormal_fit(p, max_samples=500, seed=7)
    assert fit.n.tolist() == [500, 500, 500]
    assert math.isclose(fit.mu[1].item(), a[1].mean().item(), rel_tol=1e-12)
    # uniform: the sample mean of ln P is an unbiased estimate of the full mean (4096 entries)
    full_mean = np.log(p.numpy()).reshape(3, -1).mean(1)
    assert np.all(np.abs(fit.mu.numpy() - full_mean) < 4 * np.log(p.numpy()).reshape(3, -1).std(1) / math.sqrt(500))


def test_fit_log_values_rejects_bad_input():
    with pytest.raises(ValueError, match="at least 3 values"):
        fit_log_values([0.0, 1.0])
    with pytest.raises(ValueError, match=r"log_values: expected finite values, found -inf at index 1"):
        fit_log_values([0.0, -np.inf, 1.0])
    with pytest.raises(ValueError, match="sigma = 0"):
        fit_log_values([2.0, 2.0, 2.0])
    with pytest.raises(ValueError, match="max_samples"):
        attnstats.lognormal_fit(torch.full((4, 4), 0.25), max_samples=0)


def test_matrix_without_a_fit_is_nan_with_a_warning_naming_it():
    q, k = gaussian_qk((2, 2), 6, 4, seed=3)
    mask = torch.ones(2, 1, 6, 6, dtype=torch.bool)
    mask[1, ..., 1:] = False  # one valid key: every valid entry is 1, ln P = 0 everywhere
    p = softmax_attention(q, k, mask)
    with pytest.warns(RuntimeWarning, match=r"batch index \(1, 0\) has 6 valid entries all equal"):
        fit = attnstats.lognormal_fit(p, mask)
    assert torch.isnan(fit.sigma[1]).all() and fit.n[1].tolist() == [6, 6]
    ref = scipy_reference(np.log(p[0, 1].numpy().ravel()))
    assert math.isclose(fit.sigma[0, 1].item(), ref[1], rel_tol=1e-12)


def test_frame_survives_a_sentence_of_one_token():
    mha = torch.nn.MultiheadAttention(16, 2, batch_first=True).eval()
    x = torch.randn(2, 5, 16)
    kpm = torch.zeros(2, 5, dtype=torch.bool)
    kpm[1, 1:] = True  # the second sentence is one real token
    with torch.no_grad(), attnstats.record(mha) as rec, pytest.warns(RuntimeWarning, match="fit is NaN"):
        mha(x, x, x, key_padding_mask=kpm, need_weights=False)
        f = rec.frame(batch="each")
    sig = f[(f.metric == "lognormal_sigma")]
    assert sig[sig.batch == 0].value.notna().all() and sig[sig.batch == 1].value.isna().all()
