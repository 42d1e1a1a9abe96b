"""Spectral gap of a dense row-stochastic attention matrix.

``P`` is row-stochastic, so ``λ_1 = 1`` (eigenvector ``1``); the gap is ``γ = 1 − |λ_2|`` with
``λ_2`` the eigenvalue of second-largest modulus. Causal attention is lower-triangular, so its
eigenvalues are its diagonal and ``γ = 1 − max_{i≥1} P_ii`` exactly, without an eigen-solver.
"""
from __future__ import annotations

import numpy as np
import torch

from .stats import prepare_probs
from .validation import first_index, row_sum_tolerance

__all__ = ["spectral_gap", "deflated", "eigenvalues", "causal_spectral_gap", "is_lower_triangular", "valid_block"]


def causal_spectral_gap(diagonal: torch.Tensor) -> torch.Tensor:
    """Exact gap of lower-triangular row-stochastic attention from its diagonal ``[..., N]``.

    The eigenvalues of a triangular matrix are its diagonal, with ``P_00 = 1``: ``γ = 1 − max_{i≥1} P_ii``.
    A single token (N = 1) has no second eigenvalue; its gap is 1.
    """
    if diagonal.shape[-1] == 1:
        return torch.ones(diagonal.shape[:-1], dtype=diagonal.dtype, device=diagonal.device)
    return 1.0 - diagonal[..., 1:].amax(-1)


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


def deflated(x: torch.Tensor) -> torch.Tensor:
    """``[..., N−1, N−1]`` matrix whose eigenvalues are those of row-stochastic ``x`` less one copy of 1.

    ``x`` maps the vector ``1`` to itself, so it acts on the quotient space modulo ``1``; in the basis
    ``e_1 … e_{N−1}`` (with ``e_N ≡ −Σ e_i``) that action is ``A_ij = x_ij − x_Nj``. Removing the known
    Perron eigenvalue exactly makes ``|λ_2|`` the spectral radius of ``A``, and spares LAPACK the
    highly degenerate spectra (uniform rows: all eigenvalues but one are 0) on which it can fail.
    """
    return x[..., :-1, :-1] - x[..., -1:, :-1]


def eigenvalues(a: torch.Tensor) -> torch.Tensor:
    """Eigenvalues ``[..., N]`` (complex) of square matrices ``a: [..., N, N]``, robust to LAPACK failures."""
    try:
        return torch.linalg.eigvals(a)
    except RuntimeError:  # LAPACK did not converge in torch's build; scipy's driver balances first
        import scipy.linalg

        ev = [scipy.linalg.eigvals(m) for m in a.detach().cpu().double().reshape(-1, *a.shape[-2:]).numpy()]
        return torch.from_numpy(np.stack(ev)).reshape(*a.shape[:-1]).to(a.device)


def _dense_gap(x: torch.Tensor) -> torch.Tensor:
    """Gap of each matrix of ``x: [M, N, N]``; triangular ones by the diagonal rule, others by eigvals."""
    out = torch.ones(x.shape[0], dtype=x.dtype, device=x.device)
    if x.shape[-1] == 1:
        return out
    tri = is_lower_triangular(x)
    if bool(tri.any()):
        out[tri] = causal_spectral_gap(torch.diagonal(x[tri], dim1=-2, dim2=-1))
    if bool((~tri).any()):
        out[~tri] = (1.0 - eigenvalues(deflated(x[~tri])).abs().amax(-1)).to(x.dtype)
    return out


def spectral_gap(p: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Spectral gap ``1 − |λ_2|`` of each attention matrix.

    Args:
        p: ``[..., N, N]`` row-stochastic attention.
        mask: bool, broadcastable to ``p``, True = attend. Padded tokens (columns no query attends
            to, rows with no valid entry) are removed and the valid square block is analysed.

    Returns:
        ``[...]``, in ``[0, 1]``. Lower-triangular (causal) matrices use the exact diagonal rule
        ``1 − max_{i≥1} P_ii``; others a dense eigen-solver (LAPACK ``geev``, ``O(N³)``) on the
        matrix deflated of its Perron eigenvalue (:func:`deflated`). A single token gives 1.
    """
    x, m = prepare_probs(p, mask)
    batch = x.shape[:-2]
    flat = x.reshape(-1, *x.shape[-2:])
    if m is None or flat.shape[0] == 0:
        return _dense_gap(flat).reshape(batch)
    mflat = m.reshape(-1, *m.shape[-2:])
    tol = row_sum_tolerance(p.dtype, p.shape[-1])
    gaps = []
    for i in range(flat.shape[0]):
        where = tuple(int(j) for j in torch.unravel_index(torch.tensor(i), tuple(batch))) if batch else ()
        block = valid_block(flat[i], mflat[i], tol, where)
        # half-precision rows sum to 1 only within their rounding: renormalise so λ_1 is exactly 1
        gaps.append(_dense_gap((block / block.sum(-1, keepdim=True))[None])[0])
    return torch.stack(gaps).reshape(batch)
