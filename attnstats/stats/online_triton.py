"""Fused Triton kernel for :func:`attnstats.streaming_stats`: one pass over the keys, nothing N×N.

One program owns ``BLOCK_M`` query rows of one head and walks over the keys ``BLOCK_N`` at a time,
as a flash-attention forward does, but without the ``P·V`` product. It works in base 2
(``y = s·log2 e``) and keeps per row, against the running maximum ``m``:

    l = Σ 2^{y−m},  t = Σ 2^{y−m}·(y−m),  u = Σ 2^{2(y−m)},  a = Σ (y−m),  b = Σ (y−m)²,  n

Every sum is rescaled when ``m`` grows (``a`` and ``b`` by the shift ``m_old − m_new``, the others by
``2^{m_old−m_new}``). The same quantities in nats are what the PyTorch path keeps; the conversion
is in :func:`row_accumulators`. ``e·e`` replaces a second exponential, and all of ``t, u, a, b``
reuse ``y − m``, which the exponential needs anyway.

Triton is optional (``pip install 'attnstats[triton]'``). The kernel runs on CUDA tensors, and on CPU
tensors under ``TRITON_INTERPRET=1`` (set before Triton is first imported), which is how the tests
check it on machines without a GPU.
"""
from __future__ import annotations

import math

import torch

from ..triton_launch import interpreting, launch, on_device

__all__ = ["available", "row_accumulators", "raw_accumulators", "row_moments", "attention_products", "attention_row_sums",
           "sampled_log_probs", "head_sums"]

_LN2 = math.log(2.0)
_LOG2E = 1.0 / _LN2

try:  # Triton is an optional extra: without it the kernel is simply unavailable.
    import triton
    import triton.language as tl

    _HAVE_TRITON = True
except Exception:  # pragma: no cover - depends on the environment
    _HAVE_TRITON = False


def available() -> bool:
    """True when the fused kernel can run here: Triton imports, and a GPU or the interpreter."""
    return _HAVE_TRITON and (torch.cuda.is_available() or interpreting())


if _HAVE_TRITON:

    @triton.jit
    def _tile(
        acc_m, acc_l, acc_t, acc_u, acc_a, acc_b, acc_n,
        q, k_ptrs, km_ptrs, offs_m, start_n, N_K, qk_scale,
        BLOCK_N: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr,
        HAS_KMASK: tl.constexpr, F32: tl.constexpr, F32_PRECISION: tl.constexpr,
    ):
        # One key tile against the program's query rows; returns the updated accumulators.
        # acc_m … acc_n: [BLOCK_M] float32 each, the running sums of the module docstring (base 2),
        #                acc_m the running maximum of y = s·log2 e, acc_n the valid keys so far
        # q:        [BLOCK_M, D] the program's query rows (loaded once, input dtype)
        # k_ptrs:   [D, BLOCK_N] pointers to the keys start_n … start_n + BLOCK_N − 1, transposed
        # km_ptrs:  pointer to key 0 of this (batch, head)'s key-padding row, unit stride (HAS_KMASK)
        # offs_m:   [BLOCK_M] query indices (for the causal rule); start_n: first key of the tile
        # N_K:      number of keys; qk_scale: scale·log2 e
        # MASKED:   the tile needs bounds, causal or padding checks (the tiles before it need none)
        offs_n = start_n + tl.arange(0, BLOCK_N)  # [BLOCK_N]
        if MASKED:
            k = tl.load(k_ptrs, mask=offs_n[None, :] < N_K, other=0.0)  # [D, BLOCK_N]
        else:
            k = tl.load(k_ptrs)  # [D, BLOCK_N]
        if F32:
            x = tl.dot(q, k, input_precision=F32_PRECISION)  # [BLOCK_M, BLOCK_N] q·k, float32
        else:
            x = tl.dot(q, k)  # [BLOCK_M, BLOCK_N]
        # scale > 0, so the row maximum of s is the maximum of q·k times the scale; y − m is then
        # one fused multiply-add per entry.
        if MASKED:
            valid = offs_n[None, :] < N_K  # [1, BLOCK_N]
            if CAUSAL:
                valid = valid & (offs_n[None, :] <= offs_m[:, None])  # [BLOCK_M, BLOCK_N]
            if HAS_KMASK:
                km = tl.load(km_ptrs + offs_n, mask=offs_n < N_K, other=0)  # [BLOCK_N] int8
                valid = valid & (km[None, :] != 0)
            x = tl.where(valid, x, float("-inf"))  # [BLOCK_M, BLOCK_N]
            n_blk = tl.sum(valid.to(tl.float32), 1)  # [BLOCK_M]
        m_blk = tl.max(x, 1) * qk_scale  # [BLOCK_M]
        if not MASKED:
            n_blk = tl.zeros_like(m_blk) + BLOCK_N  # [BLOCK_M]
        m_new = tl.maximum(acc_m, m_blk)  # [BLOCK_M]
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # [BLOCK_M]
        seen = acc_n > 0  # [BLOCK_M]
        delta = tl.where(seen, acc_m - m_use, 0.0)  # [BLOCK_M]
        alpha = tl.math.exp2(delta)  # [BLOCK_M]
        alpha = tl.where(seen, alpha, 0.0)
        d = x * qk_scale - m_use[:, None]  # [BLOCK_M, BLOCK_N]: y − m
        if MASKED:
            d = tl.where(valid, d, 0.0)
            e = tl.where(valid, tl.math.exp2(d), 0.0)  # [BLOCK_M, BLOCK_N]
        else:
            e = tl.math.exp2(d)  # [BLOCK_M, BLOCK_N]
        # Shift the sums of (y − m) and (y − m)² to the new maximum before adding this tile.
        acc_b = acc_b + 2.0 * delta * acc_a + acc_n * delta * delta + tl.sum(d * d, 1)
        acc_a = acc_a + acc_n * delta + tl.sum(d, 1)
        acc_t = alpha * (acc_t + delta * acc_l) + tl.sum(e * d, 1)
        acc_l = alpha * acc_l + tl.sum(e, 1)
        acc_u = alpha * alpha * acc_u + tl.sum(e * e, 1)
        acc_n = acc_n + n_blk
        acc_m = tl.where(n_blk > 0, m_use, acc_m)
        return acc_m, acc_l, acc_t, acc_u, acc_a, acc_b, acc_n

    @triton.jit
    def _streaming_kernel(
        Q, K, KM, OUT,
        sq_b, sq_h, sq_n, sq_d,
        sk_b, sk_h, sk_n, sk_d,
        skm_b, skm_h,
        so_f, so_bh,
        H, N_Q, N_K, GROUP, qk_scale, LN2,
        D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        CAUSAL: tl.constexpr, HAS_KMASK: tl.constexpr, F32: tl.constexpr, F32_PRECISION: tl.constexpr,
    ):
        # Q:    [B, H, N_Q, D] queries (fp16, bf16 or fp32), strides (sq_b, sq_h, sq_n, sq_d)
        # K:    [B, H // GROUP, N_K, D] keys, Q's dtype, strides (sk_b, sk_h, sk_n, sk_d); query head h
        #       reads key head h // GROUP (grouped-query attention)
        # KM:   [B, H, N_K] int8 key-padding mask (nonzero = attend), strides (skm_b, skm_h, 1); when
        #       not HAS_KMASK a one-element placeholder, never read
        # OUT:  [6, B·H, N_Q] float32, strides (so_f, so_bh, 1): rows lse, entropy, sum_p2, count,
        #       s_mean, s_m2 (see RowAccumulators)
        # H:    query heads; N_Q, N_K: queries, keys; qk_scale: scale·log2 e; LN2: ln 2
        # D:    head dim (16 … 256, a power of two); BLOCK_M query rows per program, BLOCK_N keys per tile
        # grid: (cdiv(N_Q, BLOCK_M), B·H)
        pid_m = tl.program_id(0)
        if CAUSAL:  # the longest rows (most key tiles) first, so that no long program starts last
            pid_m = tl.num_programs(0) - 1 - pid_m
        bh = tl.program_id(1)
        # 64-bit offsets: batch × head strides pass 2^31 elements for large batches of long sequences.
        b = (bh // H).to(tl.int64)
        h = (bh % H).to(tl.int64)
        hk = h // GROUP
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M]
        offs_d = tl.arange(0, D)  # [D]
        q_ptrs = Q + b * sq_b + h * sq_h + offs_m[:, None] * sq_n + offs_d[None, :] * sq_d  # [BLOCK_M, D]
        q = tl.load(q_ptrs, mask=offs_m[:, None] < N_Q, other=0.0)  # [BLOCK_M, D]
        kbase = K + b * sk_b + hk * sk_h + offs_d[:, None] * sk_d  # [D, 1]
        km_base = KM + b * skm_b + h * skm_h  # pointer to key 0 of this (b, h)

        acc_m = tl.full([BLOCK_M], float("-inf"), tl.float32)  # [BLOCK_M], as acc_l … acc_n
        acc_l = tl.zeros([BLOCK_M], tl.float32)
        acc_t = tl.zeros([BLOCK_M], tl.float32)
        acc_u = tl.zeros([BLOCK_M], tl.float32)
        acc_a = tl.zeros([BLOCK_M], tl.float32)
        acc_b = tl.zeros([BLOCK_M], tl.float32)
        acc_n = tl.zeros([BLOCK_M], tl.float32)

        # Tiles that need no mask (fully below the diagonal, inside N_K, no key padding) first.
        if CAUSAL:
            hi_full = (pid_m * BLOCK_M) // BLOCK_N * BLOCK_N
            hi = tl.minimum((pid_m + 1) * BLOCK_M, N_K)
        else:
            hi_full = N_K // BLOCK_N * BLOCK_N
            hi = N_K
        if HAS_KMASK:
            hi_full = 0
        for start_n in range(0, hi_full, BLOCK_N):
            k_ptrs = kbase + (start_n + tl.arange(0, BLOCK_N))[None, :] * sk_n  # [D, BLOCK_N]
            acc_m, acc_l, acc_t, acc_u, acc_a, acc_b, acc_n = _tile(
                acc_m, acc_l, acc_t, acc_u, acc_a, acc_b, acc_n,
                q, k_ptrs, km_base, offs_m, start_n, N_K, qk_scale,
                BLOCK_N, False, CAUSAL, HAS_KMASK, F32, F32_PRECISION,
            )
        for start_n in range(hi_full, hi, BLOCK_N):
            k_ptrs = kbase + (start_n + tl.arange(0, BLOCK_N))[None, :] * sk_n  # [D, BLOCK_N]
            acc_m, acc_l, acc_t, acc_u, acc_a, acc_b, acc_n = _tile(
                acc_m, acc_l, acc_t, acc_u, acc_a, acc_b, acc_n,
                q, k_ptrs, km_base, offs_m, start_n, N_K, qk_scale,
                BLOCK_N, True, CAUSAL, HAS_KMASK, F32, F32_PRECISION,
            )

        # Epilogue: the sums become row statistics in nats (see RowAccumulators); NaN where a row
        # has no valid key.
        empty = acc_n == 0  # [BLOCK_M], as every row statistic below
        l_safe = tl.where(empty, 1.0, acc_l)
        n_safe = tl.where(empty, 1.0, acc_n)
        log2l = tl.math.log2(l_safe)
        nan = float("nan")
        lse = tl.where(empty, nan, LN2 * (acc_m + log2l))
        ent = tl.where(empty, nan, LN2 * (log2l - acc_t / l_safe))
        sp2 = tl.where(empty, nan, acc_u / (l_safe * l_safe))
        s_mean = tl.where(empty, nan, LN2 * (acc_m + acc_a / n_safe))
        s_m2 = tl.where(empty, nan, LN2 * LN2 * tl.maximum(acc_b - acc_a * acc_a / n_safe, 0.0))
        out = OUT + bh.to(tl.int64) * so_bh + offs_m  # [BLOCK_M] pointers into row 0 (lse)
        keep = offs_m < N_Q  # [BLOCK_M]
        sf = so_f + tl.zeros([BLOCK_M], tl.int64)  # [BLOCK_M], the 64-bit stride between rows
        tl.store(out + 0 * sf, lse, mask=keep)
        tl.store(out + 1 * sf, ent, mask=keep)
        tl.store(out + 2 * sf, sp2, mask=keep)
        tl.store(out + 3 * sf, acc_n, mask=keep)
        tl.store(out + 4 * sf, s_mean, mask=keep)
        tl.store(out + 5 * sf, s_m2, mask=keep)


    @triton.jit
    def _listed_head(Q, K, LSE2, X, OUT, HEADS, sq_h, sk_h, sl_h, sx_a, so_a):
        # The pointers of program (·, a) of a product kernel: head HEADS[a] of Q, K, LSE2, slice a of X, OUT.
        a = tl.program_id(1).to(tl.int64)
        h = tl.load(HEADS + a).to(tl.int64)
        return Q + h * sq_h, K + h * sk_h, LSE2 + h * sl_h, X + a * sx_a, OUT + a * so_a

    @triton.jit
    def _matmat_kernel(
        Q, K, LSE2, X, OUT, HEADS,
        sq_h, sq_n, sk_h, sk_n, sl_h, sx_a, sx_n, so_a, so_n,
        N, qk_scale,
        D: tl.constexpr, R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, F32: tl.constexpr,
        F32_PRECISION: tl.constexpr,
    ):
        # out_i = Σ_j 2^{y_ij − lse2_i} x_j over all keys: attention with V = x, the softmax
        # normaliser known in advance, so no running maximum is needed. Program (·, a) works on
        # head HEADS[a], so that a solver can leave out the heads it has finished.
        # Q:     [M, N, D] queries (fp16, bf16 or fp32), strides (sq_h, sq_n, 1)
        # K:     [M, N, D] keys, Q's dtype, strides (sk_h, sk_n, 1)
        # LSE2:  [M, N] float32 row log-normalisers in base 2 (LSE_i·log2 e), strides (sl_h, 1)
        # X:     [A, N, R] float32 vectors of the A heads listed, strides (sx_a, sx_n, 1)
        # OUT:   [A, N, R] float32, strides (so_a, so_n, 1): P·X
        # HEADS: [A] int32, the head of each of X's slices
        # N: tokens; qk_scale: scale·log2 e; D: head dim; R: columns of X (16 or 32)
        # grid: (cdiv(N, BLOCK_M), A)
        pid = tl.program_id(0)
        Q, K, LSE2, X, OUT = _listed_head(Q, K, LSE2, X, OUT, HEADS, sq_h, sk_h, sl_h, sx_a, so_a)
        offs_m = pid * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M]
        offs_d = tl.arange(0, D)  # [D]
        offs_r = tl.arange(0, R)  # [R]
        q = tl.load(Q + offs_m[:, None] * sq_n + offs_d[None, :], mask=offs_m[:, None] < N, other=0.0)  # [BLOCK_M, D]
        lse2 = tl.load(LSE2 + offs_m, mask=offs_m < N, other=0.0)  # [BLOCK_M]
        acc = tl.zeros([BLOCK_M, R], tl.float32)  # [BLOCK_M, R]
        for start_n in range(0, N, BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)  # [BLOCK_N]
            k = tl.load(K + offs_n[None, :] * sk_n + offs_d[:, None], mask=offs_n[None, :] < N, other=0.0)  # [D, BLOCK_N]
            if F32:
                x = tl.dot(q, k, input_precision=F32_PRECISION)  # [BLOCK_M, BLOCK_N]
            else:
                x = tl.dot(q, k)  # [BLOCK_M, BLOCK_N]
            p = tl.math.exp2(x * qk_scale - lse2[:, None])  # [BLOCK_M, BLOCK_N]: rows of P
            p = tl.where(offs_n[None, :] < N, p, 0.0)
            v = tl.load(X + offs_n[:, None] * sx_n + offs_r[None, :], mask=offs_n[:, None] < N, other=0.0)  # [BLOCK_N, R]
            acc += tl.dot(p, v, input_precision=F32_PRECISION)  # [BLOCK_M, R]
        tl.store(OUT + offs_m[:, None] * so_n + offs_r[None, :], acc, mask=offs_m[:, None] < N)



    @triton.jit
    def _rmatmat_kernel(
        Q, K, LSE2, X, OUT, HEADS,
        sq_h, sq_n, sk_h, sk_n, sl_h, sx_a, sx_n, so_a, so_n,
        N, qk_scale,
        D: tl.constexpr, R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, F32: tl.constexpr,
        F32_PRECISION: tl.constexpr,
    ):
        # out_j = Σ_i 2^{y_ij − lse2_i} x_i over all queries: Pᵀ x, the product of _matmat_kernel with
        # the roles of queries and keys swapped; arguments as there.
        # grid: (cdiv(N, BLOCK_M), A): BLOCK_M keys per program, BLOCK_N queries per tile
        pid = tl.program_id(0)
        Q, K, LSE2, X, OUT = _listed_head(Q, K, LSE2, X, OUT, HEADS, sq_h, sk_h, sl_h, sx_a, so_a)
        offs_j = pid * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M] keys
        offs_d = tl.arange(0, D)  # [D]
        offs_r = tl.arange(0, R)  # [R]
        k = tl.load(K + offs_j[:, None] * sk_n + offs_d[None, :], mask=offs_j[:, None] < N, other=0.0)  # [BLOCK_M, D]
        acc = tl.zeros([BLOCK_M, R], tl.float32)  # [BLOCK_M, R]
        for start_i in range(0, N, BLOCK_N):
            offs_i = start_i + tl.arange(0, BLOCK_N)  # [BLOCK_N] queries
            q = tl.load(Q + offs_i[None, :] * sq_n + offs_d[:, None], mask=offs_i[None, :] < N, other=0.0)  # [D, BLOCK_N]
            if F32:
                y = tl.dot(k, q, input_precision=F32_PRECISION)  # [BLOCK_M, BLOCK_N]: s_ij, transposed
            else:
                y = tl.dot(k, q)  # [BLOCK_M, BLOCK_N]
            lse2 = tl.load(LSE2 + offs_i, mask=offs_i < N, other=0.0)  # [BLOCK_N]
            p = tl.math.exp2(y * qk_scale - lse2[None, :])  # [BLOCK_M, BLOCK_N]: columns of P
            p = tl.where(offs_i[None, :] < N, p, 0.0)
            x = tl.load(X + offs_i[:, None] * sx_n + offs_r[None, :], mask=offs_i[:, None] < N, other=0.0)  # [BLOCK_N, R]
            acc += tl.dot(p, x, input_precision=F32_PRECISION)  # [BLOCK_M, R]
        tl.store(OUT + offs_j[:, None] * so_n + offs_r[None, :], acc, mask=offs_j[:, None] < N)


    @triton.jit
    def _hash32(x):
        # lowbias32 (attnstats.stats.sampling.hash32) on uint32, whose products wrap mod 2³² as the
        # reference's masked int64 ones do: no int64 arithmetic
        x = x ^ (x >> 16)
        x = (x * 0x7FEB352D).to(tl.uint32)
        x = x ^ (x >> 15)
        x = (x * 0x846CA68B).to(tl.uint32)
        return x ^ (x >> 16)

    @triton.jit
    def _sampled_kernel(
        Q, K, LSE, I, J, OUT,
        sq_b, sq_h, sq_n, sq_d, sk_b, sk_h, sk_n, sk_d, sl_b, sl_h, sl_n, si_m, so_m,
        HQ, GROUP, S, COUNT, NK, BASE, FIRST, scale,
        D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr, DRAW: tl.constexpr, CAUSAL: tl.constexpr,
        RUNS: tl.constexpr,
    ):
        # ln P at sampled entries: out[t, s] = scale·q[b, h, i]·k[b, h // GROUP, j] − lse[b, h, i], computed
        # in float64 and stored in OUT's dtype.
        # Q: [B, HQ, Nq, D], K: [B, HQ/GROUP, Nk, D] (any float dtype, strides as given)
        # LSE: [B, HQ, Nq] (float32 or float64); OUT: [M, S] float64 or float32; M = B·HQ matrices, t = b·HQ + h
        # DRAW: the entries are drawn here, as attnstats.stats.sampling.sample_ranks draws them (one
        #   uniform rank in each of S runs of the COUNT valid entries; the matrix keys derive from the
        #   seed's key BASE and the matrix's index FIRST + t, as sampling.matrix_keys),
        #   then mapped to (i, j) row-major (the lower triangle when CAUSAL, else rows of NK).
        #   Otherwise I, J: [M, S] int64 give them.
        # grid: (M, cdiv(S, BLOCK_S))
        t = tl.program_id(0)
        b = t // HQ
        h = t % HQ
        offs = tl.program_id(1) * BLOCK_S + tl.arange(0, BLOCK_S)  # [BLOCK_S]
        ok = offs < S
        if DRAW:
            run = offs.to(tl.int64)  # [BLOCK_S]
            # RUNS (= S) is a compile-time constant: int64 division by it compiles to products, where
            # division by a run-time value is a long software routine (515 → 336 µs for 32 × 100,000 draws)
            start = (run * COUNT) // RUNS
            length = ((run + 1) * COUNT) // RUNS - start
            index = FIRST + t.to(tl.int64)
            # the matrix's two keys (once per program), then the draw's; sums wrap mod 2³² in uint32
            ka = _hash32((BASE ^ (index & 0xFFFFFFFF)).to(tl.uint32))
            kb = _hash32((ka + (index >> 32).to(tl.uint32) + 0x7F4A7C15).to(tl.uint32))
            r32 = offs.to(tl.uint32)
            hi = (_hash32((_hash32(r32 ^ ka) + 0x165667B1).to(tl.uint32)) >> 11).to(tl.int64)  # 21 bits
            lo = _hash32(r32 ^ kb).to(tl.int64)  # 32 bits
            u = ((hi << 32) | lo).to(tl.float64) * 1.1102230246251565e-16  # 2^-53
            rank = start + tl.minimum((u * length.to(tl.float64)).to(tl.int64), length - 1)
            if CAUSAL:
                ii = tl.floor((tl.sqrt(8.0 * rank.to(tl.float64) + 1.0) - 1.0) / 2.0).to(tl.int64)
                ii = tl.where(ii * (ii + 1) // 2 > rank, ii - 1, ii)
                ii = tl.where((ii + 1) * (ii + 2) // 2 <= rank, ii + 1, ii)
                jj = rank - ii * (ii + 1) // 2
            else:
                ii = rank // NK
                jj = rank % NK
            ii = tl.where(ok, ii, 0)
            jj = tl.where(ok, jj, 0)
        else:
            ii = tl.load(I + t * si_m + offs, mask=ok, other=0)  # [BLOCK_S]
            jj = tl.load(J + t * si_m + offs, mask=ok, other=0)  # [BLOCK_S]
        dd = tl.arange(0, BLOCK_D)  # [BLOCK_D]
        m2 = ok[:, None] & (dd[None, :] < D)
        q = tl.load(Q + b * sq_b + h * sq_h + ii[:, None] * sq_n + dd[None, :] * sq_d, mask=m2, other=0.0)
        k = tl.load(K + b * sk_b + (h // GROUP) * sk_h + jj[:, None] * sk_n + dd[None, :] * sk_d, mask=m2, other=0.0)
        # float64 products and sum: the same arithmetic as the PyTorch reference, [BLOCK_S, BLOCK_D]
        dot = tl.sum(q.to(tl.float64) * k.to(tl.float64), axis=1)  # [BLOCK_S]
        lse = tl.load(LSE + b * sl_b + h * sl_h + ii * sl_n, mask=ok, other=0.0).to(tl.float64)
        tl.store(OUT + t * so_m + offs, (dot * scale - lse).to(OUT.dtype.element_ty), mask=ok)


if _HAVE_TRITON:

    @triton.jit
    def _row_moments_kernel(CNT, SP2, LSE, SMEAN, SM2, OUT, NQ, M, BLOCK: tl.constexpr):
        # One program, matrix m: the entry moments of attnstats.stats.online.moments_from_rows (no sink)
        # from its rows' accumulators. CNT int64 and SP2, LSE, SMEAN, SM2 float32, each [M, NQ]
        # contiguous; OUT [5, M] float64: mean, var, log_mean, log_var, count. Two passes over the
        # rows (the spreads between rows need the means), float64 throughout, as the reference.
        m = tl.program_id(0)
        base = m.to(tl.int64) * NQ
        acc_n = tl.zeros([BLOCK], dtype=tl.float64)
        acc_has = tl.zeros([BLOCK], dtype=tl.float64)
        acc_wp = tl.zeros([BLOCK], dtype=tl.float64)
        acc_wl = tl.zeros([BLOCK], dtype=tl.float64)
        acc_lm = tl.zeros([BLOCK], dtype=tl.float64)
        for r0 in range(0, NQ, BLOCK):
            offs = r0 + tl.arange(0, BLOCK)
            ok = offs < NQ
            n = tl.load(CNT + base + offs, mask=ok, other=0).to(tl.float64)  # [BLOCK] valid keys per row
            has = n > 0
            inv_n = tl.where(has, 1.0 / tl.maximum(n, 1.0), 0.0)  # row mean of P
            sp2 = tl.load(SP2 + base + offs, mask=ok, other=0.0).to(tl.float64)
            rlm = (tl.load(SMEAN + base + offs, mask=ok, other=0.0)
                   - tl.load(LSE + base + offs, mask=ok, other=0.0)).to(tl.float64)  # row mean of ln P
            sm2 = tl.load(SM2 + base + offs, mask=ok, other=0.0).to(tl.float64)
            acc_n += n
            acc_has += tl.where(has, 1.0, 0.0)
            acc_wp += tl.where(has, tl.maximum(sp2 - inv_n, 0.0), 0.0)  # Σ_j (P_ij − 1/n_i)²
            acc_wl += tl.where(has, sm2, 0.0)
            acc_lm += tl.where(has, n * rlm, 0.0)
        count = tl.sum(acc_n, 0)
        mean = tl.sum(acc_has, 0) / count
        log_mean = tl.sum(acc_lm, 0) / count
        acc_bp = tl.zeros([BLOCK], dtype=tl.float64)
        acc_bl = tl.zeros([BLOCK], dtype=tl.float64)
        for r0 in range(0, NQ, BLOCK):
            offs = r0 + tl.arange(0, BLOCK)
            ok = offs < NQ
            n = tl.load(CNT + base + offs, mask=ok, other=0).to(tl.float64)
            has = n > 0
            inv_n = tl.where(has, 1.0 / tl.maximum(n, 1.0), 0.0)
            rlm = (tl.load(SMEAN + base + offs, mask=ok, other=0.0)
                   - tl.load(LSE + base + offs, mask=ok, other=0.0)).to(tl.float64)
            acc_bp += tl.where(has, n * (inv_n - mean) * (inv_n - mean), 0.0)
            acc_bl += tl.where(has, n * (rlm - log_mean) * (rlm - log_mean), 0.0)
        tl.store(OUT + m, mean)
        tl.store(OUT + M + m, (tl.sum(acc_wp, 0) + tl.sum(acc_bp, 0)) / count)
        tl.store(OUT + 2 * M + m, log_mean)
        tl.store(OUT + 3 * M + m, (tl.sum(acc_wl, 0) + tl.sum(acc_bl, 0)) / count)
        tl.store(OUT + 4 * M + m, count)


if _HAVE_TRITON:

    @triton.jit
    def _head_sums_kernel(X, OUT, H, N, CHUNKS, sx_b, sx_h, sx_n, sx_d,
                          D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, ROWS: tl.constexpr):
        # Partial Σx and Σx² of rows [c·ROWS, (c+1)·ROWS) of matrix t = b·H + h of X [B, H, N, D] (any
        # float dtype and strides), accumulated in float64; OUT [B·H, CHUNKS, 2] float64.
        t = tl.program_id(0)
        c = tl.program_id(1)
        base = X + (t // H).to(tl.int64) * sx_b + (t % H).to(tl.int64) * sx_h
        dd = tl.arange(0, BLOCK_D)  # [BLOCK_D]
        s1 = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float64)
        s2 = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float64)
        for r0 in range(c * ROWS, c * ROWS + ROWS, BLOCK_N):
            rows = r0 + tl.arange(0, BLOCK_N)  # [BLOCK_N]
            ok = (rows[:, None] < N) & (dd[None, :] < D)
            x = tl.load(base + rows[:, None].to(tl.int64) * sx_n + dd[None, :] * sx_d, mask=ok, other=0.0)
            x = x.to(tl.float64)  # [BLOCK_N, BLOCK_D]
            s1 += x
            s2 += x * x
        out = OUT + (t.to(tl.int64) * CHUNKS + c) * 2
        tl.store(out, tl.sum(tl.sum(s1, 1), 0))
        tl.store(out + 1, tl.sum(tl.sum(s2, 1), 0))


def head_sums(x: torch.Tensor) -> torch.Tensor:
    """``[B, H, 2]`` float64: ``Σx`` and ``Σx²`` over the tokens and channels of each head of
    ``x: [B, H, N, d]`` (any float dtype and strides), in one launch that reads ``x`` once.

    The sums are accumulated in float64 from the input's own values (no float64 copy of ``x``), as
    ``torch.sum(x, dtype=torch.float64)`` computes them, in another order.
    """
    if not _HAVE_TRITON:
        raise ImportError("the fused head sums need Triton: pip install 'attnstats[triton]'")
    B, H, N, d = x.shape
    interp = interpreting()
    block_n, rows = (16, 32) if interp else (32, 1024)
    chunks = max(triton.cdiv(N, rows), 1)
    out = torch.zeros(B * H, chunks, 2, dtype=torch.float64, device=x.device)  # [B·H, chunks, 2]
    if B * H and N:
        with on_device(x):
            launch(_head_sums_kernel, (B * H, chunks), x, out, H, N, chunks, *x.stride(), D=d,
                   BLOCK_D=triton.next_power_of_2(d), BLOCK_N=block_n, ROWS=rows)
    return out.sum(1).reshape(B, H, 2)


def row_moments(count, sum_p2, lse, s_mean, s_m2) -> torch.Tensor:
    """The entry moments of every matrix from its rows' accumulators, in one launch: ``[5, ...]`` float64
    ``mean, var, log_mean, log_var, count`` for rows ``[..., Nq]`` (``count`` int64, the others float32),
    the numbers of :func:`attnstats.stats.online.moments_from_rows` (no sink), which is its reference and
    takes some 35 small launches on a GPU."""
    if not _HAVE_TRITON:
        raise ImportError("the fused row merge needs Triton: pip install 'attnstats[triton]'")
    batch, nq = lse.shape[:-1], lse.shape[-1]
    fields = [x.reshape(-1, nq).contiguous() for x in (count, sum_p2, lse, s_mean, s_m2)]  # [M, Nq] each
    m = fields[0].shape[0]
    out = torch.empty(5, m, dtype=torch.float64, device=lse.device)  # [5, M]
    if m:
        block = 64 if interpreting() else 1024
        with on_device(lse):
            launch(_row_moments_kernel, (m,), *fields, out, nq, m, BLOCK=block)
    return out.reshape(5, *batch)


def _f32_precision() -> str:
    # float32 operands: three TF32 products (hi·hi + hi·lo + lo·hi) on the tensor cores give about
    # float32 accuracy, unlike one TF32 product (~1e-3); the interpreter computes in plain float32.
    return "ieee" if interpreting() else "tf32x3"


def _config(d: int, dtype: torch.dtype, interpreting: bool, causal: bool = False):
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) for head dim ``d``, input ``dtype`` and masking."""
    if interpreting:
        return 16, 16, 1, 1
    if dtype == torch.float32 or d > 128:
        # float32 tiles take twice the shared memory of half ones (the bf16 tiles below need
        # 320 KiB at d = 128 in float32, over the H100's 227 KiB).
        return (64, 64, 4, 2) if d <= 128 else (32, 32, 4, 2)
    # Fastest of ten tiles timed on an H100 at N = 16k, bf16 (benchmarks/RESULTS.md). Causal
    # rows end at the diagonal: shorter query tiles waste less of the masked diagonal tile.
    if causal:
        return 64, 128, 4, 3
    if d <= 64:
        return 128, 128, 8, 3
    return 64, 128, 4, 3


def raw_accumulators(q, k, scale, mask, causal, config=None) -> torch.Tensor:
    """Run the kernel; return ``[6, B·Hq, Nq]`` float32 rows ``lse, entropy, sum_p2, count, s_mean, s_m2``.

    ``q: [B, Hq, Nq, d]``, ``k: [B, Hk, Nk, d]`` and ``mask: [B, Hq, 1, Nk]`` bool or None, as
    :func:`attnstats.stats.online.prepare_qk` returns them; ``config`` overrides the tile
    ``(BLOCK_M, BLOCK_N, num_warps, num_stages)``.
    """
    if not _HAVE_TRITON:
        raise ImportError("the fused streaming kernel needs Triton: pip install 'attnstats[triton]'")
    B, Hq, Nq, d = q.shape
    Hk, Nk = k.shape[1], k.shape[2]
    if d not in (16, 32, 64, 128, 256):
        raise ValueError(f"q: the Triton path supports head dims 16, 32, 64, 128, 256; got d = {d} (use backend='torch')")
    if q.dtype != k.dtype:  # both to the wider type: rounding k to q's half type would lose precision
        wide = torch.promote_types(q.dtype, k.dtype)
        q, k = q.to(wide), k.to(wide)
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        q, k = q.float(), k.float()
    interp = interpreting()
    bm, bn, warps, stages = config or _config(d, q.dtype, interp, bool(causal))
    out = torch.empty(6, B * Hq, Nq, dtype=torch.float32, device=q.device)  # [6, B·Hq, Nq]
    if mask is not None:
        km = mask[:, :, 0, :].to(torch.int8).contiguous()  # [B, Hq, Nk]
        skm_b, skm_h = km.stride(0), km.stride(1)
    else:
        km = torch.empty(1, dtype=torch.int8, device=q.device)
        skm_b = skm_h = 0
    grid = (triton.cdiv(Nq, bm), B * Hq)
    kwargs = {} if interp else {"num_warps": warps, "num_stages": stages}
    with on_device(q):
        launch(
            _streaming_kernel, grid,
            q, k, km, out,
            *q.stride(), *k.stride(), skm_b, skm_h, out.stride(0), out.stride(1),
            Hq, Nq, Nk, Hq // Hk, float(scale * _LOG2E), _LN2,
            D=d, BLOCK_M=bm, BLOCK_N=bn, CAUSAL=bool(causal), HAS_KMASK=mask is not None,
            F32=q.dtype == torch.float32, F32_PRECISION=_f32_precision(),
            **kwargs,
        )
    return out


def row_accumulators(q, k, scale, mask, causal, config=None) -> tuple[torch.Tensor, ...]:
    """The fused pass as the fields of :class:`attnstats.stats.online.RowAccumulators`, in order:
    ``(lse, entropy, sum_p2, count, s_mean, s_m2)``, each ``[B, Hq, Nq]`` (float32; count int64).

    Plain tensors rather than the dataclass, so that this module imports nothing back from the
    reference pass that dispatches to it."""
    B, Hq, Nq, _ = q.shape
    lse, ent, sp2, n, s_mean, s_m2 = raw_accumulators(q, k, scale, mask, causal, config).reshape(6, B, Hq, Nq).unbind(0)  # [B, Hq, Nq] each
    return lse, ent, sp2, n.round().to(torch.int64), s_mean, s_m2


def attention_products(q: torch.Tensor, k: torch.Tensor, lse: torch.Tensor, x: torch.Tensor, scale: float, *,
                        transpose: bool = False, heads: torch.Tensor | None = None,
                        row_sums: torch.Tensor | None = None, config=None) -> torch.Tensor:
    """``P x`` (or ``Pᵀ x``) for several heads in one launch, ``P = softmax(scale · q kᵀ)``, fused: no
    tile of ``P`` leaves the chip.

    Args:
        q, k: ``[M, N, d]`` (bf16, fp16 or fp32; bf16/fp16 products are exact in the fp32 accumulator).
        lse: ``[M, N]`` row log-normalisers ``LSE_i`` (nats), e.g. from :func:`row_accumulators`.
        x: ``[A, N, c]`` float32 vectors, one slice per head listed in ``heads``; ``c ≤ 31`` for
            ``P x``, ``c ≤ 32`` for ``Pᵀ x``.
        scale: logit scale.
        transpose: ``Pᵀ x`` instead of ``P x``.
        heads: ``[A]`` indices into ``M`` (default: all heads, ``A = M``).
        row_sums: ``[M, N]``, for ``Pᵀ x``: the sums of the rows of ``exp(s − lse)`` (float32 ``lse``
            leaves them 1 only to ~1e-7·|lse|), from :func:`attention_row_sums`; with them ``x`` is
            divided first, so that the product is that of the row-normalised ``P``.
        config: ``(BLOCK_M, BLOCK_N, num_warps, num_stages)`` instead of the default tile.

    Returns:
        ``[A, N, c]`` float32. For ``P x`` a column of ones rides along and each row is divided by
        its sum, so the result is row-normalised to float32 rounding even though ``lse`` is float32.
    """
    if not _HAVE_TRITON:
        raise ImportError("the fused attention product needs Triton: pip install 'attnstats[triton]'")
    m, n, _ = q.shape
    if heads is None:
        heads = torch.arange(m, device=q.device)
    a, c = x.shape[0], x.shape[2]
    extra = 0 if transpose else 1  # the ones column of P x
    if c + extra > 32:
        raise ValueError(f"x: at most {32 - extra} columns per call, got {c}")
    r = 16 if c + extra <= 16 else 32
    xp = torch.zeros(a, n, r, dtype=torch.float32, device=x.device)  # [A, N, R]
    if transpose:
        xp[..., :c] = x if row_sums is None else x / row_sums[heads][..., None]
        return _launch_product(_rmatmat_kernel, q, k, lse, xp, heads, scale, config)[..., :c]  # [A, N, c]
    xp[..., :c] = x
    xp[..., c] = 1.0
    out = _launch_product(_matmat_kernel, q, k, lse, xp, heads, scale, config)  # [A, N, R]
    return out[..., :c] / out[..., c:c + 1]  # [A, N, c]


def _launch_product(kernel, q, k, lse, xp, heads, scale, config=None) -> torch.Tensor:
    """``exp(s − lse) xp`` (:func:`_matmat_kernel`) or ``exp(s − lse)ᵀ xp`` (:func:`_rmatmat_kernel`)
    for the heads ``heads [A]`` of ``q, k: [M, N, d]``, ``lse: [M, N]``; ``xp: [A, N, R]`` float32 → ``[A, N, R]``."""
    a, n, r = xp.shape
    d = q.shape[-1]
    interp = interpreting()
    bm, bn, warps, stages = config or ((16, 16, 1, 1) if interp else (64, 64, 4, 3))
    kwargs = {} if interp else {"num_warps": warps, "num_stages": stages}
    q = q.contiguous()  # [M, N, d]
    k = k.contiguous().to(q.dtype)  # [M, N, d]
    lse2 = (lse.to(torch.float32) * _LOG2E).contiguous()  # [M, N]
    heads = heads.to(device=q.device, dtype=torch.int32).contiguous()  # [A]
    out = torch.empty_like(xp)  # [A, N, R]
    if a:
        with on_device(q):
            launch(
                kernel, (triton.cdiv(n, bm), a),
                q, k, lse2, xp, out, heads, q.stride(0), q.stride(1), k.stride(0), k.stride(1), lse2.stride(0),
                xp.stride(0), xp.stride(1), out.stride(0), out.stride(1),
                n, float(scale * _LOG2E), D=d, R=r, BLOCK_M=bm, BLOCK_N=bn, F32=q.dtype == torch.float32,
                F32_PRECISION=_f32_precision(), **kwargs,
            )
    return out


def attention_row_sums(q: torch.Tensor, k: torch.Tensor, lse: torch.Tensor, scale: float) -> torch.Tensor:
    """``[M, N]`` float32 row sums of ``exp(scale·q kᵀ − lse)`` for heads ``q, k: [M, N, d]``, ``lse: [M, N]``:
    1 up to the rounding of ``lse``."""
    m, n, _ = q.shape
    xp = torch.zeros(m, n, 16, dtype=torch.float32, device=q.device)  # [M, N, 16]
    xp[..., 0] = 1.0
    heads = torch.arange(m, device=q.device)
    return _launch_product(_matmat_kernel, q, k, lse, xp, heads, scale)[..., 0]  # [M, N]


def sampled_log_probs(q: torch.Tensor, k: torch.Tensor, lse: torch.Tensor, i: torch.Tensor | None,
                      j: torch.Tensor | None, scale: float, *, draw=None,
                      dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """``ln P_ij = scale·q_i·k_j − LSE_i`` at sampled entries of every matrix, one launch.

    Args:
        q: ``[B, Hq, Nq, d]``; k: ``[B, Hk, Nk, d]`` (``Hq`` a multiple of ``Hk``), any strides.
        lse: ``[B, Hq, Nq]`` row log-normalisers (nats).
        i, j: ``[B·Hq, S]`` int64 row and column of each sample of matrix ``t = b·Hq + h``; or None
            with ``draw``.
        scale: logit scale.
        draw: ``(count, size, seed, first_matrix, causal)`` to draw the entries in the kernel instead,
            as :func:`attnstats.stats.sampling.sample_ranks` does for unmasked matrices of ``count``
            valid entries whose flat batch indices start at ``first_matrix``.
        dtype: of the result, float64 or float32 (the float64 values rounded once, as ``.float()``).

    Returns:
        ``[B·Hq, S]`` in ``dtype``: the dot products in float64, as the PyTorch reference computes them,
        without gathering the sampled rows of q and k into memory.
    """
    if dtype not in (torch.float64, torch.float32):
        raise ValueError(f"dtype: expected torch.float64 or torch.float32, got {dtype}")
    if not _HAVE_TRITON:
        raise ImportError("the fused sampler needs Triton: pip install 'attnstats[triton]'")
    B, Hq, _, d = q.shape
    m = B * Hq
    if draw is not None:
        from .sampling import seed_base

        count, s, seed, first, causal = draw
        base = seed_base(seed)
        i = j = torch.empty(1, 1, dtype=torch.int64, device=q.device)
    else:
        s = i.shape[1]
        count, causal, base, first = 0, False, 0, 0
        i, j = i.contiguous(), j.contiguous()
    out = torch.empty(m, s, dtype=dtype, device=q.device)  # [M, S]
    interp = interpreting()
    block_s = 16 if interp else 64  # 32–256 rows and 2–8 warps timed within 10 % of each other
    grid = (m, triton.cdiv(s, block_s))
    kwargs = {} if interp else {"num_warps": 4}
    if s:
        with on_device(q):
            launch(
                _sampled_kernel, grid,
                q, k, lse, i, j, out,
                *q.stride(), *k.stride(), *lse.stride(), i.stride(0), out.stride(0),
                Hq, Hq // k.shape[1], s, count, k.shape[2], base, first, float(scale),
                D=d, BLOCK_D=triton.next_power_of_2(d), BLOCK_S=block_s, DRAW=draw is not None, CAUSAL=bool(causal),
                RUNS=s if draw is not None else 1,
                **kwargs,
            )
    return out
