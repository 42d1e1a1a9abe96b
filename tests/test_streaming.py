"""Streaming statistics (PyTorch path) against dense float64 attention built from the same q, k."""
import math

import numpy as np
import pytest
import torch

from attnstats.stats.lognormal import log_entries, lognormal_fit
from attnstats.stats.dense import entry_moments, row_entropy
from attnstats.stats.qk import _triangle_index, sample_log_probs, streaming_lognormal_fit, streaming_stats
from helpers import gaussian_qk, softmax_attention


pytestmark = pytest.mark.usefixtures("one_thread")

RTOL = 1e-6


def dense_reference(q, k, valid, scale=None):
    """Dense float64 statistics of softmax(scale q kᵀ) over ``valid`` entries (GQA already expanded)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    p = softmax_attention(q, k, mask=valid, scale=scale)
    s = (q.double() @ k.double().transpose(-1, -2)) * scale
    lse = torch.logsumexp(s.masked_fill(~valid, -math.inf), -1)
    lse = lse.masked_fill(~valid.expand(s.shape).any(-1), math.nan)  # a row with no valid key has none
    return p, lse, (p * p).sum(-1)


def assert_close(a, b, rtol=RTOL):
    a, b = a.double(), b.double()
    assert torch.equal(torch.isnan(a), torch.isnan(b))
    ok = ~torch.isnan(b)
    err = (a[ok] - b[ok]).abs().max() / b[ok].abs().max()
    assert err <= rtol, f"relative error {err:.3g} > {rtol}"


def check_against_dense(q, k, valid, st, group=1):
    kr = k.repeat_interleave(group, dim=-3) if group > 1 else k
    p, lse, sp2 = dense_reference(q, kr, valid)
    em = entry_moments(p, valid)
    assert_close(st.entropy, row_entropy(p, valid))
    assert_close(st.lse, lse)
    assert_close(st.sum_p2, sp2)
    for f in ("mean", "var", "log_mean", "log_var"):
        assert_close(getattr(st.entry_moments, f), getattr(em, f))
    assert torch.equal(st.entry_moments.count, em.count)
    assert torch.equal(st.row_count, valid.expand(p.shape).sum(-1))


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("block", [None, 32, 61])
def test_matches_dense(causal, padded, block):
    n = 203
    q, k = gaussian_qk((2, 3), n, 16, 1.3, 1.1, seed=1)
    valid = torch.ones(2, 1, n, n, dtype=torch.bool)
    mask = None
    if padded:
        mask = torch.ones(2, 1, 1, n, dtype=torch.bool)
        mask[1, ..., 150:] = False  # right padding
        mask[0, ..., :7] = False  # left padding: causal rows 0..6 have no valid key
        valid = valid & mask
    if causal:
        valid = valid & torch.ones(n, n, dtype=torch.bool).tril()
    st = streaming_stats(q, k, mask=mask, causal=causal, block_size=block, backend="torch")
    assert st.backend == "torch"
    assert st.entropy.shape == (2, 3, n) and st.entry_moments.var.shape == (2, 3)
    check_against_dense(q, k, valid, st)


def test_gqa_and_full_mask():
    n = 150
    q, _ = gaussian_qk((2, 6), n, 32, 1.0, 1.0, seed=2)
    _, k = gaussian_qk((2, 2), n, 32, 1.0, 1.4, seed=3)
    g = torch.Generator().manual_seed(4)
    full = torch.rand(2, 6, n, n, generator=g) > 0.3
    full[..., 0] = True  # every row keeps a key
    st = streaming_stats(q, k, mask=full, causal=True, block_size=40)
    valid = full & torch.ones(n, n, dtype=torch.bool).tril()
    check_against_dense(q, k, valid, st, group=3)


def test_long_sequence_causal_padded_gqa():
    # The bar: N up to 2048, causal, padded and GQA at once, within 1e-6 of dense float64.
    n = 2048
    q, _ = gaussian_qk((1, 2), n, 16, 1.2, 1.0, seed=5)
    _, k = gaussian_qk((1, 1), n, 16, 1.0, 1.2, seed=6)
    mask = torch.ones(1, 1, 1, n, dtype=torch.bool)
    mask[..., 1900:] = False
    st = streaming_stats(q, k, mask=mask, causal=True)
    valid = mask & torch.ones(n, n, dtype=torch.bool).tril()
    check_against_dense(q, k, valid, st, group=2)


def test_unbatched_scale_and_rectangular():
    q, _ = gaussian_qk((), 40, 8, seed=7)
    _, k = gaussian_qk((), 90, 8, seed=8)
    st = streaming_stats(q, k, scale=0.7, block_size=16)
    p, lse, sp2 = dense_reference(q, k, torch.ones(40, 90, dtype=torch.bool), scale=0.7)
    assert st.lse.shape == (40,)
    assert_close(st.lse, lse)
    assert_close(st.sum_p2, sp2)
    assert_close(st.entropy, -(p * p.log()).sum(-1))


def test_one_query_head_against_several_key_heads():
    q, _ = gaussian_qk((2, 1), 50, 8, seed=14)
    _, k = gaussian_qk((2, 3), 50, 8, seed=15)
    st = streaming_stats(q, k)
    assert st.backend == "torch" and st.entropy.shape == (2, 3, 50)  # auto on the CPU: PyTorch
    check_against_dense(q.expand(2, 3, 50, 8), k, torch.ones(1, 50, 50, dtype=torch.bool), st)


def test_half_inputs_computed_in_float64_on_cpu():
    q, k = gaussian_qk((2,), 64, 16, seed=9)
    qh, kh = q.to(torch.bfloat16), k.to(torch.bfloat16)
    st = streaming_stats(qh, kh)
    assert st.entropy.dtype == torch.float64
    valid = torch.ones(1, 64, 64, dtype=torch.bool)
    check_against_dense(qh.double(), kh.double(), valid, st)


def test_no_valid_entry():
    q, k = gaussian_qk((2,), 10, 4, seed=10)
    mask = torch.ones(2, 10, 10, dtype=torch.bool)
    mask[0, 3] = False
    st = streaming_stats(q, k, mask=mask)
    assert torch.isnan(st.entropy[0, 3]) and torch.isnan(st.lse[0, 3]) and st.row_count[0, 3] == 0
    assert not torch.isnan(st.entropy[1]).any()
    mask[1] = False
    with pytest.raises(ValueError, match=r"mask: no valid entry in the matrix at batch index \(1,\)"):
        streaming_stats(q, k, mask=mask)


def test_bad_input():
    q, k = gaussian_qk((2, 4), 10, 8, seed=11)
    with pytest.raises(TypeError, match="q: expected a torch.Tensor"):
        streaming_stats(q.numpy(), k)
    with pytest.raises(ValueError, match="head dims differ"):
        streaming_stats(q, k[..., :4])
    with pytest.raises(ValueError, match="scale: expected a positive"):
        streaming_stats(q, k, scale=-1.0)
    with pytest.raises(ValueError, match="4 query heads and 3 key heads"):
        streaming_stats(q, k[:, :3])
    with pytest.raises(TypeError, match="mask: expected dtype torch.bool"):
        streaming_stats(q, k, mask=torch.ones(10, 10))
    with pytest.raises(ValueError, match="mask: shape"):
        streaming_stats(q, k, mask=torch.ones(3, 10, 10, dtype=torch.bool))
    with pytest.raises(ValueError, match="causal: expects as many queries as keys"):
        streaming_stats(q, k[..., :5, :], causal=True)
    bad = k.clone()
    bad[1, 2, 3, 4] = math.inf
    with pytest.raises(ValueError, match=r"k: expected finite values, found inf at index \(1, 2, 3, 4\)"):
        streaming_stats(q, bad)
    with pytest.raises(ValueError, match="backend"):
        streaming_stats(q, k, backend="cuda")
    with pytest.raises(ValueError, match="block_size"):
        streaming_stats(q, k, block_size=0)


def test_triangle_index():
    f = torch.arange(200_000)
    i, j = _triangle_index(f)
    rows = torch.repeat_interleave(torch.arange(700), torch.arange(1, 701))[: f.numel()]
    assert torch.equal(i, rows)
    assert torch.equal(j, f - rows * (rows + 1) // 2)
    # Near the end of a 128k-token triangle, where float64 square roots are no longer exact.
    n = 131072
    last = torch.tensor([n * (n + 1) // 2 - 1, n * (n - 1) // 2, n * (n - 1) // 2 - 1])
    i, j = _triangle_index(last)
    assert i.tolist() == [n - 1, n - 1, n - 2] and j.tolist() == [n - 1, 0, n - 2]


def test_log_samples_all_entries_equal_dense():
    n = 120
    q, k = gaussian_qk((2,), n, 16, 1.2, 1.2, seed=12)
    mask = torch.ones(2, 1, n, dtype=torch.bool)
    mask[1, :, 90:] = False
    valid = mask & torch.ones(n, n, dtype=torch.bool).tril()
    p = softmax_attention(q, k, mask=valid)
    got = sample_log_probs(q, k, mask=mask, causal=True)
    want = log_entries(p, valid)
    for a, b in zip(got, want):
        assert a.shape == b.shape
        assert torch.allclose(a, b, rtol=0, atol=1e-12)
    fa, fb = streaming_lognormal_fit(q, k, mask=mask, causal=True), lognormal_fit(p, valid)
    for f in ("mu", "sigma", "ks_statistic", "ad_statistic", "skew", "excess_kurtosis"):
        assert torch.allclose(getattr(fa, f), getattr(fb, f), rtol=1e-9, atol=1e-12), f
    assert torch.equal(fa.n, fb.n)


def test_log_samples_subsample_valid_and_distinct():
    n = 300
    q, k = gaussian_qk((1,), n, 16, 1.2, 1.2, seed=13)
    mask = torch.ones(1, 1, n, dtype=torch.bool)
    mask[..., 250:] = False
    valid = mask & torch.ones(n, n, dtype=torch.bool).tril()
    p = softmax_attention(q, k, mask=valid)
    dense = np.sort(torch.log(p[valid]).numpy())
    (got,) = sample_log_probs(q, k, mask=mask, causal=True, max_samples=5000, seed=3)
    assert got.numel() == 5000
    assert torch.unique(got).numel() == 5000  # distinct entries (continuous values)
    pos = np.clip(np.searchsorted(dense, got.numpy()), 1, dense.size - 1)
    nearest = np.minimum(np.abs(dense[pos] - got.numpy()), np.abs(dense[pos - 1] - got.numpy()))
    assert nearest.max() < 1e-9  # every sampled value is a valid entry of the dense matrix
    again = sample_log_probs(q, k, mask=mask, causal=True, max_samples=5000, seed=3)[0]
    assert torch.equal(got, again)
    with pytest.raises(ValueError, match="max_samples"):
        sample_log_probs(q, k, max_samples=2)


def test_auto_falls_back_when_the_kernel_fails(monkeypatch):
    # A GPU the Triton kernel does not compile for: "auto" warns and uses the PyTorch path.
    import attnstats.stats.online as streaming
    from attnstats.stats import online_triton as streaming_triton

    def broken(*args, **kwargs):
        raise RuntimeError("out of resource: shared memory")

    monkeypatch.setattr(streaming, "_use_triton", lambda q, mask: True)
    monkeypatch.setattr(streaming_triton, "row_accumulators", broken)
    q, k = gaussian_qk((2,), 30, 8, seed=16)
    with pytest.warns(RuntimeWarning, match="the Triton kernel failed"):
        st = streaming_stats(q, k)
    assert st.backend == "torch"
    check_against_dense(q, k, torch.ones(1, 30, 30, dtype=torch.bool), st)
    with pytest.raises(RuntimeError, match="out of resource"):
        streaming_stats(q, k, backend="triton")


def test_log_samples_under_a_sparse_padding_mask():
    # 1024 queries, only a few valid keys: 0.4–0.5 % of the entries are valid
    q, k = gaussian_qk((1, 1), 1024, 8, seed=21)
    for keep, max_samples in ((4, 5000), (5, 5000)):
        pad = torch.zeros(1, 1, 1, 1024, dtype=torch.bool)
        pad[..., :keep] = True
        dense = torch.log(softmax_attention(q, k, pad))[..., :keep].reshape(-1)
        got = sample_log_probs(q, k, mask=pad, max_samples=max_samples, seed=3)[0]
        if keep * 1024 <= max_samples:  # every valid entry, in row-major order, as the dense sampler
            torch.testing.assert_close(got, dense, rtol=1e-12, atol=1e-12)
        else:  # a sample of distinct valid entries
            assert got.numel() == max_samples
            near = (got[:, None] - dense[None, :]).abs().min(1).values
            assert float(near.max()) < 1e-12


def masks_of_every_form(n, seed):
    """(mask for sample_log_probs, causal, the dense valid mask [B, H, n, n]) for every mask form."""
    g = torch.Generator().manual_seed(seed)
    tril = torch.ones(n, n, dtype=torch.bool).tril()
    keys = torch.ones(2, 1, 1, n, dtype=torch.bool)
    keys[1, ..., n - 9 :] = False
    full = torch.rand(2, 2, n, n, generator=g) > 0.4
    out = [(None, False, torch.ones(1, 1, n, n, dtype=torch.bool)), (None, True, tril[None, None])]
    out += [(keys, False, keys & torch.ones(n, n, dtype=torch.bool)), (keys, True, keys & tril)]
    out += [(full, False, full), (full, True, full & tril)]
    return out


@pytest.mark.parametrize("max_samples", [10_000, 300])  # every valid entry; a sample of them
def test_log_samples_are_the_dense_samplers_entries(max_samples):
    # log_entries (dense) and sample_log_probs (q, k) enumerate the valid entries alike and draw the
    # same ranks, for every mask form: the values agree to float64 rounding of ln P (~1e-15 · |ln P|).
    n = 40
    q, k = gaussian_qk((2, 2), n, 8, 1.3, 1.3, seed=30)
    for form, (mask, causal, valid) in enumerate(masks_of_every_form(n, seed=31)):
        p = softmax_attention(q, k, valid)
        want = log_entries(p, valid, max_samples=max_samples, seed=5)
        got = sample_log_probs(q, k, mask=mask, causal=causal, max_samples=max_samples, seed=5)
        for a, b in zip(got, want):
            assert a.shape == b.shape, form
            torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
        assert max(v.numel() for v in got) == min(max_samples, int(valid.expand(p.shape).sum((-2, -1)).max()))


def test_log_samples_of_a_batch_split_in_parts_equal_the_whole():
    # record(..., store="stats") fits one batch element at a time: first_matrix gives each matrix the
    # sample it has in the whole batch.
    q, k = gaussian_qk((3, 2), 30, 8, seed=32)
    whole = sample_log_probs(q, k, max_samples=100, seed=2)
    for b in range(3):
        part = sample_log_probs(q[b : b + 1], k[b : b + 1], max_samples=100, seed=2, first_matrix=2 * b)
        for h in range(2):
            assert torch.equal(part[h], whole[2 * b + h])
    assert not torch.equal(whole[0], whole[1])  # each matrix has its own draw
    with pytest.raises(ValueError, match="first_matrix"):
        sample_log_probs(q, k, first_matrix=-1)
    with pytest.raises(ValueError, match="seed"):
        sample_log_probs(q, k, seed=True)


def test_log_samples_of_a_matrix_with_no_valid_entry_name_it():
    q, k = gaussian_qk((2, 3), 6, 4, seed=33)
    keys = torch.ones(2, 1, 1, 6, dtype=torch.bool)
    keys[1] = False
    for fn in (sample_log_probs, streaming_lognormal_fit):
        with pytest.raises(ValueError, match=r"mask: no valid entry in the matrix at batch index \(1, 0\)"):
            fn(q, k, mask=keys)
    full = torch.ones(2, 3, 6, 6, dtype=torch.bool)
    full[0, 2] = torch.ones(6, 6, dtype=torch.bool).triu(1)  # nothing on or below the diagonal
    with pytest.raises(ValueError, match=r"batch index \(0, 2\)"):
        sample_log_probs(q, k, mask=full, causal=True)


def lowbias32(x: int) -> int:
    """The reference hash in Python integers (unbounded, masked to 32 bits by hand)."""
    x ^= x >> 16
    x = (x * 0x7FEB352D) & 0xFFFFFFFF
    x ^= x >> 15
    x = (x * 0x846CA68B) & 0xFFFFFFFF
    return x ^ (x >> 16)


def test_hash32_equals_the_integer_reference():
    from attnstats.stats.sampling import hash32

    xs = [0, 1, 2, 0xFFFF, 0x10000, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF] + list(range(12345, 2_000_000, 99991))
    got = hash32(torch.tensor(xs, dtype=torch.int64)).tolist()
    assert got == [lowbias32(x) for x in xs]


@pytest.mark.parametrize("count", [1000, 100_000, 10**12])
def test_sample_ranks_are_distinct_stratified_and_reproducible(count):
    from attnstats.stats.sampling import sample_ranks

    size = 200
    r = sample_ranks(count, size, 0, 0)
    assert r.numel() == size and torch.equal(r, r.sort().values) and torch.unique(r).numel() == size
    # one rank in each run [⌊i·count/size⌋, ⌊(i+1)·count/size⌋), computed here in Python integers
    bounds = [(i * count) // size for i in range(size + 1)]
    assert all(bounds[i] <= int(r[i]) < bounds[i + 1] for i in range(size))
    assert torch.equal(r, sample_ranks(count, size, 0, 0))
    batch = sample_ranks(count, size, 0, torch.arange(3))  # the batched draw is row by row the single one
    assert batch.shape == (3, size) and all(torch.equal(batch[t], sample_ranks(count, size, 0, t)) for t in range(3))
    assert not torch.equal(batch[0], batch[1]) and not torch.equal(r, sample_ranks(count, size, 1, 0))
    assert torch.equal(sample_ranks(size - 1, size, 0, 0), torch.arange(size - 1))


def test_sample_ranks_take_every_entry_equally_often():
    # count = 50, size = 10: each entry is in one run of 5 and is drawn with probability 1/5. Over
    # 4000 (seed, matrix) pairs its count is Binomial(4000, 0.2): mean 800, sd 25.3. The chi-square
    # statistic of the 50 counts (49 degrees of freedom) lies below 100 with probability 1 − 1e-5.
    from attnstats.stats.sampling import sample_ranks

    counts = torch.zeros(50)
    for seed in range(40):
        r = sample_ranks(50, 10, seed, torch.arange(100))  # [100, 10]
        counts += torch.bincount(r.reshape(-1), minlength=50)
    expect = 4000 * 10 / 50
    chi2 = float(((counts - expect) ** 2 / (expect * (1 - 0.2))).sum())
    assert chi2 < 100, chi2
