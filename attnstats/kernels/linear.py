"""Linearised attention ``P_ij ∝ φ_Q(q_i)·φ_K(k_j)`` (docs/theory.md §1, §4) and its feature maps.

Every feature map here is non-negative, so the engine works with the *logarithm* of the features,
``lq = log φ_Q(q)``, ``lk = log φ_K(k)`` (``-inf`` for a zero feature). Shifts taken in log space
cancel in the normalisation, and they are chosen so that no denominator can underflow:

- keys: ``exp(lk_jl − m_l)`` with ``m_l`` the maximum of feature ``l`` over the valid keys, so the
  key sums ``z_l = Σ_j exp(lk_jl − m_l)`` are ≥ 1;
- queries: ``exp(lq_il + m_l − M_i)`` with ``M_i = max_l (lq_il + m_l)``, so each row has a term
  equal to 1 against a ``z_l ≥ 1``: every non-causal denominator is ≥ 1 before ``eps`` is added.

This is a stronger form of the shifts of docs/theory.md §4 (one maximum per token for queries, one per
head for keys); it keeps outputs finite and accurate for |q|, |k| in the tens. A causal row sees only
the keys before it, which may all lie below the shared maximum: its denominator can be far below 1
(see :func:`causal_underflow_limit` for when that is still exact, and the log-space algorithm for
when it is not). ``eps`` is a guard of at most a relative ``eps`` on every path (added to a
denominator ≥ 1, or multiplied in as ``1 + eps``); keep it tiny (default 1e-8): the paths then agree
to rounding. Computation is float32 for half and float32 inputs, float64 for float64, with autocast
off; the exception is causal bfloat16 on a GPU with fla installed (:func:`linear_attention_causal`).
(LLN on a GPU without a mask has fused kernels of its own, :mod:`attnstats.kernels.lln_triton`, tested
against this engine.)

Costs: non-causal output ``O(N·r·d_v)`` time, ``O(N·r + r·d_v)`` memory; causal output in chunks of
``C`` tokens by matrix products (``[C, C]`` inside a chunk, prefix sums of ``r × d_v`` states for the
earlier ones), ``O(N·(C + d_v)·r)`` time and ``O(N·(C + r·d_v/C))`` memory per head, with an exact
log-space algorithm for key features too spread out for the shared shift; spectral gap from the
``r × r`` matrix ``Φ_Kᵀ D⁻¹ Φ_Q`` (never the N×N one).
"""
from __future__ import annotations

import functools
import importlib
import math

import torch

from ..masks import check_parts, from_parts, tokens_of_parts
from ..stats.spectral import causal_spectral_gap, eigenvalues, gap_from_eigenvalues
from ..validation import check_finite, check_tensor, compute_dtype, first_index
from .base import (
    Kernel,
    _register,
    check_all_finite,
    check_count,
    check_qkv,
    check_real,
    padding_parts,
    result_dtype,
    work_dtype,
)

__all__ = [
    "FEATURE_MAPS",
    "LinearAttention",
    "linear_attention",
    "linear_attention_causal",
    "causal_product_form",
    "causal_log_space",
    "causal_underflow_limit",
    "fla_available",
    "linear_matrix",
    "linear_spectral_gap",
    "log_feature_gap",
    "performer_projection",
]

FEATURE_MAPS = ("relu", "elu_plus_one", "exp", "performer")

_NEG_INF = float("-inf")


# --------------------------------------------------------------------------------------------
# log-space engine, shared by LinearAttention and LLNAttention
# --------------------------------------------------------------------------------------------


def _mask_keys(lk: torch.Tensor, key_valid) -> torch.Tensor:
    """``lk`` with padded keys at -inf (a zero feature vector: they receive no attention)."""
    if key_valid is None:
        return lk
    return lk.masked_fill(~key_valid[..., None], _NEG_INF)


def _finite_or_zero(x: torch.Tensor) -> torch.Tensor:
    return torch.where(torch.isfinite(x), x, torch.zeros((), dtype=x.dtype, device=x.device))


def _logsumexp(x: torch.Tensor, dim: int) -> torch.Tensor:
    """``log Σ exp(x)`` over ``dim`` whose gradient stays finite when every term is -inf (a pair of
    tokens with no common nonzero feature): ``torch.logsumexp`` gives NaN gradients there."""
    m = _finite_or_zero(x.amax(dim, keepdim=True))  # x's shape with dim kept as 1
    s = torch.exp(x - m).sum(dim, keepdim=True)  # as m
    pos = s > 0  # as m
    out = torch.log(torch.where(pos, s, torch.ones_like(s))) + m  # as m
    return torch.where(pos, out, torch.full_like(out, _NEG_INF)).squeeze(dim)  # x's shape without dim


def _denominator(den: torch.Tensor, eps: float) -> torch.Tensor:
    """``den + eps``, and 1 where ``den`` is 0: a row with no weight (its numerator is 0 too) gives
    0, not 0/0, even with ``eps = 0``."""
    return torch.where(den > 0, den + eps, torch.ones_like(den))


def _shifted_features(lq: torch.Tensor, lk: torch.Tensor, m: torch.Tensor | None = None):
    """``(qt [B,H,N,r], kt [B,H,M,r])`` with ``P = D̃⁻¹ qt ktᵀ`` exactly and every ``qt·Σ kt ≥ 1``.

    ``lk`` must already hold -inf at padded keys; ``m``: its maximum over the keys ``[B, H, 1, r]``, if
    already known. The shifts cancel in the normalisation, so they carry no gradient (as softmax's
    maximum does not): autograd then skips the backward of both maxima.
    """
    if m is None:
        m = lk.detach().amax(-2, keepdim=True)  # [B, H, 1, r], -inf for a feature no valid key has
    # in place on the fresh differences: one pass less each over [N, r] (autograd keeps exp_'s output)
    kt = (lk - _finite_or_zero(m)).exp_()  # [B, H, M, r]
    w = lq + m  # [B, H, N, r]; a feature no key has stays at -inf: it carries no weight
    big = _finite_or_zero(w.detach().amax(-1, keepdim=True))  # [B, H, N, 1]
    qt = w.sub_(big).exp_()  # [B, H, N, r]
    return qt, kt


def linear_attention(lq, lk, v, key_valid=None, query_valid=None, eps: float = 1e-8) -> torch.Tensor:
    """Non-causal linearised attention from log-features, ``O(N·r·d_v)``.

    Args:
        lq: ``[B, H, N, r]`` log query features (``-inf`` = zero feature).
        lk: ``[B, H, M, r]`` log key features.
        v: ``[B, H, M, d_v]`` values.
        key_valid: ``[B, H, M]`` bool or None; query_valid: ``[B, H, N]`` bool or None.
        eps: added to each denominator (which the shifts keep ≥ 1 when the row has weight).

    Returns:
        ``[B, H, N, d_v]``; rows with no weight (no valid key, an invalid query, an all-zero ReLU
        feature) are 0.
    """
    out = _NonCausalLinear.apply(lq, _mask_keys(lk, key_valid), v, float(eps))  # [B, H, N, d_v]
    if query_valid is not None:
        out = out * query_valid[..., None]  # [B, H, N, d_v]
    return out


class _NonCausalLinear(torch.autograd.Function):
    """Non-causal linearised attention from log-features with a hand-written backward.

    Forward: ``out = qt (ktᵀ v) / (qt · Σ kt + eps)`` on the shifted features of
    :func:`_shifted_features`. The shifts cancel between numerator and denominator (up to ``eps``), so
    they are held constant, as softmax's maximum is; the backward is then a handful of matrix products
    (autograd through the same forward records about four times as many kernels, which at a few
    thousand tokens cost more than the arithmetic). Checked against autograd through the dense matrix
    and by gradcheck in the kernel tests.
    """

    @staticmethod
    def forward(ctx, lq, lk, v, eps):
        with torch.autocast(lq.device.type, enabled=False):  # the work dtype was chosen by the caller
            return _NonCausalLinear._forward(ctx, lq, lk, v, eps)

    @staticmethod
    def _forward(ctx, lq, lk, v, eps):
        qt, kt = _shifted_features(lq, lk)  # [B, H, N, r], [B, H, M, r]
        kv = kt.transpose(-2, -1) @ v  # [B, H, r, d_v]
        z = kt.sum(-2)  # [B, H, r]
        den = qt @ z[..., :, None]  # [B, H, N, 1]
        d = _denominator(den, eps)  # [B, H, N, 1]
        out = (qt @ kv).div_(d)  # [B, H, N, d_v]
        ctx.save_for_backward(qt, kt, v, kv, z, d, out, den > 0)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable  # the saved tensors carry no graph: no second derivative
    def backward(ctx, g):
        with torch.autocast(g.device.type, enabled=False):
            return _NonCausalLinear._backward(ctx, g)

    @staticmethod
    def _backward(ctx, g):
        qt, kt, v, kv, z, d, out, has = ctx.saved_tensors
        g = g.to(out.dtype)
        gn = g / d  # [B, H, N, d_v]: through the numerator
        gd = -(g * out).sum(-1, keepdim=True) / d * has  # [B, H, N, 1]: through the denominator (1 where it has no weight)
        gkv = qt.transpose(-2, -1) @ gn  # [B, H, r, d_v]
        gz = qt.transpose(-2, -1) @ gd  # [B, H, r, 1]
        gv = kt @ gkv  # [B, H, M, d_v]
        # then, in place on the fresh products: + the denominator's term, × exp's derivative exp(x)
        gqt = (gn @ kv.transpose(-2, -1)).addcmul_(gd, z[..., None, :]).mul_(qt)  # [B, H, N, r]
        gkt = (v @ gkv.transpose(-2, -1)).add_(gz.transpose(-2, -1)).mul_(kt)  # [B, H, M, r]; padded keys (kt = 0) get 0
        return gqt, gkt, gv, None


def _chunk_size(shape, r: int, requested: int | None) -> int:
    """Tokens per chunk: the requested size, or the largest power of two ≤ 64 whose
    ``[B, H, C, C, r]`` intra-chunk tensor stays under 32 Mi elements."""
    if requested is not None:
        return int(requested)
    bh = shape[0] * shape[1]
    c = 64
    while c > 8 and bh * c * c * r > 32 * 2**20:
        c //= 2
    return c


# Tokens per chunk of the causal product form: the intra-chunk matrix [C, C] costs N·C per head and
# the per-chunk states N·r·d_v/C; C = 64 balances the two for r, d_v around 64 (benchmarks/lln_gpu.py).
CAUSAL_CHUNK = 64


def causal_underflow_limit(dtype: torch.dtype) -> float:
    """Largest key-feature spread (in log units) for which the causal product form is exact to rounding.

    The product form shifts key features by their maximum over all keys, future ones included, so a
    key ``L`` log units below that maximum enters as ``e^{−L}``. An entry lost to underflow (below
    ``tiny``) is then at most ``e^{L}·tiny`` of the row's largest term: with ``L ≤ ln(1/tiny) − 27`` that
    is below ``e^{−27} ≈ 2e-12``, under the rounding of float32 (60 log units in float32, 681 in float64).
    """
    return -math.log(torch.finfo(dtype).tiny) - 27.0


def _key_spread(lk: torch.Tensor, key_valid=None, finite: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``(max_{b,h,l} (max_j lk_jl − min_j lk_jl)`` over the valid keys' finite entries (0-dim; 0 if none),
    and the per-feature maximum ``[B, H, 1, r]``, the keys' shift of :func:`_shifted_features`).

    ``key_valid``: ``[B, H, M]`` bool or None (every key valid, or ``lk`` already −inf at padded keys);
    ``finite``: ``lk`` holds no −inf (features that are never zero), so one ``aminmax`` pass does.
    """
    if finite and key_valid is None:
        lo, hi = torch.aminmax(lk, dim=-2, keepdim=True)  # [B, H, 1, r] each
    else:
        # lk holds no NaN or +inf (checked inputs), only −inf for zero features and padded keys: amax
        # skips them as it is, amin once they read +inf
        lk = _mask_keys(lk, key_valid)  # [B, H, M, r]
        hi = lk.amax(-2, keepdim=True)  # [B, H, 1, r]
        lo = lk.nan_to_num(neginf=float("inf")).amin(-2, keepdim=True)  # [B, H, 1, r]
    return _finite_or_zero(hi - lo).amax(), hi


# fla's normalisation adds 1e-10 to each denominator. Its features are passed scaled by 2^60 (through
# fla's `scale`, which multiplies numerator and denominator alike), so a row whose keys lie at most L log
# units below the shared shift has a denominator of at least 2^60·e^{−L} ≥ 1e-4 for L ≤ 50: the 1e-10
# then moves it by at most 1e-6 relative, under the bf16 rounding of the output. (bf16 has float32's
# exponent range; float16 has not, so float16 is never sent to fla.)
FLA_SPREAD_LIMIT = 50.0
_FLA_SCALE = 2.0**60


def fla_available(x: torch.Tensor) -> bool:
    """Whether fla's ``chunk_linear_attn`` can run on ``x`` (a CUDA tensor, fla importable)."""
    return x.is_cuda and _fla_importable()


@functools.lru_cache(maxsize=1)
def _fla_importable() -> bool:
    try:
        importlib.import_module("fla.ops.linear_attn")
    except Exception:  # not installed, or no working Triton
        return False
    return True


def _fla_causal(qt, kt, v, half: torch.dtype) -> torch.Tensor:
    """Causal attention of the shifted features through fla's chunked kernel, in the half dtype ``half``.

    ``[B, H, N, r]`` features and ``[B, H, N, d_v]`` values in, ``[B, H, N, d_v]`` out in ``half`` (the
    caller's output dtype: no float32 round trip).
    """
    from fla.ops.linear_attn import chunk_linear_attn

    # fla's layout [B, N, H, ·], contiguous, written in one pass each (fla would copy a strided view)
    q, k, vv = (x.transpose(1, 2).to(half, memory_format=torch.contiguous_format) for x in (qt, kt, v))
    o, _ = chunk_linear_attn(q, k, vv, scale=_FLA_SCALE, normalize=True)  # [B, N, H, d_v]
    return o.transpose(1, 2)


def linear_attention_causal(
    lq, lk, v, key_valid=None, query_valid=None, eps: float = 1e-8, chunk: int | None = None,
    half: torch.dtype | None = None, spread: float | None = None,
) -> torch.Tensor:
    """Causal linearised attention from log-features, ``O(N)`` time and memory in ``N``.

    Row ``i`` uses keys ``j <= i`` only. The product form (:func:`causal_product_form`: batched
    matrix products in chunks, a prefix sum over chunks, autograd through them) runs when the key
    features' spread is within :func:`causal_underflow_limit` of the compute dtype, where it is exact to
    rounding; wider spreads (|k| in the hundreds) take the log-space algorithm
    (:func:`causal_log_space`), exact at any scale but about ten times slower. Deciding costs one host
    sync. Args as :func:`linear_attention` (``N == M``), plus ``chunk``: tokens per chunk (default
    :data:`CAUSAL_CHUNK` for the product form, a memory-bounded size for the log-space one), and
    ``half``: the half dtype the caller's inputs came in, or None; ``spread``: the key spread (the
    maximum over batch, head and feature of ``max_j lk_jl − min_j lk_jl`` over the valid keys) when the
    caller knows it, else it is measured here (one device sync). The whole computation runs with
    autocast off.

    bfloat16 inputs on a GPU go to fla's ``chunk_linear_attn`` when fla is installed, the spread is
    within :data:`FLA_SPREAD_LIMIT` and the call needs no gradient (measured 1.3–1.6× faster than the
    product form from 16k tokens; benchmarks/RESULTS.md §4). Its forward products run in bf16 and TF32,
    about 1e-3 relative, below the bf16 rounding of the output, and its denominators get its own guard
    (1e-10 on a scale of at least 1e-4, see :data:`FLA_SPREAD_LIMIT`) instead of ``eps``; its backward
    is off by about 8e-2 of the largest gradient entry on bf16 (the product form: ~4e-3, the bf16
    rounding), so a call that needs gradients takes the product form. float16 is not sent: fla keeps its
    denominators in the input dtype, and float16's range (6e-5 to 6.5e4) holds neither the 2^60 scale
    nor features e^-50 small. float16, float32 and float64 inputs take the product form (about 1e-6
    relative in float32) or, past the underflow limit, the log-space algorithm.
    """
    # features can be e^-60 of their row's largest: an autocast region must not round them to half
    with torch.autocast(lq.device.type, enabled=False):
        lk = _mask_keys(lk, key_valid)  # [B, H, N, r]
        if spread is None:
            spread, m = _key_spread(lk.detach())  # 0-dim, [B, H, 1, r]
            spread = float(spread)
        else:
            m = lk.detach().amax(-2, keepdim=True)  # [B, H, 1, r]
        needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (lq, lk, v))
        if half == torch.bfloat16 and spread <= FLA_SPREAD_LIMIT and not needs_grad and fla_available(lq):
            qt, kt = _shifted_features(lq, lk, m)  # [B, H, N, r] each
            out = _fla_causal(qt, kt, v, half)  # [B, H, N, d_v], in bf16
        elif spread <= causal_underflow_limit(lq.dtype):
            qt, kt = _shifted_features(lq, lk, m)  # [B, H, N, r] each
            out = causal_product_form(qt, kt, v, eps, CAUSAL_CHUNK if chunk is None else int(chunk))  # [B, H, N, d_v]
        else:
            out = causal_log_space(lq, lk, v, eps, chunk)  # [B, H, N, d_v]
        if query_valid is not None:
            out = out * query_valid[..., None]  # [B, H, N, d_v]
    return out


def causal_product_form(qt, kt, v, eps: float, chunk: int) -> torch.Tensor:
    """Causal ``out_i = Σ_{j≤i} (qt_i·kt_j) v_j / Σ_{j≤i} qt_i·kt_j`` from non-negative features.

    Chunks of ``C`` tokens: inside a chunk the ``[C, C]`` products ``qt kt^T`` (lower triangle); the
    earlier chunks through the prefix sums of their states ``kt^T v`` ``[r, d_v]`` and key sums
    ``Σ kt`` ``[r]``. Every step is a batched matrix product or a sum, so autograd gives the backward.
    Half-precision inputs on a GPU may go to fla instead (:func:`linear_attention_causal`).

    Args:
        qt: ``[B, H, N, r]``, kt: ``[B, H, N, r]`` non-negative features; v: ``[B, H, N, d_v]``.
        eps: relative guard: each denominator is multiplied by ``1 + eps`` (the shared shift leaves it on
            no fixed scale); a row with no weight gives 0.
        chunk: tokens per chunk ``C``.

    Returns:
        ``[B, H, N, d_v]``. Time ``O(N·(C + d_v)·r)``, memory ``O(N·(C + r·d_v/C))`` per head.
    """
    if chunk < 1:
        raise ValueError(f"chunk: expected a positive number of tokens per chunk, got {chunk}")
    b, h, n, r = qt.shape
    dv = v.shape[-1]
    c = min(chunk, n)
    nc = -(-n // c)
    pad = nc * c - n
    if pad:  # zero features: padding keys carry no weight, padding queries are cut off at the end
        qt = torch.nn.functional.pad(qt, (0, 0, 0, pad))  # [B, H, nc·C, r]
        kt = torch.nn.functional.pad(kt, (0, 0, 0, pad))  # [B, H, nc·C, r]
        v = torch.nn.functional.pad(v, (0, 0, 0, pad))  # [B, H, nc·C, d_v]
    qc = qt.reshape(b, h, nc, c, r)  # [B, H, nc, C, r]
    kc = kt.reshape(b, h, nc, c, r)  # [B, H, nc, C, r]
    vc = v.reshape(b, h, nc, c, dv)  # [B, H, nc, C, d_v]
    kv = kc.transpose(-2, -1) @ vc  # [B, H, nc, r, d_v]: each chunk's state
    state = _exclusive_prefix(kv)  # [B, H, nc, r, d_v]: the chunks before
    zsum = _exclusive_prefix(kc.sum(-2))  # [B, H, nc, r]
    a = torch.tril(qc @ kc.transpose(-2, -1))  # [B, H, nc, C, C]
    num = qc @ state + a @ vc  # [B, H, nc, C, d_v]
    den = qc @ zsum[..., :, None] + a.sum(-1, keepdim=True)  # [B, H, nc, C, 1]
    # the shared shift leaves den on no fixed scale (it can be far below 1), so eps is applied relative
    # to it: den·(1 + eps), which the log-space form's den + eps (den ≥ 1 there) matches to O(eps)
    den = torch.where(den > 0, den * (1.0 + eps), torch.ones_like(den))  # [B, H, nc, C, 1]
    return (num / den).reshape(b, h, nc * c, dv)[:, :, :n]  # [B, H, N, d_v]


def _exclusive_prefix(x: torch.Tensor) -> torch.Tensor:
    """``y[c] = Σ_{c' < c} x[c']`` along dim 2 (the chunk axis)."""
    return torch.cat([torch.zeros_like(x[:, :, :1]), x[:, :, :-1].cumsum(2)], 2)


def causal_log_space(lq, lk, v, eps: float = 1e-8, chunk: int | None = None) -> torch.Tensor:
    """Causal linearised attention from log-features (padded keys at ``-inf``), exact at any scale.

    The sequence is cut into chunks of ``C`` tokens.
    Inside a chunk the weights ``log A_ij = logsumexp_l(lq_il + lk_jl)`` are computed exactly in log
    space. Earlier chunks enter through a state ``S_l = Σ_j exp(lk_jl − m_l) v_j``, ``z_l = Σ_j
    exp(lk_jl − m_l)``, with ``m_l`` the maximum of feature ``l`` over the earlier chunks (so
    ``z_l ≥ 1``): each chunk's own sums are formed in parallel, then a short scan over chunks
    rescales and accumulates them (as an online softmax does).

    Args: ``lq [B, H, N, r]``, ``lk [B, H, N, r]`` (``-inf`` at padded keys), ``v [B, H, N, d_v]``,
        ``eps``, and ``chunk``: tokens per chunk (default: chosen from the memory of the
        ``[B, H, C, C, r]`` intra-chunk tensor). Returns ``[B, H, N, d_v]`` (no query padding applied).
    """
    b, h, n, r = lq.shape
    dv = v.shape[-1]
    c = _chunk_size(lq.shape, r, chunk)
    if c < 1:
        raise ValueError(f"chunk: expected a positive number of tokens per chunk, got {chunk}")
    nc = -(-n // c)
    pad = nc * c - n
    if pad:  # padding keys at -inf carry no weight; padding queries are cut off at the end
        lq = torch.nn.functional.pad(lq, (0, 0, 0, pad))  # [B, H, nc·C, r]
        lk = torch.nn.functional.pad(lk, (0, 0, 0, pad), value=_NEG_INF)  # [B, H, nc·C, r]
        v = torch.nn.functional.pad(v, (0, 0, 0, pad))  # [B, H, nc·C, d_v]
    lq = lq.reshape(b, h, nc, c, r)  # [B, H, nc, C, r]
    lk = lk.reshape(b, h, nc, c, r)  # [B, H, nc, C, r]
    v = v.reshape(b, h, nc, c, dv)  # [B, H, nc, C, d_v]
    # each chunk's key sums, relative to the chunk's own per-feature maximum
    mk = lk.amax(-2)  # [B, H, nc, r]
    kt = torch.exp(lk - _finite_or_zero(mk)[..., None, :])  # [B, H, nc, C, r]
    s_loc = kt.transpose(-2, -1) @ v  # [B, H, nc, r, d_v]
    z_loc = kt.sum(-2)  # [B, H, nc, r]
    # m_prev[c]: per-feature maximum over chunks before c (-inf for the first chunk)
    first = torch.full_like(mk[:, :, :1], _NEG_INF)  # [B, H, 1, r]
    m_prev = torch.cat([first, torch.cummax(mk, dim=2).values[:, :, :-1]], dim=2)  # [B, H, nc, r]
    # exclusive scan over chunks: the state seen by chunk ci, relative to m_prev[ci]
    ref = _finite_or_zero(m_prev)  # [B, H, nc, r]
    old = torch.exp(m_prev[:, :, :-1] - ref[:, :, 1:])  # [B, H, nc − 1, r]; rescales the state: 0 where it was empty
    loc = torch.exp(mk[:, :, :-1] - ref[:, :, 1:])  # [B, H, nc − 1, r]; rescales the previous chunk's own sums
    states, zsums = [torch.zeros_like(s_loc[:, :, 0])], [torch.zeros_like(z_loc[:, :, 0])]  # [B, H, r, d_v], [B, H, r] each
    for ci in range(1, nc):
        states.append(states[-1] * old[:, :, ci - 1, :, None] + s_loc[:, :, ci - 1] * loc[:, :, ci - 1, :, None])  # [B, H, r, d_v]
        zsums.append(zsums[-1] * old[:, :, ci - 1] + z_loc[:, :, ci - 1] * loc[:, :, ci - 1])  # [B, H, r]
    state = torch.stack(states, dim=2)  # [B, H, nc, r, d_v]
    zsum = torch.stack(zsums, dim=2)  # [B, H, nc, r]
    # all chunks' outputs, in groups that bound the [B, H, G, C, C, r] intra-chunk tensor
    group = max(1, 2**25 // max(1, b * h * c * c * r))
    tril = torch.ones(c, c, dtype=torch.bool, device=lq.device).tril()  # [C, C]
    outs = []
    for g0 in range(0, nc, group):
        sl = slice(g0, g0 + group)
        lq_g = lq[:, :, sl]  # [B, H, G, C, r]
        log_a = _logsumexp(lq_g[..., :, None, :] + lk[:, :, sl][..., None, :, :], dim=-1)  # [B, H, G, C, C]
        log_a = log_a.masked_fill(~tril, _NEG_INF)  # [B, H, G, C, C]
        w = lq_g + m_prev[:, :, sl][..., None, :]  # [B, H, G, C, r]: inter-chunk log weights per feature
        big = _finite_or_zero(torch.maximum(w.amax(-1), log_a.amax(-1)))[..., None]  # [B, H, G, C, 1]
        qt = torch.exp(w - big)  # [B, H, G, C, r]
        a = torch.exp(log_a - big)  # [B, H, G, C, C]
        num = qt @ state[:, :, sl] + a @ v[:, :, sl]  # [B, H, G, C, d_v]
        den = (qt * zsum[:, :, sl][..., None, :]).sum(-1, keepdim=True) + a.sum(-1, keepdim=True)  # [B, H, G, C, 1]
        outs.append(num / _denominator(den, eps))  # [B, H, G, C, d_v]
    return torch.cat(outs, dim=2).reshape(b, h, nc * c, dv)[:, :, :n]  # [B, H, N, d_v]


def _undefined_row(at, kernel: str):
    raise ValueError(
        f"q: row {at} (batch, head, query) has zero weight on every valid key under kernel {kernel!r} "
        "(all its feature products are 0), so its attention distribution is undefined"
    )


def _log_row_weights(lq_rows: torch.Tensor, lk_b: torch.Tensor) -> torch.Tensor:
    """Exact ``log A_j = logsumexp_l(lq_l + lk_jl)`` for a few rows: ``[R, r]`` × ``[R, M, r]`` → ``[R, M]``."""
    return _logsumexp(lq_rows[:, None, :] + lk_b, dim=-1)  # [R, M]


def linear_matrix(lq, lk, valid, kernel: str) -> torch.Tensor:
    """Dense row-stochastic ``P = D⁻¹ Φ_Q Φ_Kᵀ`` from log-features, in ``lq``'s dtype.

    Args:
        lq: ``[B, H, N, r]``; lk: ``[B, H, M, r]`` (compute dtype).
        valid: ``[B, H, N, M]`` bool (padding and causal rule combined) or None.
        kernel: name used in error messages.

    Rows whose shifted sum is too small to trust (possible only for causal rows, whose shift uses
    later keys) are recomputed exactly in log space. Rows with no valid entry are 0. A row whose
    valid weights are all exactly zero (ReLU features) has no attention distribution: ValueError.
    """
    key_valid = None if valid is None else valid.any(-2)  # [B, H, M] or None
    qt, kt = _shifted_features(lq, _mask_keys(lk, key_valid))  # [B, H, N, r], [B, H, M, r]
    a = qt @ kt.transpose(-2, -1)  # [B, H, N, M]
    if valid is not None:
        a = a.masked_fill(~valid, 0)  # [B, H, N, M]
    s = a.sum(-1, keepdim=True)  # [B, H, N, 1]
    has_row = torch.ones_like(s[..., 0], dtype=torch.bool) if valid is None else valid.any(-1)  # [B, H, N]
    small = (s[..., 0] < math.sqrt(torch.finfo(a.dtype).tiny)) & has_row  # [B, H, N]
    if bool(small.any()):
        idx = torch.nonzero(small, as_tuple=False)  # [S, 3]: (b, h, i) of the rows to recompute
        for start in range(0, idx.shape[0], 64):
            bi, hi, ii = idx[start : start + 64].unbind(-1)  # [R] each, R ≤ 64
            log_rows = _log_row_weights(lq[bi, hi, ii], lk[bi, hi])  # [R, M]
            if valid is not None:
                log_rows = log_rows.masked_fill(~valid[bi, hi, ii], _NEG_INF)  # [R, M]
            lse = _logsumexp(log_rows, dim=-1)[:, None]  # [R, 1]
            zero = ~torch.isfinite(lse[:, 0])  # [R]
            if bool(zero.any()):
                _undefined_row(tuple(int(t) for t in idx[start + int(torch.nonzero(zero)[0, 0])]), kernel)
            a[bi, hi, ii] = torch.exp(log_rows - lse)  # [R, M]
            s[bi, hi, ii] = 1.0
    s = torch.where(has_row[..., None], s, torch.ones_like(s))  # [B, H, N, 1]
    return a / s  # [B, H, N, M]


def log_feature_gap(lq, lk, valid_tokens, causal: bool, kernel: str) -> torch.Tensor:
    """Spectral gap ``1 − |λ_2|`` of linearised attention without the N×N matrix.

    Non-causal: the nonzero eigenvalues of ``P = D̃⁻¹ qt ktᵀ`` are those of the ``r × r`` matrix
    ``ktᵀ D̃⁻¹ qt`` (``O(N·r²)``, then an ``r × r`` eigen-solver). Causal: ``P`` is lower-triangular,
    its eigenvalues are ``P_ii = A_ii / D_i`` with ``log D_i = logsumexp_l(lq_il + logcumsumexp_j
    lk_jl)``; the gap is ``1 − max`` over the valid tokens after the first (``O(N·r)``).

    Args:
        lq, lk: ``[B, H, N, r]`` log-features in the compute dtype.
        valid_tokens: ``[B, H, N]`` bool, tokens valid as both query and key (padding removed, the
            square block the dense :func:`attnstats.spectral_gap` analyses), or None.

    Returns:
        ``[B, H]``; 1 for a matrix with a single valid token.
    """
    lk = _mask_keys(lk, valid_tokens)  # [B, H, N, r]
    b, h, n, r = lq.shape
    if causal:
        log_den = torch.logsumexp(lq + torch.logcumsumexp(lk, dim=-2), dim=-1)  # [B, H, N]
        log_diag = torch.logsumexp(lq + lk, dim=-1)  # [B, H, N]
        bad = ~torch.isfinite(log_den)  # [B, H, N]
        if valid_tokens is not None:
            bad = bad & valid_tokens
        if bool(bad.any()):
            _undefined_row(first_index(bad), kernel)
        diag = torch.exp(log_diag - _finite_or_zero(log_den))  # [B, H, N]: the eigenvalues P_ii
        if valid_tokens is None:
            return causal_spectral_gap(diag)
        # the first valid token's row is (1, 0, ...): drop it, as the dense rule drops P_00
        first = valid_tokens & (valid_tokens.cumsum(-1) == 1)  # [B, H, N]
        d = diag.masked_fill(~valid_tokens | first, _NEG_INF)  # [B, H, N]
        top = d.amax(-1)  # [B, H]
        return torch.where(torch.isfinite(top), 1.0 - top, torch.ones_like(top))
    qt, kt = _shifted_features(lq, lk)  # [B, H, N, r] each
    z = kt.sum(-2)  # [B, H, r]
    den = (qt * z[..., None, :]).sum(-1)  # [B, H, N]
    bad = den <= 0  # [B, H, N]
    if valid_tokens is not None:
        bad = bad & valid_tokens
    if bool(bad.any()):
        _undefined_row(first_index(bad), kernel)
    qd = qt / torch.where(den > 0, den, torch.ones_like(den))[..., None]  # [B, H, N, r]
    if valid_tokens is not None:
        qd = qd * valid_tokens[..., None]  # [B, H, N, r]
    small = kt.transpose(-2, -1) @ qd  # [B, H, r, r]
    gap = _second_modulus_gap(small).to(lq.dtype)  # [B, H]
    if valid_tokens is not None:
        count = valid_tokens.sum(-1)  # [B, H]
        gap = torch.where(count <= 1, torch.ones_like(gap), gap)
    elif n == 1:
        gap = torch.ones_like(gap)
    return gap


def _second_modulus_gap(small: torch.Tensor) -> torch.Tensor:
    """``1 − |λ_2|`` of each ``[..., r, r]`` matrix whose largest eigenvalue is 1 (r = 1 gives 1)."""
    if small.shape[-1] == 1:
        return torch.ones(small.shape[:-2], dtype=small.dtype, device=small.device)
    gap, _, _ = gap_from_eigenvalues(eigenvalues(small).reshape(-1, small.shape[-1]), "the r × r matrix Φ_Kᵀ D⁻¹ Φ_Q")  # [B·H]
    return gap.reshape(small.shape[:-2]).to(device=small.device)  # [B, H]


def linear_spectral_gap(phi_q, phi_k, *, causal=False) -> torch.Tensor:
    """Exact spectral gap of linearised attention ``P = D⁻¹ Φ_Q Φ_Kᵀ`` from its feature maps.

    Args:
        phi_q: ``[..., N, r]`` non-negative query features ``φ_Q(q_i)``.
        phi_k: ``[..., N, r]`` non-negative key features ``φ_K(k_j)``.
        causal: row ``i`` uses keys ``j ≤ i`` (then ``P`` is lower-triangular).

    Returns:
        ``[...]`` float64 (on the CPU: float64; on a GPU: the compute dtype) gaps ``1 − |λ_2|``.
        Non-causal: the nonzero eigenvalues of ``P`` are those of the ``r×r`` matrix
        ``Φ_Kᵀ D⁻¹ Φ_Q`` (``D_i = φ_Q(q_i)·Σ_j φ_K(k_j)``), ``O(N·r²)``; the rest are 0. Causal:
        the diagonal ``φ_Q(q_i)·φ_K(k_i) / φ_Q(q_i)·Σ_{j≤i} φ_K(k_j)``, ``O(N·r)``.
    """
    check_tensor(phi_q, "phi_q")
    check_tensor(phi_k, "phi_k")
    if phi_q.dim() < 2 or phi_q.shape != phi_k.shape:
        raise ValueError(
            f"phi_q, phi_k: expected equal shapes [..., N, r], got {tuple(phi_q.shape)} and {tuple(phi_k.shape)}"
        )
    check_finite(phi_q, "phi_q")
    check_finite(phi_k, "phi_k")
    for name, x in (("phi_q", phi_q), ("phi_k", phi_k)):
        if bool((x < 0).any()):
            idx = tuple(int(i) for i in (x < 0).nonzero()[0])
            raise ValueError(f"{name}: expected non-negative features, found {x[idx].item()} at index {idx}")
    dt = compute_dtype(phi_q)
    batch, (n, r) = phi_q.shape[:-2], phi_q.shape[-2:]
    # the kernels' log-space rule is the one implementation; log 0 = −inf marks a zero feature
    lq = torch.log(phi_q.to(dt)).reshape(1, -1, n, r)
    lk = torch.log(phi_k.to(dt)).reshape(1, -1, n, r)
    return log_feature_gap(lq, lk, None, causal, "linear").reshape(batch)


# --------------------------------------------------------------------------------------------
# feature maps
# --------------------------------------------------------------------------------------------


def performer_projection(d: int, num_features: int, seed: int = 0) -> torch.Tensor:
    """FAVOR+ random projection ``[num_features, d]`` (float64, CPU), seeded.

    Blocks of ``d`` orthogonal directions (QR of a Gaussian matrix) with lengths drawn as the norms
    of ``d``-dimensional Gaussian vectors, so every row is marginally ``N(0, I_d)`` and rows within a
    block are orthogonal (Choromanski et al., 2021).
    """
    g = torch.Generator().manual_seed(int(seed))
    blocks = []
    for _ in range(math.ceil(num_features / d)):
        qmat, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
        blocks.append(qmat.T)
    w = torch.cat(blocks, 0)[:num_features]
    lengths = torch.randn(num_features, d, generator=g, dtype=torch.float64).norm(dim=-1)
    return w * lengths[:, None]


def _log_relu(x):
    return torch.where(x > 0, torch.log(x.clamp_min(torch.finfo(x.dtype).tiny)), torch.full_like(x, _NEG_INF))


def _log_elu_plus_one(x):
    # log(elu(x) + 1) is x for x <= 0 and log1p(x) above: exact, never -inf
    return torch.where(x > 0, torch.log1p(x.clamp_min(0)), x)


class LogFeatureAttention(Kernel):
    """Linearised attention ``P_ij ∝ φ_Q(q_i)·φ_K(k_j)`` given by the logarithms of its features.

    Subclasses define ``log_features(q, k, dtype) -> (log φ_Q(q), log φ_K(k))`` (``[B, H, N, r]``,
    ``-inf`` for a zero feature) and set ``name``, ``eps`` and ``chunk``; the output, the dense
    matrix and the r×r spectral gap follow from them alike for every feature map.
    """

    def forward(self, q, k, v, *, causal: bool = False, mask=None) -> torch.Tensor:
        """Attention output ``[B, H, N, d_v]`` (same dtype as the inputs; float32 compute for half)."""
        check_qkv(q, k, v, causal, finite=False)  # finiteness: with the features, in _checked_features
        return self._output(q, k, v, causal, mask)

    def _output(self, q, k, v, causal: bool, mask, checked: bool = False) -> torch.Tensor:
        """:meth:`forward` after its shape checks; ``checked``: finiteness already checked too (a kernel
        combining this one checks once)."""
        out_dt = result_dtype(q, k, v)
        dt = work_dtype(out_dt)
        shape = (q.shape[0], q.shape[1], q.shape[-2], k.shape[-2])
        query_valid, key_valid = padding_parts(mask, shape, causal, self.name)  # [B, H, N] | None, [B, H, M] | None
        with torch.autocast(q.device.type, enabled=False):  # the work dtype is chosen here, not by autocast
            lq, lk, spread = self._checked_features(q, k, v, dt, causal, key_valid, checked)
            vv = v.to(dt)  # [B, H, M, d_v]
            if causal:
                half = out_dt if out_dt in (torch.float16, torch.bfloat16) else None
                out = linear_attention_causal(lq, lk, vv, key_valid, query_valid, self.eps, self.chunk, half,
                                              spread)  # [B, H, N, d_v]
            else:
                out = linear_attention(lq, lk, vv, key_valid, query_valid, self.eps)  # [B, H, N, d_v]
        return out.to(out_dt)

    def _checked_features(self, q, k, v, dtype, causal: bool, key_valid, checked: bool):
        """``(lq, lk, spread)``: the log-features after the finiteness check of q, k, v (skipped when
        ``checked``), and the causal key spread of :func:`linear_attention_causal` where it is known
        without another device sync (None here: it is measured there). ``key_valid``: ``[B, H, M]`` or
        None (every key valid)."""
        if not checked:
            check_all_finite(q=q, k=k, v=v)
        lq, lk = self.log_features(q, k, dtype)  # [B, H, N, r], [B, H, M, r]
        return lq, lk, None

    def _valid(self, mask, shape, causal: bool, device):
        """``(query_valid [B, H, N] | None, key_valid [B, H, M] | None)``: features factorise ``P``, so
        only padding masks are supported (:func:`~attnstats.kernels.base.padding_parts`)."""
        return padding_parts(mask, shape, causal, self.name)

    def _matrix(self, q, k, valid, *, causal: bool, dtype: torch.dtype) -> torch.Tensor:
        """The dense matrix ``[B, H, N, M]`` from the log-features; rows with no valid key are 0."""
        query_valid, key_valid = valid  # [B, H, N] | None, [B, H, M] | None
        shape = (q.shape[0], q.shape[1], q.shape[-2], k.shape[-2])
        dense_valid = from_parts(query_valid, key_valid, causal, shape, q.device)  # [B, H, N, M] or None
        lq, lk = self.log_features(q, k, dtype)  # [B, H, N, r], [B, H, M, r]
        return linear_matrix(lq, lk, dense_valid, self.name)  # [B, H, N, M]

    def _gap(self, q, k, valid, *, causal: bool, dtype: torch.dtype) -> torch.Tensor:
        """Spectral gap ``[B, H]`` from the ``r × r`` matrix ``Φ_Kᵀ D⁻¹ Φ_Q`` of docs/theory.md §4 (causal:
        diagonal rule); the N×N matrix is never built."""
        query_valid, key_valid = valid  # [B, H, N] | None, [B, H, N] | None
        check_parts(query_valid, key_valid, causal)  # a matrix with no entry, or no square block, raises
        tokens = tokens_of_parts(query_valid, key_valid)  # [B, H, N] or None
        lq, lk = self.log_features(q, k, dtype)  # [B, H, N, r] each
        return log_feature_gap(lq, lk, tokens, causal, self.name)  # [B, H]


class LinearAttention(LogFeatureAttention):
    """Linearised attention with a fixed feature map, ``P_ij ∝ φ(q_i)·φ(k_j)``.

    Args:
        feature_map: ``"relu"`` (``max(x, 0)``), ``"elu_plus_one"`` (``elu(x) + 1``), ``"exp"``
            (``exp(x)`` element-wise, on q and k as given), or ``"performer"`` (FAVOR+ positive random
            features ``exp(ωᵀx − |x|²/2)/sqrt(m)`` of ``x = q·d^{-1/4}``, an unbiased estimate of the
            softmax kernel ``exp(q·k/sqrt(d))``).
        num_features: Performer only, number ``m`` of random features (default ``int(d·ln d)``,
            at least ``d``).
        seed: Performer only, seed of the random projection.
        eps: guard against zero denominators, at most a relative change of ``eps`` (module docstring).
        chunk: tokens per chunk of the causal algorithm (default 64 for the product form, a
            memory-bounded size for the log-space algorithm).

    ``relu`` rows can have zero weight everywhere (a query with no positive feature): their output
    is 0 and ``matrix``/``spectral_gap`` raise a ValueError naming the row.
    """

    def __init__(self, feature_map: str = "elu_plus_one", *, num_features: int | None = None, seed: int = 0,
                 eps: float = 1e-8, chunk: int | None = None):
        super().__init__()
        if not isinstance(feature_map, str) or feature_map not in FEATURE_MAPS:
            raise ValueError(f"feature_map: unknown feature map {feature_map!r}, expected one of {', '.join(FEATURE_MAPS)}")
        num_features = check_count(num_features, "num_features")
        if num_features is not None and feature_map != "performer":
            raise ValueError(f"num_features: only the 'performer' feature map has random features, not {feature_map!r}")
        seed = check_count(seed, "seed", low=0, none_ok=False)
        chunk = check_count(chunk, "chunk")
        eps = check_real(eps, "eps", low=0)
        self.name = feature_map
        self.feature_map = feature_map
        self.num_features = num_features
        self.seed = seed
        self.eps = float(eps)
        self.chunk = chunk
        self._projections: dict = {}

    def extra_repr(self) -> str:
        extra = f", num_features={self.num_features}, seed={self.seed}" if self.feature_map == "performer" else ""
        return f"feature_map={self.feature_map!r}{extra}, eps={self.eps}"

    def projection(self, d: int, device, dtype) -> torch.Tensor:
        """The Performer projection ``[m, d]`` used for head dim ``d`` (drawn once per ``d``)."""
        m = self.num_features if self.num_features is not None else max(d, int(d * math.log(d)))
        if d not in self._projections:
            self._projections[d] = performer_projection(d, m, self.seed)
        return self._projections[d].to(device=device, dtype=dtype)

    def log_features(self, q: torch.Tensor, k: torch.Tensor, dtype: torch.dtype):
        """``(log φ(q), log φ(k))`` in ``dtype``, ``[B, H, N, r]``; ``-inf`` marks a zero feature."""
        q, k = q.to(dtype), k.to(dtype)  # [B, H, N, d], [B, H, M, d]
        f = self.feature_map
        if f == "relu":
            return _log_relu(q), _log_relu(k)
        if f == "elu_plus_one":
            return _log_elu_plus_one(q), _log_elu_plus_one(k)
        if f == "exp":
            return q, k
        d = q.shape[-1]
        w = self.projection(d, q.device, dtype)  # [m, d]
        scale = d ** -0.25

        def favor(x):
            x = x * scale  # [B, H, N, d]
            # the constant −log(m)/2 cancels in the normalisation and is left out
            return x @ w.T - 0.5 * (x * x).sum(-1, keepdim=True)  # [B, H, N, m]

        return favor(q), favor(k)


for _name in FEATURE_MAPS:
    _register(_name, LinearAttention, feature_map=_name)
