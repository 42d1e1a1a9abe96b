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
