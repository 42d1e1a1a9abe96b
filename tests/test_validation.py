import pytest
import torch

import attnstats
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
        attnstats.row_entropy(off)  # float64 is held to float64 precision
    attnstats.row_entropy(off.bfloat16())  # within bfloat16's own rounding


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
