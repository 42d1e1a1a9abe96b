"""Triton kernels for the batched log-normal fit: the sums over each sorted row in four launches.

:func:`attnstats.stats.lognormal.fit_log_values_batched` fits every row of a ``[M, W]`` table of
``ln P`` samples at once. After the sort, its PyTorch form makes some 25 float64 passes over the
table (masks, deviations, powers, the normal cdf and two log-cdfs, products with the ranks); under
``record(..., store="stats")`` on an H100, 32 rows of 100,000 samples per layer of 32 heads, that is
~0.75 ms of kernels a layer. Here each pass that needs a row-wide number first is one launch over ``(row, chunk)``
programs, writing per-chunk partial sums that a few small PyTorch operations combine:

1. ``Σ y`` (the mean);
2. ``Σ d², Σ d³, Σ d⁴`` with ``d = y − mean`` (the central moments);
3. the Kolmogorov–Smirnov maxima ``max (i+1)/n − Φ(z_i)``, ``max Φ(z_i) − i/n`` and the
   Anderson–Darling sum, in which sample ``j`` of the sorted row contributes
   ``(2j+1)/n·ln Φ(w_j) + (2n−2j−1)/n·ln Φ(−w_j)`` (the reversed index of scipy's formula moved onto
   the sample itself, so no gather).

Every sum is float64 from the float64 samples, as the PyTorch form; only the order of the additions
differs. ``ln Φ`` needs the normal tail to relative accuracy: ``erfc(x)`` is ``1 − erf(x)`` below
``x = 2`` (relative error under 5e-14 there) and a 60-term continued fraction of ``erfcx`` above it
(within 4e-15 relative of ``scipy.special.erfcx`` from ``x = 2`` to ``1e8``), in logs, so nothing
underflows. The PyTorch form in :mod:`attnstats.stats.lognormal` is the reference, and the
tests check one against the other under ``TRITON_INTERPRET=1``.
"""
from __future__ import annotations

import torch

from ..triton_launch import interpreting, launch, on_device
from .online_triton import _HAVE_TRITON, available

__all__ = ["available", "sorted_row_sums"]

if _HAVE_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _log_erfc(x):
        # ln erfc(x) for x ≥ 0, float64: 1 − erf below 2, else ln erfcx(x) − x² by the continued fraction
        # erfcx(x) = 1/(√π K), K = x + (1/2)/(x + 1/(x + (3/2)/(x + …))), to its 60th term. K is the ratio
        # of the convergents A_n = x·A_{n−1} + (n/2)·A_{n−2} (B_n alike), here divided by xⁿ so that they
        # stay bounded for any x (a_n = a_{n−1} + (n/2)/x²·a_{n−2}): multiply-adds, no division per term.
        xc = tl.maximum(x, 2.0)  # the unused branch stays finite
        c = 0.5 / (xc * xc)
        a_prev = xc  # A_{−1}·x
        a_cur = xc  # A_0
        b_prev = tl.zeros(xc.shape, tl.float64)  # B_{−1}·x
        b_cur = tl.full(xc.shape, 1.0, tl.float64)  # B_0
        for n in tl.static_range(1, 61):
            a_prev, a_cur = a_cur, a_cur + (n * c) * a_prev
            b_prev, b_cur = b_cur, b_cur + (n * c) * b_prev
        tail = -tl.log(a_cur / b_cur * 1.7724538509055159) - xc * xc  # √π
        return tl.where(x < 2.0, tl.log(1.0 - tl.math.erf(tl.minimum(x, 2.0))), tail)

    @triton.jit
    def _log_ndtr_pair(w):
        # (ln Φ(w), ln Φ(−w)), float64, for any w, from one ln erfc(|w|/√2): the tail side is
        # ln(erfc/2), the other ln(1 − erfc/2)
        le = _log_erfc(tl.abs(w) * 0.7071067811865476)
        tail = le - 0.6931471805599453
        body = tl.log(1.0 - 0.5 * tl.exp(le))
        return tl.where(w < 0.0, tail, body), tl.where(w < 0.0, body, tail)

    @triton.jit
    def _sum_kernel(Y, CNT, OUT, W, CHUNKS, CHUNK: tl.constexpr, BLOCK: tl.constexpr):
        # OUT[r, c] = Σ y over the valid samples of row r in chunk c; Y [M, W] float64, CNT [M] int64.
        r = tl.program_id(0)
        c = tl.program_id(1)
        n = tl.load(CNT + r)
        acc = tl.zeros([BLOCK], dtype=tl.float64)
        for j0 in range(c * CHUNK, c * CHUNK + CHUNK, BLOCK):
            j = j0 + tl.arange(0, BLOCK)  # [BLOCK] sample ranks
            ok = (j < n) & (j < W)
            acc += tl.load(Y + r.to(tl.int64) * W + j, mask=ok, other=0.0)
        tl.store(OUT + r * CHUNKS + c, tl.sum(acc, 0))

    @triton.jit
    def _row_sum(PART, r, CHUNKS, STRIDE: tl.constexpr, FIELD: tl.constexpr, BLOCK_C: tl.constexpr):
        # Σ over the chunks of row r of a partial table [M, CHUNKS, STRIDE], field FIELD: every kernel
        # sums a row's partials in this one order, so all of them see the same mean and moments
        cc = tl.arange(0, BLOCK_C)
        return tl.sum(tl.load(PART + (r * CHUNKS + cc) * STRIDE + FIELD, mask=cc < CHUNKS, other=0.0), 0)

    @triton.jit
    def _central_kernel(Y, CNT, PART1, OUT, W, CHUNKS, CHUNK: tl.constexpr, BLOCK: tl.constexpr,
                        BLOCK_C: tl.constexpr):
        # OUT[r, c, :] = Σ d², Σ d³, Σ d⁴ with d = y − mean; the mean from the partial sums PART1 [M, CHUNKS]
        r = tl.program_id(0)
        c = tl.program_id(1)
        n = tl.load(CNT + r)
        mu = _row_sum(PART1, r, CHUNKS, 1, 0, BLOCK_C) / tl.maximum(n, 1).to(tl.float64)
        a2 = tl.zeros([BLOCK], dtype=tl.float64)
        a3 = tl.zeros([BLOCK], dtype=tl.float64)
        a4 = tl.zeros([BLOCK], dtype=tl.float64)
        for j0 in range(c * CHUNK, c * CHUNK + CHUNK, BLOCK):
            j = j0 + tl.arange(0, BLOCK)
            ok = (j < n) & (j < W)
            d = tl.where(ok, tl.load(Y + r.to(tl.int64) * W + j, mask=ok, other=0.0) - mu, 0.0)  # [BLOCK]
            d2 = d * d
            a2 += d2
            a3 += d2 * d
            a4 += d2 * d2
        out = OUT + (r * CHUNKS + c) * 3
        tl.store(out, tl.sum(a2, 0))
        tl.store(out + 1, tl.sum(a3, 0))
        tl.store(out + 2, tl.sum(a4, 0))

    @triton.jit
    def _tests_kernel(Y, CNT, PART1, PART3, OUT, W, CHUNKS, CHUNK: tl.constexpr, BLOCK: tl.constexpr,
                      BLOCK_C: tl.constexpr):
        # OUT[r, c, :] = max (j+1)/n − Φ(z_j), max Φ(z_j) − j/n (z = d/σ, σ the n-std), and the
        # Anderson–Darling sum Σ (2j+1)/n·ln Φ(w_j) + (2n−2j−1)/n·ln Φ(−w_j) (w = d/s, s the (n−1)-std),
        # over the valid samples j of chunk c; mean and spread from the partials PART1, PART3
        r = tl.program_id(0)
        c = tl.program_id(1)
        n = tl.load(CNT + r)
        nf = tl.maximum(n, 1).to(tl.float64)
        mu = _row_sum(PART1, r, CHUNKS, 1, 0, BLOCK_C) / nf
        m2 = _row_sum(PART3, r, CHUNKS, 3, 0, BLOCK_C) / nf
        sigma = tl.sqrt(m2)
        sigma = tl.where(sigma > 0.0, sigma, 1.0)
        s1 = tl.sqrt(m2 * nf / tl.maximum(nf - 1.0, 1.0))
        s1 = tl.where(s1 > 0.0, s1, 1.0)
        dplus = tl.full([BLOCK], float("-inf"), dtype=tl.float64)
        dminus = tl.full([BLOCK], float("-inf"), dtype=tl.float64)
        ad = tl.zeros([BLOCK], dtype=tl.float64)
        for j0 in range(c * CHUNK, c * CHUNK + CHUNK, BLOCK):
            j = j0 + tl.arange(0, BLOCK)
            ok = (j < n) & (j < W)
            d = tl.load(Y + r.to(tl.int64) * W + j, mask=ok, other=0.0) - mu  # [BLOCK]
            cdf = 0.5 * (1.0 + tl.math.erf(d / sigma * 0.7071067811865476))  # Φ(z), to float64's absolute rounding
            jf = j.to(tl.float64)
            dplus = tl.maximum(dplus, tl.where(ok, (jf + 1.0) / nf - cdf, float("-inf")))
            dminus = tl.maximum(dminus, tl.where(ok, cdf - jf / nf, float("-inf")))
            w = d / s1
            log_cdf, log_sf = _log_ndtr_pair(w)
            term = (2.0 * jf + 1.0) / nf * log_cdf + (2.0 * nf - 2.0 * jf - 1.0) / nf * log_sf
            ad += tl.where(ok, term, 0.0)
        out = OUT + (r * CHUNKS + c) * 3
        tl.store(out, tl.max(dplus, 0))
        tl.store(out + 1, tl.max(dminus, 0))
        tl.store(out + 2, tl.sum(ad, 0))

    @triton.jit
    def _finish_kernel(CNT, PART1, PART3, TESTS, OUT, M, CHUNKS, BLOCK_C: tl.constexpr):
        # OUT[:, r] = mean, m2, m3, m4, KS D, A² of row r from the three partial tables
        r = tl.program_id(0)
        nf = tl.maximum(tl.load(CNT + r), 1).to(tl.float64)
        cc = tl.arange(0, BLOCK_C)
        tests = TESTS + (r * CHUNKS + cc) * 3
        dplus = tl.max(tl.load(tests, mask=cc < CHUNKS, other=float("-inf")), 0)
        dminus = tl.max(tl.load(tests + 1, mask=cc < CHUNKS, other=float("-inf")), 0)
        tl.store(OUT + r, _row_sum(PART1, r, CHUNKS, 1, 0, BLOCK_C) / nf)
        tl.store(OUT + M + r, _row_sum(PART3, r, CHUNKS, 3, 0, BLOCK_C) / nf)
        tl.store(OUT + 2 * M + r, _row_sum(PART3, r, CHUNKS, 3, 1, BLOCK_C) / nf)
        tl.store(OUT + 3 * M + r, _row_sum(PART3, r, CHUNKS, 3, 2, BLOCK_C) / nf)
        tl.store(OUT + 4 * M + r, tl.maximum(dplus, dminus))
        tl.store(OUT + 5 * M + r, -nf - _row_sum(TESTS, r, CHUNKS, 3, 2, BLOCK_C))


def sorted_row_sums(y: torch.Tensor, cnt: torch.Tensor):
    """The fit's sums over sorted rows ``y: [M, W]`` float64 (row ``r`` valid in its first ``cnt[r]``
    entries, ``cnt: [M]`` int64), on y's device in four launches (the three passes and one that
    combines their partial sums) and no host sync.

    Returns:
        ``(mu, m2, m3, m4, ks, ad)``, each ``[M]`` float64: the mean, the central moments (``Σ dᵏ/n``),
        the Kolmogorov–Smirnov ``D`` against ``N(mu, m2)`` and the Anderson–Darling ``A²`` (standardised
        by the ``n − 1`` std), as the PyTorch form of :func:`attnstats.stats.lognormal.fit_log_values_batched`
        computes them. Rows with no valid sample give NaN or ±inf; the caller masks rows that admit no fit.
    """
    if not _HAVE_TRITON:
        raise ImportError("the fused fit needs Triton: pip install 'attnstats[triton]'")
    m, width = y.shape
    y = y.contiguous()
    cnt = cnt.to(torch.int64).contiguous()
    chunk, block = (32, 16) if interpreting() else (4096, 256)
    chunks = max(1, triton.cdiv(width, chunk))
    grid = (m, chunks)
    meta = {"CHUNK": chunk, "BLOCK": block}
    block_c = triton.next_power_of_2(chunks)
    buf = torch.empty(7 * m * chunks + 6 * m, dtype=torch.float64, device=y.device)  # every partial, one allocation
    part1 = buf[: m * chunks]  # [M, C] Σ y
    part3 = buf[m * chunks : 4 * m * chunks]  # [M, C, 3] Σ d², Σ d³, Σ d⁴
    tests = buf[4 * m * chunks : 7 * m * chunks]  # [M, C, 3] D⁺, D⁻, A² sum
    out = buf[7 * m * chunks :]  # [6, M]
    if m:
        with on_device(y):
            launch(_sum_kernel, grid, y, cnt, part1, width, chunks, **meta)
            launch(_central_kernel, grid, y, cnt, part1, part3, width, chunks, **meta, BLOCK_C=block_c)
            launch(_tests_kernel, grid, y, cnt, part1, part3, tests, width, chunks, **meta, BLOCK_C=block_c)
            launch(_finish_kernel, (m,), cnt, part1, part3, tests, out, m, chunks, BLOCK_C=block_c)
    return tuple(out.reshape(6, m).unbind(0))
