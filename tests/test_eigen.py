"""Spectral gap without the matrix against numpy.linalg.eigvals of the dense matrix."""
import math
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import attnstats
from attnstats.budget import DenseTooLargeError, memory_budget
from attnstats.stats import spectral as eigen
from attnstats.stats.arnoldi import AttentionOperator
from attnstats.kernels.linear import linear_spectral_gap
from attnstats.stats.spectral import spectral_gap_from_qk
from helpers import gaussian_qk, softmax_attention


pytestmark = pytest.mark.usefixtures("one_thread")


def numpy_gap_and_lambda2(p: np.ndarray):
    ev = np.linalg.eigvals(p)
    ev = ev[np.argsort(-np.abs(ev))]
    return 1 - abs(ev[1]), ev[1]


def test_arnoldi_matches_dense_eigvals():
    # The bar: within 1e-6 of the dense gap on random attention at N = 512.
    q, k = gaussian_qk((2,), 512, 16, 1.4, 1.4, seed=0)
    r = spectral_gap_from_qk(q, k)
    p = softmax_attention(q, k).numpy()
    assert r.method == "arnoldi" and r.gap.shape == (2,)
    for h in range(2):
        gap, lam2 = numpy_gap_and_lambda2(p[h])
        assert abs(float(r.gap[h]) - gap) < 1e-6
        assert abs(complex(r.lambda2[h]) - lam2) < 1e-6 or abs(complex(r.lambda2[h]) - np.conj(lam2)) < 1e-6
    assert bool(r.converged.all())
    assert (r.iterations > 0).all() and (r.residual < 1e-8).all()


def test_padding_removes_tokens():
    n = 200
    q, k = gaussian_qk((2,), n, 16, 1.5, 1.5, seed=1)
    pad = torch.ones(2, n, dtype=torch.bool)
    pad[1, 150:] = False
    r = spectral_gap_from_qk(q, k, mask=pad[:, None, :])
    for h, m in ((0, n), (1, 150)):
        p = softmax_attention(q[h, :m], k[h, :m]).numpy()
        assert abs(float(r.gap[h]) - numpy_gap_and_lambda2(p)[0]) < 1e-6


def test_causal_diagonal_rule():
    n = 300
    q, k = gaussian_qk((3,), n, 16, 1.3, 1.3, seed=2)
    pad = torch.ones(3, n, dtype=torch.bool)
    pad[1, :20] = False  # left padding: the first real token is 20
    pad[2, 1:] = False  # one real token: no second eigenvalue, gap 1
    r = spectral_gap_from_qk(q, k, causal=True, mask=pad[:, None, :])
    assert r.method == "causal-diagonal" and bool(r.converged.all()) and (r.iterations == 0).all()
    for h in range(2):
        keep = pad[h]
        p = softmax_attention(q[h][keep], k[h][keep], mask=torch.ones(int(keep.sum()), int(keep.sum()), dtype=torch.bool).tril())
        assert abs(float(r.gap[h]) - numpy_gap_and_lambda2(p.numpy())[0]) < 1e-9
    assert float(r.gap[2]) == 1.0


def test_gqa_heads_and_dense_method():
    q, _ = gaussian_qk((1, 4), 64, 8, 1.5, 1.0, seed=3)
    _, k = gaussian_qk((1, 2), 64, 8, 1.0, 1.5, seed=4)
    r = spectral_gap_from_qk(q, k, method="dense")
    assert r.gap.shape == (1, 4) and r.method == "dense"
    for h in range(4):
        p = softmax_attention(q[0, h], k[0, h // 2]).numpy()
        assert abs(float(r.gap[0, h]) - numpy_gap_and_lambda2(p)[0]) < 1e-9
    with memory_budget(1000):
        with pytest.raises(DenseTooLargeError):
            spectral_gap_from_qk(q, k, method="dense")


def test_operator_is_attention_with_v_equal_x():
    q, k = gaussian_qk((), 130, 16, 1.2, 1.2, seed=5)
    op = AttentionOperator(q, k, 0.25, tile_bytes=8 * 130 * 7)  # 7-row tiles
    x = torch.randn(130, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    want = softmax_attention(q, k, scale=0.25) @ x
    assert torch.allclose(op.matmat(x), want, rtol=0, atol=1e-12)
    assert op.calls == 1


def la_matrix(fq, fk, causal):
    a = fq @ fk.T
    if causal:
        a = np.tril(a)
    return a / a.sum(1, keepdims=True)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("r", [6, 80])
def test_linear_attention_gap(causal, r):
    g = torch.Generator().manual_seed(6)
    fq = torch.rand(2, 60, r, generator=g, dtype=torch.float64)
    fk = torch.rand(2, 60, r, generator=g, dtype=torch.float64) ** 3
    got = linear_spectral_gap(fq, fk, causal=causal)
    for h in range(2):
        want = numpy_gap_and_lambda2(la_matrix(fq[h].numpy(), fk[h].numpy(), causal))[0]
        assert abs(float(got[h]) - want) < 1e-9


def test_bad_input():
    q, k = gaussian_qk((2,), 20, 4, seed=7)
    with pytest.raises(ValueError, match="method: 'arnoldi' is for non-causal"):
        spectral_gap_from_qk(q, k, causal=True, method="arnoldi")
    with pytest.raises(ValueError, match="method"):
        spectral_gap_from_qk(q, k, method="lanczos")
    with pytest.raises(ValueError, match=r"padding_mask: no real token in the matrix at batch index \(1,\)"):
        spectral_gap_from_qk(q, k, padding_mask=torch.tensor([[True] * 20, [False] * 20]))
    with pytest.raises(TypeError, match="padding_mask"):
        spectral_gap_from_qk(q, k, padding_mask=torch.ones(2, 20))
    with pytest.raises(ValueError, match="square matrix"):
        spectral_gap_from_qk(q, k[:, :10])
    fq = torch.rand(3, 5)
    with pytest.raises(ValueError, match=r"phi_k: expected non-negative features, found -1.0 at index \(2, 1\)"):
        bad = torch.rand(3, 5)
        bad[2, 1] = -1.0
        linear_spectral_gap(fq, bad)
    with pytest.raises(ValueError, match="equal shapes"):
        linear_spectral_gap(fq, torch.rand(3, 4))


def test_small_heads_and_loose_tolerance_match_dense():
    # ARPACK needs nev + 1 < ncv ≤ N: small heads go to the dense solver, not to a scipy error
    for n in range(1, 20):
        q, k = gaussian_qk((1,), n, 16, seed=n)
        want = attnstats.spectral_gap(softmax_attention(q, k))
        torch.testing.assert_close(spectral_gap_from_qk(q, k).gap, want, rtol=0, atol=1e-9)
    # with a loose tolerance, several requested eigenvalues keep it on λ_2, not on a neighbour
    for seed in range(6):
        q, k = gaussian_qk((2,), 256, 64, sigma_q=1.5, sigma_k=1.5, seed=100 + seed)
        got = spectral_gap_from_qk(q, k, tol=1e-6, method="arnoldi")
        want = attnstats.spectral_gap(softmax_attention(q, k))
        assert float((got.gap - want).abs().max()) < 1e-6


def peaked_head(n=30, d=16, seed=65):
    """q, k ~ N(0, 20²) at scale 1/4: every row on about one key; |λ_2| ≈ 1e-5 and ill-conditioned."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(n, d, generator=g, dtype=torch.float64) * 20
    k = torch.randn(n, d, generator=g, dtype=torch.float64) * 20
    return q, k


def test_arnoldi_on_an_ill_conditioned_head_is_not_certified():
    # A residual of 1e-15 and converged=True, yet |λ_2| off by 4e-3: only the condition number of
    # λ_2 (from the left eigenvector) reveals it. Forced Arnoldi must say so; "auto" must re-solve P.
    q, k = peaked_head()
    want, _ = numpy_gap_and_lambda2(softmax_attention(q, k, scale=0.25).numpy())
    with pytest.warns(attnstats.UncertifiedGapWarning, match="1 of 1 gaps are not certified"):
        r = spectral_gap_from_qk(q, k, scale=0.25, method="arnoldi")
    assert bool(r.converged) and float(r.residual) < 1e-12
    assert not bool(r.certified) and float(r.error_bound) > abs(float(r.gap) - want)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        eigen_dense_max = eigen.DENSE_MAX_TOKENS
        try:
            eigen.DENSE_MAX_TOKENS = 8  # route the 30-token head to Arnoldi first
            r = spectral_gap_from_qk(q, k, scale=0.25)
        finally:
            eigen.DENSE_MAX_TOKENS = eigen_dense_max
    assert r.method == "dense" and bool(r.certified) and abs(float(r.gap) - want) < 1e-9


@pytest.mark.parametrize("which", ["same queries", "same keys", "zero queries", "zero keys"])
@pytest.mark.parametrize("method", ["auto", "arnoldi"])
def test_rank_one_attention_has_gap_one(which, method):
    # Identical queries give identical rows, identical keys uniform rows: P = 1 πᵀ has rank one, so
    # λ_2 = 0 exactly. (ARPACK stopped with "starting vector is zero" on the deflated operator.)
    q, k = gaussian_qk((), 40, 8, seed=3)
    if which == "same queries":
        q = q[:1].expand(40, 8)
    elif which == "same keys":
        k = k[:1].expand(40, 8)
    elif which == "zero queries":
        q = torch.zeros_like(q)
    else:
        k = torch.zeros_like(k)
    r = spectral_gap_from_qk(q, k, method=method)
    assert bool(r.certified) and math.isclose(float(r.gap), 1.0, abs_tol=1e-12)


def test_inputs_that_require_grad():
    q, k = gaussian_qk((2,), 300, 8, seed=4)
    r = spectral_gap_from_qk(q.requires_grad_(), k.requires_grad_())
    for h in range(2):
        want, _ = numpy_gap_and_lambda2(softmax_attention(q, k)[h].detach().numpy())
        assert abs(float(r.gap[h]) - want) < 1e-9


def structured_qk(kind: str, n: int, seed: int):
    """``(q, k, scale)`` of a head whose P is peaked, banded, near-periodic or rank-deficient."""
    g = torch.Generator().manual_seed(seed)
    i = torch.arange(n, dtype=torch.float64)[:, None]
    if kind == "peaked":  # as peaked_head: a mix of one-key rows shared by many queries and permutations
        q, k = peaked_head(n, 16, seed)
        return q, k, 0.25
    if kind in ("banded", "near-periodic"):
        # score s·cos(ω(i − j)): attention to the tokens at distance ≈ 0 mod 2π/ω
        omega = 0.3 if kind == "banded" else 2 * math.pi * 3 / n + 1e-3
        s = 6.0 if kind == "banded" else 12.0
        f = torch.cat([torch.cos(omega * i), torch.sin(omega * i)], 1)
        noise = 0.05 * torch.randn(n, 2, generator=g, dtype=torch.float64)
        return (f + noise) * s ** 0.5, (f + noise) * s ** 0.5, 1.0
    # rank-deficient: three distinct queries, repeated
    q = torch.randn(3, 8, generator=g, dtype=torch.float64)[torch.arange(n) % 3]
    return q, torch.randn(n, 8, generator=g, dtype=torch.float64), None


@settings(max_examples=40, deadline=None)
@given(kind=st.sampled_from(["peaked", "banded", "near-periodic", "rank-deficient"]),
       n=st.integers(10, 60), seed=st.integers(0, 10_000))
def test_gap_property_against_numpy_eigvals(kind, n, seed):
    # Every route against float64 numpy.linalg.eigvals of P. The dense routes solve the same matrix
    # (up to the rounding of q kᵀ, which an ill-conditioned λ_2 can amplify to ~κ·1e-16); 1e-6 is the
    # certification level. Arnoldi is held to it wherever it claims to be certified.
    q, k, scale = structured_qk(kind, n, seed)
    p = softmax_attention(q, k, scale=scale)
    want, _ = numpy_gap_and_lambda2(p.numpy())
    assert abs(attnstats.spectral_gap(p).item() - want) < 1e-6
    assert abs(float(spectral_gap_from_qk(q, k, scale=scale).gap) - want) < 1e-6
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", attnstats.UncertifiedGapWarning)
        r = spectral_gap_from_qk(q, k, scale=scale, method="arnoldi")
    assert 0.0 <= float(r.gap) <= 1.0
    if bool(r.certified):
        assert abs(float(r.gap) - want) < 1e-6, float(r.error_bound)


def test_record_stats_of_identical_tokens_does_not_raise():
    # Identical tokens make P uniform (rank one), so the deflated operator is exactly 0: the forward
    # under record(store="stats") raised ArpackError ("starting vector is zero"). Its gap is 1.
    x = torch.randn(1, 2, 1, 8, generator=torch.Generator().manual_seed(0)).expand(1, 2, 24, 8)  # [B, H, N, d]
    attention = torch.nn.functional.scaled_dot_product_attention
    with torch.no_grad(), attnstats.record(torch.nn.Identity(), store="stats", metrics=("spectral_gap",)) as rec:
        out = attention(x, x, x)
    assert torch.equal(out, attention(x, x, x))
    gap = rec.frame().query("metric == 'spectral_gap'").value
    assert len(gap) == 2 and np.allclose(gap, 1.0, atol=1e-12)
