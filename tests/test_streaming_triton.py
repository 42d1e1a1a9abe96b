"""The fused Triton kernels against dense float64 attention, on the CPU under TRITON_INTERPRET=1.

Triton reads TRITON_INTERPRET when a kernel is decorated, i.e. when attnstats.stats.online_triton is
first imported, so the check runs in a fresh interpreter with the variable set. Sizes are tiny:
the interpreter runs each program in Python. bf16 is checked on the GPU only
(benchmarks/streaming_gpu.py): the interpreter has no bf16 arithmetic.
"""
import textwrap

import pytest
from helpers import run_interpreted

pytest.importorskip("triton")

SCRIPT = textwrap.dedent(
    """
    import math, torch
    from attnstats.stats import online_triton as streaming_triton
    from attnstats.stats.qk import streaming_stats
    from attnstats.stats.dense import entry_moments, row_entropy

    assert streaming_triton.available()

    def rel(a, b):
        a, b = a.double(), b.double()
        assert torch.equal(torch.isnan(a), torch.isnan(b))
        ok = ~torch.isnan(b)
        return float((a[ok] - b[ok]).abs().max() / b[ok].abs().max())

    def dense(q, k, valid, scale):
        s = (q.double() @ k.double().transpose(-1, -2)) * scale
        s = s.masked_fill(~valid, -math.inf)
        lse = torch.logsumexp(s, -1).masked_fill(~valid.any(-1), math.nan)  # no valid key: no LSE
        p = torch.softmax(s, -1)
        return p, lse

    g = torch.Generator().manual_seed(0)
    worst = 0.0
    # (n, d, hq, hk, causal, padded, dtype): sizes not multiples of the 16-wide tiles, GQA, padding
    for n, d, hq, hk, causal, padded, dt in [
        (40, 16, 2, 2, False, False, torch.float32),
        (37, 32, 4, 2, True, True, torch.float16),
        (33, 16, 2, 1, False, True, torch.float32),
    ]:
        q = (torch.randn(2, hq, n, d, generator=g) * 1.3).to(dt)
        k = (torch.randn(2, hk, n, d, generator=g) * 1.1).to(dt)
        mask = torch.ones(2, 1, 1, n, dtype=torch.bool)
        if padded:
            mask[0, ..., :5] = False
            mask[1, ..., n - 9:] = False
        st = streaming_stats(q, k, mask=mask if padded else None, causal=causal, backend="triton")
        assert st.backend == "triton"
        valid = mask.expand(2, hq, n, n).clone()
        if causal:
            valid &= torch.ones(n, n, dtype=torch.bool).tril()
        kr = k.repeat_interleave(hq // hk, dim=1)
        p, lse = dense(q, kr, valid, d ** -0.5)
        em = entry_moments(p, valid)
        errs = [rel(st.entropy, row_entropy(p, valid)), rel(st.lse, lse), rel(st.sum_p2, (p * p).sum(-1))]
        errs += [rel(getattr(st.entry_moments, f), getattr(em, f)) for f in ("mean", "var", "log_mean", "log_var")]
        assert torch.equal(st.row_count, valid.sum(-1)), "row counts"
        worst = max(worst, max(errs))

    # Mixed precision: float16 queries with float32 keys keep the keys' precision.
    q = (torch.randn(1, 2, 30, 16, generator=g) * 1.3).half()
    k = torch.randn(1, 2, 30, 16, generator=g) * 3.0
    st = streaming_stats(q, k, backend="triton")
    p, _ = dense(q, k, torch.ones(30, 30, dtype=torch.bool), 16 ** -0.5)
    worst = max(worst, rel(st.sum_p2, (p * p).sum(-1)), rel(st.entropy, row_entropy(p)))

    # The fused product P x of the matrix-free spectral gap.
    n, d = 45, 16
    q = torch.randn(n, d, generator=g) * 1.3
    k = torch.randn(n, d, generator=g) * 1.3
    x = torch.randn(n, 3, generator=g)
    st = streaming_stats(q, k, backend="triton")
    y = streaming_triton.attention_products(q[None], k[None], st.lse[None], x.float()[None], d ** -0.5)[0]
    p, _ = dense(q, k, torch.ones(n, n, dtype=torch.bool), d ** -0.5)
    worst = max(worst, rel(y, p @ x.double()))
    # ... and its transpose Pᵀ x, the product that certifies the gap (left eigenvectors)
    sums = streaming_triton.attention_row_sums(q[None], k[None], st.lse[None], d ** -0.5)[0]
    yt = streaming_triton.attention_products(q[None], k[None], st.lse[None], x.float()[None], d ** -0.5,
                                             transpose=True, row_sums=sums[None])[0]
    worst = max(worst, rel(sums, torch.ones(n, dtype=torch.float64)), rel(yt, p.T @ x.double()))
    # ... for several heads in one launch, on a listed subset of them in another order, with a block
    # of 20 columns (the kernel's 32-column width)
    q3 = torch.randn(3, n, d, generator=g) * 1.3
    k3 = torch.randn(3, n, d, generator=g) * 1.3
    x3 = torch.randn(2, n, 20, generator=g)
    lse3 = streaming_stats(q3, k3, backend="triton").lse  # [3, n]
    heads = torch.tensor([2, 0])
    p3, _ = dense(q3, k3, torch.ones(n, n, dtype=torch.bool), d ** -0.5)  # [3, n, n]
    sums3 = streaming_triton.attention_row_sums(q3, k3, lse3, d ** -0.5)
    y3 = streaming_triton.attention_products(q3, k3, lse3, x3.float(), d ** -0.5, heads=heads)
    yt3 = streaming_triton.attention_products(q3, k3, lse3, x3.float(), d ** -0.5, heads=heads, transpose=True, row_sums=sums3)
    worst = max(worst, rel(y3, p3[heads] @ x3.double()), rel(yt3, p3[heads].transpose(1, 2) @ x3.double()))

    # The batched spectral-gap solver on the fused products (all heads at once, then the unfinished
    # ones listed, P and Pᵀ): certified at the float32 threshold, and within its own bound of dense.
    import numpy as np
    from attnstats.stats.spectral import spectral_gap_from_qk
    q3 = torch.randn(2, 70, 16, generator=g) * 1.2
    k3 = torch.randn(2, 70, 16, generator=g) * 1.2
    r = spectral_gap_from_qk(q3, k3, method="krylov", backend="triton")
    p3, _ = dense(q3, k3, torch.ones(70, 70, dtype=torch.bool), 0.25)
    assert r.method == "krylov" and bool(r.certified.all()), r
    for h in range(2):
        ev = np.sort(np.abs(np.linalg.eigvals(p3[h].numpy())))[::-1]
        err = abs(float(r.gap[h]) - (1 - ev[1]))
        assert err <= 2 * float(r.error_bound[h]) + 1e-7 and err < 1e-4, (h, err, r.error_bound)

    # ln P at sampled entries (the log-normal fit's sample), GQA, strided q: against a float64 dense
    # log-softmax read at the same entries, and the PyTorch twin, whose float64 arithmetic it repeats.
    from attnstats.stats.qk import sampled_scores_reference
    q = (torch.randn(2, 7, 4, 16, generator=g) * 1.3).transpose(1, 2)  # [2, 4, 7, 16], not contiguous
    k = torch.randn(2, 2, 9, 16, generator=g)
    lse = torch.randn(2, 4, 7, generator=g)
    i = torch.randint(0, 7, (8, 21), generator=g)
    j = torch.randint(0, 9, (8, 21), generator=g)
    got = streaming_triton.sampled_log_probs(q, k, lse, i, j, 0.25)
    ref = sampled_scores_reference(q, k, lse, i, j, 0.25)
    s = (q.double() @ k.double().repeat_interleave(2, dim=1).transpose(-1, -2)) * 0.25 - lse.double()[..., None]
    t = torch.arange(8)
    dense_at = s.reshape(8, 7, 9)[t[:, None], i, j]
    worst = max(worst, rel(got, dense_at), rel(got, ref))
    # stored as float32: the same float64 values rounded once (the kernel casts at its store, as .float())
    got32 = streaming_triton.sampled_log_probs(q, k, lse, i, j, 0.25, dtype=torch.float32)
    assert got32.dtype == torch.float32 and torch.equal(got32, got.float())

    # The same with the entries drawn inside the kernel: the ranks of sample_ranks, mapped row-major
    # (lower triangle when causal), seen through the values they give.
    from attnstats.stats.qk import _entries_of_ranks
    from attnstats.stats.sampling import sample_ranks
    k = torch.randn(2, 2, 7, 16, generator=g)
    for causal, count in ((False, 49), (True, 28)):
        idx = torch.arange(5, 13)  # a call whose first matrix is 5 of a larger batch
        got = streaming_triton.sampled_log_probs(q, k, lse, None, None, 0.25, draw=(count, 11, 3, 5, causal))
        ii, jj = _entries_of_ranks(sample_ranks(count, 11, 3, idx), None, 7, 7, causal)
        ref = sampled_scores_reference(q, k, lse, ii, jj, 0.25)
        assert torch.equal(torch.isnan(got), torch.isnan(ref))
        worst = max(worst, rel(got, ref))
    # The per-matrix merge of the rows (one launch on a GPU) against its reference, moments_from_rows:
    # float64 sums of the same float32 rows in another order, so they agree to float64 rounding
    # (a few hundred terms: ~1e-14 relative); rows with no valid key (NaN fields) and a matrix with none.
    from attnstats.stats.online import RowAccumulators, moments_from_rows
    nq = 150  # more rows than one step of the merge's loop
    cnt = torch.randint(0, 40, (2, 3, nq), generator=g)
    cnt[0, 0] = 0
    cnt[1, 2, :7] = 0
    f32 = lambda *shape: torch.rand(*shape, generator=g, dtype=torch.float64).float()  # noqa: E731
    lse, sp2, s_mean, s_m2 = f32(2, 3, nq) * 5, f32(2, 3, nq), f32(2, 3, nq) * 3 - 1, f32(2, 3, nq) * 2
    for x in (lse, sp2, s_mean, s_m2):
        x[cnt == 0] = math.nan
    rows = RowAccumulators(lse=lse, entropy=torch.zeros_like(lse), sum_p2=sp2, count=cnt, s_mean=s_mean, s_m2=s_m2)
    ref = moments_from_rows(rows)
    got = streaming_triton.row_moments(cnt, sp2, lse, s_mean, s_m2)
    merge = max(rel(got[i], getattr(ref, f)) for i, f in enumerate(("mean", "var", "log_mean", "log_var")))
    assert torch.equal(got[4].round().long(), ref.count), "merge counts"
    print("MERGE", merge)
    # Per-head Σx and Σx² (the temperature's σ on a GPU) against torch's float64 sums of the same values:
    # float64 sums in another order of ~1e3 terms, so within ~1e-13 of the sum of |terms|; a strided
    # (transposed) input and a length over one program's rows.
    x = torch.randn(2, 40, 3, 24, generator=g).to(torch.float16).transpose(1, 2)  # [2, 3, 40, 24], strided
    got = streaming_triton.head_sums(x)
    ref1 = torch.sum(x, (-2, -1), dtype=torch.float64)
    ref2 = torch.sum(x.double() ** 2, (-2, -1))
    size1 = torch.sum(x.double().abs(), (-2, -1))
    hsums = max(float(((got[..., 0] - ref1).abs() / size1).max()), float(((got[..., 1] - ref2).abs() / ref2).max()))
    print("HEADSUMS", hsums)
    # The causal gap's diagonal ln P_ii through the sampler's kernel, against float64 q_i·k_i (GQA k)
    q = torch.randn(1, 4, 21, 16, generator=g)
    k = torch.randn(1, 2, 21, 16, generator=g)
    lse = torch.randn(1, 4, 21, generator=g).float()
    kx = k.repeat_interleave(2, dim=1)
    ref = (q.double() * kx.double()).sum(-1) * 0.3 - lse.double()
    got = streaming_triton.sampled_log_probs(q, k, lse, *(torch.arange(21).expand(4, 21),) * 2, 0.3).reshape(1, 4, 21)
    print("DIAG", float((got - ref).abs().max() / ref.abs().max()))
    print("WORST", worst)
    """
)


@pytest.mark.skipif(
    tuple(int(x) for x in __import__("triton").__version__.split(".")[:2]) < (3, 9),
    reason="older Triton interpreters cannot run this kernel (TypeError seen under 3.6); the compiled kernel "
    "is checked on the GPU by benchmarks/streaming_gpu.py",
)
def test_triton_kernels_under_interpreter():
    stdout = run_interpreted(SCRIPT)
    worst = float(stdout.split("WORST")[-1])
    # float32 accumulation of a few dozen terms: far under 1e-5 relative.
    assert worst < 1e-5, worst
    merge = float(stdout.split("MERGE")[-1].split()[0])
    assert merge < 1e-12, merge  # float64 sums in another order
    assert float(stdout.split("HEADSUMS")[-1].split()[0]) < 1e-13
    # float64 dot products of float32 values (exact products, 16 terms): float64 rounding only
    assert float(stdout.split("DIAG")[-1].split()[0]) < 1e-14
