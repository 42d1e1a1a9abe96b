"""The spectral gap of attention, by every route: from P, from q and k, and the one eigen-solver policy.

``P`` is row-stochastic, so ``λ_1 = 1`` (eigenvector ``1``); the gap is ``γ = 1 − |λ_2|`` with
``λ_2`` the eigenvalue of second-largest modulus. Causal attention is lower-triangular, so its
eigenvalues are its diagonal and ``γ = 1 − max_{i≥1} P_ii`` exactly, without an eigen-solver.

Every dense gap in attnstats (this module, :func:`attnstats.spectral_gap_from_qk` on small heads,
the kernels' ``r × r`` matrices) goes through :func:`eigenvalues` and :func:`gap_from_eigenvalues`:
LAPACK ``geev`` on ``P`` itself, with balancing, and a check that the solver found ``λ_1 = 1``.
Solving ``P`` itself matters: an explicit deflation such as ``P[:-1, :-1] − P[-1:, :-1]`` has the
same eigenvalues in exact arithmetic, but on peaked attention it is so ill-conditioned that LAPACK
returns ``|λ_2|`` wrong by up to 0.02 (seen on 30×30 heads; the test suite keeps such cases).

From ``q`` and ``k`` (:func:`spectral_gap_from_qk`): causal attention by the exact diagonal rule,
short heads by LAPACK on ``P`` batched over heads, long ones by a certified matrix-free solver: all
heads of one length at once by the block Krylov–Schur solver of :mod:`attnstats.stats.krylov` where
the fused product runs (a GPU), one head at a time by ARPACK (:mod:`attnstats.stats.arnoldi`) on the
CPU, where it needs fewer operations. Linearised attention has an exact rule of its own, from its
``r × r`` matrix (:func:`attnstats.linear_spectral_gap`, beside the kernels that use it).
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np
import torch

from ..budget import check_dense_fits, get_memory_budget
from ..masks import block_tokens, from_padding, no_token, valid_tokens
from .arnoldi import ARNOLDI_MIN_TOKENS, AttentionOperator, arnoldi_gap, certify_tol, fused_products_run
from .krylov import KRYLOV_MIN_TOKENS, krylov_bytes_per_head, krylov_gaps
from . import online_triton
from .dense import prepare_probs, softmax_attention
from .parallel import map_each
from .online import prepare_qk, streaming_row_accumulators
from ..validation import compute_dtype, row_sum_tolerance

__all__ = [
    "spectral_gap",
    "spectral_gap_from_qk",
    "gap_of_probs",
    "SpectralGap",
    "DENSE_MAX_TOKENS",
    "eigenvalues",
    "gap_from_eigenvalues",
    "perron_tolerance",
    "UncertifiedGapWarning",
    "causal_spectral_gap",
    "diagonal_log_probs",
    "is_lower_triangular",
]


class UncertifiedGapWarning(RuntimeWarning):
    """A spectral gap whose accuracy the solver could not confirm; the value is reported anyway."""


def diagonal_log_probs(q: torch.Tensor, k: torch.Tensor, scale: float, lse: torch.Tensor) -> torch.Tensor:
    """``ln P_ii = scale·q_i·k_i − LSE_i``, the diagonal of self-attention in logs: ``[B, H, N]`` float64
    for ``q: [B, H, N, d]``, ``k: [B, H/g, N, d]`` (grouped key heads allowed), ``lse: [B, H, N]``.

    The dot products are float64 (exact for half inputs). On a GPU they go through the sampler's kernel
    at entries ``(i, i)``; the PyTorch expression, its reference, copies q and k to float64 (1.5 ms per
    layer at 32k tokens, 32 heads, on an H100).
    """
    b, h, n, _ = q.shape
    if q.is_cuda and online_triton.available():
        idx = torch.arange(n, device=q.device).expand(b * h, n)  # [B·H, N], one row for every matrix
        return online_triton.sampled_log_probs(q, k, lse, idx, idx, scale).reshape(b, h, n)
    if k.shape[1] != h:
        k = k.repeat_interleave(h // k.shape[1], dim=1)
    return (q.double() * k.double()).sum(-1) * scale - lse.double()


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


def eigenvalues(a: torch.Tensor) -> torch.Tensor:
    """Eigenvalues ``[..., N]`` (complex) of square matrices ``a: [..., N, N]``.

    On the CPU: numpy's stacked LAPACK ``geev`` (balanced), the batch split over torch's threads
    (:mod:`attnstats.stats.parallel`). A matrix on which it fails to converge is retried alone with
    scipy's driver. On a GPU: ``torch.linalg.eigvals``. The result is on ``a``'s device.
    """
    return eigenvalues_each([a])[0]


def _geev(x: np.ndarray) -> np.ndarray:
    """Eigenvalues of the stacked matrices ``x: [M, n, n]`` (float64) by LAPACK, scipy's driver for a failure."""
    try:
        return np.linalg.eigvals(x)
    except np.linalg.LinAlgError:
        import scipy.linalg

        return np.stack([scipy.linalg.eigvals(m, check_finite=False) for m in x])


def eigenvalues_each(mats: list[torch.Tensor]) -> list[torch.Tensor]:
    """:func:`eigenvalues` of each stack of ``mats`` (stacks of different sizes), solved together.

    On the CPU the stacks (large ones in chunks) are shared out over torch's threads, so that many
    small stacks, one per block size, keep every core busy.
    """
    out: list = [None] * len(mats)
    cpu = []
    for i, a in enumerate(mats):
        if a.shape[-1] == 0:
            out[i] = torch.zeros(a.shape[:-1], dtype=torch.complex128, device=a.device)
        elif a.device.type != "cpu":
            try:
                out[i] = torch.linalg.eigvals(a)
            except RuntimeError:  # no converged solve on the device: the CPU path below balances and retries
                cpu.append(i)
        else:
            cpu.append(i)
    arrays = [mats[i].detach().cpu().double().numpy().reshape(-1, *mats[i].shape[-2:]) for i in cpu]
    for i, ev in zip(cpu, map_each(_geev, arrays, cost=lambda x: x.shape[0] * x.shape[-1] ** 3)):
        a = mats[i]
        out[i] = torch.from_numpy(ev.astype(np.complex128)).reshape(*a.shape[:-1]).to(a.device)
    return out


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
    return stochastic_gaps([x], what)[0]


def stochastic_gaps(stacks: list[torch.Tensor], what: str = "p") -> list[torch.Tensor]:
    """:func:`stochastic_gap` of each stack ``[M_i, n_i, n_i]``, the LAPACK solves of all stacks run together."""
    out, solve, where = [], [], []
    for x in stacks:
        g = torch.ones(x.shape[0], dtype=torch.float64, device=x.device)
        out.append(g)
        if x.shape[-1] == 1 or x.shape[0] == 0:
            continue
        tri = is_lower_triangular(x)  # [M_i]
        if bool(tri.any()):
            g[tri] = causal_spectral_gap(torch.diagonal(x[tri], dim1=-2, dim2=-1)).to(g.dtype)
        if not bool(tri.all()):
            solve.append(x[~tri])
            where.append((g, ~tri))
    for ev, (g, rest) in zip(eigenvalues_each(solve), where):
        gap, _, _ = gap_from_eigenvalues(ev, what)
        g[rest] = gap.to(g.device)
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
    return gap_of_probs(x, m, p.dtype)


def gap_of_probs(x: torch.Tensor, m: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """:func:`spectral_gap` of probabilities that :func:`attnstats.stats.dense.prepare_probs` returned,
    ``x: [..., N, N]`` and ``m`` (None or expanded to ``x.shape``); ``dtype``: the dtype they came in,
    whose rounding bounds how much probability a row may put outside the valid block."""
    batch = x.shape[:-2]
    flat = x.reshape(-1, *x.shape[-2:])
    if m is None or flat.shape[0] == 0:
        return stochastic_gap(flat).to(x.dtype).reshape(batch)
    mflat = m.reshape(-1, *m.shape[-2:])
    tol = row_sum_tolerance(dtype, x.shape[-1])
    keep = valid_tokens(mflat, False, mflat.shape)  # [M, N]: the causal rule is in x itself, not in m
    sizes = keep.sum(-1)  # [M]
    if bool((sizes == 0).any()):
        i = int((sizes == 0).nonzero()[0, 0])
        raise no_token(tuple(int(j) for j in torch.unravel_index(torch.tensor(i), tuple(batch))) if batch else ())
    # the valid tokens of each matrix first, in order: a gather gives the blocks of one size at once
    order = torch.sort((~keep).to(torch.uint8), dim=-1, stable=True).indices  # [M, N]
    gaps = torch.empty(flat.shape[0], dtype=torch.float64, device=x.device)
    groups, blocks = [], []
    for n in sizes.unique().tolist():  # one batched solve per block size
        idx = (sizes == n).nonzero()[:, 0]  # [G]
        tok = order[idx, :n]  # [G, n]
        rows = flat[idx].gather(1, tok[:, :, None].expand(-1, -1, flat.shape[-1]))  # [G, n, N]
        block = rows.gather(2, tok[:, None, :].expand(-1, n, -1))  # [G, n, n]
        sums = block.sum(-1)  # [G, n]
        off = (sums - 1).abs() > tol
        if bool(off.any()):
            g, r = (int(t) for t in off.nonzero()[0])
            raise ValueError(
                f"mask: row {int(tok[g, r])} of the matrix at batch index "
                f"{tuple(int(j) for j in torch.unravel_index(idx[g].cpu(), tuple(batch)))} puts probability "
                f"{1 - sums[g, r].item():.3g} on tokens that are not valid queries; spectral_gap expects a padding "
                "(and/or causal) mask whose valid tokens form a square block"
            )
        # half-precision rows sum to 1 only within their rounding: renormalise so λ_1 is exactly 1
        groups.append(idx)
        blocks.append(block / sums[..., None])
    for idx, g in zip(groups, stochastic_gaps(blocks)):
        gaps[idx] = g
    return gaps.to(x.dtype).reshape(batch)


# ----------------------------------------------------------------------------------------------
# from q and k: the dispatcher over the exact rules, LAPACK and the matrix-free solvers


@dataclass(frozen=True)
class SpectralGap:
    """Spectral gap of each attention matrix, with how it was found.

    Every field is a tensor of the batch shape ``[...]``.

    Attributes:
        gap: ``1 − |λ_2|`` (float64), in ``[0, 1]``.
        lambda2: ``λ_2`` (complex128), the eigenvalue of second-largest modulus.
        iterations: products the solve of ``λ_2`` asked for (int64; 0 for the dense and exact
            rules): ``P x`` for ARPACK, block products of all heads' ``b`` vectors for ``"krylov"``
            (both the solve on ``P`` and the one on ``Pᵀ`` that certifies it).
        residual: ``‖A v − λ_2 v‖ / ‖v‖`` for the returned eigenvector ``v`` of the operator ``A``
            solved (``P`` with ``λ_1`` deflated); 0 for the dense and exact rules.
        converged: True where the iterative solver met its tolerance (always True for the dense and
            exact rules).
        certified: True where the gap's accuracy is confirmed: a matrix-free error bound of at most
            1e-6 (1e-3 when the products run in float32), LAPACK's ``λ_1`` within rounding of 1, or
            an exact rule.
        error_bound: first-order bound ``κ(λ_2)·residual`` on the error of ``|λ_2|`` for matrix-free
            results (``inf`` when the left eigenvector was not found); 0 otherwise.
        method: ``"arnoldi"``, ``"krylov"``, ``"dense"``, two of them joined by ``+`` (heads solved
            either way) or ``"causal-diagonal"``.
    """

    gap: torch.Tensor
    lambda2: torch.Tensor
    iterations: torch.Tensor
    residual: torch.Tensor
    converged: torch.Tensor
    certified: torch.Tensor
    error_bound: torch.Tensor
    method: str


# method="auto" solves heads of up to this many tokens densely (LAPACK on P, batched over heads):
# below it one dense solve costs less than a certified Arnoldi solve on the CPU (measured in
# benchmarks/RESULTS.md, "dense vs Arnoldi gap").
DENSE_MAX_TOKENS = 448



def _dense_gaps(heads: list[tuple[torch.Tensor, torch.Tensor]], scale: float):
    """``(gap, λ_2, certified)`` of each head ``(q [n, d], k [n, d])`` by LAPACK on ``P``, batched by ``n``."""
    m = len(heads)
    gap = torch.empty(m, dtype=torch.float64)
    lam2 = torch.empty(m, dtype=torch.complex128)
    cert = torch.empty(m, dtype=torch.bool)
    sizes = torch.tensor([qi.shape[0] for qi, _ in heads])
    for n in sizes.unique().tolist():
        idx = (sizes == n).nonzero()[:, 0].tolist()
        # P in float64 plus LAPACK's copy: 16 bytes an entry; the batch is cut to fit the budget
        check_dense_fits((n, n), 16, "the dense attention matrix for the eigen-solver")
        per_chunk = max(1, get_memory_budget() // (16 * n * n))
        for c0 in range(0, len(idx), per_chunk):
            part = idx[c0:c0 + per_chunk]
            q = torch.stack([heads[i][0] for i in part]).to(torch.float64)  # [M, n, d]
            k = torch.stack([heads[i][1] for i in part]).to(torch.float64)  # [M, n, d]
            p = softmax_attention(q, k, scale=scale)  # [M, n, n] float64
            g, l2, c = gap_from_eigenvalues(eigenvalues(p), "the attention of a head")
            gap[part], lam2[part], cert[part] = g, l2, c
    return gap, lam2, cert


def _dense_fits(n: int) -> bool:
    return 16 * n * n <= get_memory_budget()


def spectral_gap_from_qk(
    q,
    k,
    *,
    scale=None,
    mask=None,
    causal=False,
    method="auto",
    tol=None,
    max_iterations=None,
    ncv=None,
    seed=0,
    backend="auto",
    padding_mask=None,
) -> SpectralGap:
    """Spectral gap of ``P = softmax(scale · q kᵀ)`` for each head, without building ``P`` when long.

    Args:
        q: ``[..., Hq, N, d]`` queries; k: ``[..., Hk, N, d]`` keys (GQA allowed, as in
            :func:`attnstats.streaming_stats`). Gradients are not followed (the inputs are detached).
        scale: positive logit scale, default ``1/sqrt(d)``.
        mask: bool, broadcastable to ``[..., Hq, N, N]``, True = attend, as in
            :func:`attnstats.streaming_stats`: key padding ``[..., 1, N]`` (``O(N)``). Padded tokens
            are removed as queries and as keys, as :func:`attnstats.spectral_gap` does, and the gap
            is that of the square block of the valid tokens. A mask of another form is accepted
            only where it is key padding in effect (each valid token attends exactly the valid
            tokens, ``j ≤ i`` with ``causal``); any other raises a ValueError naming ``mask``.
        causal: lower-triangular attention; the gap is then exact from the diagonal, ``O(N·d)`` memory.
        method: ``"auto"`` (causal: the exact diagonal rule; otherwise LAPACK on ``P`` for heads of
            up to :data:`DENSE_MAX_TOKENS` tokens, all heads of one length in one batched call, and
            above it ``"krylov"`` where the fused Triton product runs, ``"arnoldi"`` elsewhere, with a
            dense re-solve of any head whose result is not certified when ``P`` fits the memory
            budget), ``"arnoldi"`` (ARPACK, one head at a time), ``"krylov"`` (all heads of one length
            at once, block Krylov–Schur, :mod:`attnstats.stats.krylov`) or ``"dense"`` (only within
            the budget).
        tol: relative tolerance of the eigenvalue (default 1e-10 in float64 on the CPU, 1e-6 on a GPU).
        max_iterations: ARPACK restarts at most (default ``10·N``); for ``"krylov"``, restarts of
            each solve at most (default 100).
        ncv: ARPACK's Krylov subspace size (default ``min(N, 96)``; at least ``2·3 + 2``).
        seed: seed of the start vector.
        backend: product ``P x`` by ``"auto"``, ``"torch"`` or ``"triton"`` (see :class:`AttentionOperator`).
        padding_mask: deprecated, to be removed in the next release: ``[..., N]`` bool, True = real
            token; pass ``mask=padding_mask[..., None, :]`` (the same key padding) instead.

    Returns:
        :class:`SpectralGap` with fields of the batch shape. Heads under 9 tokens (28 for
        ``"krylov"``) are always solved densely (the iterative solvers need more). An uncertified head raises an
        :class:`attnstats.UncertifiedGapWarning`.

    Example:
        >>> q, k = torch.randn(4, 2048, 64), torch.randn(4, 2048, 64)
        >>> r = spectral_gap_from_qk(q, k)
        >>> bool(r.certified.all()), r.gap.shape
        (True, torch.Size([4]))
    """
    if method not in ("auto", "arnoldi", "krylov", "dense"):
        raise ValueError(f"method: expected 'auto', 'arnoldi', 'krylov' or 'dense', got {method!r}")
    if causal and method in ("arnoldi", "krylov"):
        raise ValueError(f"method: {method!r} is for non-causal attention; causal attention uses the exact diagonal rule")
    if isinstance(q, torch.Tensor):
        q = q.detach()
    if isinstance(k, torch.Tensor):
        k = k.detach()
    qb, kb, scale, _, batch = prepare_qk(q, k, scale, None, causal)
    B, Hq, N, d = qb.shape
    if kb.shape[2] != N:
        raise ValueError(f"q, k: the spectral gap needs a square matrix, got Nq = {N} and Nk = {kb.shape[2]}")
    name = "mask"
    if padding_mask is not None:
        mask, name = _deprecated_padding(padding_mask, mask, batch, N), "padding_mask"
    # [*batch, N] tokens of the square block (None: all), as [B, Hq, N]
    valid = block_tokens(mask, causal, (*batch, N, N), name, "spectral_gap_from_qk")
    if valid is not None:
        valid = valid.to(qb.device).reshape(B, Hq, N)
    if causal:
        return _causal_gap(qb, kb, scale, valid, batch, method)
    if tol is None:
        tol = 1e-10 if compute_dtype(qb) == torch.float64 and backend != "triton" else 1e-6
    g = Hq // kb.shape[1]
    heads = []
    for b in range(B):
        for h in range(Hq):
            qi, ki = qb[b, h], kb[b, h // g]
            if valid is not None:
                qi, ki = qi[valid[b, h]], ki[valid[b, h]]
            heads.append((qi, ki))
    m = len(heads)
    gap = torch.empty(m, dtype=torch.float64)
    lam2 = torch.empty(m, dtype=torch.complex128)
    iters = torch.zeros(m, dtype=torch.int64)
    res = torch.zeros(m, dtype=torch.float64)
    bound = torch.zeros(m, dtype=torch.float64)
    conv = torch.ones(m, dtype=torch.bool)
    cert = torch.ones(m, dtype=torch.bool)
    if method == "auto":
        method_of = "krylov" if backend != "torch" and fused_products_run(qb) else "arnoldi"
    else:
        method_of = method
    fewest = KRYLOV_MIN_TOKENS if method_of == "krylov" else ARNOLDI_MIN_TOKENS
    dense = [i for i, (qi, _) in enumerate(heads)
             if method == "dense" or qi.shape[0] < fewest
             or (method == "auto" and qi.shape[0] <= DENSE_MAX_TOKENS and _dense_fits(qi.shape[0]))]
    iterative = sorted(set(range(m)) - set(dense))
    solved = {}
    if method_of == "krylov":
        sizes = {}
        for i in iterative:
            sizes.setdefault(heads[i][0].shape[0], []).append(i)
        for n, idx in sizes.items():
            per_chunk = max(1, get_memory_budget() // krylov_bytes_per_head(n, compute_dtype(qb)))
            for c0 in range(0, len(idx), per_chunk):
                part = idx[c0:c0 + per_chunk]
                q_ = torch.stack([heads[i][0] for i in part])  # [M, n, d]
                k_ = torch.stack([heads[i][1] for i in part])  # [M, n, d]
                op = AttentionOperator(q_, k_, scale, backend=backend)
                kr = krylov_gaps(op, tol=tol, max_restarts=100 if max_iterations is None else max_iterations, seed=seed)
                for a, i in enumerate(part):
                    solved[i] = (complex(kr.lambda2[a]), int(kr.products[a]), float(kr.residual[a]),
                                 bool(kr.converged[a]), float(kr.error_bound[a]), op.dtype)
    else:
        for i in iterative:
            qi, ki = heads[i]
            op = AttentionOperator(qi, ki, scale, backend=backend)
            solved[i] = (*arnoldi_gap(op, tol, max_iterations, ncv, seed), op.dtype)
    redo = []
    for i, (lam, it, r, c, eb, dtype) in sorted(solved.items()):
        lam2[i], iters[i], res[i], conv[i], bound[i] = lam, it, r, c, eb
        gap[i] = min(max(1.0 - abs(lam), 0.0), 1.0) if math.isfinite(abs(lam)) else math.nan
        cert[i] = c and eb <= certify_tol(dtype)
        if not cert[i] and method == "auto" and _dense_fits(heads[i][0].shape[0]):
            redo.append(i)
    if dense or redo:
        todo = sorted(dense + redo)
        g_, l_, c_ = _dense_gaps([heads[i] for i in todo], scale)
        gap[todo], lam2[todo], cert[todo] = g_, l_, c_
        iters[todo], res[todo], bound[todo], conv[todo] = 0, 0.0, 0.0, True
    if not bool(cert.all()):
        j = int((~cert).nonzero()[0, 0])
        where = tuple(int(x) for x in torch.unravel_index(torch.tensor(j), tuple(batch))) if batch else ()
        warnings.warn(
            f"spectral_gap_from_qk: {int((~cert).sum())} of {m} gaps are not certified, first at batch index {where}: "
            f"gap {gap[j].item():.6g}, converged {bool(conv[j])}, error bound {bound[j].item():.3g} "
            f"(the eigenvalue is too ill-conditioned for the matrix-free solver); method='dense' solves P itself within the memory budget",
            UncertifiedGapWarning,
            stacklevel=2,
        )
    used = {"dense" if i in set(dense) | set(redo) else method_of for i in range(m)}
    return SpectralGap(
        gap=gap.reshape(batch),
        lambda2=lam2.reshape(batch),
        iterations=iters.reshape(batch),
        residual=res.reshape(batch),
        converged=conv.reshape(batch),
        certified=cert.reshape(batch),
        error_bound=bound.reshape(batch),
        method="+".join(sorted(used, key=lambda u: u == "dense")),
    )


def _deprecated_padding(padding_mask, mask, batch, n: int):
    """``padding_mask [..., N]`` of the previous release as the key padding ``[..., 1, N]`` it means."""
    warnings.warn(
        "spectral_gap_from_qk: padding_mask= is deprecated and will be removed in the next release; pass "
        "mask=padding_mask[..., None, :] instead (bool key padding [..., 1, N], True = attend, as streaming_stats takes)",
        DeprecationWarning,
        stacklevel=3,
    )
    if mask is not None:
        raise ValueError("padding_mask: give mask= or the deprecated padding_mask=, not both")
    key_pad = from_padding(padding_mask, "padding_mask")  # [..., 1, N]
    try:
        real = padding_mask.expand(*batch, n)
    except RuntimeError:
        raise ValueError(f"padding_mask: shape {tuple(padding_mask.shape)} does not broadcast to {(*batch, n)}") from None
    none = ~real.any(-1)
    if bool(none.any()):
        idx = tuple(int(i) for i in none.nonzero()[0])
        raise ValueError(f"padding_mask: no real token in the matrix at batch index {idx}; expected at least one True")
    return key_pad


def _causal_gap(qb, kb, scale, valid, batch, method):
    """Exact causal gap ``1 − max_{i≥1} P_ii`` with ``P_ii = exp(scale q_i·k_i − LSE_i)``.

    ``valid``: ``[B, Hq, N]`` tokens of the square block (key padding with ``causal``), or None.
    """
    B, Hq, N, d = qb.shape
    mask = None if valid is None else from_padding(valid)  # [B, Hq, 1, N]
    rows, _, _ = streaming_row_accumulators(qb, kb, scale=scale, mask=mask, causal=True)
    log_diag = diagonal_log_probs(qb, kb, scale, rows.lse)  # [B, Hq, N]
    # Eigenvalues of the valid block are the diagonal at real tokens; the first real token's is λ_1 = 1.
    keep = torch.ones(B, Hq, N, dtype=torch.bool, device=qb.device) if valid is None else valid.clone()
    first = keep.to(torch.int8).argmax(-1)
    keep.scatter_(-1, first[..., None], False)
    log_diag = log_diag.masked_fill(~keep, -math.inf)
    lam2 = torch.exp(log_diag.amax(-1)).cpu()  # exp(-inf) = 0: one real token, gap 1
    shape = batch
    lam2 = lam2.reshape(shape)
    zeros = torch.zeros(shape, dtype=torch.float64)
    ones = torch.ones(shape, dtype=torch.bool)
    return SpectralGap(
        gap=(1.0 - lam2).clamp(0.0, 1.0),
        lambda2=lam2.to(torch.complex128),
        iterations=torch.zeros(shape, dtype=torch.int64),
        residual=zeros,
        converged=ones,
        certified=ones,
        error_bound=zeros,
        method="causal-diagonal",
    )
