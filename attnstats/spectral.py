"""Spectral gap of a dense row-stochastic attention matrix, and the one eigen-solver policy.

``P`` is row-stochastic, so ``λ_1 = 1`` (eigenvector ``1``); the gap is ``γ = 1 − |λ_2|`` with
``λ_2`` the eigenvalue of second-largest modulus. Causal attention is lower-triangular, so its
eigenvalues are its diagonal and ``γ = 1 − max_{i≥1} P_ii`` exactly, without an eigen-solver.

Every dense gap in attnstats (this module, :func:`attnstats.spectral_gap_from_qk` on small heads,
the kernels' ``r × r`` matrices) goes through :func:`eigenvalues` and :func:`gap_from_eigenvalues`:
LAPACK ``geev`` on ``P`` itself, with balancing, and a check that the solver found ``λ_1 = 1``.
Solving ``P`` itself matters: an explicit deflation such as ``P[:-1, :-1] − P[-1:, :-1]`` has the
same eigenvalues in exact arithmetic, but on peaked attention it is so ill-conditioned that LAPACK
returns ``|λ_2|`` wrong by up to 0.02 (seen on 30×30 heads; the test suite keeps such cases).
"""
from __future__ import annotations

import math
import warnings

import numpy as np
import torch

from .budget import check_dense_fits
from .stats import prepare_probs
from .validation import first_index, row_sum_tolerance

__all__ = [
    "spectral_gap",
    "eigenvalues",
    "gap_from_eigenvalues",
    "perron_tolerance",
    "UncertifiedGapWarning",
    "causal_spectral_gap",
    "is_lower_triangular",
    "valid_block",
]


class UncertifiedGapWarning(RuntimeWarning):
    """A spectral gap whose accuracy the solver could not confirm; the value is reported anyway."""


def causal_spectral_gap(diagonal: torch.Tensor) -> torch.Tensor:
    """Exact gap of lower-triangular row-stochastic attention from its diagonal ``[..., N]``.

    The eigenvalues of a triangular matrix are its diagonal, with ``P_00 = 1``: ``γ = 1 − max_{i≥1} P_ii``.
    A single token (N = 1) has no second eigenvalue; its gap is 1.
    """
    if diagonal.shape[-1] == 1:
        return torch.ones(diagonal.shape[:-1], dtype=diagonal.dtype, device=diagonal.device)
    return (1.0 - diagonal[..., 1:].amax(-1)).clamp(0.0, 1.0)


def is_lower_triangular(x: torch.Tensor) -> torch.Tensor:
    """Per matrix of ``x: [..., N, N]``: True where every entry above the diagonal is exactly 0."""
    upper = torch.triu(torch.ones(x.shape[-2:], dtype=torch.bool, device=x.device), diagonal=1)
    return ~((x != 0) & upper).flatten(-2).any(-1)


def valid_block(x: torch.Tensor, m: torch.Tensor, tol: float = 1e-6, index=()) -> torch.Tensor:
    """The square block of one matrix ``x: [N, N]`` over the tokens that are valid as keys and queries.

    Padding removes a token's column (no query attends to it) and may remove its row (no valid
    entry). What stays must still be row-stochastic: a mask that sends valid attention outside the
    block is not a padding (+ causal) mask, and the block's spectrum would not be a spectral gap.
    """
    keep = m.any(-2) & m.any(-1)
    idx = torch.nonzero(keep, as_tuple=False)[:, 0]
    if idx.numel() == 0:
        raise ValueError(
            f"mask: the matrix at batch index {index} has no token that is both a valid query and a valid key; "
            "spectral_gap expects a padding (and/or causal) mask"
        )
    block = x[idx][:, idx]
    sums = block.sum(-1)
    off = (sums - 1).abs() > tol
    if bool(off.any()):
        row = int(idx[first_index(off)[0]])
        raise ValueError(
            f"mask: row {row} puts probability {1 - sums[first_index(off)].item():.3g} on tokens that are not "
            "valid queries; spectral_gap expects a padding (and/or causal) mask whose valid tokens form a square block"
        )
    return block


def eigenvalues(a: torch.Tensor) -> torch.Tensor:
    """Eigenvalues ``[..., N]`` (complex) of square matrices ``a: [..., N, N]``.

    On the CPU: numpy's stacked LAPACK ``geev`` (balanced; one call for the whole batch). A matrix
    on which it fails to converge is retried alone with scipy's driver. On a GPU:
    ``torch.linalg.eigvals``. The result is on ``a``'s device.
    """
    if a.shape[-1] == 0:
        return torch.zeros(a.shape[:-1], dtype=torch.complex128, device=a.device)
    if a.device.type != "cpu":
        try:
            return torch.linalg.eigvals(a)
        except RuntimeError:  # no converged solve on the device: the CPU path below balances and retries
            pass
    x = a.detach().cpu().double().numpy().reshape(-1, *a.shape[-2:])
    try:
        ev = np.linalg.eigvals(x)
    except np.linalg.LinAlgError:
        import scipy.linalg

        ev = np.stack([scipy.linalg.eigvals(m, check_finite=False) for m in x])
    return torch.from_numpy(ev.astype(np.complex128)).reshape(*a.shape[:-1]).to(a.device)


def perron_tolerance(n: int, dtype: torch.dtype = torch.float64) -> float:
    """How far a backward-stable solver may put ``λ_1 = 1`` of an ``n × n`` stochastic matrix.

    The solve is exact for a matrix within ``~n·eps·‖P‖`` of ``P`` (``‖P‖_F ≤ sqrt(n)``), and the
    condition number of ``λ_1`` is ``sqrt(n)·‖π‖ ≤ sqrt(n)`` (``π`` the stationary distribution), so
    ``|λ̂_1 − 1| ≲ n²·eps``; a margin of 16 covers the constants of Householder reductions.
    """
    return 16.0 * n * n * torch.finfo(dtype).eps


def gap_from_eigenvalues(ev: torch.Tensor, what: str = "p") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Spectral gap from the eigenvalues of row-stochastic matrices.

    Args:
        ev: ``[M, n]`` complex eigenvalues, one row per matrix (all ``n`` of them, or, for a
            low-rank matrix, all its nonzero ones: the others are 0 and never the second largest
            unless every one is).
        what: name of the matrices in the warning.

    Returns:
        ``(gap, lambda2, certified)``, each ``[M]``: the gap ``1 − |λ_2|`` clamped to ``[0, 1]``
        (rounding can put ``|λ_2|`` of a permutation a hair above 1) in float64, ``λ_2`` (complex128),
        and whether the solver's ``λ_1`` lies within :func:`perron_tolerance` of 1. ``λ_1`` is the
        eigenvalue closest to 1, removed once; ``λ_2`` is the largest modulus left. One eigenvalue
        (``n = 1``) gives ``λ_2 = 0`` and gap 1. Uncertified matrices raise an
        :class:`UncertifiedGapWarning` naming the first.
    """
    ev = ev.to(torch.complex128).cpu()
    m, n = ev.shape
    if n <= 1:
        lam2 = torch.zeros(m, dtype=torch.complex128)
        return torch.ones(m, dtype=torch.float64), lam2, torch.ones(m, dtype=torch.bool)
    dist = (ev - 1).abs()
    i1 = dist.argmin(-1)
    perron_error = dist.gather(-1, i1[:, None])[:, 0]
    rest = ev.clone()
    rest.scatter_(-1, i1[:, None], 0)
    i2 = rest.abs().argmax(-1)
    lam2 = rest.gather(-1, i2[:, None])[:, 0]
    gap = (1.0 - lam2.abs()).clamp(0.0, 1.0)
    certified = perron_error <= perron_tolerance(n)
    if not bool(certified.all()):
        j = int((~certified).nonzero()[0, 0])
        warnings.warn(
            f"spectral gap of {what}: the eigen-solver put λ_1 at distance {perron_error[j].item():.3g} from 1 for "
            f"matrix {j} (tolerance {perron_tolerance(n):.2g}); its gap {gap[j].item():.6g} is not certified",
            UncertifiedGapWarning,
            stacklevel=3,
        )
    return gap, lam2, certified


def stochastic_gap(x: torch.Tensor, what: str = "p") -> torch.Tensor:
    """Gap of each row-stochastic matrix of ``x: [M, N, N]``: triangular ones by the diagonal rule, others by LAPACK."""
    out = torch.ones(x.shape[0], dtype=torch.float64, device=x.device)
    if x.shape[-1] == 1 or x.shape[0] == 0:
        return out
    tri = is_lower_triangular(x)
    if bool(tri.any()):
        out[tri] = causal_spectral_gap(torch.diagonal(x[tri], dim1=-2, dim2=-1)).to(out.dtype)
    if bool((~tri).any()):
        gap, _, _ = gap_from_eigenvalues(eigenvalues(x[~tri]), what)
        out[~tri] = gap.to(out.device)
    return out


def spectral_gap(p: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Spectral gap ``1 − |λ_2|`` of each attention matrix.

    Args:
        p: ``[..., N, N]`` row-stochastic attention.
        mask: bool, broadcastable to ``p``, True = attend. Padded tokens (columns no query attends
            to, rows with no valid entry) are removed and the valid square block is analysed.

    Returns:
        ``[...]`` float64 (the compute dtype on a GPU), in ``[0, 1]``. Lower-triangular (causal)
        matrices use the exact diagonal rule ``1 − max_{i≥1} P_ii``; others LAPACK ``geev`` on ``P``
        itself (``O(N³)``), ``λ_1`` checked against 1 (see :func:`gap_from_eigenvalues`). A single
        token gives 1. Raises :class:`attnstats.DenseTooLargeError` past the memory budget.
    """
    if isinstance(p, torch.Tensor):
        check_dense_fits(p.shape, 8, "the float64 copy of p that spectral_gap solves")
    x, m = prepare_probs(p, mask)
    batch = x.shape[:-2]
    flat = x.reshape(-1, *x.shape[-2:])
    if m is None or flat.shape[0] == 0:
        return stochastic_gap(flat).to(x.dtype).reshape(batch)
    mflat = m.reshape(-1, *m.shape[-2:])
    tol = row_sum_tolerance(p.dtype, p.shape[-1])
    blocks = []
    for i in range(flat.shape[0]):
        where = tuple(int(j) for j in torch.unravel_index(torch.tensor(i), tuple(batch))) if batch else ()
        block = valid_block(flat[i], mflat[i], tol, where)
        # half-precision rows sum to 1 only within their rounding: renormalise so λ_1 is exactly 1
        blocks.append(block / block.sum(-1, keepdim=True))
    gaps = torch.empty(flat.shape[0], dtype=torch.float64, device=x.device)
    sizes = torch.tensor([b.shape[-1] for b in blocks])
    for n in sizes.unique().tolist():  # one batched solve per block size
        idx = (sizes == n).nonzero()[:, 0]
        gaps[idx.to(x.device)] = stochastic_gap(torch.stack([blocks[i] for i in idx.tolist()]))
    return gaps.to(x.dtype).reshape(batch)
