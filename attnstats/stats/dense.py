"""The dense attention matrix: softmax attention from ``q, k``, and its row entropy and entry moments.

:func:`softmax_attention` is the one place attnstats turns scores into a dense softmax matrix; the
kernels, the dense eigen-solver and the command's checks call it. The statistics below read any
row-stochastic ``p``.

``p`` is ``[..., N, N]`` (rows are queries, columns keys), any float dtype; ``mask`` is bool,
broadcastable to ``p``, True = attend. Masked entries are absent from every sum and statistic, not
zeros of the distribution. Everything is computed in float64 on the CPU (at least float32 on a GPU).
"""
from __future__ import annotations

import math
import numbers
import warnings
from dataclasses import dataclass

import torch

from ..budget import check_dense_fits
from ..masks import broadcast_mask, full_mask
from ..validation import check_finite, check_qk, check_square, check_tensor, compute_dtype, probability_blocks

__all__ = ["EntryMoments", "row_entropy", "entry_moments", "prepare_probs", "softmax_attention", "entropy_of_blocks",
           "moments_of_blocks"]


def softmax_attention(q: torch.Tensor, k: torch.Tensor, *, scale: float | None = None, mask: torch.Tensor | None = None,
                      causal: bool = False, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Dense softmax attention ``P = softmax(scale · q kᵀ)`` over the valid keys of each row.

    Args:
        q: ``[..., Nq, d]`` queries; k: ``[..., Nk, d]`` keys (batch dims broadcast together).
        scale: positive logit scale; None = ``d ** -0.5``.
        mask: bool, broadcastable to ``[..., Nq, Nk]``, True = attend; None = every key valid.
        causal: query ``i`` attends to keys ``j <= i`` only (needs ``Nq == Nk``).
        dtype: dtype of the scores and of ``P``; None = :func:`attnstats.validation.compute_dtype`
            of ``q`` (float64 on the CPU, at least float32 on a GPU).

    Returns:
        ``[..., Nq, Nk]`` in ``dtype``: each row with a valid key sums to 1; masked entries are
        exactly 0, and a row with no valid key is all 0 (never NaN).

    Raises:
        attnstats.DenseTooLargeError: if ``[..., Nq, Nk]`` in ``dtype`` exceeds the memory budget.
    """
    check_qk(q, k, causal)
    nq, nk = q.shape[-2], k.shape[-2]
    try:
        batch = torch.broadcast_shapes(q.shape[:-2], k.shape[:-2])
    except RuntimeError:
        raise ValueError(f"q, k: batch dims {tuple(q.shape[:-2])} and {tuple(k.shape[:-2])} do not broadcast") from None
    if scale is None:
        scale = q.shape[-1] ** -0.5
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"scale: expected a positive finite float or None, got {scale!r}")
    scale = float(scale)
    if dtype is None:
        dtype = compute_dtype(q)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype: expected a floating-point torch.dtype or None, got {dtype!r}")
    shape = torch.Size((*batch, nq, nk))
    check_dense_fits(shape, torch.finfo(dtype).bits // 8, "the softmax attention matrix")
    check_finite(q, "q")
    check_finite(k, "k")
    valid = full_mask(broadcast_mask(mask, shape, device=q.device), shape, causal, q.device)  # [..., Nq, Nk] or None
    s = (q.to(dtype) @ k.to(dtype).transpose(-2, -1)) * scale  # [..., Nq, Nk]
    if valid is None:
        return torch.softmax(s, dim=-1)
    p = torch.softmax(s.masked_fill(~valid, float("-inf")), dim=-1)  # [..., Nq, Nk], NaN rows where no key is valid
    return torch.where(valid.any(-1, keepdim=True), p, torch.zeros((), dtype=p.dtype, device=p.device))


def _checked(p, mask):
    """``(p, mask broadcast, batch shape, N)`` after the checks every dense statistic starts with."""
    check_tensor(p, "p")
    n = check_square(p, "p")
    return p, broadcast_mask(mask, p.shape), tuple(p.shape[:-2]), n


def prepare_probs(p: torch.Tensor, mask: torch.Tensor | None = None):
    """Validate attention probabilities and return ``(p, mask)`` upcast, renormalised and broadcast.

    Returns:
        ``p`` in float64 (CPU) or ≥ float32 (GPU) with masked entries set to 0 and every row with a
        valid entry divided by its sum (see :func:`attnstats.validation.probability_blocks`), and the
        mask expanded to ``p.shape`` (or None).

    Raises:
        attnstats.DenseTooLargeError: if ``p`` in the compute dtype exceeds the memory budget.
    """
    p, m, batch, n = _checked(p, mask)
    cd = compute_dtype(p)
    check_dense_fits(p.shape, torch.finfo(cd).bits // 8, f"p in {cd}")
    x = torch.empty(p.shape, dtype=cd, device=p.device)
    flat = x.view(-1, n, n)
    for i0, i1, r0, r1, block, _ in probability_blocks(p, m):
        flat[i0:i1, r0:r1] = block
    return x, m


def row_entropy(p: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Entropy of each row of ``p`` over its valid entries, in nats.

    Args:
        p: ``[..., N, N]`` row-stochastic attention (rows sum to 1 over valid entries; see
            :func:`attnstats.validation.row_sum_tolerance`); each valid row is divided by its sum first.
        mask: bool, broadcastable to ``p``, True = attend; None = every entry valid.

    Returns:
        ``[..., N]``: ``H_i = −Σ_j P_ij ln P_ij`` (``0 ln 0 = 0``); NaN for a row with no valid entry.
        Rows are read a block at a time: extra memory is a few blocks of about 16 MiB, not ``N²``.
    """
    p, m, batch, n = _checked(p, mask)
    return entropy_of_blocks(probability_blocks(p, m), batch, n, compute_dtype(p), p.device)


def entropy_of_blocks(blocks, batch, n: int, dtype: torch.dtype, device) -> torch.Tensor:
    """:func:`row_entropy` ``[*batch, N]`` of checked probabilities given as blocks of rows (the protocol of
    :func:`attnstats.validation.probability_blocks`: ``(i0, i1, r0, r1, x, valid)``)."""
    h = torch.empty((*batch, n), dtype=dtype, device=device)
    flat = h.view(-1, n)
    for i0, i1, r0, r1, x, valid in blocks:
        hb = -torch.special.xlogy(x, x).sum(-1)  # [i1 - i0, r1 - r0]
        if valid is not None:
            hb = hb.masked_fill(~valid.any(-1), float("nan"))
        flat[i0:i1, r0:r1] = hb
    return h
@dataclass(frozen=True)
class EntryMoments:
    """Mean and variance of the valid entries of each attention matrix, and of their logarithm.

    Every field is a tensor of the batch shape ``[...]``. Variances are population variances
    (divided by the count). Log moments use the strictly positive valid entries only: an entry that
    underflowed to 0 has ``log P = −∞`` and is counted in ``zero_count`` instead.

    Attributes:
        mean: mean of ``P`` entries (exactly ``1/N`` for a full N×N matrix).
        var: variance of ``P`` entries.
        log_mean: mean of ``ln P`` entries (nats).
        log_var: variance of ``ln P`` entries.
        count: number of valid entries.
        zero_count: number of valid entries equal to 0, left out of the log moments.
    """

    mean: torch.Tensor
    var: torch.Tensor
    log_mean: torch.Tensor
    log_var: torch.Tensor
    count: torch.Tensor
    zero_count: torch.Tensor


def _merge_rows(n: torch.Tensor, mean: torch.Tensor, m2: torch.Tensor):
    """Per-matrix count, mean and population variance from per-row ``n, mean, M2`` (``[M, N]``).

    The parallel-variance rule: ``M2 = Σ_i M2_i + Σ_i n_i (mean_i − mean)²``, no large differences.
    """
    count = n.sum(-1)
    mean_all = (n * mean).sum(-1) / count
    m2_all = m2.sum(-1) + (n * (mean - mean_all[:, None]) ** 2).sum(-1)
    return count, mean_all, m2_all / count


def entry_moments(p: torch.Tensor, mask: torch.Tensor | None = None) -> EntryMoments:
    """Mean and variance of the valid entries of ``p`` and of ``ln p``, per matrix.

    Args:
        p: ``[..., N, N]`` row-stochastic attention (each valid row is divided by its sum first).
        mask: bool, broadcastable to ``p``, True = attend; None = every entry valid.

    Returns:
        :class:`EntryMoments` with fields of shape ``[...]``. Rows are read a block at a time (mean
        and ``Σ (x − mean)²`` per row, then merged per matrix), so the extra memory is a few blocks of
        about 16 MiB and ``O(N)`` per matrix, not copies of ``p``.
    """
    p, m, batch, n = _checked(p, mask)
    return moments_of_blocks(probability_blocks(p, m), batch, n, compute_dtype(p), p.device)


def moments_of_blocks(blocks, batch, n: int, cd: torch.dtype, device) -> EntryMoments:
    """:func:`entry_moments` of checked probabilities given as blocks of rows (see :func:`entropy_of_blocks`);
    the blocks' ``x`` are overwritten."""
    rows = math.prod(batch) if batch else 1
    acc = torch.zeros((6, rows, n), dtype=cd, device=device)  # n, mean, M2 of P; then of ln P
    for i0, i1, r0, r1, x, valid in blocks:
        cnt = torch.full(x.shape[:-1], n, dtype=cd, device=x.device) if valid is None else valid.sum(-1).to(cd)
        mean = x.sum(-1) / cnt.clamp_min(1)
        dev = x - mean[..., None]
        if valid is not None:
            dev.masked_fill_(~valid, 0)
        m2 = dev.square_().sum(-1)
        del dev
        pos = x > 0
        if valid is not None:
            pos &= valid
        lx = x.log_().masked_fill_(~pos, 0)  # x is ours: its log replaces it (no copy)
        npos = pos.sum(-1).to(cd)
        lmean = lx.sum(-1) / npos.clamp_min(1)
        lx.sub_(lmean[..., None]).masked_fill_(~pos, 0)
        lm2 = lx.square_().sum(-1)
        for slot, value in enumerate((cnt, mean, m2, npos, lmean, lm2)):
            acc[slot, i0:i1, r0:r1] = value
    count, mean, var = _merge_rows(acc[0], acc[1], acc[2])
    pos_count, log_mean, log_var = _merge_rows(acc[3], acc[4], acc[5])
    zeros = (count - pos_count).round().to(torch.int64)
    if bool((zeros > 0).any()):
        warnings.warn(
            f"entry_moments: {int(zeros.sum())} valid entries of p are exactly 0 (log = -inf); "
            "they are left out of log_mean and log_var and counted in zero_count",
            RuntimeWarning,
            stacklevel=3,
        )
    return EntryMoments(
        mean=mean.reshape(batch),
        var=var.reshape(batch),
        log_mean=log_mean.reshape(batch),
        log_var=log_var.reshape(batch),
        count=count.round().to(torch.int64).reshape(batch),
        zero_count=zeros.reshape(batch),
    )
