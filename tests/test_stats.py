import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats as sps

import attnstats
from helpers import gaussian_qk, softmax_attention


def padding_mask(lengths, n):
    """[B, 1, 1, n] key-padding mask: the first lengths[b] tokens are valid."""
    return (torch.arange(n)[None, :] < torch.tensor(lengths)[:, None])[:, None, None, :]


def test_row_entropy_matches_scipy():
    q, k = gaussian_qk((2, 3), 40, 8, seed=1)
    p = softmax_attention(q, k)
    h = attnstats.row_entropy(p)
    assert h.shape == (2, 3, 40) and h.dtype == torch.float64
    ref = sps.entropy(p.numpy(), axis=-1)
    np.testing.assert_allclose(h.numpy(), ref, rtol=1e-12, atol=1e-12)


def test_row_entropy_masked_entries_are_absent():
    n = 12
    q, k = gaussian_qk((3, 2), n, 4, seed=2)
    mask = padding_mask([12, 7, 3], n) & torch.ones(n, n, dtype=torch.bool).tril()
    p = softmax_attention(q, k, mask)
    h = attnstats.row_entropy(p, mask).numpy()
    m = mask.expand_as(p).numpy()
    for idx in np.ndindex(*p.shape[:-1]):
        valid = p.numpy()[idx][m[idx]]
        assert math.isclose(h[idx], sps.entropy(valid), rel_tol=1e-12, abs_tol=1e-12)


def test_row_with_no_valid_entry_is_nan_in_rows():
    p = torch.tensor([[1.0, 0.0], [0.3, 0.7]], dtype=torch.float64)
    mask = torch.tensor([[True, False], [False, False]])
    h = attnstats.row_entropy(p, mask)
    assert h[0].item() == 0.0 and math.isnan(h[1].item())
    m = attnstats.entry_moments(p, mask)
    assert m.count.item() == 1 and m.mean.item() == 1.0


def test_entry_moments_match_dense_loop():
    n = 16
    q, k = gaussian_qk((2, 2), n, 8, seed=3)
    mask = padding_mask([16, 9], n)
    p = softmax_attention(q, k, mask)
    m = attnstats.entry_moments(p, mask)
    for b in range(2):
        for h in range(2):
            vals = [p[b, h, i, j].item() for i in range(n) for j in range(n) if mask[b, 0, 0, j]]
            vals = np.array(vals)
            assert m.count[b, h].item() == len(vals)
            assert math.isclose(m.mean[b, h].item(), vals.mean(), rel_tol=1e-12)
            assert math.isclose(m.var[b, h].item(), vals.var(), rel_tol=1e-10)
            assert math.isclose(m.log_mean[b, h].item(), np.log(vals).mean(), rel_tol=1e-12)
            assert math.isclose(m.log_var[b, h].item(), np.log(vals).var(), rel_tol=1e-10)


def test_entry_moments_zero_entries_leave_log_moments_and_warn():
    p = torch.tensor([[1.0, 0.0], [0.25, 0.75]], dtype=torch.float64)
    with pytest.warns(RuntimeWarning, match="exactly 0"):
        m = attnstats.entry_moments(p)
    logs = np.log([1.0, 0.25, 0.75])
    assert m.zero_count.item() == 1 and m.count.item() == 4
    assert math.isclose(m.log_mean.item(), logs.mean()) and math.isclose(m.log_var.item(), logs.var())


def test_half_precision_input_is_upcast():
    q, k = gaussian_qk((2,), 32, 8, seed=4)
    p = softmax_attention(q, k)
    for dtype in (torch.float16, torch.bfloat16):
        ph = p.to(dtype)
        h = attnstats.row_entropy(ph)
        assert h.dtype == torch.float64
        # computed on the half values themselves, in float64: same as scipy on those values
        ref = sps.entropy(ph.double().numpy(), axis=-1)  # scipy renormalises; rows sum to 1 ± eps
        np.testing.assert_allclose(h.numpy(), ref, atol=5 * torch.finfo(dtype).eps * math.log(32))


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 40), batch=st.integers(1, 3))
def test_uniform_rows_have_entropy_ln_n(n, batch):
    p = torch.full((batch, n, n), 1.0 / n, dtype=torch.float64)
    np.testing.assert_allclose(attnstats.row_entropy(p).numpy(), math.log(n), atol=1e-12)


@settings(max_examples=25, deadline=None)
@given(n=st.integers(2, 30), seed=st.integers(0, 10_000), temp=st.floats(0.1, 5.0))
def test_permuting_keys_leaves_entropy_unchanged(n, seed, temp):
    q, k = gaussian_qk((), n, 4, seed=seed)
    p = softmax_attention(q, k, scale=1 / temp)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    np.testing.assert_allclose(
        attnstats.row_entropy(p[:, perm]).numpy(), attnstats.row_entropy(p).numpy(), rtol=1e-12, atol=1e-12
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_entropy_rises_with_temperature(dtype):
    # dH/dτ = Var_p(s)/τ³ ≥ 0 for every row, so the mean entropy rises strictly with τ.
    q, k = gaussian_qk((4,), 64, 16, seed=5)
    taus = [0.25, 0.5, 1.0, 2.0, 4.0]
    hs = [attnstats.row_entropy(softmax_attention(q, k, scale=1 / (4 * t)).to(dtype)).mean().item() for t in taus]
    assert all(a < b for a, b in zip(hs, hs[1:])), hs
    assert hs[-1] < math.log(64)


def test_rows_read_in_blocks_give_the_same_numbers_and_errors():
    # The budget sets the block size: one row, three rows (blocks that end inside a matrix), two whole
    # matrices. Every block size must give the numbers of the one-block pass (equal up to the order
    # of float64 sums, ~1e-15 relative) and name the bad entry by its index in p.
    n = 8
    q, k = gaussian_qk((3, 2), n, 4, seed=6)
    mask = padding_mask([8, 5, 2], n) & torch.ones(n, n, dtype=torch.bool).tril()
    p = softmax_attention(q, k, mask)
    h, m = attnstats.row_entropy(p, mask), attnstats.entry_moments(p, mask)
    fit = attnstats.lognormal_fit(p, mask, max_samples=20, seed=1)
    bad = p.clone()
    bad[2, 1, 6, 0] = float("nan")  # in the last block of every size: its index is offset back
    for budget in (8 * n, 3 * 8 * n, 2 * 8 * n * n):
        with attnstats.memory_budget(budget):
            np.testing.assert_allclose(attnstats.row_entropy(p, mask).numpy(), h.numpy(), rtol=1e-15, equal_nan=True)
            mb = attnstats.entry_moments(p, mask)
            for f in ("mean", "var", "log_mean", "log_var"):
                np.testing.assert_allclose(getattr(mb, f).numpy(), getattr(m, f).numpy(), rtol=1e-13)
            assert torch.equal(mb.count, m.count)
            fb = attnstats.lognormal_fit(p, mask, max_samples=20, seed=1)
            np.testing.assert_allclose(fb.sigma.numpy(), fit.sigma.numpy(), rtol=1e-13)
            assert torch.equal(fb.n, fit.n)
            with pytest.raises(ValueError, match=r"expected finite values, found nan at index \(2, 1, 6, 0\)"):
                attnstats.entry_moments(bad, mask)


@pytest.mark.parametrize("fn", [attnstats.row_entropy, attnstats.entry_moments, attnstats.lognormal_fit])
def test_dense_statistics_are_guarded_by_the_memory_budget(fn):
    # Rows are upcast to float64 a block at a time; a budget below one row (8·N bytes) admits none.
    p = softmax_attention(*gaussian_qk((2,), 16, 4, seed=7))
    with attnstats.memory_budget(8 * 16 - 1):
        with pytest.raises(attnstats.DenseTooLargeError, match=r"a block of rows of p in torch.float64 of shape \(1, 16\)"):
            fn(p)
    with attnstats.memory_budget(8 * 16):
        fn(p)


def test_prepare_probs_is_guarded_by_the_memory_budget():
    from attnstats.stats.dense import prepare_probs

    p = softmax_attention(*gaussian_qk((2,), 16, 4, seed=7)).float()
    with attnstats.memory_budget(2 * 16 * 16 * 8 - 1):  # the float64 copy of p needs 4 KiB
        with pytest.raises(attnstats.DenseTooLargeError, match=r"p in torch.float64 of shape \(2, 16, 16\)"):
            prepare_probs(p)
    x, _ = prepare_probs(p)
    torch.testing.assert_close(x, p.double() / p.double().sum(-1, keepdim=True), rtol=0, atol=0)
