"""Fused Triton kernels for LLN attention on a GPU: a whole forward + backward in a handful of launches.

:class:`~attnstats.kernels.lln.LLNAttention` sends a call here when its inputs are CUDA tensors of one
dtype (bfloat16, float16 or float32), with no mask and head dims ≤ :data:`MAX_HEAD_DIM`, and Triton is
installed; everything else takes the PyTorch path of :mod:`attnstats.kernels.linear`, which is the
reference these kernels are tested against (on the CPU under ``TRITON_INTERPRET=1``, small sizes, and
on the GPU by ``benchmarks/lln_gpu.py``). The mathematics is that path's, with LLN's features
``exp(αq)``, ``exp(βk)`` formed inside the kernels from q and k as they come (no float32 copies):

- keys ``kt = exp(βk − m)`` with ``m_l = β·max_j k_jl`` (a per-head, per-feature shift), so every key
  sum ``z_l = Σ_j kt_jl ≥ 1``;
- queries ``qt = exp(αq + m − M_i)`` with ``M_i = max_l (αq_il + m_l)``: each row has a term equal to 1
  against a ``z_l ≥ 1``, so a non-causal denominator is ≥ 1 before ``eps``; the shifts cancel and carry
  no gradient.

Why fused: at a few thousand tokens the PyTorch path is some 50 kernel launches and Python steps for a
forward + backward whose arithmetic takes a fraction of a millisecond (benchmarks/RESULTS.md §4). Here:

1. :func:`moments` (one launch, one small transfer to the host): σ_q, σ_k for moment matching (per
   program mean and sum of squared deviations, combined on the host in float64 by Chan's rule), whether
   v is finite (a NaN or inf in q or k makes its σ NaN), and each program's per-feature maximum and
   minimum of k (the shift ``m``, and the causal path's spread). Non-causal calls with the curve rule
   (or none) use :func:`device_rule` instead: the same launch, then one program that combines the
   partials and evaluates the rule on the device, whose α, β the kernels read there, so nothing waits
   for the host (the call can be captured in a CUDA graph).
2. non-causal forward: the state ``S = ktᵀ v`` ``[d, d_v]`` and ``z = Σ kt`` (grid: head × split,
   each program a range of keys), then the output ``qt S / (qt·z + eps)``, which also stores the
   denominators for the backward.
3. non-causal backward: over the queries, ``dq`` and the partial sums of ``∂S``, ``∂z``; over the
   keys, ``dk`` and ``dv``.
4. causal: one program per 64-token chunk computes its state, a prefix kernel turns the chunk states
   into running sums in place, and one program per chunk forms its output from the states before it
   and its ``[C, C]`` tile; the backward mirrors this with running sums from the end.

Every kernel is launched through :func:`attnstats.triton_launch.launch`, which hands an
already compiled kernel its arguments directly (a third of Triton's own launch cost on the host).

Partial sums go to per-(head, split) buffers summed by the next kernel, in a fixed order: the results
do not depend on scheduling. Products run in TF32 for bf16 inputs (about 1e-3, below the output's
rounding) and as three TF32 products, about float32 accuracy, for float16 and float32; accumulation is
float32.
"""
from __future__ import annotations

import functools
import math

import numpy as np
import torch

__all__ = ["MAX_HEAD_DIM", "available", "applies", "fuses_diag", "moments", "device_rule", "lln_noncausal", "lln_causal"]

from . import block_diagonal_triton
from ..triton_launch import interpreting, launch, on_device
from .triton_common import DTYPES, HAVE_TRITON, MixWeights, launched_on_device, offsets_fit, pad, precision

if HAVE_TRITON:
    import triton
    import triton.language as tl

    from .triton_common import block_probs, block_softmax, block_softmax_grads, mix_weights

# Largest head dim (of q, k and of v) the kernels take: the per-program state [d, d_v] lives in registers
MAX_HEAD_DIM = 128


def available(x: torch.Tensor) -> bool:
    """Whether the kernels can run on ``x``: Triton imports, and ``x`` is a CUDA tensor (or a CPU tensor
    under ``TRITON_INTERPRET=1``, for tests)."""
    return HAVE_TRITON and (x.is_cuda or (interpreting() and x.device.type == "cpu"))


def applies(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask) -> bool:
    """Whether :class:`~attnstats.kernels.lln.LLNAttention` takes the fused path for this call: CUDA
    tensors of one dtype (bf16, fp16, fp32), no mask, head dims ≤ :data:`MAX_HEAD_DIM`, no empty batch,
    every tensor and buffer under 2^31 entries (32-bit offsets), Triton installed. (CPU tensors never
    do: the interpreter is for tests.)"""
    if not (HAVE_TRITON and mask is None and q.is_cuda and k.is_cuda and v.is_cuda
            and q.dtype in DTYPES and k.dtype == q.dtype and v.dtype == q.dtype
            and q.shape[-1] <= MAX_HEAD_DIM and v.shape[-1] <= MAX_HEAD_DIM
            and q.shape[-2] > 0 and k.shape[-2] > 0 and q.shape[0] * q.shape[1] > 0):
        return False
    bh, n, dv = q.shape[0] * q.shape[1], max(q.shape[-2], k.shape[-2]), v.shape[-1]
    # the largest buffers: the output (and LLN+Diag's LLN part), the causal per-chunk states (tiles of 32
    # tokens at the least)
    states = bh * triton.cdiv(n, 32) * pad(q.shape[-1]) * (pad(dv) + 1)
    return offsets_fit(q, k, v, buffers=max(bh * n * max(dv, q.shape[-1]), states))


def _block(d_pad: int, dv_pad: int) -> int:
    """Tokens per tile: 64, halved for the widest heads so the tiles and the [d, d_v] state fit in registers."""
    return 64 if max(d_pad, dv_pad) <= 64 else 32


@functools.lru_cache(maxsize=None)
def _multiprocessors(index) -> int:
    # (a CPU tensor under the interpreter: as if 8, so that small tests run several programs per head)
    return 8 if index is None else torch.cuda.get_device_properties(index).multi_processor_count


# Programs per head along the tokens. Each consumer kernel sums its producer's per-program partial
# states ([d, d_v] each) itself when there are at most 16; long calls (from WIDE_FROM_TOKENS tokens) run
# up to WIDE_SPLIT programs per head, about eight per streaming multiprocessor, and have their partials
# summed by one torch.sum first: with 16 programs per head the kernels ran at a third of the memory
# bandwidth at 64k tokens (benchmarks/RESULTS.md §4).
WIDE_FROM_TOKENS = 32768
WIDE_SPLIT = 64
_SUMMED_IN_KERNEL = 16


@functools.lru_cache(maxsize=1024)
def _splits(bh: int, n: int, block: int, device: torch.device) -> int:
    """Programs per head along ``n`` tokens: about two per streaming multiprocessor in all (eight from
    :data:`WIDE_FROM_TOKENS` tokens), at most one per tile, at most 16 (:data:`WIDE_SPLIT` for long calls)."""
    index = None
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
    sms = _multiprocessors(index)
    if n >= WIDE_FROM_TOKENS:
        return max(1, min(WIDE_SPLIT, triton.cdiv(n, block), triton.cdiv(8 * sms, bh)))
    return max(1, min(_SUMMED_IN_KERNEL, triton.cdiv(n, block), triton.cdiv(2 * sms, bh)))


def _summed(parts):
    """Partial states ``[BH, P, …]`` as the next kernel reads them: as they are (it sums them) when
    ``P ≤ 16``, else summed over P first (``[BH, 1, …]``); and their number."""
    if parts[0].shape[1] <= _SUMMED_IN_KERNEL:
        return parts, parts[0].shape[1]
    return tuple(x.sum(1, keepdim=True) for x in parts), 1


def _rows(n: int, split: int, block: int) -> int:
    """Tokens per program: ``n`` cut into ``split`` ranges of whole tiles."""
    return triton.cdiv(triton.cdiv(n, block), split) * block


if HAVE_TRITON:

    @triton.jit
    def _head(H, D, DV, D_PAD: tl.constexpr, DV_PAD: tl.constexpr):
        # The program's (batch·head) index, its batch and head, and the feature and value offsets with
        # their masks (padded columns past D, DV)
        bh = tl.program_id(0)
        offs_d = tl.arange(0, D_PAD)
        offs_e = tl.arange(0, DV_PAD)
        return bh, bh // H, bh % H, offs_d, offs_e, offs_d < D, offs_e < DV

    @triton.jit
    def _tile(X, b, h, s_b, s_h, s_n, s_d, rows, cols, mask):
        # X[b, h, rows, cols] as a float32 tile, 0 where not mask
        return tl.load(X + b * s_b + h * s_h + rows[:, None] * s_n + cols[None, :] * s_d, mask=mask,
                       other=0.0).to(tl.float32)

    @triton.jit
    def _flat_tile(X, bh, N, W, rows, cols, mask):
        # X[bh, rows, cols] of a contiguous [BH, N, W] buffer as a float32 tile, 0 where not mask
        return tl.load(X + (bh * N + rows[:, None]) * W + cols[None, :], mask=mask, other=0.0).to(tl.float32)

    @triton.jit
    def _column_moments(X, sx_n, sx_d, lo, hi, offs_d, dmask, BLOCK: tl.constexpr, D_PAD: tl.constexpr):
        # Per column l of rows lo … hi−1 of one head: mean and sum of squared deviations (Chan's rule
        # over tiles), maximum and minimum; returned as [D_PAD] float32 each (padded columns: 0, ±inf).
        mean = tl.zeros([D_PAD], dtype=tl.float32)
        m2 = tl.zeros([D_PAD], dtype=tl.float32)
        big = tl.full([D_PAD], float("-inf"), dtype=tl.float32)
        small = tl.full([D_PAD], float("inf"), dtype=tl.float32)
        for r0 in range(lo, hi, BLOCK):
            rows = r0 + tl.arange(0, BLOCK)  # [BLOCK]
            ok = (rows[:, None] < hi) & dmask[None, :]  # [BLOCK, D_PAD]
            x = tl.load(X + rows[:, None] * sx_n + offs_d[None, :] * sx_d, mask=ok, other=0.0).to(tl.float32)
            cnt = (r0 - lo).to(tl.float32)  # entries per column before this tile
            nb = tl.minimum(hi - r0, BLOCK).to(tl.float32)
            mb = tl.sum(x, 0) / nb  # [D_PAD]
            dev = tl.where(ok, x - mb[None, :], 0.0)  # [BLOCK, D_PAD]
            m2b = tl.sum(dev * dev, 0)  # [D_PAD]
            tot = cnt + nb
            delta = mb - mean  # [D_PAD]
            mean = mean + delta * (nb / tot)
            m2 = m2 + m2b + delta * delta * (cnt * nb / tot)
            big = tl.maximum(big, tl.max(tl.where(ok, x, float("-inf")), 0))
            small = tl.minimum(small, tl.min(tl.where(ok, x, float("inf")), 0))
        return mean, m2, big, small

    @triton.jit
    def _moments_kernel(
        Q, K, V, PART, KMAX, KMIN,
        sq_b, sq_h, sq_n, sq_d, sk_b, sk_h, sk_n, sk_d, sv_b, sv_h, sv_n, sv_d,
        H, N, M, D, DV, ROWS_Q, ROWS_K,
        D_PAD: tl.constexpr, DV_PAD: tl.constexpr, BLOCK: tl.constexpr,
    ):
        # One program: a range of query rows and a range of key rows of one (batch, head).
        # PART [BH, SPLIT, 5] float32: mean and squared deviations of its q entries, the same of its k
        # entries, its count of non-finite v entries; KMAX, KMIN [BH, SPLIT, D_PAD]: its keys' per-feature
        # maximum and minimum.
        bh = tl.program_id(0)
        sp = tl.program_id(1)
        split = tl.num_programs(1)
        b = bh // H
        h = bh % H
        offs_d = tl.arange(0, D_PAD)
        dmask = offs_d < D
        lo = sp * ROWS_Q
        hi = tl.minimum(lo + ROWS_Q, N)
        mq, m2q, _, _ = _column_moments(Q + b * sq_b + h * sq_h, sq_n, sq_d, lo, hi, offs_d, dmask, BLOCK, D_PAD)
        # the columns (equal counts) combined: mean of means, and Chan's between-column term
        nq = tl.maximum(hi - lo, 0).to(tl.float32)
        mean_q = tl.sum(tl.where(dmask, mq, 0.0), 0) / D
        dq = tl.where(dmask, mq - mean_q, 0.0)
        m2_q = tl.sum(tl.where(dmask, m2q, 0.0), 0) + nq * tl.sum(dq * dq, 0)
        lo = sp * ROWS_K
        hi = tl.minimum(lo + ROWS_K, M)
        mk, m2k, kmax, kmin = _column_moments(K + b * sk_b + h * sk_h, sk_n, sk_d, lo, hi, offs_d, dmask, BLOCK, D_PAD)
        nk = tl.maximum(hi - lo, 0).to(tl.float32)
        mean_k = tl.sum(tl.where(dmask, mk, 0.0), 0) / D
        dk = tl.where(dmask, mk - mean_k, 0.0)
        m2_k = tl.sum(tl.where(dmask, m2k, 0.0), 0) + nk * tl.sum(dk * dk, 0)
        offs_e = tl.arange(0, DV_PAD)
        emask = offs_e < DV
        bad = tl.zeros([DV_PAD], dtype=tl.float32)
        vb = V + b * sv_b + h * sv_h
        for r0 in range(lo, hi, BLOCK):
            rows = r0 + tl.arange(0, BLOCK)
            ok = (rows[:, None] < hi) & emask[None, :]
            x = tl.load(vb + rows[:, None] * sv_n + offs_e[None, :] * sv_d, mask=ok, other=0.0).to(tl.float32)
            fin = (x == x) & (tl.abs(x) < float("inf"))  # [BLOCK, DV_PAD]: not NaN, not ±inf
            bad += tl.sum(tl.where(fin, 0.0, 1.0), 0)
        out = PART + (bh * split + sp) * 5
        tl.store(out, mean_q)
        tl.store(out + 1, m2_q)
        tl.store(out + 2, mean_k)
        tl.store(out + 3, m2_k)
        tl.store(out + 4, tl.sum(bad, 0))
        tl.store(KMAX + (bh * split + sp) * D_PAD + offs_d, kmax)
        tl.store(KMIN + (bh * split + sp) * D_PAD + offs_d, kmin)

    @triton.jit
    def _part_mean(PART, idx, at, P, SPLIT, ROWS, N, D):
        # Partials idx of the moments kernel's P = BH·SPLIT: (the mean at column `at`, its entry count, valid);
        # program s of a head read min(ROWS, N − s·ROWS) rows of D entries (0 past the end)
        ok = idx < P
        c = tl.minimum(tl.maximum(N - (idx % SPLIT) * ROWS, 0), ROWS).to(tl.float64) * D
        mean = tl.load(PART + idx * 5 + at, mask=ok, other=0.0).to(tl.float64)
        return mean, tl.where(ok, c, 0.0), ok

    @triton.jit
    def _combined_std(PART, at, P, SPLIT, ROWS, N, D, BLOCK: tl.constexpr):
        # The sample standard deviation (divisor n − 1) of all q (at = 0) or k (at = 2) entries from the
        # moments kernel's partials (mean, squared deviations) by Chan's rule, float64, as _combine on the
        # host: NaN for fewer than two entries or a non-finite sum.
        offs = tl.arange(0, BLOCK)
        tot = tl.zeros([BLOCK], dtype=tl.float64)
        cnt = tl.zeros([BLOCK], dtype=tl.float64)
        for p0 in range(0, P, BLOCK):
            mean, c, _ = _part_mean(PART, p0 + offs, at, P, SPLIT, ROWS, N, D)
            tot += mean * c
            cnt += c
        n = tl.sum(cnt, 0)
        mu = tl.sum(tot, 0) / tl.maximum(n, 1.0)
        dev = tl.zeros([BLOCK], dtype=tl.float64)
        for p0 in range(0, P, BLOCK):
            mean, c, ok = _part_mean(PART, p0 + offs, at, P, SPLIT, ROWS, N, D)
            m2 = tl.load(PART + (p0 + offs) * 5 + at + 1, mask=ok, other=0.0).to(tl.float64)
            dev += m2 + (mean - mu) * (mean - mu) * c
        total = tl.sum(dev, 0)
        finite = (total == total) & (tl.abs(total) < float("inf"))
        return tl.where(finite & (n >= 2.0), tl.sqrt(tl.maximum(total, 0.0) / (n - 1.0)), float("nan"))

    @triton.jit
    def _rule_kernel(PART, CURVE, GRID, OUT, P, SPLIT, N, M, D, ROWS_Q, ROWS_K, L, c,
                     CURVE_RULE: tl.constexpr, BLOCK: tl.constexpr, L_PAD: tl.constexpr):
        # One program: σ_q, σ_k from the moments kernel's partials, then the temperatures of the curve rule
        # (CURVE_RULE; else α = β = 1, no moment matching), as LLNAttention._rule computes them on the host.
        # CURVE, GRID [L] float64: ln Var and ln s of the head dim's LLN curve; c: the softmax scale's
        # factor (scale·√d). OUT [5] float64: α, β, σ_q, σ_k, the count of non-finite v entries.
        sq = _combined_std(PART, 0, P, SPLIT, ROWS_Q, N, D, BLOCK)
        sk = _combined_std(PART, 2, P, SPLIT, ROWS_K, M, D, BLOCK)
        offs = tl.arange(0, BLOCK)
        bad = tl.zeros([BLOCK], dtype=tl.float64)
        for p0 in range(0, P, BLOCK):
            idx = p0 + offs
            bad += tl.load(PART + idx * 5 + 4, mask=idx < P, other=0.0).to(tl.float64)
        alpha = tl.where(sq == sq, 1.0, 1.0).to(tl.float64)  # 1 whatever σ (a NaN σ included)
        beta = alpha
        if CURVE_RULE:
            sqr = tl.where(sq > 0.0, sq, 1.0)  # NaN > 0 is False: read as 1, as the host rule
            skr = tl.where(sk > 0.0, sk, 1.0)
            x = c * sqr * skr
            var = x * x
            target = tl.log(var + var * var / (2.0 * D))  # ln of softmax's Var[ln P] (softmax_log_variance)
            j = tl.arange(0, L_PAD)
            inside = j < L
            curve = tl.load(CURVE + j, mask=inside, other=float("inf"))
            grid = tl.load(GRID + j, mask=inside, other=0.0)
            i = tl.sum((curve < target).to(tl.int32), 0)  # bisect_left, then clamped as the host does
            i = tl.minimum(tl.maximum(i, 1), L - 1)
            lo = tl.sum(tl.where(j == i - 1, curve, 0.0), 0)
            hi = tl.sum(tl.where(j == i, curve, 0.0), 0)
            g0 = tl.sum(tl.where(j == i - 1, grid, 0.0), 0)
            g1 = tl.sum(tl.where(j == i, grid, 0.0), 0)
            scale_s = tl.exp(g0 + (target - lo) * (g1 - g0) / (hi - lo))  # the feature scale ασ_q = βσ_k
            alpha = scale_s / sqr
            beta = scale_s / skr
        tl.store(OUT, alpha)
        tl.store(OUT + 1, beta)
        tl.store(OUT + 2, sq)
        tl.store(OUT + 3, sk)
        tl.store(OUT + 4, tl.sum(bad, 0))

    @triton.jit
    def _key_shift(KMAX, bh, beta, SPLIT_S, offs_d, dmask, D_PAD: tl.constexpr):
        # m_l = β·max_j k_jl over the moments kernel's SPLIT_S partial maxima; 0 in padded columns
        big = tl.full([D_PAD], float("-inf"), dtype=tl.float32)
        for s in range(0, SPLIT_S):
            big = tl.maximum(big, tl.load(KMAX + (bh * SPLIT_S + s) * D_PAD + offs_d))
        return tl.where(dmask, beta * big, 0.0)

    @triton.jit
    def _temperatures(AB, alpha, beta, AB_DEVICE: tl.constexpr):
        # (α, β) as float32: read from the device (the rule kernel's AB[0], AB[1], float64) when AB_DEVICE,
        # else the scalars passed; the same float32 values either way (float64 → float32, as the launch
        # converts a Python float)
        if AB_DEVICE:
            alpha = tl.load(AB).to(tl.float32)
            beta = tl.load(AB + 1).to(tl.float32)
        return alpha, beta

    @triton.jit
    def _query_features(q, alpha, m, dmask):
        # qt = exp(αq + m − M_i) [BLOCK, D_PAD] float32 with M_i the row maximum; 0 in padded columns
        w = tl.where(dmask[None, :], alpha * q + m[None, :], float("-inf"))
        big = tl.max(w, 1)
        return tl.exp(w - big[:, None])

    @triton.jit
    def _sum_partials(P, bh, split, offs_a, offs_b, A_PAD: tl.constexpr, B_PAD: tl.constexpr):
        # Σ_s P[bh, s] of [BH, SPLIT, A_PAD, B_PAD] float32 partials, in order
        acc = tl.zeros([A_PAD, B_PAD], dtype=tl.float32)
        base = P + bh * split * A_PAD * B_PAD + offs_a[:, None] * B_PAD + offs_b[None, :]
        for s in range(0, split):
            acc += tl.load(base + s * A_PAD * B_PAD)
        return acc

    @triton.jit
    def _sum_vectors(P, bh, split, offs_a, A_PAD: tl.constexpr):
        acc = tl.zeros([A_PAD], dtype=tl.float32)
        for s in range(0, split):
            acc += tl.load(P + (bh * split + s) * A_PAD + offs_a)
        return acc

    @triton.jit
    def _nc_state_kernel(
        K, V, KMAX, SP, ZP, AB,
        sk_b, sk_h, sk_n, sk_d, sv_b, sv_h, sv_n, sv_d,
        H, M, D, DV, ROWS, SPLIT_S, beta,
        D_PAD: tl.constexpr, DV_PAD: tl.constexpr, BLOCK: tl.constexpr, PRECISION: tl.constexpr,
        AB_DEVICE: tl.constexpr,
    ):
        # One program, a range of keys of one head: its share of S = ktᵀ v and z = Σ kt.
        _, beta = _temperatures(AB, beta, beta, AB_DEVICE)
        bh, b, h, offs_d, offs_e, dmask, emask = _head(H, D, DV, D_PAD, DV_PAD)
        sp = tl.program_id(1)
        split = tl.num_programs(1)
        m = _key_shift(KMAX, bh, beta, SPLIT_S, offs_d, dmask, D_PAD)  # [D_PAD]
        s_acc = tl.zeros([D_PAD, DV_PAD], dtype=tl.float32)
        z_acc = tl.zeros([D_PAD], dtype=tl.float32)
        lo = sp * ROWS
        hi = tl.minimum(lo + ROWS, M)
        for r0 in range(lo, hi, BLOCK):
            rows = r0 + tl.arange(0, BLOCK)  # [BLOCK]
            rmask = rows < hi
            kmask = rmask[:, None] & dmask[None, :]
            kk = _tile(K, b, h, sk_b, sk_h, sk_n, sk_d, rows, offs_d, kmask)  # [BLOCK, D_PAD]
            vmask = rmask[:, None] & emask[None, :]
            vv = _tile(V, b, h, sv_b, sv_h, sv_n, sv_d, rows, offs_e, vmask)  # [BLOCK, DV_PAD]
            kt = tl.where(kmask, tl.exp(beta * kk - m[None, :]), 0.0)  # [BLOCK, D_PAD]
            s_acc += tl.dot(tl.trans(kt), vv, input_precision=PRECISION)  # [D_PAD, DV_PAD]
            z_acc += tl.sum(kt, 0)
        tl.store(SP + (bh * split + sp) * D_PAD * DV_PAD + offs_d[:, None] * DV_PAD + offs_e[None, :], s_acc)
        tl.store(ZP + (bh * split + sp) * D_PAD + offs_d, z_acc)

    @triton.jit
    def _nc_out_kernel(
        Q, K, V, SP, ZP, KMAX, OUT, DEN, OUT_L, WL, WD, AB,
        sq_b, sq_h, sq_n, sq_d, sk_b, sk_h, sk_n, sk_d, sv_b, sv_h, sv_n, sv_d,
        H, N, D, DV, ROWS, SPLIT_S, NP, alpha, beta, eps, dscale, wl, wd,
        D_PAD: tl.constexpr, DV_PAD: tl.constexpr, BLOCK: tl.constexpr, PRECISION: tl.constexpr,
        DIAG: tl.constexpr, PER_CHANNEL: tl.constexpr, AB_DEVICE: tl.constexpr,
    ):
        # One program, a range of queries of one head: out = qt S / (qt·z + eps) (S, z: the sum of NP
        # partials at SP, ZP), and the denominators.
        # OUT [BH, N, DV] contiguous in the output dtype; DEN [BH, N] float32. DIAG (LLN+Diag, blocks of
        # BLOCK tokens: the program's tiles are its blocks): OUT = w_L ⊙ LLN + w_D ⊙ block softmax, and
        # OUT_L the LLN part, for the backward.
        alpha, beta = _temperatures(AB, alpha, beta, AB_DEVICE)
        bh, b, h, offs_d, offs_e, dmask, emask = _head(H, D, DV, D_PAD, DV_PAD)
        sp = tl.program_id(1)
        m = _key_shift(KMAX, bh, beta, SPLIT_S, offs_d, dmask, D_PAD)  # [D_PAD]
        s = _sum_partials(SP, bh, NP, offs_d, offs_e, D_PAD, DV_PAD)  # [D_PAD, DV_PAD]
        z = _sum_vectors(ZP, bh, NP, offs_d, D_PAD)  # [D_PAD]
        lo = sp * ROWS
        hi = tl.minimum(lo + ROWS, N)
        for r0 in range(lo, hi, BLOCK):
            rows = r0 + tl.arange(0, BLOCK)
            rmask = rows < hi
            qmask = rmask[:, None] & dmask[None, :]
            qq = _tile(Q, b, h, sq_b, sq_h, sq_n, sq_d, rows, offs_d, qmask)  # [BLOCK, D_PAD]
            qt = _query_features(qq, alpha, m, dmask)  # [BLOCK, D_PAD]
            num = tl.dot(qt, s, input_precision=PRECISION)  # [BLOCK, DV_PAD]
            den = tl.sum(qt * z[None, :], 1) + eps  # [BLOCK], ≥ 1 + eps
            out = num / den[:, None]
            at = (bh * N + rows[:, None]) * DV + offs_e[None, :]
            vmask = rmask[:, None] & emask[None, :]
            if DIAG:
                kk = _tile(K, b, h, sk_b, sk_h, sk_n, sk_d, rows, offs_d, qmask)  # [BLOCK, D_PAD]
                vv = _tile(V, b, h, sv_b, sv_h, sv_n, sv_d, rows, offs_e, vmask)  # [BLOCK, DV_PAD]
                _, od = block_softmax(qq, kk, vv, rmask, dscale, False, BLOCK, PRECISION)  # [BLOCK, DV_PAD]
                tl.store(OUT_L + at, out.to(OUT_L.dtype.element_ty), mask=vmask)
                wl_h, wd_h = mix_weights(WL, WD, h, DV, offs_e, emask, wl, wd, PER_CHANNEL)
                out = wl_h * out + wd_h * od
            tl.store(OUT + at, out.to(OUT.dtype.element_ty), mask=vmask)
            tl.store(DEN + bh * N + rows, den, mask=rmask)

    @triton.jit
    def _nc_grad_q_kernel(
        Q, K, V, G, OUT, DEN, SP, ZP, KMAX, DQ, GSP, GZP, WL, WD, DK, DV_OUT, DWL, DWD, AB,
        sq_b, sq_h, sq_n, sq_d, sk_b, sk_h, sk_n, sk_d, sv_b, sv_h, sv_n, sv_d, sg_b, sg_h, sg_n, sg_d,
        H, N, D, DV, ROWS, SPLIT_S, NP, alpha, beta, dscale, wl, wd,
        D_PAD: tl.constexpr, DV_PAD: tl.constexpr, BLOCK: tl.constexpr, PRECISION: tl.constexpr,
        DIAG: tl.constexpr, PER_CHANNEL: tl.constexpr, MIXED: tl.constexpr, AB_DEVICE: tl.constexpr,
    ):
        # One program, a range of queries of one head: dq, and its share of ∂S = qtᵀ gn, ∂z = qtᵀ gd
        # (S, z: the sum of NP partials at SP, ZP).
        # gn = g / den (through the numerator), gd = −(g·out) / den (through the denominator). MIXED: OUT
        # is LLN+Diag's LLN part, whose output gradient is w_L ⊙ g. DIAG (with MIXED): the block softmax's
        # gradients (for w_D ⊙ g) add to dq here and are stored at DK, DV_OUT, which the key kernel then
        # adds to; per-channel weights get the program's Σ_rows g ⊙ LLN and Σ_rows g ⊙ Diag at DWL, DWD
        # [BH, SPLIT, DV_PAD].
        alpha, beta = _temperatures(AB, alpha, beta, AB_DEVICE)
        bh, b, h, offs_d, offs_e, dmask, emask = _head(H, D, DV, D_PAD, DV_PAD)
        sp = tl.program_id(1)
        split = tl.num_programs(1)
        m = _key_shift(KMAX, bh, beta, SPLIT_S, offs_d, dmask, D_PAD)
        s = _sum_partials(SP, bh, NP, offs_d, offs_e, D_PAD, DV_PAD)  # [D_PAD, DV_PAD]
        z = _sum_vectors(ZP, bh, NP, offs_d, D_PAD)  # [D_PAD]
        gs_acc = tl.zeros([D_PAD, DV_PAD], dtype=tl.float32)
        gz_acc = tl.zeros([D_PAD], dtype=tl.float32)
        wl_acc = tl.zeros([DV_PAD], dtype=tl.float32)
        wd_acc = tl.zeros([DV_PAD], dtype=tl.float32)
        if MIXED:
            wl_h, wd_h = mix_weights(WL, WD, h, DV, offs_e, emask, wl, wd, PER_CHANNEL)
        lo = sp * ROWS
        hi = tl.minimum(lo + ROWS, N)
        for r0 in range(lo, hi, BLOCK):
            rows = r0 + tl.arange(0, BLOCK)
            rmask = rows < hi
            qmask = rmask[:, None] & dmask[None, :]
            vmask = rmask[:, None] & emask[None, :]
            qq = _tile(Q, b, h, sq_b, sq_h, sq_n, sq_d, rows, offs_d, qmask)  # [BLOCK, D_PAD]
            qt = tl.where(qmask, _query_features(qq, alpha, m, dmask), 0.0)  # [BLOCK, D_PAD]
            g = _tile(G, b, h, sg_b, sg_h, sg_n, sg_d, rows, offs_e, vmask)  # [BLOCK, DV_PAD]
            o = _flat_tile(OUT, bh, N, DV, rows, offs_e, vmask)
            den = tl.load(DEN + bh * N + rows, mask=rmask, other=1.0)  # [BLOCK]
            gl = g
            if MIXED:
                gl = wl_h * g
            gn = gl / den[:, None]  # [BLOCK, DV_PAD]
            gd = -tl.sum(gl * o, 1) / den  # [BLOCK]
            gqt = tl.dot(gn, tl.trans(s), input_precision=PRECISION) + gd[:, None] * z[None, :]  # [BLOCK, D_PAD]
            dq = alpha * gqt * qt
            if DIAG:
                kk = _tile(K, b, h, sk_b, sk_h, sk_n, sk_d, rows, offs_d, qmask)  # [BLOCK, D_PAD]
                vv = _tile(V, b, h, sv_b, sv_h, sv_n, sv_d, rows, offs_e, vmask)  # [BLOCK, DV_PAD]
                p = block_probs(qq, kk, rmask, dscale, False, BLOCK, PRECISION)  # [BLOCK, BLOCK]
                dq_d, dk_d, dv_d = block_softmax_grads(qq, kk, vv, p, wd_h * g, dscale, PRECISION)
                dq += dq_d
                tl.store(DK + (bh * N + rows[:, None]) * D + offs_d[None, :], dk_d.to(DK.dtype.element_ty), mask=qmask)
                tl.store(DV_OUT + (bh * N + rows[:, None]) * DV + offs_e[None, :], dv_d.to(DV_OUT.dtype.element_ty),
                         mask=vmask)
                if PER_CHANNEL:
                    wl_acc += tl.sum(g * o, 0)
                    wd_acc += tl.sum(g * tl.dot(p, vv, input_precision=PRECISION), 0)  # g ⊙ the block's output
            tl.store(DQ + (bh * N + rows[:, None]) * D + offs_d[None, :], dq.to(DQ.dtype.element_ty), mask=qmask)
            gs_acc += tl.dot(tl.trans(qt), gn, input_precision=PRECISION)  # [D_PAD, DV_PAD]
            gz_acc += tl.sum(qt * gd[:, None], 0)
        tl.store(GSP + (bh * split + sp) * D_PAD * DV_PAD + offs_d[:, None] * DV_PAD + offs_e[None, :], gs_acc)
        tl.store(GZP + (bh * split + sp) * D_PAD + offs_d, gz_acc)
        if DIAG and PER_CHANNEL:
            tl.store(DWL + (bh * split + sp) * DV_PAD + offs_e, wl_acc)
            tl.store(DWD + (bh * split + sp) * DV_PAD + offs_e, wd_acc)

    @triton.jit
    def _nc_grad_kv_kernel(
        K, V, KMAX, GSP, GZP, DK, DV_OUT, AB,
        sk_b, sk_h, sk_n, sk_d, sv_b, sv_h, sv_n, sv_d,
        H, M, D, DV, ROWS, SPLIT_S, NP, beta,
        D_PAD: tl.constexpr, DV_PAD: tl.constexpr, BLOCK: tl.constexpr, PRECISION: tl.constexpr,
        DIAG: tl.constexpr, AB_DEVICE: tl.constexpr,
    ):
        # One program, a range of keys of one head: dv = kt ∂S, dk = β·(v ∂Sᵀ + ∂z)·kt (DIAG: added to the
        # block softmax's, which the query kernel left at DK, DV_OUT).
        _, beta = _temperatures(AB, beta, beta, AB_DEVICE)
        bh, b, h, offs_d, offs_e, dmask, emask = _head(H, D, DV, D_PAD, DV_PAD)
        sp = tl.program_id(1)
        m = _key_shift(KMAX, bh, beta, SPLIT_S, offs_d, dmask, D_PAD)
        gs = _sum_partials(GSP, bh, NP, offs_d, offs_e, D_PAD, DV_PAD)  # [D_PAD, DV_PAD]: NP partials
        gz = _sum_vectors(GZP, bh, NP, offs_d, D_PAD)  # [D_PAD]
        lo = sp * ROWS
        hi = tl.minimum(lo + ROWS, M)
        for r0 in range(lo, hi, BLOCK):
            rows = r0 + tl.arange(0, BLOCK)
            rmask = rows < hi
            kmask = rmask[:, None] & dmask[None, :]
            vmask = rmask[:, None] & emask[None, :]
            kk = _tile(K, b, h, sk_b, sk_h, sk_n, sk_d, rows, offs_d, kmask)  # [BLOCK, D_PAD]
            vv = _tile(V, b, h, sv_b, sv_h, sv_n, sv_d, rows, offs_e, vmask)  # [BLOCK, DV_PAD]
            kt = tl.where(kmask, tl.exp(beta * kk - m[None, :]), 0.0)  # [BLOCK, D_PAD]
            dv = tl.dot(kt, gs, input_precision=PRECISION)  # [BLOCK, DV_PAD]
            gkt = tl.dot(vv, tl.trans(gs), input_precision=PRECISION) + gz[None, :]  # [BLOCK, D_PAD]
            dk = beta * gkt * kt
            if DIAG:
                dk += _flat_tile(DK, bh, M, D, rows, offs_d, kmask)
                dv += _flat_tile(DV_OUT, bh, M, DV, rows, offs_e, vmask)
            tl.store(DK + (bh * M + rows[:, None]) * D + offs_d[None, :], dk.to(DK.dtype.element_ty), mask=kmask)
            tl.store(DV_OUT + (bh * M + rows[:, None]) * DV + offs_e[None, :], dv.to(DV_OUT.dtype.element_ty),
                     mask=vmask)

    @triton.jit
    def _prefix_kernel(X, Z, NC, SX, SZ, NBX, BS: tl.constexpr, U: tl.constexpr):
        # In place, along the chunks: X [BH, NC, SX] and Z [BH, NC, SZ] float32 (the per-chunk states and
        # key sums) become their running sums over chunks 0 … c. One program: BS columns of one head, of X
        # (program index < NBX) or of Z, U chunks per step (a [U, BS] tile: enough bytes in flight to
        # stream at memory speed, which torch.cumsum along this middle axis did not reach).
        bh = tl.program_id(0)
        j = tl.program_id(1)
        on_x = j < NBX
        width = tl.where(on_x, SX, SZ)
        cols = tl.where(on_x, j, j - NBX) * BS + tl.arange(0, BS)
        cmask = cols < width
        carry = tl.zeros([BS], dtype=tl.float32)
        for c0 in range(0, NC, U):
            chunks = c0 + tl.arange(0, U)
            m = (chunks[:, None] < NC) & cmask[None, :]
            at = (bh * NC + chunks[:, None]) * width + cols[None, :]
            if on_x:
                x = tl.load(X + at, mask=m, other=0.0)
            else:
                x = tl.load(Z + at, mask=m, other=0.0)
            run = tl.cumsum(x, 0) + carry[None, :]  # [U, BS]
            if on_x:
                tl.store(X + at, run, mask=m)
            else:
                tl.store(Z + at, run, mask=m)
            carry += tl.sum(x, 0)

    @triton.jit
    def _c_state_kernel(
        K, V, KMAX, HS, ZS,
        sk_b, sk_h, sk_n, sk_d, sv_b, sv_h, sv_n, sv_d,
        H, N, D, DV, SPLIT_S, beta, NC,
        D_PAD: tl.constexpr, DV_PAD: tl.constexpr, C: tl.constexpr, PRECISION: tl.constexpr,
    ):
        # One program, chunk c of one head: its state ktᵀ v [D_PAD, DV_PAD] and key sum Σ kt [D_PAD],
        # at HS[bh, c], ZS[bh, c] (a prefix sum over chunks follows).
        bh, b, h, offs_d, offs_e, dmask, emask = _head(H, D, DV, D_PAD, DV_PAD)
        c = tl.program_id(1)
        m = _key_shift(KMAX, bh, beta, SPLIT_S, offs_d, dmask, D_PAD)
        rows = c * C + tl.arange(0, C)
        rmask = rows < N
        kmask = rmask[:, None] & dmask[None, :]
        kk = _tile(K, b, h, sk_b, sk_h, sk_n, sk_d, rows, offs_d, kmask)  # [C, D_PAD]
        vv = _tile(V, b, h, sv_b, sv_h, sv_n, sv_d, rows, offs_e, rmask[:, None] & emask[None, :])  # [C, DV_PAD]
        kt = tl.where(kmask, tl.exp(beta * kk - m[None, :]), 0.0)  # [C, D_PAD]
        hs = tl.dot(tl.trans(kt), vv, input_precision=PRECISION)  # [D_PAD, DV_PAD]
        tl.store(HS + (bh * NC + c) * D_PAD * DV_PAD + offs_d[:, None] * DV_PAD + offs_e[None, :], hs)
        tl.store(ZS + (bh * NC + c) * D_PAD + offs_d, tl.sum(kt, 0))

    @triton.jit
    def _chunk_tiles(Q, K, V, KMAX, bh, c, H, N, D, DV, SPLIT_S, alpha, beta,
                     sq_b, sq_h, sq_n, sq_d, sk_b, sk_h, sk_n, sk_d, sv_b, sv_h, sv_n, sv_d,
                     D_PAD: tl.constexpr, DV_PAD: tl.constexpr, C: tl.constexpr, PRECISION: tl.constexpr):
        # Chunk c of one head: q, k as loaded (float32), qt, kt [C, D_PAD], v [C, DV_PAD], the causal
        # intra-chunk weights a = tril(qt ktᵀ) [C, C], and the rows, their mask and the feature mask.
        b = bh // H
        h = bh % H
        offs_d = tl.arange(0, D_PAD)
        offs_e = tl.arange(0, DV_PAD)
        dmask = offs_d < D
        emask = offs_e < DV
        m = _key_shift(KMAX, bh, beta, SPLIT_S, offs_d, dmask, D_PAD)
        rows = c * C + tl.arange(0, C)
        rmask = rows < N
        qmask = rmask[:, None] & dmask[None, :]
        qq = _tile(Q, b, h, sq_b, sq_h, sq_n, sq_d, rows, offs_d, qmask)
        kk = _tile(K, b, h, sk_b, sk_h, sk_n, sk_d, rows, offs_d, qmask)
        vv = _tile(V, b, h, sv_b, sv_h, sv_n, sv_d, rows, offs_e, rmask[:, None] & emask[None, :])
        qt = tl.where(qmask, _query_features(qq, alpha, m, dmask), 0.0)  # [C, D_PAD]
        kt = tl.where(qmask, tl.exp(beta * kk - m[None, :]), 0.0)  # [C, D_PAD]
        tri = tl.arange(0, C)[None, :] <= tl.arange(0, C)[:, None]  # [C, C]: key j ≤ query i
        a = tl.where(tri, tl.dot(qt, tl.trans(kt), input_precision=PRECISION), 0.0)  # [C, C]
        return qq, kk, qt, kt, vv, a, tri, rows, rmask, offs_d, offs_e, dmask, emask

    @triton.jit
    def _c_out_kernel(
        Q, K, V, KMAX, HS, ZS, OUT, DEN, OUT_L, WL, WD,
        sq_b, sq_h, sq_n, sq_d, sk_b, sk_h, sk_n, sk_d, sv_b, sv_h, sv_n, sv_d,
        H, N, D, DV, SPLIT_S, alpha, beta, eps, NC, dscale, wl, wd,
        D_PAD: tl.constexpr, DV_PAD: tl.constexpr, C: tl.constexpr, PRECISION: tl.constexpr,
        DIAG: tl.constexpr, PER_CHANNEL: tl.constexpr,
    ):
        # One program, chunk c of one head: out = (qt S_<c + a v) / ((qt·z_<c + Σ a)(1 + eps)), with
        # S_<c, z_<c the inclusive prefix sums HS, ZS at chunk c − 1 (0 for the first chunk). DIAG
        # (LLN+Diag, blocks of C tokens: the chunks): OUT = w_L ⊙ LLN + w_D ⊙ causal block softmax, and
        # OUT_L the LLN part, for the backward.
        bh = tl.program_id(0)
        c = tl.program_id(1)
        qq, kk, qt, kt, vv, a, tri, rows, rmask, offs_d, offs_e, dmask, emask = _chunk_tiles(
            Q, K, V, KMAX, bh, c, H, N, D, DV, SPLIT_S, alpha, beta,
            sq_b, sq_h, sq_n, sq_d, sk_b, sk_h, sk_n, sk_d, sv_b, sv_h, sv_n, sv_d, D_PAD, DV_PAD, C, PRECISION)
        prev = tl.maximum(c - 1, 0)
        first = c == 0
        s = tl.load(HS + (bh * NC + prev) * D_PAD * DV_PAD + offs_d[:, None] * DV_PAD + offs_e[None, :])
        z = tl.load(ZS + (bh * NC + prev) * D_PAD + offs_d)
        s = tl.where(first, 0.0, s)  # [D_PAD, DV_PAD]
        z = tl.where(first, 0.0, z)  # [D_PAD]
        num = tl.dot(qt, s, input_precision=PRECISION) + tl.dot(a, vv, input_precision=PRECISION)  # [C, DV_PAD]
        den = tl.sum(qt * z[None, :], 1) + tl.sum(a, 1)  # [C]
        # the shared shift leaves den on no fixed scale: eps is relative, and a row with no weight gives 0
        den = tl.where(den > 0, den * (1.0 + eps), 1.0)
        out = num / den[:, None]
        at = (bh * N + rows[:, None]) * DV + offs_e[None, :]
        vmask = rmask[:, None] & emask[None, :]
        if DIAG:
            _, od = block_softmax(qq, kk, vv, rmask, dscale, True, C, PRECISION)  # [C, DV_PAD]
            tl.store(OUT_L + at, out.to(OUT_L.dtype.element_ty), mask=vmask)
            wl_h, wd_h = mix_weights(WL, WD, bh % H, DV, offs_e, emask, wl, wd, PER_CHANNEL)
            out = wl_h * out + wd_h * od
        tl.store(OUT + at, out.to(OUT.dtype.element_ty), mask=vmask)
        tl.store(DEN + bh * N + rows, den, mask=rmask)

    @triton.jit
    def _c_grad_state_kernel(
        Q, G, OUT, DEN, KMAX, GHS, GZS, WL, WD,
        sq_b, sq_h, sq_n, sq_d, sg_b, sg_h, sg_n, sg_d,
        H, N, D, DV, SPLIT_S, alpha, beta, NC, wl, wd,
        D_PAD: tl.constexpr, DV_PAD: tl.constexpr, C: tl.constexpr, PRECISION: tl.constexpr,
        MIXED: tl.constexpr, PER_CHANNEL: tl.constexpr,
    ):
        # One program, chunk c of one head: qtᵀ gn [D_PAD, DV_PAD] and qtᵀ gd [D_PAD], stored at chunk
        # position NC − 1 − c (reversed, so a prefix sum gives the sums over later chunks). MIXED: OUT is
        # LLN+Diag's LLN part, whose output gradient is w_L ⊙ g.
        bh, b, h, offs_d, offs_e, dmask, emask = _head(H, D, DV, D_PAD, DV_PAD)
        c = tl.program_id(1)
        m = _key_shift(KMAX, bh, beta, SPLIT_S, offs_d, dmask, D_PAD)
        rows = c * C + tl.arange(0, C)
        rmask = rows < N
        qmask = rmask[:, None] & dmask[None, :]
        vmask = rmask[:, None] & emask[None, :]
        qq = _tile(Q, b, h, sq_b, sq_h, sq_n, sq_d, rows, offs_d, qmask)
        qt = tl.where(qmask, _query_features(qq, alpha, m, dmask), 0.0)  # [C, D_PAD]
        g = _tile(G, b, h, sg_b, sg_h, sg_n, sg_d, rows, offs_e, vmask)
        o = _flat_tile(OUT, bh, N, DV, rows, offs_e, vmask)
        den = tl.load(DEN + bh * N + rows, mask=rmask, other=1.0)
        if MIXED:
            wl_h, _ = mix_weights(WL, WD, h, DV, offs_e, emask, wl, wd, PER_CHANNEL)
            g = wl_h * g
        gn = g / den[:, None]  # [C, DV_PAD]
        gd = -tl.sum(g * o, 1) / den  # [C]
        rc = NC - 1 - c
        tl.store(GHS + (bh * NC + rc) * D_PAD * DV_PAD + offs_d[:, None] * DV_PAD + offs_e[None, :],
                 tl.dot(tl.trans(qt), gn, input_precision=PRECISION))
        tl.store(GZS + (bh * NC + rc) * D_PAD + offs_d, tl.sum(qt * gd[:, None], 0))

    @triton.jit
    def _c_grad_kernel(
        Q, K, V, G, OUT, DEN, KMAX, HS, ZS, GHS, GZS, DQ, DK, DV_OUT, WL, WD, DWL, DWD,
        sq_b, sq_h, sq_n, sq_d, sk_b, sk_h, sk_n, sk_d, sv_b, sv_h, sv_n, sv_d, sg_b, sg_h, sg_n, sg_d,
        H, N, D, DV, SPLIT_S, alpha, beta, NC, dscale, wl, wd,
        D_PAD: tl.constexpr, DV_PAD: tl.constexpr, C: tl.constexpr, PRECISION: tl.constexpr,
        DIAG: tl.constexpr, PER_CHANNEL: tl.constexpr, MIXED: tl.constexpr,
    ):
        # One program, chunk c of one head: dq, dk, dv. With ga = tril(gn vᵀ + gd) [C, C], S_<c, z_<c the
        # earlier chunks' state and key sum, ∂S_>c, ∂z_>c the later chunks' qtᵀ gn and qtᵀ gd:
        #   dq = α·(gn S_<cᵀ + gd z_<c + ga kt)·qt
        #   dk = β·(gaᵀ qt + v ∂S_>cᵀ + ∂z_>c)·kt
        #   dv = aᵀ gn + kt ∂S_>c
        # MIXED: OUT is LLN+Diag's LLN part (output gradient w_L ⊙ g). DIAG (with MIXED): the causal block
        # softmax's gradients for w_D ⊙ g are added, and per-channel weights get the chunk's Σ_rows g ⊙ LLN
        # and Σ_rows g ⊙ Diag at DWL, DWD [BH, NC, DV_PAD].
        bh = tl.program_id(0)
        c = tl.program_id(1)
        b = bh // H
        h = bh % H
        qq, kk, qt, kt, vv, a, tri, rows, rmask, offs_d, offs_e, dmask, emask = _chunk_tiles(
            Q, K, V, KMAX, bh, c, H, N, D, DV, SPLIT_S, alpha, beta,
            sq_b, sq_h, sq_n, sq_d, sk_b, sk_h, sk_n, sk_d, sv_b, sv_h, sv_n, sv_d, D_PAD, DV_PAD, C, PRECISION)
        vmask = rmask[:, None] & emask[None, :]
        qmask = rmask[:, None] & dmask[None, :]
        g = _tile(G, b, h, sg_b, sg_h, sg_n, sg_d, rows, offs_e, vmask)
        o = _flat_tile(OUT, bh, N, DV, rows, offs_e, vmask)
        den = tl.load(DEN + bh * N + rows, mask=rmask, other=1.0)
        gl = g
        if MIXED:
            wl_h, wd_h = mix_weights(WL, WD, h, DV, offs_e, emask, wl, wd, PER_CHANNEL)
            gl = wl_h * g
        gn = gl / den[:, None]  # [C, DV_PAD]
        gd = -tl.sum(gl * o, 1) / den  # [C]
        state = offs_d[:, None] * DV_PAD + offs_e[None, :]
        prev = tl.maximum(c - 1, 0)
        s = tl.where(c == 0, 0.0, tl.load(HS + (bh * NC + prev) * D_PAD * DV_PAD + state))  # S_<c
        z = tl.where(c == 0, 0.0, tl.load(ZS + (bh * NC + prev) * D_PAD + offs_d))  # z_<c
        later = tl.maximum(NC - 2 - c, 0)  # reversed position of chunk c + 1
        last = c == NC - 1
        gs = tl.where(last, 0.0, tl.load(GHS + (bh * NC + later) * D_PAD * DV_PAD + state))  # ∂S_>c
        gz = tl.where(last, 0.0, tl.load(GZS + (bh * NC + later) * D_PAD + offs_d))  # ∂z_>c
        ga = tl.where(tri, tl.dot(gn, tl.trans(vv), input_precision=PRECISION) + gd[:, None], 0.0)  # [C, C]
        dqt = (tl.dot(gn, tl.trans(s), input_precision=PRECISION) + gd[:, None] * z[None, :]
               + tl.dot(ga, kt, input_precision=PRECISION))  # [C, D_PAD]
        dkt = (tl.dot(tl.trans(ga), qt, input_precision=PRECISION)
               + tl.dot(vv, tl.trans(gs), input_precision=PRECISION) + gz[None, :])  # [C, D_PAD]
        dv = tl.dot(tl.trans(a), gn, input_precision=PRECISION) + tl.dot(kt, gs, input_precision=PRECISION)
        dq = alpha * dqt * qt
        dk = beta * dkt * kt
        if DIAG:
            p = block_probs(qq, kk, rmask, dscale, True, C, PRECISION)  # [C, C]
            dq_d, dk_d, dv_d = block_softmax_grads(qq, kk, vv, p, wd_h * g, dscale, PRECISION)
            dq += dq_d
            dk += dk_d
            dv += dv_d
            if PER_CHANNEL:
                tl.store(DWL + (bh * NC + c) * DV_PAD + offs_e, tl.sum(g * o, 0))
                tl.store(DWD + (bh * NC + c) * DV_PAD + offs_e,
                         tl.sum(g * tl.dot(p, vv, input_precision=PRECISION), 0))  # g ⊙ the block's output
        tl.store(DQ + (bh * N + rows[:, None]) * D + offs_d[None, :], dq.to(DQ.dtype.element_ty), mask=qmask)
        tl.store(DK + (bh * N + rows[:, None]) * D + offs_d[None, :], dk.to(DK.dtype.element_ty), mask=qmask)
        tl.store(DV_OUT + (bh * N + rows[:, None]) * DV + offs_e[None, :], dv.to(DV_OUT.dtype.element_ty),
                 mask=vmask)



class Moments:
    """What :func:`moments` read: ``sigma_q``, ``sigma_k`` (floats; NaN when q or k holds a NaN or inf),
    ``v_finite`` (bool), ``kmax`` (``[B·H, SPLIT, D_PAD]`` float32 on the device, the per-program key
    maxima, or their reduction, ``SPLIT = 1``), ``split`` (``SPLIT``) and ``spread`` (k's spread, a
    float, when asked for; else None)."""

    __slots__ = ("sigma_q", "sigma_k", "v_finite", "kmax", "split", "spread")

    def __init__(self, sigma_q, sigma_k, v_finite, kmax, split, spread=None):
        self.sigma_q, self.sigma_k, self.v_finite = sigma_q, sigma_k, v_finite
        self.kmax, self.split, self.spread = kmax, split, spread


@functools.lru_cache(maxsize=256)
def _counts(n: int, m_: int, d: int, split: int, rows_q: int, rows_k: int) -> np.ndarray:
    """``[2, 1, SPLIT]`` float64: the q and k entries each :func:`moments` program reads (0 for a program
    past the end)."""
    starts = np.arange(split, dtype=np.float64)
    return np.stack([np.clip(n - starts * rows_q, 0, rows_q), np.clip(m_ - starts * rows_k, 0, rows_k)])[:, None] * d


def _combine(mean: np.ndarray, m2: np.ndarray, counts: np.ndarray) -> tuple:
    """Sample standard deviations (divisor n − 1) of q and of k from per-part means and squared deviations
    (Chan's rule), in float64; NaN for fewer than two entries or a non-finite sum. ``mean, m2``:
    ``[2, BH, SPLIT]``; ``counts``: ``[2, 1, SPLIT]`` entries per part (a part with none holds zeros)."""
    n = counts.sum((1, 2)) * mean.shape[1]  # [2]
    with np.errstate(invalid="ignore", over="ignore"):
        mu = (mean * counts).sum((1, 2)) / np.maximum(n, 1)
        total = m2.sum((1, 2)) + (((mean - mu[:, None, None]) ** 2) * counts).sum((1, 2))
    return tuple(math.sqrt(max(t, 0.0) / (c - 1)) if c >= 2 and math.isfinite(t) else float("nan")
                 for t, c in zip(total.tolist(), n.tolist()))


def _moments_launch(q, k, v):
    """The moments kernel's launch: ``(part [BH·SPLIT·5], kmax, kmin [BH, SPLIT, D_PAD], split, rows_q,
    rows_k)`` on the device, nothing read back."""
    bsz, h, n, d = q.shape
    m_, dv = k.shape[-2], v.shape[-1]
    d_pad, dv_pad = pad(d), pad(dv)
    block = _block(d_pad, dv_pad)
    bh = bsz * h
    split = _splits(bh, max(n, m_), block, q.device)
    rows_q, rows_k = _rows(n, split, block), _rows(m_, split, block)
    # one allocation: the per-program moments [BH, SPLIT, 5], then key maxima and minima [BH, SPLIT, D_PAD]
    buf = torch.empty(bh * split * (5 + 2 * d_pad), dtype=torch.float32, device=q.device)
    cut = bh * split * 5
    part = buf[:cut]
    kmax, kmin = buf[cut:].view(2, bh, split, d_pad).unbind(0)
    with on_device(q):
        launch(_moments_kernel, (bh, split),
               q, k, v, part, kmax, kmin, *q.stride(), *k.stride(), *v.stride(),
               h, n, m_, d, dv, rows_q, rows_k, D_PAD=d_pad, DV_PAD=dv_pad, BLOCK=block)
    return part, kmax, kmin, split, rows_q, rows_k


def device_rule(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, c: float, curve: bool):
    """σ_q, σ_k and the temperatures of LLN's curve rule, computed on the device: two launches (a third
    reduces a long call's key maxima), nothing read back, so a non-causal call never waits for the device
    (and can be captured in a CUDA graph).

    Args: ``q, k, v`` as :func:`moments`; ``c``: the softmax scale's factor ``scale·√d`` (1 for
    ``1/√d``); ``curve``: the ``"curve"`` rule (:func:`attnstats.kernels.moment_matching.curve_feature_scale`
    at softmax's ``Var[ln P]``), else ``α = β = 1``. Returns ``(Moments, ab)``: the key maxima as
    :func:`moments` gives them (its σ fields None), and ``ab`` float64 ``[5]`` on the device: ``α, β, σ_q,
    σ_k``, the number of non-finite entries of v — the numbers :meth:`LLNAttention._rule` gives from
    :func:`moments`' σ (Chan's rule in float64 in another order; tested).
    """
    from .moment_matching import _curve_tensors

    bsz, h, n, d = q.shape
    part, kmax, _, split, rows_q, rows_k = _moments_launch(q, k, v)
    curve_t, grid_t = _curve_tensors(d, q.device)  # float64 ln Var, ln s, copied to the device once
    ab = torch.empty(5, dtype=torch.float64, device=q.device)
    with on_device(q):
        launch(_rule_kernel, (1,), part, curve_t, grid_t, ab, bsz * h * split, split, n, k.shape[-2], d,
               rows_q, rows_k, curve_t.numel(), float(c),
               CURVE_RULE=bool(curve), BLOCK=1024, L_PAD=triton.next_power_of_2(curve_t.numel()))
    if split > _SUMMED_IN_KERNEL:  # as moments(): one partial of the key maxima, not dozens
        kmax, split = kmax.amax(1, keepdim=True), 1
    return Moments(None, None, None, kmax, split), ab


def moments(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spread: bool = False) -> Moments:
    """σ_q, σ_k, v's finiteness and the per-program key extremes, in one launch and one transfer.

    Args: ``q [B, H, N, d]``, ``k [B, H, M, d]``, ``v [B, H, M, d_v]`` (any strides) on a device where
    :func:`available`; ``spread``: also read k's spread, the largest ``max_j k_jl − min_j k_jl`` over
    batch, head and feature (what the causal path needs), in the same transfer. σ is ``torch.std``'s
    (all entries, divisor ``n − 1``), to float32 rounding.
    """
    bsz, h, n, d = q.shape
    m_ = k.shape[-2]
    bh = bsz * h
    part, kmax, kmin, split, rows_q, rows_k = _moments_launch(q, k, v)
    cut = bh * split * 5
    if spread:
        width = (kmax.amax(1) - kmin.amin(1))[:, :d].amax()  # 0-dim: the padded columns left out
        part = torch.cat([part, width.reshape(1)])
    host = part.cpu().numpy().astype(np.float64)  # the one host transfer
    p = host[:cut].reshape(bh, split, 5).transpose(2, 0, 1)  # [5, BH, SPLIT]
    sq, sk = _combine(p[0:3:2], p[1:4:2], _counts(n, m_, d, split, rows_q, rows_k))
    if split > _SUMMED_IN_KERNEL:  # every later program reads the key shift: one partial, not dozens
        kmax, split = kmax.amax(1, keepdim=True), 1
    return Moments(sq, sk, bool(p[4].sum() == 0), kmax, split, float(host[-1]) if spread else None)


def _states(bh: int, parts: int, d_pad: int, dv_pad: int, device):
    """``([BH, parts, D_PAD, DV_PAD], [BH, parts, D_PAD])`` float32 buffers in one allocation."""
    buf = torch.empty(bh * parts * d_pad * (dv_pad + 1), dtype=torch.float32, device=device)
    cut = bh * parts * d_pad * dv_pad
    return buf[:cut].view(bh, parts, d_pad, dv_pad), buf[cut:].view(bh, parts, d_pad)


class _NonCausalLLN(torch.autograd.Function):
    """Non-causal LLN attention by the fused kernels (module docstring), with its backward; with a Diag
    part (``dscale`` not None), LLN+Diag's ``w_L ⊙ LLN + w_D ⊙ Diag``: inside LLN's kernels, or with
    ``dblock`` (the block size) by the separate block kernel after them (:func:`_diag_after`)."""

    @staticmethod
    @launched_on_device
    def forward(ctx, q, k, v, wl, wd, alpha, beta, eps, kmax, split_s, dscale, dblock):
        bsz, h, n, d = q.shape
        m_, dv = k.shape[-2], v.shape[-1]
        d_pad, dv_pad = pad(d), pad(dv)
        block = _block(d_pad, dv_pad)
        bh = bsz * h
        prec = precision(q.dtype)
        mix = MixWeights(wl, wd, on=dscale is not None)
        inside = mix.on and dblock is None  # the block softmax in LLN's kernels
        dscale = 1.0 if dscale is None else float(dscale)  # the block softmax's score scale (unused without it)
        ab, alpha, beta = _temperature_args(alpha, beta)
        split = _splits(bh, max(n, m_), block, q.device)  # programs per head, every kernel
        sp, zp = _states(bh, split, d_pad, dv_pad, q.device)
        launch(_nc_state_kernel, (bh, split),
            k, v, kmax, sp, zp, ab, *k.stride(), *v.stride(), h, m_, d, dv, _rows(m_, split, block), split_s,
            beta, D_PAD=d_pad, DV_PAD=dv_pad, BLOCK=block, PRECISION=prec, AB_DEVICE=ab is not None,
        )
        (sp, zp), n_parts = _summed((sp, zp))
        out = torch.empty(bsz, h, n, dv, dtype=q.dtype, device=q.device)
        out_l = torch.empty_like(out) if inside else out  # the LLN part, kept for the backward
        den = torch.empty(bsz, h, n, dtype=torch.float32, device=q.device)
        launch(_nc_out_kernel, (bh, split),
            q, k, v, sp, zp, kmax, out, den, out_l, mix.wl_t, mix.wd_t, ab, *q.stride(), *k.stride(), *v.stride(),
            h, n, d, dv, _rows(n, split, block), split_s, n_parts, alpha, beta, eps, dscale, mix.wl, mix.wd,
            D_PAD=d_pad, DV_PAD=dv_pad, BLOCK=block, PRECISION=prec, DIAG=inside, PER_CHANNEL=mix.per_channel,
            AB_DEVICE=ab is not None, num_warps=DIAG_WARPS if inside else 4,
        )
        if mix.on and not inside:
            out = block_diagonal_triton.forward_into(q, k, v, out_l, mix, dscale, dblock, False)  # [B, H, N, d_v]
        ctx.save_for_backward(q, k, v, out_l, den, sp, zp, kmax)
        ctx.consts = (alpha, beta, ab, split_s, mix, dscale, split, dblock)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable  # the kernels record no graph: no second derivative
    @launched_on_device
    def backward(ctx, g):
        q, k, v, out_l, den, sp, zp, kmax = ctx.saved_tensors
        alpha, beta, ab, split_s, mix, dscale, split, dblock = ctx.consts
        inside = mix.on and dblock is None
        bsz, h, n, d = q.shape
        m_, dv = k.shape[-2], v.shape[-1]
        d_pad, dv_pad = sp.shape[-2], sp.shape[-1]
        block = _block(d_pad, dv_pad)
        bh, n_parts = sp.shape[0], sp.shape[1]
        prec = precision(q.dtype)
        dq = torch.empty(bsz, h, n, d, dtype=q.dtype, device=q.device)
        dk = torch.empty(bsz, h, m_, d, dtype=k.dtype, device=k.device)
        dvv = torch.empty(bsz, h, m_, dv, dtype=v.dtype, device=v.device)
        gsp, gzp = _states(bh, split, d_pad, dv_pad, q.device)
        dwl, dwd = (torch.empty(2, bh, split, dv_pad, dtype=torch.float32, device=q.device).unbind(0)
                    if mix.per_channel and inside else (None, None))
        launch(_nc_grad_q_kernel, (bh, split),
            q, k, v, g, out_l, den, sp, zp, kmax, dq, gsp, gzp, mix.wl_t, mix.wd_t, dk, dvv, dwl, dwd, ab,
            *q.stride(), *k.stride(), *v.stride(), *g.stride(),
            h, n, d, dv, _rows(n, split, block), split_s, n_parts, alpha, beta, dscale, mix.wl, mix.wd,
            D_PAD=d_pad, DV_PAD=dv_pad, BLOCK=block, PRECISION=prec, DIAG=inside, PER_CHANNEL=mix.per_channel,
            MIXED=mix.on, AB_DEVICE=ab is not None, num_warps=DIAG_WARPS if inside else 4,
        )
        (gsp, gzp), g_parts = _summed((gsp, gzp))
        launch(_nc_grad_kv_kernel, (bh, split),
            k, v, kmax, gsp, gzp, dk, dvv, ab, *k.stride(), *v.stride(),
            h, m_, d, dv, _rows(m_, split, block), split_s, g_parts, beta,
            D_PAD=d_pad, DV_PAD=dv_pad, BLOCK=block, PRECISION=prec, DIAG=inside, AB_DEVICE=ab is not None,
        )
        if mix.on and not inside:  # the block kernel's gradients added to LLN's in place
            dwl, dwd = block_diagonal_triton.backward_into(q, k, v, g, out_l, mix, dscale, dblock, False, dq, dk, dvv)
        gwl, gwd = mix.grads((dwl, dwd), bsz, h, dv)
        return dq, dk, dvv, gwl, gwd, None, None, None, None, None, None, None


# Warps per program of the non-causal kernels that carry LLN+Diag's block softmax: 8 measured faster than 4
# from 16k tokens (benchmarks/profile_lln.py, benchmarks/results/profile_lln_run3.txt)
DIAG_WARPS = 8

# Longest call whose block softmax runs inside LLN's kernels, causal or not: faster than the separate
# kernel up to 16k tokens (LLN+Diag 1.11× LLN there non-causal, against 1.39×; causal 1.15× against
# 1.19×), slower beyond (32k: 1.49× against 1.39× non-causal, 1.33× against 1.21× causal; 64k: 2.26×
# against 1.85×, 1.41× against 1.34×), where the gradient kernel carrying both is bound by its work per
# tile: twice LLN's alone (benchmarks/profile_lln.py --only-diag, benchmarks/RESULTS.md §4).
DIAG_FUSED_MAX_TOKENS = 16384


def fuses_diag(q: torch.Tensor, v: torch.Tensor, block: int, causal: bool) -> bool:
    """Whether LLN+Diag's block softmax runs inside LLN's kernels: its blocks are the kernels' tiles
    (``block`` equals their tile of 64 tokens, 32 for head dims above 64), ``N == M``, half-precision
    inputs (float32's three-TF32 products need more shared memory than an H100 has for the fused
    backward's tiles: 295 KB against 232 KB), and at most :data:`DIAG_FUSED_MAX_TOKENS` tokens. Other
    calls take the separate kernel of :mod:`attnstats.kernels.block_diagonal_triton`."""
    n = q.shape[-2]
    return (block == _block(pad(q.shape[-1]), pad(v.shape[-1])) and n == v.shape[-2]
            and q.dtype in (torch.bfloat16, torch.float16) and n <= DIAG_FUSED_MAX_TOKENS)


def _diag_inputs(diag):
    # (w_L, w_D) as Function inputs: tensors stay tensors (they get gradients)
    return (None, None) if diag is None else (diag[1], diag[2])


def _diag_consts(diag):
    # (the block softmax's score scale, the separate kernel's block size or None), Nones without a Diag part
    return (None, None) if diag is None else (float(diag[0]), None if diag[3] is None else int(diag[3]))


def _temperature_args(alpha, beta):
    """``(AB or None, α, β)`` as the non-causal kernels take them: a device tensor ``alpha`` (the rule's
    output, :func:`device_rule`) is read there (the scalars then unused, 0); else the floats."""
    if isinstance(alpha, torch.Tensor):
        return alpha, 0.0, 0.0
    return None, float(alpha), float(beta)


def lln_noncausal(q, k, v, alpha, beta, eps: float, stats: Moments, diag=None) -> torch.Tensor:
    """Non-causal LLN attention ``[B, H, N, d_v]`` in q's dtype, by the fused kernels.

    Args: ``q [B, H, N, d]``, ``k [B, H, M, d]``, ``v [B, H, M, d_v]`` (one dtype, any strides, finite);
    ``alpha, beta``: the temperatures (> 0), floats; or ``alpha`` the float64 device tensor of
    :func:`device_rule` (``α, β`` its first two entries, read by the kernels: nothing waits for the
    device) and ``beta`` None; ``eps``: added to each denominator (≥ 1); ``stats``: what
    :func:`moments` read from these q, k, v; ``diag``: None, or LLN+Diag's ``(scale, w_L, w_D, block)``
    (the block softmax's score scale, weights as floats or ``[H, d_v]`` tensors, and None when
    :func:`fuses_diag` — the block softmax inside LLN's kernels — else the block size for the separate
    kernel, which runs after them in the same node): then the output is ``w_L ⊙ LLN + w_D ⊙ Diag``
    (``N == M``). Differentiable in q, k, v and tensor weights (once).
    """
    return _NonCausalLLN.apply(q, k, v, *_diag_inputs(diag), alpha, beta, float(eps), stats.kmax,
                               stats.split, *_diag_consts(diag))


# Columns and chunks per step of the prefix-sum kernel: 64 × 32 float32 (8 KB) per program and step
PREFIX_COLUMNS, PREFIX_CHUNKS = 64, 32


def _prefix_sums(hs: torch.Tensor, zs: torch.Tensor) -> None:
    """In place: ``hs [BH, nc, D_PAD, DV_PAD]`` and ``zs [BH, nc, D_PAD]`` (float32, contiguous, as
    :func:`_states` makes them) become their running sums along the chunks (``torch.cumsum(dim=1)``)."""
    bh, nc, d_pad, dv_pad = hs.shape
    sx = d_pad * dv_pad
    nbx = triton.cdiv(sx, PREFIX_COLUMNS)
    launch(_prefix_kernel, (bh, nbx + triton.cdiv(d_pad, PREFIX_COLUMNS)), hs, zs, nc, sx, d_pad, nbx,
           BS=PREFIX_COLUMNS, U=PREFIX_CHUNKS)


class _CausalLLN(torch.autograd.Function):
    """Causal LLN attention by the fused chunk kernels (module docstring), with its backward; with a Diag
    part (``dscale`` not None), LLN+Diag's ``w_L ⊙ LLN + w_D ⊙ Diag``, as in :class:`_NonCausalLLN`."""

    @staticmethod
    @launched_on_device
    def forward(ctx, q, k, v, wl, wd, alpha, beta, eps, kmax, split_s, dscale, dblock):
        bsz, h, n, d = q.shape
        dv = v.shape[-1]
        d_pad, dv_pad = pad(d), pad(dv)
        c = _block(d_pad, dv_pad)
        bh, nc = bsz * h, triton.cdiv(n, c)
        prec = precision(q.dtype)
        mix = MixWeights(wl, wd, on=dscale is not None)
        inside = mix.on and dblock is None  # the block softmax in LLN's kernels
        dscale = 1.0 if dscale is None else float(dscale)  # the block softmax's score scale (unused without it)
        hs, zs = _states(bh, nc, d_pad, dv_pad, q.device)
        strides = (*q.stride(), *k.stride(), *v.stride())
        launch(_c_state_kernel, (bh, nc),
               k, v, kmax, hs, zs, *k.stride(), *v.stride(), h, n, d, dv, split_s, beta, nc,
               D_PAD=d_pad, DV_PAD=dv_pad, C=c, PRECISION=prec)
        _prefix_sums(hs, zs)  # [BH, nc, D_PAD, DV_PAD], [BH, nc, D_PAD]: the states of chunks 0 … c
        out = torch.empty(bsz, h, n, dv, dtype=q.dtype, device=q.device)
        out_l = torch.empty_like(out) if inside else out  # the LLN part, kept for the backward
        den = torch.empty(bsz, h, n, dtype=torch.float32, device=q.device)
        launch(_c_out_kernel, (bh, nc),
               q, k, v, kmax, hs, zs, out, den, out_l, mix.wl_t, mix.wd_t, *strides, h, n, d, dv,
               split_s, alpha, beta, eps, nc, dscale, mix.wl, mix.wd,
               D_PAD=d_pad, DV_PAD=dv_pad, C=c, PRECISION=prec, DIAG=inside,
               PER_CHANNEL=mix.per_channel,
               num_warps=8)  # a dozen [C, C] and [C, d] float32 tiles live at once
        if mix.on and not inside:
            out = block_diagonal_triton.forward_into(q, k, v, out_l, mix, dscale, dblock, True)  # [B, H, N, d_v]
        ctx.save_for_backward(q, k, v, out_l, den, hs, zs, kmax)
        ctx.consts = (alpha, beta, split_s, mix, dscale, dblock)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable  # the kernels record no graph: no second derivative
    @launched_on_device
    def backward(ctx, g):
        q, k, v, out_l, den, hs, zs, kmax = ctx.saved_tensors
        alpha, beta, split_s, mix, dscale, dblock = ctx.consts
        inside = mix.on and dblock is None
        bsz, h, n, d = q.shape
        dv = v.shape[-1]
        bh, nc, d_pad, dv_pad = hs.shape
        c = _block(d_pad, dv_pad)
        prec = precision(q.dtype)
        ghs, gzs = _states(bh, nc, d_pad, dv_pad, q.device)
        launch(_c_grad_state_kernel, (bh, nc),
               q, g, out_l, den, kmax, ghs, gzs, mix.wl_t, mix.wd_t, *q.stride(), *g.stride(),
               h, n, d, dv, split_s, alpha, beta, nc, mix.wl, mix.wd,
               D_PAD=d_pad, DV_PAD=dv_pad, C=c, PRECISION=prec, MIXED=mix.on,
               PER_CHANNEL=mix.per_channel)
        _prefix_sums(ghs, gzs)  # reversed chunk order: position r holds the sum over chunks ≥ nc − 1 − r
        dq = torch.empty_like(q, memory_format=torch.contiguous_format)
        dk = torch.empty_like(k, memory_format=torch.contiguous_format)
        dvv = torch.empty_like(v, memory_format=torch.contiguous_format)
        dwl, dwd = (torch.empty(2, bh, nc, dv_pad, dtype=torch.float32, device=q.device).unbind(0)
                    if mix.per_channel and inside else (None, None))
        launch(_c_grad_kernel, (bh, nc),
               q, k, v, g, out_l, den, kmax, hs, zs, ghs, gzs, dq, dk, dvv, mix.wl_t, mix.wd_t,
               dwl, dwd, *q.stride(), *k.stride(), *v.stride(), *g.stride(),
               h, n, d, dv, split_s, alpha, beta, nc, dscale, mix.wl, mix.wd,
               D_PAD=d_pad, DV_PAD=dv_pad, C=c, PRECISION=prec, DIAG=inside,
               PER_CHANNEL=mix.per_channel, MIXED=mix.on, num_warps=8)
        if mix.on and not inside:  # the block kernel's gradients added to LLN's in place
            dwl, dwd = block_diagonal_triton.backward_into(q, k, v, g, out_l, mix, dscale, dblock, True, dq, dk, dvv)
        gwl, gwd = mix.grads((dwl, dwd), bsz, h, dv)
        return dq, dk, dvv, gwl, gwd, None, None, None, None, None, None, None


def lln_causal(q, k, v, alpha: float, beta: float, eps: float, stats: Moments, diag=None) -> torch.Tensor:
    """Causal LLN attention ``[B, H, N, d_v]`` in q's dtype, by the fused chunk kernels.

    Args as :func:`lln_noncausal` (``N == M``; ``diag`` with the causal rule inside each block); ``eps``
    here multiplies each denominator by ``1 + eps`` (the shared shift leaves it on no fixed scale). Exact
    to rounding while the key spread (``β`` times k's) is within
    :func:`attnstats.kernels.linear.causal_underflow_limit` of float32; the caller checks that
    (:attr:`Moments.spread`). Chunks of 64 tokens (32 for head dims above 64): inside a chunk the
    ``[C, C]`` products, the earlier chunks through prefix sums of their ``[d, d_v]`` states; memory
    ``O(N·d·d_v/C)`` per head. Differentiable in q, k, v and tensor weights (once).
    """
    return _CausalLLN.apply(q, k, v, *_diag_inputs(diag), float(alpha), float(beta), float(eps), stats.kmax,
                            stats.split, *_diag_consts(diag))
