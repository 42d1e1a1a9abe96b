"""The batched block Krylov–Schur solver against numpy.linalg.eigvals of the dense matrix, and ARPACK."""
import numpy as np
import pytest
import scipy.linalg
import torch

from attnstats.stats import krylov
from attnstats.stats.arnoldi import AttentionOperator
from attnstats.stats.spectral import spectral_gap_from_qk
from helpers import gaussian_qk, softmax_attention

pytestmark = pytest.mark.usefixtures("one_thread")


def dense_lambda2(p: np.ndarray) -> complex:
    ev = np.linalg.eigvals(p)
    return ev[np.argsort(-np.abs(ev))][1]


@pytest.mark.parametrize("sigma", [1.0, 1.5])
def test_all_heads_at_once_match_dense_eigvals(sigma):
    q, k = gaussian_qk((3,), 240, 16, sigma, sigma, seed=11)
    op = AttentionOperator(q, k, 0.25)
    r = krylov.krylov_gaps(op, tol=1e-10, block=4, blocks=12)
    p = softmax_attention(q, k, scale=0.25).numpy()
    assert bool(r.converged.all())
    for h in range(3):
        want = abs(dense_lambda2(p[h]))
        err = abs(abs(complex(r.lambda2[h])) - want)
        # float64 products, residual ≤ 1e-10·|λ₂|: the error is about κ(λ₂)·residual, and κ of random
        # attention is O(1–100); 1e-8 leaves that margin. The bound is first order: the r² term is ~1e-20.
        assert err < 1e-8, (h, err)
        assert err <= 2 * float(r.error_bound[h]) + 1e-13, (h, err, float(r.error_bound[h]))
        assert float(r.error_bound[h]) < 1e-6  # certified at the float64 threshold
        assert float(r.residual[h]) <= 1e-10 * want * 10  # recomputed, so a little above the solve's own
    assert (r.products > 0).all()


def test_krylov_method_agrees_with_arpack_over_lengths_and_gqa():
    # Two lengths (padding) are solved in two groups; GQA heads share keys.
    n = 200
    q, _ = gaussian_qk((2, 4), n, 16, 1.3, 1.0, seed=12)
    _, k = gaussian_qk((2, 2), n, 16, 1.0, 1.3, seed=13)
    pad = torch.ones(2, n, dtype=torch.bool)
    pad[1, 170:] = False
    mask = pad[:, None, None, :]
    rk = spectral_gap_from_qk(q, k, mask=mask, method="krylov")
    ra = spectral_gap_from_qk(q, k, mask=mask, method="arnoldi")
    assert rk.method == "krylov" and rk.gap.shape == (2, 4)
    assert bool(rk.certified.all()) and bool(ra.certified.all())
    # both certified to 1e-6 of |λ₂| (float64 products): their gaps agree to the sum of the bounds
    assert torch.allclose(rk.gap, ra.gap, rtol=0, atol=2e-6)
    for b, m in ((0, n), (1, 170)):
        for h in range(4):
            p = softmax_attention(q[b, h, :m], k[b, h // 2, :m]).numpy()
            assert abs(float(rk.gap[b, h]) - (1 - abs(dense_lambda2(p)))) < 1e-8


def test_small_blocks_where_problems_reach_a_restart_with_different_sizes():
    # One vector per block and a basis of 6: the A and Aᵀ problems (and the heads) keep different
    # numbers of columns at a cut, so one reaches its restart with fewer than the batch's longest.
    q, k = gaussian_qk((2,), 100, 16, 1.0, 1.0, seed=0)
    p = softmax_attention(q, k, scale=0.25).numpy()
    # blocks = 6 raised an IndexError at the first restart: it must return (it converges too slowly
    # to finish in 20 restarts, and says so)
    r = krylov.krylov_gaps(AttentionOperator(q, k, 0.25), tol=1e-10, block=1, blocks=6, max_restarts=20)
    assert r.lambda2.shape == (2,) and not bool(r.converged.all())
    r = krylov.krylov_gaps(AttentionOperator(q, k, 0.25), tol=1e-10, block=1, blocks=8, max_restarts=400)
    assert bool(r.converged.all())
    for h in range(2):  # float64, residual ≤ 1e-10·|λ₂|, as in the test above
        assert abs(abs(complex(r.lambda2[h])) - abs(dense_lambda2(p[h]))) < 1e-8
    with pytest.raises(ValueError, match="blocks, block: a basis of at least 2 blocks"):
        krylov.krylov_gaps(AttentionOperator(q, k, 0.25), tol=1e-10, blocks=1)


def test_rank_one_attention_has_gap_one():
    # Identical keys: every row of P is uniform, P = 1 1ᵀ/N, and λ₂ = 0 exactly.
    q, k = gaussian_qk((2,), 120, 8, seed=14)
    k = k[:, :1].expand(2, 120, 8)
    r = spectral_gap_from_qk(q, k, method="krylov")
    assert torch.equal(r.gap, torch.ones(2, dtype=torch.float64)) and bool(r.certified.all())


def test_operator_of_several_heads_multiplies_the_listed_ones():
    q, k = gaussian_qk((3,), 90, 8, 1.2, 1.2, seed=15)
    p = softmax_attention(q, k, scale=0.3)  # [3, 90, 90]
    x = torch.randn(2, 90, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    heads = torch.tensor([2, 0])
    for tile in (2**30, 8 * 90 * 7):  # every P kept whole; 7-row tiles rebuilt per product
        op = AttentionOperator(q, k, 0.3, tile_bytes=tile)
        # float64 tiles against a float64 softmax: sums of 90 terms below 1, rounding ~1e-16 each
        assert torch.allclose(op.matmat(x, heads), p[heads] @ x, rtol=0, atol=1e-13)
        assert torch.allclose(op.rmatmat(x, heads), p[heads].mT @ x, rtol=0, atol=1e-13)
    with pytest.raises(ValueError, match="x: one slice per head, expected 2, got 3"):
        op.matmat(torch.zeros(3, 90, 1, dtype=torch.float64), heads)


def test_cholesky_qr_keeps_a_dependent_block_orthonormal():
    g = torch.Generator().manual_seed(2)
    w = torch.randn(3, 50, 6, dtype=torch.float64, generator=g)
    w[1, :, 3] = w[1, :, 0] + w[1, :, 1]  # rank 5: the Gram matrix is singular; the shifted first pass factors it
    q, r = krylov._cholesky_qr(w)
    eye = torch.eye(6, dtype=torch.float64).expand(3, 6, 6)
    assert torch.allclose(q.mT @ q, eye, atol=1e-12)
    assert torch.allclose(q @ r, w, atol=1e-12)


def test_schur_restart_keeps_an_invariant_subspace_when_eigenvectors_are_defective():
    # A Jordan block has one eigenvector for a double eigenvalue: the eigenvector restart cannot
    # span its invariant subspace, and the reordered Schur form must.
    h = np.diag([0.9, 0.9, 0.5, -0.3, 0.2, 0.1])
    h[0, 1] = 1.0
    rng = np.random.default_rng(0)
    s = scipy.linalg.qr(rng.standard_normal((6, 6)))[0]
    h = s @ h @ s.T
    bres = rng.standard_normal((2, 6))
    t, z, vals, y, res, ok = krylov._ritz(h, bres, nev=2, keep=3, most=4, tol=1e-10, floor=1e-12)
    assert z.shape == (6, 3)
    assert np.allclose(z.T @ z, np.eye(3), atol=1e-12)
    assert np.linalg.norm(h @ z - z @ t) < 1e-10
    assert np.allclose(np.sort(np.abs(np.linalg.eigvals(t))), [0.5, 0.9, 0.9], atol=1e-6)  # a Jordan pair: ~sqrt(eps)


def test_heads_too_short_for_a_basis_are_solved_densely():
    # 12 tokens cannot hold a basis of 24 blocks: such heads go to LAPACK, as ARPACK's short heads do
    q, k = gaussian_qk((2,), 12, 8, 1.3, 1.3, seed=17)
    r = spectral_gap_from_qk(q, k, method="krylov")
    p = softmax_attention(q, k).numpy()
    assert r.method == "dense" and bool(r.certified.all())
    for h in range(2):
        assert abs(float(r.gap[h]) - (1 - abs(dense_lambda2(p[h])))) < 1e-12  # both LAPACK on float64 P equal up to rounding; λ₂ of these heads is well-conditioned


def test_krylov_is_for_non_causal_attention():
    q, k = gaussian_qk((1,), 20, 4, seed=16)
    with pytest.raises(ValueError, match="method: 'krylov' is for non-causal"):
        spectral_gap_from_qk(q, k, causal=True, method="krylov")
