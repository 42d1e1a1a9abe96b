"""Statistics of a dense attention matrix: row entropy and moments of the entries.

``p`` is ``[..., N, N]`` (rows are queries, columns keys), any float dtype; ``mask`` is bool,
broadcastable to ``p``, True = attend. Masked entries are absent from every sum and statistic, not
zeros of the distribution. Everything is computed in float64 on the CPU (at least float32 on a GPU).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from .validation import broadcast_mask, check_probs, check_square, check_tensor, upcast

__all__ = ["EntryMoments", "row_entropy", "entry_moments", "prepare_probs"]


def prepare_probs(p: torch.Tensor, mask: torch.Tensor | None = None):
    """Validate attention probabilities and return ``(p, mask)`` upcast and broadcast.

    Returns:
        ``p`` in float64 (CPU) or ≥ float32 (GPU) with masked entries set to 0, and the mask
        expanded to ``p.shape`` (or None).
    """
    check_tensor(p, "p")
    check_square(p, "p")
    m = broadcast_mask(mask, p.shape)
    check_probs(p, m)
    x = upcast(p)
    if m is not None:
        x = x.masked_fill(~m, 0)
    return x, m


def row_entropy(p: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Entropy of each row of ``p`` over its valid entries, in nats.

    Args:
        p: ``[..., N, N]`` row-stochastic attention (rows sum to 1 over valid entries).
        mask: bool, broadcastable to ``p``, True = attend; None = every entry valid.

    Returns:
        ``[..., N]``: ``H_i = −Σ_j P_ij ln P_ij`` (``0 ln 0 = 0``); NaN for a row with no valid entry.
    """
    x, m = prepare_probs(p, mask)
    h = -torch.special.xlogy(x, x).sum(-1)
    if m is not None:
        h = h.masked_fill(~m.any(-1), float("nan"))
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


def _masked_mean_var(x: torch.Tensor, w: torch.Tensor):
    """Mean and population variance of ``x`` over its last two dims, entries weighted 0/1 by ``w``."""
    n = w.sum((-2, -1))
    mean = (x * w).sum((-2, -1)) / n
    var = (((x - mean[..., None, None]) * w) ** 2).sum((-2, -1)) / n
    return mean, var, n


def entry_moments(p: torch.Tensor, mask: torch.Tensor | None = None) -> EntryMoments:
    """Mean and variance of the valid entries of ``p`` and of ``ln p``, per matrix.

    Args:
        p: ``[..., N, N]`` row-stochastic attention.
        mask: bool, broadcastable to ``p``, True = attend; None = every entry valid.

    Returns:
        :class:`EntryMoments` with fields of shape ``[...]``.
    """
    x, m = prepare_probs(p, mask)
    w = torch.ones_like(x) if m is None else m.to(x.dtype)
    mean, var, count = _masked_mean_var(x, w)
    pos = (x > 0) & (w > 0)
    zeros = (w > 0).sum((-2, -1)) - pos.sum((-2, -1))
    if bool((zeros > 0).any()):
        warnings.warn(
            f"entry_moments: {int(zeros.sum())} valid entries of p are exactly 0 (log = -inf); "
            "they are left out of log_mean and log_var and counted in zero_count",
            RuntimeWarning,
            stacklevel=2,
        )
    logx = torch.log(torch.where(pos, x, torch.ones_like(x)))
    pw = pos.to(x.dtype)
    log_mean, log_var, _ = _masked_mean_var(logx, pw)
    return EntryMoments(
        mean=mean,
        var=var,
        log_mean=log_mean,
        log_var=log_var,
        count=count.round().to(torch.int64),
        zero_count=zeros.to(torch.int64),
    )
