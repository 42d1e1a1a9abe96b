"""softmax_attention, the one dense softmax of scaled scores, against numpy float64 references."""
import numpy as np
import pytest
import torch

from attnstats.budget import DenseTooLargeError, memory_budget
from attnstats.kernels import BlockDiagonalAttention, SoftmaxAttention
from attnstats.stats.dense import softmax_attention

pytestmark = pytest.mark.usefixtures("one_thread")

# Every reference entry is exp(s − max) / Σ exp(s − max) in float64, as is softmax_attention's: the
# two differ only by the order of the d-term dot products and of the row sum, a few ulps of
# numbers ≤ 1 each (|s| < 10 here), so 1e-13 absolute is far above any rounding and far below any
# real difference.
ATOL = 1e-13


def draw(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64)


def reference(q, k, scale, valid=None):
    """numpy float64: softmax over the valid keys of each row, 0 elsewhere and on empty rows."""
    s = np.asarray(q) @ np.swapaxes(np.asarray(k), -1, -2) * scale
    valid = np.ones(s.shape, bool) if valid is None else np.broadcast_to(np.asarray(valid), s.shape)
    s = np.where(valid, s, -np.inf)
    top = s.max(-1, keepdims=True)
    e = np.where(valid, np.exp(s - np.where(np.isfinite(top), top, 0)), 0.0)
    tot = e.sum(-1, keepdims=True)
    return np.where(tot > 0, e / np.where(tot > 0, tot, 1), 0.0)


def test_unmasked_default_scale_against_numpy():
    q, k = draw(2, 3, 7, 5, seed=1), draw(2, 3, 9, 5, seed=2)
    p = softmax_attention(q, k)
    assert p.shape == (2, 3, 7, 9) and p.dtype == torch.float64
    np.testing.assert_allclose(p.numpy(), reference(q, k, 5**-0.5), rtol=0, atol=ATOL)
    np.testing.assert_allclose(softmax_attention(q, k, scale=0.3).numpy(), reference(q, k, 0.3), rtol=0, atol=ATOL)


def test_mask_and_causal_give_exact_zeros_and_empty_rows_of_zeros():
    q, k = draw(2, 1, 6, 4, seed=3), draw(2, 1, 6, 4, seed=4)
    pad = torch.ones(2, 1, 1, 6, dtype=torch.bool)
    pad[0, ..., 2:] = False  # batch 0: keys 0, 1 only
    pad[1, ..., 0] = False  # batch 1: key 0 padded, so the causal row 0 has no valid key
    tril = np.tril(np.ones((6, 6), bool))
    p = softmax_attention(q, k, mask=pad, causal=True)
    want = reference(q, k, 0.5, pad.numpy() & tril)
    np.testing.assert_allclose(p.numpy(), want, rtol=0, atol=ATOL)
    valid = (pad & torch.from_numpy(tril)).expand(2, 1, 6, 6)
    assert bool((p[~valid] == 0).all())  # exactly 0, not a tiny number
    assert torch.equal(p[1, 0, 0], torch.zeros(6, dtype=torch.float64))  # no valid key: zeros, never NaN
    rows = valid.any(-1)
    torch.testing.assert_close(p.sum(-1)[rows], torch.ones(int(rows.sum()), dtype=torch.float64), rtol=0, atol=1e-15)


def test_batch_dims_broadcast_and_dtype_policy():
    q, k = draw(2, 3, 5, 4, seed=5), draw(3, 5, 4, seed=6)
    p = softmax_attention(q, k)
    np.testing.assert_allclose(p.numpy(), reference(q, k, 0.5), rtol=0, atol=ATOL)
    # float32 input on the CPU is computed (and returned) in float64, unless a dtype is asked for
    assert softmax_attention(q.float(), k.float()).dtype == torch.float64
    p32 = softmax_attention(q.float(), k.float(), dtype=torch.float32)
    assert p32.dtype == torch.float32
    # float32 rounding of scores of size ~3 and of the row sum: a few float32 ulps
    np.testing.assert_allclose(p32.numpy(), reference(q.float().double(), k.float().double(), 0.5), rtol=0, atol=1e-6)


def test_kernels_matrices_are_softmax_attention():
    """The softmax and block-diagonal kernels build their matrices with softmax_attention: the same
    numbers to the bit."""
    q, k = draw(2, 2, 10, 4, seed=7), draw(2, 2, 10, 4, seed=8)
    pad = torch.ones(2, 1, 1, 10, dtype=torch.bool)
    pad[0, ..., 5:7] = False  # every row keeps a valid key in its block of 4: none falls back to full softmax
    for causal in (False, True):
        for mask in (None, pad):
            got = SoftmaxAttention(scale=0.7).matrix(q, k, causal=causal, mask=mask)
            assert torch.equal(got, softmax_attention(q, k, scale=0.7, mask=mask, causal=causal))
            blocks = torch.arange(10)[:, None] // 4 == torch.arange(10)[None, :] // 4
            want = softmax_attention(q, k, mask=blocks if mask is None else mask & blocks, causal=causal)
            assert torch.equal(BlockDiagonalAttention(block=4).matrix(q, k, causal=causal, mask=mask), want)


def test_bad_input_is_named():
    q, k = draw(1, 4, 3), draw(1, 4, 3)
    with pytest.raises(TypeError, match="q: expected a torch.Tensor"):
        softmax_attention(q.numpy(), k)
    with pytest.raises(ValueError, match="q, k: head dims differ, q has d = 3 and k has d = 2"):
        softmax_attention(q, k[..., :2])
    with pytest.raises(ValueError, match="causal: expects as many queries as keys, got Nq = 4 and Nk = 3"):
        softmax_attention(q, k[:, :3], causal=True)
    with pytest.raises(ValueError, match="scale: expected a positive finite float or None, got -1.0"):
        softmax_attention(q, k, scale=-1.0)
    with pytest.raises(ValueError, match=r"mask: shape \(3,\) does not broadcast"):
        softmax_attention(q, k, mask=torch.ones(3, dtype=torch.bool))
    with pytest.raises(TypeError, match="mask: expected dtype torch.bool"):
        softmax_attention(q, k, mask=torch.ones(4))
    with pytest.raises(TypeError, match="dtype: expected a floating-point torch.dtype"):
        softmax_attention(q, k, dtype=torch.int64)
    bad = q.clone()
    bad[0, 2, 1] = float("nan")
    with pytest.raises(ValueError, match=r"q: expected finite values, found nan at index \(0, 2, 1\)"):
        softmax_attention(bad, k)
    with memory_budget(100):  # [1, 4, 4] float64 is 128 bytes
        with pytest.raises(DenseTooLargeError, match=r"the softmax attention matrix of shape \(1, 4, 4\)"):
            softmax_attention(q, k)
