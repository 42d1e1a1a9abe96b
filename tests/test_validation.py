import numpy as np
import pytest
import torch
from scipy import stats as sps

import attnstats
from attnstats.validation import row_sum_tolerance
from helpers import gaussian_qk, softmax_attention

FUNCS = [attnstats.row_entropy, attnstats.entry_moments, attnstats.spectral_gap, attnstats.lognormal_fit]


@pytest.fixture
def p():
    q, k = gaussian_qk((2, 3), 8, 4, seed=0)
    return softmax_attention(q, k)


@pytest.mark.parametrize("fn", FUNCS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_names_argument_and_index(fn, p, bad):
    p = p.clone()
    p[1, 2, 5, 3] = bad
    with pytest.raises(ValueError, match=r"p: expected finite values.*\(1, 2, 5, 3\)"):
        fn(p)


@pytest.mark.parametrize("fn", FUNCS)
def test_negative_entry(fn, p):
    p = p.clone()
    p[0, 1, 2, 3] = -1e-3
    with pytest.raises(ValueError, match=r"p: expected non-negative.*\(0, 1, 2, 3\)"):
        fn(p)


@pytest.mark.parametrize("fn", FUNCS)
def test_row_not_summing_to_one(fn, p):
    p = p.clone()
    p[1, 0, 4] *= 1.01
    with pytest.raises(ValueError, match=r"p: row \(1, 0, 4\) sums to 1.01.*expected 1"):
        fn(p)


def test_row_sum_tolerance_scales_with_dtype(p):
    p32 = p.float()
    attnstats.row_entropy(p32)  # float32 rounding passes
    off = p.clone()
    off[0, 0, 0] *= 1 + 1e-4
    with pytest.raises(ValueError, match="sums to"):
        attnstats.row_entropy(off)  # 1e-4 is far beyond float32 rounding (tolerance 3.2e-6 at N = 8)
    attnstats.row_entropy(off.bfloat16())  # within bfloat16's own rounding
    # float64 values are held to float32 rounding, the precision they usually come from
    assert row_sum_tolerance(torch.float64, 8) == row_sum_tolerance(torch.float32, 8) < 4e-6
    assert row_sum_tolerance(torch.bfloat16, 8) > row_sum_tolerance(torch.float32, 8)


def float32_attention(n=64):
    """Softmax computed in float32, as a model does, then cast to float64: rows sum to 1 ± ~1e-7."""
    q, k = gaussian_qk((2, 3), n, 16, 1.5, 1.5, seed=4, dtype=torch.float32)
    p64 = torch.softmax(q @ k.mT / 4, -1).double()
    assert (p64.sum(-1) - 1).abs().max() > 1e-9  # far beyond float64 rounding (~1e-15)
    return p64


@pytest.mark.parametrize("fn", FUNCS)
def test_float32_attention_cast_to_float64_is_accepted(fn):
    fn(float32_attention())


def test_rows_are_renormalised_before_any_statistic():
    p64 = float32_attention()
    q = p64 / p64.sum(-1, keepdim=True)  # the exact distribution the statistics describe
    # scipy normalises each row itself; unnormalised rows (off by ~1e-7) would be ~1e-7 off here
    np.testing.assert_allclose(attnstats.row_entropy(p64).numpy(), sps.entropy(p64.numpy(), axis=-1), rtol=1e-13)
    m = attnstats.entry_moments(p64)
    np.testing.assert_allclose(m.mean.numpy(), 1 / 64, rtol=1e-14)  # n rows summing to 1 over n² entries
    logs = np.log(q.numpy()).reshape(2, 3, -1)
    np.testing.assert_allclose(m.log_mean.numpy(), logs.mean(-1), rtol=1e-13)
    np.testing.assert_allclose(m.var.numpy(), q.numpy().reshape(2, 3, -1).var(-1), rtol=1e-11)
    fit = attnstats.lognormal_fit(p64)
    np.testing.assert_allclose(fit.mu.numpy(), logs.mean(-1), rtol=1e-13)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("factor", [0.9, 1.01])
@pytest.mark.parametrize("fn", FUNCS)
def test_rows_that_are_no_distribution_are_still_rejected(fn, dtype, factor):
    p = float32_attention().to(dtype)
    p[1, 2, 7] *= factor
    with pytest.raises(ValueError, match=r"p: row \(1, 2, 7\) sums to ([0-9.]+) .*expected 1") as err:
        fn(p)
    assert abs(float(err.value.args[0].split("sums to ")[1].split()[0]) - factor) < 1e-6  # row sum 1 ± 1e-7


@pytest.mark.parametrize("fn", FUNCS)
def test_non_square(fn):
    with pytest.raises(ValueError, match=r"p: expected square last two dims.*\(2, 3, 4\)"):
        fn(torch.full((2, 3, 4), 0.25))


@pytest.mark.parametrize("fn", FUNCS)
def test_empty_sequence(fn):
    with pytest.raises(ValueError, match=r"p: empty sequence \(N = 0\)"):
        fn(torch.zeros(2, 0, 0))


@pytest.mark.parametrize("fn", FUNCS)
def test_mask_that_does_not_broadcast(fn, p):
    with pytest.raises(ValueError, match=r"mask: shape \(5, 8\) does not broadcast to .*\(2, 3, 8, 8\)"):
        fn(p, torch.ones(5, 8, dtype=torch.bool))


@pytest.mark.parametrize("fn", FUNCS)
def test_mask_with_no_valid_entry(fn, p):
    mask = torch.ones(2, 1, 8, 8, dtype=torch.bool)
    mask[1] = False
    with pytest.raises(ValueError, match=r"mask: no valid entry in the matrix at batch index \(1, 0\)"):
        fn(p, mask)


def test_mask_must_be_bool(p):
    with pytest.raises(TypeError, match="mask: expected dtype torch.bool"):
        attnstats.row_entropy(p, torch.ones(8, 8))


def test_not_a_tensor():
    with pytest.raises(TypeError, match="p: expected a torch.Tensor"):
        attnstats.row_entropy([[1.0]])
    with pytest.raises(TypeError, match="p: expected a floating-point tensor"):
        attnstats.row_entropy(torch.ones(2, 2, dtype=torch.int64))


def test_masked_entries_may_hold_anything():
    p = torch.tensor([[1.0, float("nan")], [0.5, 0.5]], dtype=torch.float64)
    mask = torch.tensor([[True, False], [True, True]])
    h = attnstats.row_entropy(p, mask)
    assert h[0].item() == 0.0 and abs(h[1].item() - 0.6931471805599453) < 1e-15
