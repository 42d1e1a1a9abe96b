"""Spectral gap without the matrix against numpy.linalg.eigvals of the dense matrix."""
import numpy as np
import pytest
import torch

import attnstats
from attnstats.budget import DenseTooLargeError, memory_budget
from attnstats.eigen import AttentionOperator, linear_spectral_gap, spectral_gap_from_qk
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
    r = spectral_gap_from_qk(q, k, padding_mask=pad)
    for h, m in ((0, n), (1, 150)):
        p = softmax_attention(q[h, :m], k[h, :m]).numpy()
        assert abs(float(r.gap[h]) - numpy_gap_and_lambda2(p)[0]) < 1e-6


def test_causal_diagonal_rule():
    n = 300
    q, k = gaussian_qk((3,), n, 16, 1.3, 1.3, seed=2)
    pad = torch.ones(3, n, dtype=torch.bool)
    pad[1, :20] = False  # left padding: the first real token is 20
    pad[2, 1:] = False  # one real token: no second eigenvalue, gap 1
    r = spectral_gap_from_qk(q, k, causal=True, padding_mask=pad)
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
        got = spectral_gap_from_qk(q, k, tol=1e-6)
        want = attnstats.spectral_gap(softmax_attention(q, k))
        assert float((got.gap - want).abs().max()) < 1e-6
