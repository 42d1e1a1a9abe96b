import math

import numpy as np
import pytest
import torch

import attnstats
from attnstats import theory
from helpers import gaussian_qk, softmax_attention

N, D = 1024, 64


def measured(sigma2, seed=0, heads=2):
    s = sigma2**0.25  # σ_q = σ_k = σ^{1/2}, so σ_q²σ_k² = σ²
    q, k = gaussian_qk((heads,), N, D, sigma_q=s, sigma_k=s, seed=seed)
    p = softmax_attention(q, k)
    return attnstats.entry_moments(p), attnstats.row_entropy(p).mean().item(), s


@pytest.mark.parametrize("sigma2", [0.25, 1.0, 2.0])
def test_proposition_3_1_four_moments_inside_regime(sigma2):
    m, h, s = measured(sigma2)
    pred = theory.sa_lognormal(s, s, N)
    assert theory.sa_lognormal_holds(sigma2, N)
    assert math.isclose(pred.sigma2, sigma2, rel_tol=1e-12)
    np.testing.assert_allclose(m.mean.numpy(), pred.mean, rtol=1e-12)  # exact: rows sum to 1
    assert abs(m.var.mean().item() / pred.var - 1) < 0.10  # the accuracy sa_lognormal_holds promises
    assert abs(m.log_mean.mean().item() - pred.log_mean) < 0.01
    assert abs(m.log_var.mean().item() / pred.log_var - 1) < 0.04
    assert abs(h - theory.sa_entropy(sigma2, N)) < 0.02  # nats; measured 0.015 at σ² = 2


def test_proposition_3_1_fails_where_exp_sigma2_is_not_small_against_n():
    # σ² = 4 at N = 1024: (e^4 − 1)/N = 0.052; the row sums are no longer nearly constant
    m, _, s = measured(4.0)
    pred = theory.sa_lognormal(s, s, N)
    assert not theory.sa_lognormal_holds(4.0, N)
    assert m.var.mean().item() < 0.75 * pred.var  # measured about 0.6× the prediction
    # the same σ² holds again once N is large enough against e^{σ²}
    assert theory.sa_lognormal_holds(4.0, 8192)


def test_regime_boundary_separates_good_from_bad_variance_predictions():
    errors = {}
    for sigma2 in [1.5, 3.0]:
        m, _, s = measured(sigma2, seed=3)
        errors[sigma2] = abs(m.var.mean().item() / theory.sa_lognormal(s, s, N).var - 1)
    assert theory.sa_lognormal_holds(1.5, N) and errors[1.5] < 0.05
    assert not theory.sa_lognormal_holds(3.0, N) and errors[3.0] > 0.10


def test_spectral_gap_heuristic_for_small_variance():
    sigma2 = 0.5
    s = sigma2**0.25
    q, k = gaussian_qk((2,), 256, D, sigma_q=s, sigma_k=s, seed=4)
    gap = attnstats.spectral_gap(softmax_attention(q, k)).mean().item()
    assert abs(gap - theory.sa_spectral_gap(sigma2, 256)) < 0.03


def test_temperature_and_closed_forms():
    assert theory.sa_temperature(2.0, 0.25) == 2.0
    np.testing.assert_allclose(theory.sa_temperature(np.array([1.0, 2.0]), 1.0), [1.0, 0.5])
    pred = theory.sa_lognormal(1.0, 1.0, 1024)
    assert math.isclose(pred.var * 1024**2, math.e - 1, rel_tol=1e-12)
    assert math.isclose(pred.log_mean, -math.log(1024) - 0.5, rel_tol=1e-12)
    mu_s, var_s = theory.fenton_wilkinson(1.0, 1024)
    assert math.isclose(var_s, math.log(1 + (math.e - 1) / 1024))
    assert math.isclose(mu_s, math.log(1024) + 0.5 - var_s / 2)
    assert theory.sa_spectral_gap(10.0, 4) == 0.0  # clipped outside its range


def test_fenton_wilkinson_matches_monte_carlo_row_sums():
    g = torch.Generator().manual_seed(5)
    z = torch.exp(torch.randn(4000, 512, generator=g, dtype=torch.float64)).sum(-1).log()
    mu, var = theory.fenton_wilkinson(1.0, 512)
    assert abs(z.mean().item() - mu) < 0.003 and abs(z.var().item() / var - 1) < 0.1


@pytest.mark.parametrize("sq,sk", [(1.0, 1.0), (0.5, 2.0), (1.3, 0.7)])
def test_lln_alpha_beta_matches_moments(sq, sk):
    a, b = theory.LLN_A, theory.LLN_B
    alpha, beta = theory.lln_alpha_beta(sq, sk)
    assert math.isclose(alpha * sq, beta * sk, rel_tol=1e-12)
    # the fitted LLN log-variance equals the SA log-variance σ_q²σ_k²
    assert math.isclose(theory.lln_predicted_log_variance(alpha, beta, sq, sk, a, b), sq**2 * sk**2, rel_tol=1e-12)


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="sigma_q: expected positive"):
        theory.sa_temperature(0.0, 1.0)
    with pytest.raises(ValueError, match=r"sigma_k: expected positive finite values, got nan at index \(1,\)"):
        theory.sa_lognormal(1.0, np.array([1.0, np.nan]), 10)
    with pytest.raises(ValueError, match="n: expected a sequence length"):
        theory.sa_entropy(1.0, 0)
    with pytest.raises(ValueError, match="a: expected a positive slope"):
        theory.lln_alpha_beta(1.0, 1.0, a=0.0)
    with pytest.raises(ValueError, match="b: σ_q²σ_k² − b must be positive"):
        theory.lln_alpha_beta(1.0, 1.0, b=2.0)
