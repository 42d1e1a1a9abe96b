"""What attnstats' fused Triton kernels for attention share: whether Triton runs here, tile widths, the
products' precision, and the softmax of one block of tokens (forward and backward), which both
block-diagonal attention (:mod:`attnstats.kernels.block_diagonal_triton`) and LLN+Diag's fused path
(:mod:`attnstats.kernels.lln_triton`) compute.

Triton is optional (``pip install 'attnstats[triton]'``). The kernels run on CUDA tensors, and on CPU
tensors under ``TRITON_INTERPRET=1`` (set before Triton is first imported), which is how the tests check
them on machines without a GPU.
"""
from __future__ import annotations

import functools

import torch

from ..triton_launch import interpreting, on_device

try:  # Triton is an optional extra: without it the kernels are simply unavailable
    import triton
    import triton.language as tl

    HAVE_TRITON = True
except Exception:  # pragma: no cover - depends on the environment
    HAVE_TRITON = False

# the input dtypes the kernels take (float64 stays on the PyTorch paths)
DTYPES = (torch.bfloat16, torch.float16, torch.float32)




def pad(n: int) -> int:
    """Tile width for a head dim or a block: a power of two ≥ 16 (``tl.dot``'s smallest)."""
    return max(16, triton.next_power_of_2(n))


def precision(dtype: torch.dtype) -> str:
    """``tl.dot``'s input precision for float32 tiles made from inputs of ``dtype``.

    bf16 inputs: one TF32 product (~1e-3, under bf16's 2^-8 rounding of the output); float16 (2^-11)
    and float32: three TF32 products (hi·hi + hi·lo + lo·hi, about float32 accuracy; one measured 1.2e-3
    for float16, benchmarks/RESULTS.md §4); the interpreter computes in plain float32.
    """
    if interpreting():
        return "ieee"
    return "tf32" if dtype == torch.bfloat16 else "tf32x3"


# The kernels compute offsets in 32-bit integers: every tensor they read or write must stay below 2^31
# entries (larger calls take the PyTorch paths)
MAX_OFFSET = 2**31 - 1


def offsets_fit(*xs: torch.Tensor, buffers: int = 0) -> bool:
    """Whether 32-bit offsets reach every entry of ``xs`` (their whole storage: a view into a larger
    tensor is addressed from its storage) and ``buffers`` (the largest buffer a kernel allocates)."""
    return buffers <= MAX_OFFSET and all(
        x.untyped_storage().nbytes() // x.element_size() <= MAX_OFFSET for x in xs)


def launched_on_device(fn):
    """An autograd Function's ``forward(ctx, x, …)`` or ``backward(ctx, x)`` run with ``x``'s GPU current."""
    @functools.wraps(fn)
    def run(ctx, x, *args):
        with on_device(x):
            return fn(ctx, x, *args)

    return run


class MixWeights:
    """LLN+Diag's weights ``w_L, w_D`` as the kernels take them: floats (``wl``, ``wd``), or, when
    ``per_channel``, ``[H, d_v]`` tensors passed as contiguous float32 (``wl_t``, ``wd_t``; the floats
    are then 0) whose gradients the kernels return as per-program partials. ``on`` False: the call has
    no weighted sum (the kernels' flag off, every weight unused)."""

    def __init__(self, wl, wd, on: bool = True):
        self.on = on
        self.per_channel = on and isinstance(wl, torch.Tensor)
        self.wl = float(wl) if on and not self.per_channel else 0.0
        self.wd = float(wd) if on and not self.per_channel else 0.0
        self.wl_t, self.wd_t = ((w.detach().to(torch.float32).contiguous() for w in (wl, wd)) if self.per_channel
                                else (None, None))
        self.dtype = wl.dtype if self.per_channel else None

    def grads(self, parts, bsz: int, h: int, dv: int):
        """The weights' gradients ``[H, d_v]`` from the kernels' partials (two tensors ``[B·H, P, DV_PAD]``
        or ``[B, H, P, DV_PAD]``), or Nones when the weights are floats."""
        if not self.per_channel:
            return None, None
        return tuple(x.reshape(bsz, h, -1, x.shape[-1]).sum((0, 2))[:, :dv].to(self.dtype) for x in parts)


if HAVE_TRITON:

    @triton.jit
    def block_probs(q, k, rmask, scale, CAUSAL: tl.constexpr, C_PAD: tl.constexpr, PRECISION: tl.constexpr):
        # Softmax probabilities inside one block of tokens, p [C_PAD, C_PAD] (rows past the block: 0).
        # q, k [C_PAD, D_PAD] float32 tiles of the block's rows (0 past it); rmask [C_PAD]: the rows in
        # the block.
        return block_probs_of(tl.dot(q, tl.trans(k), input_precision=PRECISION), rmask, scale, CAUSAL, C_PAD)

    @triton.jit
    def block_probs_of(qk, rmask, scale, CAUSAL: tl.constexpr, C_PAD: tl.constexpr):
        # block_probs from the block's products q kᵀ [C_PAD, C_PAD] (float32). The whole score tile is on
        # chip: no running maximum. Every row in the block has its own key, so no row is empty.
        offs = tl.arange(0, C_PAD)
        valid = rmask[:, None] & rmask[None, :]
        if CAUSAL:
            valid = valid & (offs[None, :] <= offs[:, None])
        s = tl.where(valid, qk * scale, float("-inf"))
        top = tl.where(rmask, tl.max(s, 1), 0.0)  # rows past the block: no finite score, kept NaN-free
        e = tl.where(valid, tl.exp(s - top[:, None]), 0.0)
        return e / tl.where(rmask, tl.sum(e, 1), 1.0)[:, None]

    @triton.jit
    def block_softmax(q, k, v, rmask, scale, CAUSAL: tl.constexpr, C_PAD: tl.constexpr, PRECISION: tl.constexpr):
        # Softmax attention inside one block (block_probs): p [C_PAD, C_PAD] and p v [C_PAD, DV_PAD] for
        # v [C_PAD, DV_PAD] float32.
        p = block_probs(q, k, rmask, scale, CAUSAL, C_PAD, PRECISION)
        return p, tl.dot(p, v, input_precision=PRECISION)

    @triton.jit
    def block_softmax_grads(q, k, v, p, gd, scale, PRECISION: tl.constexpr):
        # The gradients of the block's output p v for its output gradient gd [C_PAD, DV_PAD]:
        # dv = pᵀ gd, ds = p ⊙ (gd vᵀ − δ), dq = scale·ds k, dk = scale·dsᵀ q, with δ_i = Σ_j p_ij (gd vᵀ)_ij,
        # which equals gd_i · (p v)_i: the output itself is not needed (one product fewer, one tile less
        # held in registers).
        return block_softmax_grads_of(q, k, p, gd, tl.dot(gd, tl.trans(v), input_precision=PRECISION), scale,
                                      PRECISION)

    @triton.jit
    def block_softmax_grads_of(q, k, p, gd, dp, scale, PRECISION: tl.constexpr):
        # block_softmax_grads given dp = gd vᵀ [C_PAD, C_PAD] (float32).
        dv = tl.dot(tl.trans(p), gd, input_precision=PRECISION)  # [C_PAD, DV_PAD]
        ds = p * (dp - tl.sum(p * dp, 1)[:, None]) * scale
        dq = tl.dot(ds, k, input_precision=PRECISION)  # [C_PAD, D_PAD]
        dk = tl.dot(tl.trans(ds), q, input_precision=PRECISION)
        return dq, dk, dv

    @triton.jit
    def mix_weights(WL, WD, h, DV, offs_e, emask, wl, wd, PER_CHANNEL: tl.constexpr):
        # LLN+Diag's (w_L, w_D) for head h: [DV_PAD] rows of [H, DV] float32 tensors, or the scalars wl, wd
        if PER_CHANNEL:
            wl_h = tl.load(WL + h * DV + offs_e, mask=emask, other=0.0)
            wd_h = tl.load(WD + h * DV + offs_e, mask=emask, other=0.0)
        else:
            wl_h = wl
            wd_h = wd
        return wl_h, wd_h
