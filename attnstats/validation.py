"""Checks of user input shared by every statistic.

Every check raises ``ValueError`` (or ``TypeError`` for a wrong type) whose message names the
argument, the first offending index and what was expected, so that bad input never turns into a
silent NaN or a wrong number further down.
"""
from __future__ import annotations

import math

import torch

__all__ = [
    "compute_dtype",
    "upcast",
    "first_index",
    "check_tensor",
    "check_finite",
    "check_square",
    "broadcast_mask",
    "check_probs",
    "row_sum_tolerance",
    "check_qk",
]


def compute_dtype(t: torch.Tensor) -> torch.dtype:
    """The dtype statistics of ``t`` are computed in: float64 on the CPU, at least float32 elsewhere."""
    if t.device.type == "cpu":
        return torch.float64
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def upcast(t: torch.Tensor) -> torch.Tensor:
    """``t`` in its :func:`compute_dtype` (half inputs are never computed in half precision)."""
    return t.to(compute_dtype(t))


def first_index(bad: torch.Tensor) -> tuple[int, ...]:
    """Index of the first True entry of the bool tensor ``bad`` (row-major order)."""
    flat = int(torch.nonzero(bad.reshape(-1), as_tuple=False)[0, 0])
    return tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), bad.shape))


def check_tensor(x, name: str) -> torch.Tensor:
    """``x`` as a floating-point tensor; TypeError otherwise."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name}: expected a floating-point tensor, got dtype {x.dtype}")
    return x


def check_finite(x: torch.Tensor, name: str, where: torch.Tensor | None = None) -> None:
    """Raise if ``x`` holds NaN or Inf (only at ``where`` if given: masked entries may hold anything)."""
    bad = ~torch.isfinite(x)
    if where is not None:
        bad = bad & where
    if bool(bad.any()):
        idx = first_index(bad)
        raise ValueError(f"{name}: expected finite values, found {x[idx].item()} at index {idx}")


def check_square(p: torch.Tensor, name: str = "p") -> int:
    """Raise unless ``p`` is ``[..., N, N]`` with N ≥ 1; return N."""
    if p.dim() < 2:
        raise ValueError(f"{name}: expected shape [..., N, N], got a {p.dim()}-d tensor of shape {tuple(p.shape)}")
    n, m = p.shape[-2], p.shape[-1]
    if n != m:
        raise ValueError(f"{name}: expected square last two dims [..., N, N], got shape {tuple(p.shape)}")
    if n == 0:
        raise ValueError(f"{name}: empty sequence (N = 0), expected N >= 1")
    return n


def broadcast_mask(mask, shape: torch.Size, name: str = "mask") -> torch.Tensor | None:
    """``mask`` as a bool tensor expanded to ``shape`` (True = attend), or None."""
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{name}: expected a bool torch.Tensor or None, got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise TypeError(f"{name}: expected dtype torch.bool (True = attend), got {mask.dtype}")
    try:
        return mask.expand(shape)
    except RuntimeError:
        raise ValueError(
            f"{name}: shape {tuple(mask.shape)} does not broadcast to the attention shape {tuple(shape)}"
        ) from None


def row_sum_tolerance(dtype: torch.dtype, n: int) -> float:
    """Largest deviation of a row sum from 1 accepted for probabilities stored in ``dtype``.

    Rounding each entry to ``dtype`` moves the sum by at most ``eps/2``; accumulating ``n`` entries
    in at least float32 adds about ``sqrt(n)`` float32 epsilons.
    """
    eps = torch.finfo(dtype).eps
    acc_eps = torch.finfo(torch.float64 if dtype == torch.float64 else torch.float32).eps
    return 4 * eps + 8 * math.sqrt(n) * acc_eps


def check_probs(p: torch.Tensor, mask: torch.Tensor | None = None, name: str = "p") -> None:
    """Raise unless ``p`` holds row-stochastic attention over its valid entries.

    Args:
        p: ``[..., N, N]`` attention probabilities, any float dtype.
        mask: ``[..., N, N]`` bool (already broadcast), True = attend, or None.

    Checks: finite and non-negative on valid entries; every row with a valid entry sums to 1 over
    them within :func:`row_sum_tolerance`; every matrix has at least one valid entry.
    """
    n = p.shape[-1]
    check_finite(p, name, where=mask)
    neg = p < 0
    if mask is not None:
        neg = neg & mask
    if bool(neg.any()):
        idx = first_index(neg)
        raise ValueError(f"{name}: expected non-negative probabilities, found {p[idx].item()} at index {idx}")
    if mask is not None:
        per_matrix = mask.flatten(-2).any(-1)
        if not bool(per_matrix.all()):
            idx = first_index(~per_matrix)
            raise ValueError(f"mask: no valid entry in the matrix at batch index {idx}; expected at least one True")
    x = upcast(p)
    valid_rows = None
    if mask is not None:
        x = x.masked_fill(~mask, 0)
        valid_rows = mask.any(-1)
    sums = x.sum(-1)
    off = (sums - 1).abs() > row_sum_tolerance(p.dtype, n)
    if valid_rows is not None:
        off = off & valid_rows
    if bool(off.any()):
        idx = first_index(off)
        raise ValueError(
            f"{name}: row {idx} sums to {sums[idx].item():.8g} over its valid entries, expected 1 "
            f"(tolerance {row_sum_tolerance(p.dtype, n):.2g} for {p.dtype})"
        )


def check_qk(q: torch.Tensor, k: torch.Tensor, qname: str = "q", kname: str = "k") -> None:
    """Raise unless ``q: [..., Nq, d]`` and ``k: [..., Nk, d]`` are finite float tensors that match."""
    check_tensor(q, qname)
    check_tensor(k, kname)
    if q.dim() < 2 or k.dim() < 2:
        raise ValueError(f"{qname}, {kname}: expected shape [..., N, d], got {tuple(q.shape)} and {tuple(k.shape)}")
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(
            f"{qname}, {kname}: head dims differ, {qname} has d = {q.shape[-1]} and {kname} has d = {k.shape[-1]}"
        )
    if q.shape[-2] == 0 or k.shape[-2] == 0:
        raise ValueError(f"{qname}, {kname}: empty sequence (N = 0), expected N >= 1")
    try:
        torch.broadcast_shapes(q.shape[:-2], k.shape[:-2])
    except RuntimeError:
        raise ValueError(
            f"{qname}, {kname}: batch dims {tuple(q.shape[:-2])} and {tuple(k.shape[:-2])} do not broadcast"
        ) from None
    check_finite(q, qname)
    check_finite(k, kname)
