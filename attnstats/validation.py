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
    "check_qk",
    "check_finite",
    "check_square",
    "probability_blocks",
    "checked_blocks",
    "row_sum_tolerance",
    "no_valid_entry",
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


def check_qk(q, k, causal: bool = False) -> None:
    """Raise unless ``q: [..., Nq, d]`` and ``k: [..., Nk, d]`` are float tensors on one device with
    one head dim ``d ≥ 1``, ``N ≥ 1``, and ``Nq == Nk`` when ``causal`` (values are not read)."""
    check_tensor(q, "q")
    check_tensor(k, "k")
    if q.dim() < 2 or k.dim() < 2:
        raise ValueError(f"q, k: expected shape [..., N, d], got {tuple(q.shape)} and {tuple(k.shape)}")
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q, k: head dims differ, q has d = {q.shape[-1]} and k has d = {k.shape[-1]}")
    if q.shape[-2] == 0 or k.shape[-2] == 0:
        raise ValueError(f"q, k: empty sequence, got Nq = {q.shape[-2]} and Nk = {k.shape[-2]}; expected N >= 1")
    if q.shape[-1] == 0:
        raise ValueError("q, k: head dim d = 0, expected d >= 1")
    if q.device != k.device:
        raise ValueError(f"q, k: on different devices, {q.device} and {k.device}")
    if causal and q.shape[-2] != k.shape[-2]:
        raise ValueError(f"causal: expects as many queries as keys, got Nq = {q.shape[-2]} and Nk = {k.shape[-2]}")


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


def no_valid_entry(index, name: str = "mask") -> ValueError:
    """The error for a matrix (at batch ``index``, a tuple) whose mask leaves no valid entry."""
    return ValueError(f"{name}: no valid entry in the matrix at batch index {tuple(index)}; expected at least one True")


def row_sum_tolerance(dtype: torch.dtype, n: int) -> float:
    """Largest deviation of a row sum from 1 accepted for probabilities stored in ``dtype``.

    Attention is computed in float32 (or coarser) far more often than in float64, and careful users
    cast it up before computing statistics, so the values are held to the rounding of the precision
    they plausibly came from, float32 at least, not to that of their storage dtype: rounding each
    entry moves the sum by at most ``eps/2``, and accumulating ``n`` entries in float32 adds about
    ``sqrt(n)`` float32 epsilons. A row summing to 0.9 or 1.01 is no distribution in any precision.
    """
    eps32 = torch.finfo(torch.float32).eps
    eps = max(torch.finfo(dtype).eps, eps32)
    return 4 * eps + 8 * math.sqrt(n) * eps32


# Rows of p handled at once by the dense statistics: blocks of about this many bytes in the compute
# dtype, so that their temporaries stay a few times this size whatever N and the batch are.
_BLOCK_BYTES = 16 * 1024**2


def _gather(x: torch.Tensor, batch_index: list, rows: slice) -> torch.Tensor:
    """``x[b, rows, :]`` for the matrices ``b`` of ``batch_index`` (a fresh tensor ``[g, r, N]``).

    ``x`` is ``[*batch, R, C]``, possibly a broadcast view (size-1 dims of a mask stay size 1).
    """
    idx = tuple(i if x.shape[d] != 1 else torch.zeros_like(i) for d, i in enumerate(batch_index))
    r = rows if x.shape[-2] != 1 else slice(None)
    return x[idx + (r, slice(None))]


def probability_blocks(p: torch.Tensor, mask: torch.Tensor | None = None, name: str = "p"):
    """Validate ``p`` and yield it renormalised, a block of rows at a time (the rule of every dense statistic).

    Args:
        p: ``[..., N, N]`` attention probabilities, any float dtype (square, N ≥ 1: checked by the caller).
        mask: bool (True = attend) broadcastable to ``p``, as :func:`attnstats.masks.broadcast_mask`
            checks and returns it (the callers' first step), or None.

    Yields:
        ``(i0, i1, r0, r1, x, valid)``: rows ``r0:r1`` of the matrices ``i0:i1`` of the flattened batch,
        ``x [i1 − i0, r1 − r0, N]`` in :func:`compute_dtype` (a fresh tensor the caller may modify) with
        masked entries 0 and every row with a valid entry divided by its sum, ``valid`` the bool mask
        of the block or None. Blocks come in row-major order.

    Raises ``ValueError`` naming the index of the first entry that is not finite or negative (on
    valid entries), of the first valid row whose sum is off 1 by more than :func:`row_sum_tolerance`
    of ``max(float32, dtype)`` precision, or of a matrix whose mask has no valid entry; and
    :class:`attnstats.DenseTooLargeError` if even one row of ``p`` in the compute dtype exceeds the
    memory budget. Only a block of rows is ever upcast at once.
    """
    from .budget import check_dense_fits, get_memory_budget

    n = p.shape[-1]
    batch = tuple(p.shape[:-2])
    m = None if mask is None else mask.expand(p.shape)
    if not batch:  # one matrix: a batch of one, so that every block is gathered (never a view of p)
        p = p[None]
        m = None if m is None else m[None]
    shape = tuple(p.shape[:-2])
    count = math.prod(shape)
    if m is not None and count:
        per_matrix = m.any(-1).any(-1)
        if not bool(per_matrix.all()):
            idx = first_index(~per_matrix)[len(shape) - len(batch) :]
            raise no_valid_entry(idx)
    cd = compute_dtype(p)
    itemsize = torch.finfo(cd).bits // 8
    rows = max(1, min(_BLOCK_BYTES, get_memory_budget()) // (n * itemsize))
    check_dense_fits((min(rows, n), n), itemsize, f"a block of rows of {name} in {cd}")
    per_block = max(1, rows // n)  # whole matrices per block when they are small
    step = min(rows, n)
    tol = row_sum_tolerance(p.dtype, n)
    for i0 in range(0, count, per_block):
        i1 = min(count, i0 + per_block)
        flat = torch.arange(i0, i1, device=p.device)
        bidx = list(torch.unravel_index(flat, shape)) if shape else []
        for r0 in range(0, n, step):
            r1 = min(n, r0 + step)
            pc = _gather(p, bidx, slice(r0, r1))
            valid = None if m is None else _gather(m, bidx, slice(r0, r1)).expand(pc.shape)

            def where(local):  # index into the caller's p of an index into this block
                b = tuple(int(t) for t in torch.unravel_index(torch.tensor(i0 + local[0]), shape)) if shape else ()
                return b[len(shape) - len(batch) :] + (r0 + local[1], local[2])

            bad = ~torch.isfinite(pc)
            if valid is not None:
                bad &= valid
            if bool(bad.any()):
                loc = first_index(bad)
                raise ValueError(f"{name}: expected finite values, found {pc[loc].item()} at index {where(loc)}")
            neg = pc < 0
            if valid is not None:
                neg &= valid
            if bool(neg.any()):
                loc = first_index(neg)
                raise ValueError(f"{name}: expected non-negative probabilities, found {pc[loc].item()} at index {where(loc)}")
            x = pc.to(cd) if pc.dtype != cd else pc
            if valid is not None:
                x.masked_fill_(~valid, 0)
            sums = x.sum(-1, keepdim=True)
            has_row = torch.ones_like(sums, dtype=torch.bool) if valid is None else valid.any(-1, keepdim=True)
            off = ((sums - 1).abs() > tol) & has_row
            if bool(off.any()):
                loc = first_index(off)
                raise ValueError(
                    f"{name}: row {where(loc)[:-1]} sums to {sums[loc].item():.8g} over its valid entries, expected 1 "
                    f"(tolerance {tol:.2g}: the rounding of float32 or of {p.dtype}, whichever is coarser)"
                )
            # exactly row-stochastic in the compute dtype: statistics then never see the input's rounding
            x.div_(torch.where(has_row, sums, torch.ones_like(sums)))
            yield i0, i1, r0, r1, x, valid


def checked_blocks(x: torch.Tensor, mask: torch.Tensor | None, copy: bool = True):
    """The blocks of :func:`probability_blocks` for probabilities it has already checked: no check again.

    ``x: [M, N, N]`` in the compute dtype, masked entries 0 and valid rows summing to 1, and ``mask``
    None or bool expanded to ``x.shape``: what :func:`attnstats.stats.dense.prepare_probs` returns,
    flattened. Several statistics of one matrix then pay for one validation, not one each. Whole
    matrices at a time, of about the size of :func:`probability_blocks`' blocks; each block a fresh copy
    that the caller may modify, or with ``copy=False`` a view of ``x``, for callers that only read it.
    """
    count, n = x.shape[0], x.shape[-1]
    per_block = max(1, _BLOCK_BYTES // (n * n * x.element_size()))
    for i0 in range(0, count, per_block):
        i1 = min(count, i0 + per_block)
        block = x[i0:i1].clone() if copy else x[i0:i1]  # [i1 - i0, N, N]
        yield i0, i1, 0, n, block, None if mask is None else mask[i0:i1]
