"""A fused Triton kernel for block-diagonal softmax attention, and for LLN+Diag's weighted sum.

:class:`~attnstats.kernels.block_diagonal.BlockDiagonalAttention` (and the Diag part of
:class:`~attnstats.kernels.lln_diag.LLNPlusDiagAttention`) send a call here when its inputs are CUDA
tensors of one dtype, with no mask and blocks of at most :data:`MAX_BLOCK` tokens; the PyTorch path
(one SDPA call over all blocks) stays the reference, tested against this kernel on the CPU under
``TRITON_INTERPRET=1`` and on the GPU by ``benchmarks/lln_gpu.py``.

One program owns one block of ``C`` consecutive tokens of one head: the whole ``[C, C]`` score tile
fits on chip, so the softmax needs no running maximum, and the backward recomputes it instead of
storing it. LLN+Diag's output ``w_L ⊙ LLN + w_D ⊙ Diag`` is formed in the same pass (``w_L, w_D``
scalars or per-head, per-channel tensors ``[H, d_v]``), and the backward gives the gradients of the
LLN output and of the weights with those of q, k, v: one launch each way, where SDPA on thousands of
64-token blocks and the weighted sum's elementwise passes took longer than LLN itself
(benchmarks/RESULTS.md §4). Products in TF32 for bf16 inputs (below their rounding), three TF32
products for float16 and float32; softmax and accumulation in float32.
"""
from __future__ import annotations

import torch

from ..triton_launch import launch
from .triton_common import DTYPES, HAVE_TRITON, MixWeights, launched_on_device, offsets_fit, pad, precision

__all__ = ["MAX_BLOCK", "applies", "block_diagonal", "forward_into", "backward_into"]

if HAVE_TRITON:
    import triton
    import triton.language as tl

    from .triton_common import block_probs_of, block_softmax_grads_of, mix_weights

# Largest block (and head dims) the kernel takes: the [C, C] scores and [C, d] tiles live in registers
MAX_BLOCK = 128

# Warps per program, by padded block size (a dozen [C, C] and [C, d] float32 tiles live at once in the
# backward); benchmarks/profile_lln.py times the alternatives
NUM_WARPS = {16: 4, 32: 4, 64: 4, 128: 8}


def applies(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask, block: int) -> bool:
    """Whether a block-diagonal call goes to the kernel: CUDA tensors of one dtype (bf16, fp16, fp32),
    no mask, ``N == M``, no empty batch, blocks and head dims of at most :data:`MAX_BLOCK`, every tensor
    under 2^31 entries (32-bit offsets), Triton installed."""
    return (
        HAVE_TRITON and mask is None and q.is_cuda and k.is_cuda and v.is_cuda
        and q.dtype in DTYPES and k.dtype == q.dtype and v.dtype == q.dtype
        and q.shape[-2] == k.shape[-2] and q.shape[-2] > 0 and q.shape[0] * q.shape[1] > 0
        and min(block, q.shape[-2]) <= MAX_BLOCK and q.shape[-1] <= MAX_BLOCK and v.shape[-1] <= MAX_BLOCK
        and offsets_fit(q, k, v, buffers=q.shape[0] * q.shape[1] * q.shape[-2] * max(q.shape[-1], v.shape[-1]))
    )


if HAVE_TRITON:

    @triton.jit
    def _block_tiles(Q, K, V, bh, blk, H, N, C, D, DV, scale,
                     sq_b, sq_h, sq_n, sq_d, sk_b, sk_h, sk_n, sk_d, sv_b, sv_h, sv_n, sv_d,
                     CAUSAL: tl.constexpr, C_PAD: tl.constexpr, D_PAD: tl.constexpr, DV_PAD: tl.constexpr,
                     PRECISION: tl.constexpr, HALF: tl.constexpr):
        # Block blk of one head: q, k [C_PAD, D_PAD], v [C_PAD, DV_PAD] as stored (rows past the block 0)
        # and the softmax p [C_PAD, C_PAD] (float32). HALF (bf16 or fp16 inputs): q kᵀ as a product of the
        # half tiles themselves, with float32 accumulation: the same products as TF32 on their float32
        # copies (every half value is exact in TF32), at the half tensor cores' rate.
        b = bh // H
        h = bh % H
        offs_c = tl.arange(0, C_PAD)
        offs_d = tl.arange(0, D_PAD)
        offs_e = tl.arange(0, DV_PAD)
        rows = blk * C + offs_c
        rmask = (offs_c < C) & (rows < N)
        qmask = rmask[:, None] & (offs_d[None, :] < D)
        vmask = rmask[:, None] & (offs_e[None, :] < DV)
        q = tl.load(Q + b * sq_b + h * sq_h + rows[:, None] * sq_n + offs_d[None, :] * sq_d, mask=qmask, other=0.0)
        k = tl.load(K + b * sk_b + h * sk_h + rows[:, None] * sk_n + offs_d[None, :] * sk_d, mask=qmask, other=0.0)
        v = tl.load(V + b * sv_b + h * sv_h + rows[:, None] * sv_n + offs_e[None, :] * sv_d, mask=vmask, other=0.0)
        if HALF:
            qk = tl.dot(q, tl.trans(k))  # [C_PAD, C_PAD] float32
        else:
            qk = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)), input_precision=PRECISION)
        p = block_probs_of(qk, rmask, scale, CAUSAL, C_PAD)  # [C_PAD, C_PAD]
        return q, k, v, p, rows, rmask, qmask, vmask, offs_d, offs_e

    @triton.jit
    def _forward_kernel(
        Q, K, V, BASE, WL, WD, OUT,
        sq_b, sq_h, sq_n, sq_d, sk_b, sk_h, sk_n, sk_d, sv_b, sv_h, sv_n, sv_d,
        H, N, C, D, DV, scale, wl, wd,
        CAUSAL: tl.constexpr, HAS_BASE: tl.constexpr, PER_CHANNEL: tl.constexpr,
        C_PAD: tl.constexpr, D_PAD: tl.constexpr, DV_PAD: tl.constexpr, PRECISION: tl.constexpr,
        HALF: tl.constexpr,
    ):
        # OUT [BH, N, DV] contiguous: p v, or w_L ⊙ BASE + w_D ⊙ p v (BASE contiguous as OUT)
        bh = tl.program_id(0)
        blk = tl.program_id(1)
        q, k, v, p, rows, rmask, qmask, vmask, offs_d, offs_e = _block_tiles(
            Q, K, V, bh, blk, H, N, C, D, DV, scale,
            sq_b, sq_h, sq_n, sq_d, sk_b, sk_h, sk_n, sk_d, sv_b, sv_h, sv_n, sv_d,
            CAUSAL, C_PAD, D_PAD, DV_PAD, PRECISION, HALF)
        od = tl.dot(p, v.to(tl.float32), input_precision=PRECISION)  # [C_PAD, DV_PAD]
        at = (bh * N + rows[:, None]) * DV + offs_e[None, :]
        if HAS_BASE:
            wl_h, wd_h = mix_weights(WL, WD, bh % H, DV, offs_e, offs_e < DV, wl, wd, PER_CHANNEL)
            base = tl.load(BASE + at, mask=vmask, other=0.0).to(tl.float32)
            od = wl_h * base + wd_h * od
        tl.store(OUT + at, od.to(OUT.dtype.element_ty), mask=vmask)

    @triton.jit
    def _backward_kernel(
        Q, K, V, G, BASE, WL, WD, DQ, DK, DVV, DBASE, DWL, DWD,
        sq_b, sq_h, sq_n, sq_d, sk_b, sk_h, sk_n, sk_d, sv_b, sv_h, sv_n, sv_d, sg_b, sg_h, sg_n, sg_d,
        H, N, C, D, DV, scale, wl, wd, NB,
        CAUSAL: tl.constexpr, HAS_BASE: tl.constexpr, PER_CHANNEL: tl.constexpr, ACC: tl.constexpr,
        C_PAD: tl.constexpr, D_PAD: tl.constexpr, DV_PAD: tl.constexpr, PRECISION: tl.constexpr,
        HALF: tl.constexpr,
    ):
        # The block's dq, dk, dv for gd = w_D ⊙ g (block_softmax_grads); with a base: ∂BASE = w_L ⊙ g,
        # and per-channel weights get their block's Σ_rows g ⊙ BASE and Σ_rows g ⊙ p v at DWL, DWD
        # [BH, NB, DV_PAD]. ACC: dq, dk, dv are added to what DQ, DK, DVV hold (the gradients of the
        # base, computed first by its own kernels), and ∂BASE is not stored.
        bh = tl.program_id(0)
        blk = tl.program_id(1)
        b = bh // H
        h = bh % H
        q, k, v, p, rows, rmask, qmask, vmask, offs_d, offs_e = _block_tiles(
            Q, K, V, bh, blk, H, N, C, D, DV, scale,
            sq_b, sq_h, sq_n, sq_d, sk_b, sk_h, sk_n, sk_d, sv_b, sv_h, sv_n, sv_d,
            CAUSAL, C_PAD, D_PAD, DV_PAD, PRECISION, HALF)
        g_in = tl.load(G + b * sg_b + h * sg_h + rows[:, None] * sg_n + offs_e[None, :] * sg_d, mask=vmask,
                       other=0.0)
        g = g_in.to(tl.float32)
        at = (bh * N + rows[:, None]) * DV + offs_e[None, :]
        gd = g
        wd_s = 1.0  # w_D when it is one number (it then factors out of gd vᵀ)
        if HAS_BASE:
            wl_h, wd_h = mix_weights(WL, WD, h, DV, offs_e, offs_e < DV, wl, wd, PER_CHANNEL)
            gd = wd_h * g
            wd_s = wd
            if not ACC:
                tl.store(DBASE + at, (wl_h * g).to(DBASE.dtype.element_ty), mask=vmask)
            if PER_CHANNEL:
                base = tl.load(BASE + at, mask=vmask, other=0.0).to(tl.float32)
                part = (bh * NB + blk) * DV_PAD + offs_e
                tl.store(DWL + part, tl.sum(g * base, 0))
                tl.store(DWD + part, tl.sum(g * tl.dot(p, v.to(tl.float32), input_precision=PRECISION), 0))
        if HALF and not PER_CHANNEL:  # g vᵀ as a product of the half tiles (as q kᵀ above), times w_D
            dp = wd_s * tl.dot(g_in, tl.trans(v))  # [C_PAD, C_PAD]
        else:
            dp = tl.dot(gd, tl.trans(v.to(tl.float32)), input_precision=PRECISION)
        dq, dk, dv = block_softmax_grads_of(q.to(tl.float32), k.to(tl.float32), p, gd, dp, scale, PRECISION)
        at_d = (bh * N + rows[:, None]) * D + offs_d[None, :]
        if ACC:
            dq += tl.load(DQ + at_d, mask=qmask, other=0.0).to(tl.float32)
            dk += tl.load(DK + at_d, mask=qmask, other=0.0).to(tl.float32)
            dv += tl.load(DVV + at, mask=vmask, other=0.0).to(tl.float32)
        tl.store(DQ + at_d, dq.to(DQ.dtype.element_ty), mask=qmask)
        tl.store(DK + at_d, dk.to(DK.dtype.element_ty), mask=qmask)
        tl.store(DVV + at, dv.to(DVV.dtype.element_ty), mask=vmask)


def _half(q) -> bool:
    """Whether the kernel multiplies the half-precision tiles themselves: q, k, v (one dtype) and the output
    gradient (autograd gives it in the output's dtype, q's) bf16 or fp16."""
    return q.dtype in (torch.bfloat16, torch.float16)


def _config(q, v, block):
    bsz, h, n, d = q.shape
    c = min(block, n)
    return bsz, h, n, d, v.shape[-1], c, triton.cdiv(n, c), pad(c), pad(d), pad(v.shape[-1])


def forward_into(q, k, v, base, mix: MixWeights, scale: float, block: int, causal: bool) -> torch.Tensor:
    """The kernel's forward: block softmax ``[B, H, N, d_v]`` in q's dtype, or ``w_L ⊙ base + w_D ⊙`` it
    (``base`` contiguous ``[B, H, N, d_v]``, ``mix.on``)."""
    bsz, h, n, d, dv, c, nb, c_pad, d_pad, dv_pad = _config(q, v, block)
    out = torch.empty(bsz, h, n, dv, dtype=q.dtype, device=q.device)
    launch(_forward_kernel, (bsz * h, nb),
        q, k, v, base, mix.wl_t, mix.wd_t, out, *q.stride(), *k.stride(), *v.stride(),
        h, n, c, d, dv, float(scale), mix.wl, mix.wd,
        CAUSAL=causal, HAS_BASE=mix.on, PER_CHANNEL=mix.per_channel,
        C_PAD=c_pad, D_PAD=d_pad, DV_PAD=dv_pad, PRECISION=precision(q.dtype), HALF=_half(q),
        num_warps=NUM_WARPS[c_pad],
    )
    return out


def backward_into(q, k, v, g, base, mix: MixWeights, scale: float, block: int, causal: bool, dq, dk, dvv,
                  dbase=None):
    """The kernel's backward: the gradients of q, k, v written to ``dq, dk, dvv`` (contiguous, q's
    layout), or added to what they hold when ``dbase`` is None and there is a base (its own gradients,
    computed first); else ``w_L ⊙ g`` at ``dbase``. Returns the per-block partials of the weights'
    gradients ``([B, H, NB, DV_PAD], …)`` for per-channel weights, else ``(None, None)``."""
    bsz, h, n, d, dv, c, nb, c_pad, d_pad, dv_pad = _config(q, v, block)
    dwl, dwd = (torch.empty(2, bsz, h, nb, dv_pad, dtype=torch.float32, device=q.device).unbind(0)
                if mix.per_channel else (None, None))
    launch(_backward_kernel, (bsz * h, nb),
        q, k, v, g, base, mix.wl_t, mix.wd_t, dq, dk, dvv, dbase, dwl, dwd,
        *q.stride(), *k.stride(), *v.stride(), *g.stride(),
        h, n, c, d, dv, float(scale), mix.wl, mix.wd, nb,
        CAUSAL=causal, HAS_BASE=mix.on, PER_CHANNEL=mix.per_channel, ACC=mix.on and dbase is None,
        C_PAD=c_pad, D_PAD=d_pad, DV_PAD=dv_pad, PRECISION=precision(q.dtype), HALF=_half(q),
        num_warps=NUM_WARPS[c_pad],
    )
    return dwl, dwd


class _BlockDiagonal(torch.autograd.Function):
    """Block-diagonal softmax, optionally combined as ``w_L ⊙ base + w_D ⊙ ·``, by the fused kernel."""

    @staticmethod
    @launched_on_device
    def forward(ctx, q, k, v, base, wl, wd, scale, block, causal):
        mix = MixWeights(wl, wd, on=base is not None)
        base_c = base.contiguous() if mix.on else None
        out = forward_into(q, k, v, base_c, mix, scale, block, causal)
        ctx.save_for_backward(q, k, v, base_c)
        ctx.consts = (mix, float(scale), block, causal)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable  # the kernel records no graph: no second derivative
    @launched_on_device
    def backward(ctx, g):
        q, k, v, base = ctx.saved_tensors
        mix, scale, block, causal = ctx.consts
        dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
        dvv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
        dbase = torch.empty_like(base) if mix.on else None
        parts = backward_into(q, k, v, g, base, mix, scale, block, causal, dq, dk, dvv, dbase)
        gwl, gwd = mix.grads(parts, q.shape[0], q.shape[1], v.shape[-1])  # block partials summed over batch and blocks
        return dq, dk, dvv, dbase, gwl, gwd, None, None, None


def block_diagonal(q, k, v, scale: float, block: int, causal: bool, base=None, wl=None, wd=None) -> torch.Tensor:
    """Softmax attention inside consecutive blocks of ``block`` tokens (the remainder a smaller last block),
    ``[B, H, N, d_v]`` in q's dtype; with ``base`` (``[B, H, N, d_v]``), ``w_L ⊙ base + w_D ⊙`` that.

    Args: ``q, k [B, H, N, d]``, ``v [B, H, N, d_v]`` (one dtype, any strides, finite); ``scale``: the
    score scale; ``causal``: the causal rule inside each block; ``wl, wd``: floats, or tensors
    ``[H, d_v]`` (learnable: they get gradients). Differentiable in q, k, v, base and the weights (once).
    """
    return _BlockDiagonal.apply(q, k, v, base, wl, wd, float(scale), int(block), bool(causal))
