"""Spectral gap of attention without the N×N matrix.

``P`` is row-stochastic: ``λ_1 = 1`` with eigenvector ``1``, and the gap is ``γ = 1 − |λ_2|``.
Three exact routes avoid building ``P``:

- non-causal softmax attention: Arnoldi iteration (ARPACK, implicitly restarted) on the operator
  ``x ↦ P x``, which is attention with ``V = x`` and is applied tile by tile; ``λ_1 = 1`` is
  deflated away first, so the largest eigenvalue left is ``λ_2``. Each result is checked: a
  second run on ``Pᵀ`` gives the left eigenvector, hence the condition number of ``λ_2`` and a
  first-order error bound; short heads (and uncertified ones that fit the memory budget) are
  solved by LAPACK on ``P`` itself instead (:mod:`attnstats.spectral`);
- causal softmax attention: ``P`` is lower-triangular, so its eigenvalues are its diagonal
  ``P_ii = exp(scale·q_i·k_i − LSE_i)`` (``LSE`` from one streaming pass), ``γ = 1 − max_{i≥1} P_ii``;
- linearised attention ``P = D⁻¹ Φ_Q Φ_Kᵀ``: its nonzero eigenvalues are those of the ``r×r``
  matrix ``Φ_Kᵀ D⁻¹ Φ_Q`` (causal: its diagonal, from prefix sums).
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np
import torch

from .budget import check_dense_fits, get_memory_budget
from .spectral import UncertifiedGapWarning
from .streaming import prepare_qk, streaming_row_accumulators
from .validation import check_finite, check_tensor, compute_dtype

__all__ = ["SpectralGap", "AttentionOperator", "spectral_gap_from_qk", "linear_spectral_gap"]


@dataclass(frozen=True)
class SpectralGap:
    """Spectral gap of each attention matrix, with how it was found.

    Every field is a tensor of the batch shape ``[...]``.

    Attributes:
        gap: ``1 − |λ_2|`` (float64), in ``[0, 1]``.
        lambda2: ``λ_2`` (complex128), the eigenvalue of second-largest modulus.
        iterations: products ``P x`` the Arnoldi solve of ``λ_2`` asked for (int64; 0 for the
            dense and exact rules).
        residual: ``‖A v − λ_2 v‖ / ‖v‖`` for the returned eigenvector ``v`` of the operator ``A``
            solved (``P`` with ``λ_1`` deflated); 0 for the dense and exact rules.
        converged: True where ARPACK met its tolerance (always True for the dense and exact rules).
        certified: True where the gap's accuracy is confirmed: an Arnoldi error bound of at most
            1e-6 (1e-3 when the products run in float32), LAPACK's ``λ_1`` within rounding of 1, or
            an exact rule.
        error_bound: first-order bound ``κ(λ_2)·residual`` on the error of ``|λ_2|`` for Arnoldi
            results (``inf`` when the left eigenvector was not found); 0 otherwise.
        method: ``"arnoldi"``, ``"dense"``, ``"arnoldi+dense"`` (heads solved either way) or
            ``"causal-diagonal"``.
    """

    gap: torch.Tensor
    lambda2: torch.Tensor
    iterations: torch.Tensor
    residual: torch.Tensor
    converged: torch.Tensor
    certified: torch.Tensor
    error_bound: torch.Tensor
    method: str


class AttentionOperator:
    """``x ↦ P x`` for ``P = softmax(scale · q kᵀ)`` of one head, never holding more than a tile of P.

    Args:
        q: ``[N, d]`` queries, k: ``[N, d]`` keys (one head, padding already removed).
        scale: logit scale.
        tile_bytes: memory of one ``rows × N`` tile of ``P`` on the PyTorch path (default 64 MiB).
        backend: ``"auto"`` (the fused Triton product on CUDA when Triton imports), ``"torch"``
            (tiles of ``P``, float64 on the CPU, float32 on a GPU) or ``"triton"``.
    """

    def __init__(self, q: torch.Tensor, k: torch.Tensor, scale: float, tile_bytes: int = 64 * 1024**2, backend="auto"):
        if backend not in ("auto", "torch", "triton"):
            raise ValueError(f"backend: expected 'auto', 'torch' or 'triton', got {backend!r}")
        from . import streaming_triton

        if backend == "auto":
            fused = q.device.type == "cuda" and streaming_triton.available() and q.shape[-1] in (16, 32, 64, 128, 256)
            backend = "triton" if fused else "torch"
        self.backend = backend
        self.dtype = compute_dtype(q)
        self.scale = scale
        self.n = q.shape[0]
        self.calls = 0
        if backend == "triton":
            # The fused product needs LSE up front: one streaming pass. q, k keep their dtype
            # (bf16 products are exact in the float32 accumulator).
            rows, _, _ = streaming_row_accumulators(q[None, None], k[None, None], scale=scale, backend="triton")
            self.q, self.k, self.lse = q, k, rows.lse.reshape(-1)
            self.dtype = torch.float32
        else:
            self.q = q.to(self.dtype)
            self.k = k.to(self.dtype)
            self.lse = None
        self.kt = self.k.to(self.dtype).T.contiguous()  # [d, N]
        itemsize = torch.finfo(self.dtype).bits // 8
        self.rows = max(1, min(self.n, tile_bytes // (itemsize * self.n)))
        # When all of P fits in one tile, it is built once: a solve takes hundreds of products, and
        # rebuilding P costs d times a product with it.
        self.p = self._tile(0, self.n) if self.rows == self.n else None  # [N, N] or None

    def _tile(self, i0: int, i1: int) -> torch.Tensor:
        """Rows ``i0:i1`` of ``P`` in the compute dtype: ``[i1 − i0, N]``."""
        s = (self.q[i0:i1].to(self.dtype) @ self.kt) * self.scale  # [rows, N]
        if self.lse is None:
            return torch.softmax(s, dim=-1)
        return torch.exp(s - self.lse[i0:i1, None])

    def matmat(self, x: torch.Tensor) -> torch.Tensor:
        """``P x`` for ``x: [N, c]`` (same device), as attention with ``V = x``."""
        self.calls += 1
        if self.backend == "triton":
            from .streaming_triton import attention_matmat

            cols = [attention_matmat(self.q, self.k, self.lse, x[:, i:i + 15].float(), self.scale)
                    for i in range(0, x.shape[1], 15)]
            return torch.cat(cols, 1)
        x = x.to(self.dtype)
        if self.p is not None:
            return self.p @ x  # [N, N] @ [N, c]
        out = torch.empty(self.n, x.shape[1], dtype=self.dtype, device=x.device)  # [N, c]
        for i0 in range(0, self.n, self.rows):
            i1 = min(self.n, i0 + self.rows)
            out[i0:i1] = self._tile(i0, i1) @ x  # [rows, N] @ [N, c]
        return out

    def rmatmat(self, x: torch.Tensor) -> torch.Tensor:
        """``Pᵀ x`` for ``x: [N, c]``: the left eigenvectors that certify an eigenvalue need it."""
        self.calls += 1
        x = x.to(self.dtype)
        if self.p is not None:
            return self.p.T @ x  # [N, N] @ [N, c]
        out = torch.zeros(self.n, x.shape[1], dtype=self.dtype, device=x.device)  # [N, c]
        for i0 in range(0, self.n, self.rows):
            i1 = min(self.n, i0 + self.rows)
            out += self._tile(i0, i1).T @ x[i0:i1]  # [N, rows] @ [rows, c]
        return out


_NEV = 3  # eigenvalues ARPACK is asked for (λ_2, its conjugate, one more); the largest modulus is |λ_2|
_NCV = 96  # Krylov basis size: a larger basis restarts less (measured on H100, N = 16k: 0.92 s vs 1.43 s at 32)
_ARNOLDI_MIN = 2 * _NEV + 3  # heads with fewer tokens are always solved densely (ARPACK needs nev + 1 < ncv ≤ N)
# method="auto" solves heads of up to this many tokens densely (LAPACK on P, batched over heads):
# below it one dense solve costs less than a certified Arnoldi solve on the CPU (measured in
# benchmarks/RESULTS.md, "dense vs Arnoldi gap").
DENSE_MAX_TOKENS = 448


def _certify_tol(dtype: torch.dtype) -> float:
    """Largest first-order error bound ``κ(λ_2)·‖r‖`` on ``|λ_2|`` accepted as certified."""
    return 1e-6 if dtype == torch.float64 else 1e-3


def _arnoldi_gap(op: AttentionOperator, tol: float, max_iterations: int | None, ncv: int | None, seed: int):
    """``(λ_2, iterations, residual, converged, error_bound)`` of one head by ARPACK.

    ARPACK runs on ``A = (I − 1 1ᵀ/N) P``, which keeps ``λ_2 … λ_N`` and sends ``λ_1 = 1`` (eigenvector
    ``1``) to 0. A small residual ``‖A v − λ v‖`` does not prove ``λ`` accurate: on peaked attention
    the eigenvalue can be so ill-conditioned that a residual of 1e-15 hides an error of 1e-3. The
    error bound is therefore the first-order one, ``κ(λ)·‖r‖`` with ``κ = ‖u‖‖v‖ / |uᵀv|`` from the left
    eigenvector ``u`` (a second ARPACK run on ``Aᵀ``); it is ``inf`` when that run finds no eigenvalue
    next to ``λ``.
    """
    from scipy.sparse.linalg import ArpackError, ArpackNoConvergence, LinearOperator, eigs

    n = op.n
    dev = op.q.device

    def apply(v: np.ndarray, transpose: bool = False) -> np.ndarray:
        x = torch.from_numpy(np.ascontiguousarray(v, dtype=np.float64)).reshape(n, -1).to(dev)  # [N, c]
        if transpose:  # Aᵀ x = Pᵀ (x − mean x)
            y = op.rmatmat(x - x.mean(0, keepdim=True))
        else:  # A x = P x − mean(P x)
            y = op.matmat(x)
            y = y - y.mean(0, keepdim=True)
        return y.double().cpu().numpy().reshape(v.shape)

    def apply_c(v: np.ndarray, transpose: bool = False) -> np.ndarray:
        return apply(v.real, transpose) + 1j * apply(v.imag, transpose) if np.iscomplexobj(v) else apply(v, transpose)

    rng = np.random.default_rng(seed)
    v0 = rng.standard_normal(n)
    v0 -= v0.mean()
    op.calls = 0
    # Rank-one attention (identical queries or keys) makes A vanish up to rounding, and ARPACK stops
    # on a zero Krylov vector. Three random vectors that A sends to rounding level (the error of a
    # product, ~sqrt(N)·eps relative) mean λ_2 = 0: a random direction sees about a 1/sqrt(N) share
    # of ‖A‖, and the factor 100 covers an unlucky draw (all three below 1/100 of it: odds ~1e-6).
    probes = rng.standard_normal((n, 3))
    probes -= probes.mean(0)
    level = float((np.linalg.norm(apply(probes), axis=0) / np.linalg.norm(probes, axis=0)).max())
    vanishing_bound = 100 * math.sqrt(n) * level
    if level <= 64 * math.sqrt(n) * torch.finfo(op.dtype).eps:
        return 0j, op.calls, level, True, vanishing_bound

    # Three eigenvalues, not two: with the bulk of the spectrum a disc whose edge lies close to
    # |λ_2|, asking ARPACK for a single one can converge to a neighbour of nearly the same modulus.
    nev = min(_NEV, n - 2)
    ncv = min(n, max(ncv or _NCV, 2 * nev + 2))

    def solve(transpose: bool):
        A = LinearOperator((n, n), matvec=lambda v: apply(v, transpose), dtype=np.float64)
        try:
            vals, vecs = eigs(A, k=nev, which="LM", v0=v0, ncv=ncv, tol=tol, maxiter=max_iterations)
            return vals, vecs, True
        except ArpackNoConvergence as err:
            return err.eigenvalues, err.eigenvectors, False
        except ArpackError:  # a breakdown ARPACK cannot restart from: reported as not converged
            return np.zeros(0, complex), np.zeros((n, 0), complex), False

    vals, vecs, converged = solve(False)
    if len(vals) == 0:  # a breakdown: the start vector's images were all that A showed of itself
        return 0j, op.calls, level, False, vanishing_bound
    i = int(np.argmax(np.abs(vals)))
    lam, v = complex(vals[i]), vecs[:, i]
    residual = float(np.linalg.norm(apply_c(v) - lam * v) / np.linalg.norm(v))
    iterations = op.calls
    lvals, lvecs, _ = solve(True)
    bound = math.inf
    if len(lvals):
        j = int(np.argmin(np.abs(lvals - lam)))
        u = lvecs[:, j]
        overlap = abs(np.dot(u, v))  # uᵀv: u is a right eigenvector of Aᵀ, i.e. ū a left one of A
        if overlap > 0:
            kappa = np.linalg.norm(u) * np.linalg.norm(v) / overlap
            # the two runs must agree on λ as well: their distance is part of the error
            bound = float(kappa * residual + abs(lvals[j] - lam))
    return lam, iterations, residual, converged, bound


def _dense_gaps(heads: list[tuple[torch.Tensor, torch.Tensor]], scale: float):
    """``(gap, λ_2, certified)`` of each head ``(q [n, d], k [n, d])`` by LAPACK on ``P``, batched by ``n``."""
    from .spectral import gap_from_eigenvalues, eigenvalues

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
            p = torch.softmax((q @ k.mT) * scale, dim=-1)  # [M, n, n]
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
    padding_mask=None,
    causal=False,
    method="auto",
    tol=None,
    max_iterations=None,
    ncv=None,
    seed=0,
    backend="auto",
) -> SpectralGap:
    """Spectral gap of ``P = softmax(scale · q kᵀ)`` for each head, without building ``P`` when long.

    Args:
        q: ``[..., Hq, N, d]`` queries; k: ``[..., Hk, N, d]`` keys (GQA allowed, as in
            :func:`attnstats.streaming_stats`). Gradients are not followed (the inputs are detached).
        scale: positive logit scale, default ``1/sqrt(d)``.
        padding_mask: ``[..., N]`` bool (broadcastable to the batch shape and N), True = real token.
            Padded tokens are removed as queries and as keys, as :func:`attnstats.spectral_gap` does.
        causal: lower-triangular attention; the gap is then exact from the diagonal, ``O(N·d)`` memory.
        method: ``"auto"`` (causal: the exact diagonal rule; otherwise LAPACK on ``P`` for heads of
            up to :data:`DENSE_MAX_TOKENS` tokens, all heads of one length in one batched call, and
            Arnoldi above, with a dense re-solve of any head whose Arnoldi result is not certified
            when ``P`` fits the memory budget), ``"arnoldi"`` or ``"dense"`` (only within the budget).
        tol: relative tolerance of the eigenvalue (default 1e-10 in float64 on the CPU, 1e-6 on a GPU).
        max_iterations: ARPACK restarts at most (default ``10·N``).
        ncv: Krylov subspace size (default ``min(N, 96)``; at least ``2·3 + 2``).
        seed: seed of the start vector.
        backend: product ``P x`` by ``"auto"``, ``"torch"`` or ``"triton"`` (see :class:`AttentionOperator`).

    Returns:
        :class:`SpectralGap` with fields of the batch shape. Heads under 9 tokens are always solved
        densely (ARPACK needs more). An uncertified head raises an
        :class:`attnstats.UncertifiedGapWarning`.

    Example:
        >>> q, k = torch.randn(4, 2048, 64), torch.randn(4, 2048, 64)
        >>> r = spectral_gap_from_qk(q, k)
        >>> bool(r.certified.all()), r.gap.shape
        (True, torch.Size([4]))
    """
    if method not in ("auto", "arnoldi", "dense"):
        raise ValueError(f"method: expected 'auto', 'arnoldi' or 'dense', got {method!r}")
    if causal and method == "arnoldi":
        raise ValueError("method: 'arnoldi' is for non-causal attention; causal attention uses the exact diagonal rule")
    if isinstance(q, torch.Tensor):
        q = q.detach()
    if isinstance(k, torch.Tensor):
        k = k.detach()
    qb, kb, scale, _, batch = prepare_qk(q, k, scale, None, causal)
    B, Hq, N, d = qb.shape
    if kb.shape[2] != N:
        raise ValueError(f"q, k: the spectral gap needs a square matrix, got Nq = {N} and Nk = {kb.shape[2]}")
    valid = None
    if padding_mask is not None:
        if not isinstance(padding_mask, torch.Tensor) or padding_mask.dtype != torch.bool:
            raise TypeError("padding_mask: expected a bool torch.Tensor [..., N], True = real token")
        try:
            valid = padding_mask.to(qb.device).expand(*batch, N).reshape(B, Hq, N)
        except RuntimeError:
            raise ValueError(
                f"padding_mask: shape {tuple(padding_mask.shape)} does not broadcast to {(*batch, N)}"
            ) from None
        none = ~valid.any(-1).reshape(batch)
        if bool(none.any()):
            idx = tuple(int(i) for i in none.nonzero()[0])
            raise ValueError(f"padding_mask: no real token in the matrix at batch index {idx}; expected at least one True")
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
    dense = [i for i, (qi, _) in enumerate(heads)
             if method == "dense" or qi.shape[0] < _ARNOLDI_MIN
             or (method == "auto" and qi.shape[0] <= DENSE_MAX_TOKENS and _dense_fits(qi.shape[0]))]
    redo = []
    for i in sorted(set(range(m)) - set(dense)):
        qi, ki = heads[i]
        op = AttentionOperator(qi, ki, scale, backend=backend)
        lam, it, r, c, eb = _arnoldi_gap(op, tol, max_iterations, ncv, seed)
        lam2[i], iters[i], res[i], conv[i], bound[i] = lam, it, r, c, eb
        gap[i] = min(max(1.0 - abs(lam), 0.0), 1.0) if math.isfinite(abs(lam)) else math.nan
        cert[i] = c and eb <= _certify_tol(op.dtype)
        if not cert[i] and method == "auto" and _dense_fits(qi.shape[0]):
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
            f"(the eigenvalue is too ill-conditioned for Arnoldi); method='dense' solves P itself within the memory budget",
            UncertifiedGapWarning,
            stacklevel=2,
        )
    used = {"dense" if i in set(dense) | set(redo) else "arnoldi" for i in range(m)}
    return SpectralGap(
        gap=gap.reshape(batch),
        lambda2=lam2.reshape(batch),
        iterations=iters.reshape(batch),
        residual=res.reshape(batch),
        converged=conv.reshape(batch),
        certified=cert.reshape(batch),
        error_bound=bound.reshape(batch),
        method=used.pop() if len(used) == 1 else "arnoldi+dense",
    )


def _causal_gap(qb, kb, scale, valid, batch, method):
    """Exact causal gap ``1 − max_{i≥1} P_ii`` with ``P_ii = exp(scale q_i·k_i − LSE_i)``."""
    B, Hq, N, d = qb.shape
    mask = None if valid is None else valid[:, :, None, :]
    rows, _, _ = streaming_row_accumulators(qb, kb, scale=scale, mask=mask, causal=True)
    g = Hq // kb.shape[1]
    k_rep = kb.repeat_interleave(g, dim=1) if g > 1 else kb
    dt = torch.float64
    diag_logit = (qb.to(dt) * k_rep.to(dt)).sum(-1) * scale  # [B, Hq, N]
    log_diag = diag_logit - rows.lse.to(dt)
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
    from .kernels.linear import linear_spectral_gap as gap_from_log_features

    dt = compute_dtype(phi_q)
    batch, (n, r) = phi_q.shape[:-2], phi_q.shape[-2:]
    # the kernels' log-space rule is the one implementation; log 0 = −inf marks a zero feature
    lq = torch.log(phi_q.to(dt)).reshape(1, -1, n, r)
    lk = torch.log(phi_k.to(dt)).reshape(1, -1, n, r)
    return gap_from_log_features(lq, lk, None, causal, "linear").reshape(batch)
