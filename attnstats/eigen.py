"""Spectral gap of attention without the N×N matrix.

``P`` is row-stochastic: ``λ_1 = 1`` with eigenvector ``1``, and the gap is ``γ = 1 − |λ_2|``.
Three exact routes avoid building ``P``:

- non-causal softmax attention: Arnoldi iteration (ARPACK, implicitly restarted) on the operator
  ``x ↦ P x``, which is attention with ``V = x`` and is applied tile by tile; ``λ_1 = 1`` is
  deflated away first, so the largest eigenvalue left is ``λ_2``;
- causal softmax attention: ``P`` is lower-triangular, so its eigenvalues are its diagonal
  ``P_ii = exp(scale·q_i·k_i − LSE_i)`` (``LSE`` from one streaming pass), ``γ = 1 − max_{i≥1} P_ii``;
- linearised attention ``P = D⁻¹ Φ_Q Φ_Kᵀ``: its nonzero eigenvalues are those of the ``r×r``
  matrix ``Φ_Kᵀ D⁻¹ Φ_Q`` (causal: its diagonal, from prefix sums).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from .budget import check_dense_fits
from .streaming import prepare_qk, streaming_row_accumulators
from .validation import check_finite, check_tensor, compute_dtype

__all__ = ["SpectralGap", "AttentionOperator", "spectral_gap_from_qk", "linear_spectral_gap"]


@dataclass(frozen=True)
class SpectralGap:
    """Spectral gap of each attention matrix, with how it was found.

    Every field is a tensor of the batch shape ``[...]``.

    Attributes:
        gap: ``1 − |λ_2|`` (float64), in ``[0, 1]`` up to rounding.
        lambda2: ``λ_2`` (complex128), the eigenvalue of second-largest modulus.
        iterations: products ``P x`` the eigen-solver asked for (int64; 0 for the exact rules).
        residual: ``‖A v − λ_2 v‖ / ‖v‖`` for the returned eigenvector ``v`` of the operator ``A``
            solved (``P`` with ``λ_1`` deflated); 0 for the exact rules.
        converged: True where the solver met its tolerance (always True for the exact rules).
        method: ``"arnoldi"``, ``"causal-diagonal"`` or ``"dense"``.
    """

    gap: torch.Tensor
    lambda2: torch.Tensor
    iterations: torch.Tensor
    residual: torch.Tensor
    converged: torch.Tensor
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
            return
        self.q = q.to(self.dtype)
        self.kt = k.to(self.dtype).T.contiguous()
        itemsize = torch.finfo(self.dtype).bits // 8
        self.rows = max(1, min(self.n, tile_bytes // (itemsize * self.n)))

    def matmat(self, x: torch.Tensor) -> torch.Tensor:
        """``P x`` for ``x: [N, c]`` (same device), as attention with ``V = x``."""
        self.calls += 1
        if self.backend == "triton":
            from .streaming_triton import attention_matmat

            cols = [attention_matmat(self.q, self.k, self.lse, x[:, i:i + 15].float(), self.scale)
                    for i in range(0, x.shape[1], 15)]
            return torch.cat(cols, 1)
        x = x.to(self.dtype)
        out = torch.empty(self.n, x.shape[1], dtype=self.dtype, device=x.device)
        for i0 in range(0, self.n, self.rows):
            i1 = min(self.n, i0 + self.rows)
            p = torch.softmax((self.q[i0:i1] @ self.kt) * self.scale, dim=-1)
            out[i0:i1] = p @ x
        return out


_NEV = 3  # eigenvalues ARPACK is asked for (λ_2, its conjugate, one more); the largest modulus is |λ_2|
_NCV = 96  # Krylov basis size: a larger basis restarts less (measured on H100, N = 16k: 0.92 s vs 1.43 s at 32)
_DENSE_BELOW = 2 * _NEV + 3  # heads with fewer tokens are solved densely (ARPACK needs nev + 1 < ncv ≤ N)


def _arnoldi_gap(op: AttentionOperator, tol: float, max_iterations: int | None, ncv: int | None, seed: int):
    """``(λ_2, iterations, residual, converged)`` of one head by ARPACK on ``P`` with ``λ_1`` deflated."""
    from scipy.sparse.linalg import ArpackNoConvergence, LinearOperator, eigs

    n = op.n
    dev = op.q.device

    # Deflation: A = (I − 1 1ᵀ/N) P keeps λ_2…λ_N and sends λ_1 = 1 (eigenvector 1) to 0,
    # because P maps multiples of 1 to themselves.
    def apply(v: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(np.ascontiguousarray(v, dtype=np.float64)).reshape(n, -1).to(dev)
        y = op.matmat(x)
        y = y - y.mean(0, keepdim=True)
        return y.double().cpu().numpy().reshape(v.shape)

    A = LinearOperator((n, n), matvec=apply, dtype=np.float64)
    rng = np.random.default_rng(seed)
    v0 = rng.standard_normal(n)
    v0 -= v0.mean()
    # Three eigenvalues, not two: with the bulk of the spectrum a disc whose edge lies close to
    # |λ_2|, asking ARPACK for a single one can converge to a neighbour of nearly the same modulus.
    nev = min(_NEV, n - 2)
    ncv = min(n, max(ncv or _NCV, 2 * nev + 2))
    op.calls = 0
    converged = True
    try:
        vals, vecs = eigs(A, k=nev, which="LM", v0=v0, ncv=ncv, tol=tol, maxiter=max_iterations)
    except ArpackNoConvergence as err:
        converged = False
        vals, vecs = err.eigenvalues, err.eigenvectors
    iterations = op.calls
    if len(vals) == 0:
        return complex("nan"), iterations, math.nan, False
    i = int(np.argmax(np.abs(vals)))
    lam, v = complex(vals[i]), vecs[:, i]
    av = apply(v.real) + 1j * apply(v.imag) if np.iscomplexobj(v) else apply(v)
    residual = float(np.linalg.norm(av - lam * v) / np.linalg.norm(v))
    return lam, iterations, residual, converged


def _dense_gap(q, k, scale):
    n = q.shape[0]
    check_dense_fits((n, n), 8, "the dense attention matrix for the eigen-solver")
    dt = compute_dtype(q)
    p = torch.softmax((q.to(dt) @ k.to(dt).T) * scale, dim=-1)
    ev = torch.linalg.eigvals(p.double())
    if n == 1:
        return complex(0.0)
    order = ev.abs().argsort(descending=True)
    return complex(ev[order[1]].item())


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
    """Spectral gap of ``P = softmax(scale · q kᵀ)`` for each head, without building ``P``.

    Args:
        q: ``[..., Hq, N, d]`` queries; k: ``[..., Hk, N, d]`` keys (GQA allowed, as in
            :func:`attnstats.streaming_stats`).
        scale: positive logit scale, default ``1/sqrt(d)``.
        padding_mask: ``[..., N]`` bool (broadcastable to the batch shape and N), True = real token.
            Padded tokens are removed as queries and as keys, as :func:`attnstats.spectral_gap` does.
        causal: lower-triangular attention; the gap is then exact from the diagonal, ``O(N·d)`` memory.
        method: ``"auto"`` (the exact diagonal rule if causal, else Arnoldi), ``"arnoldi"``, or
            ``"dense"`` (builds ``P``, only within the memory budget).
        tol: relative tolerance of the eigenvalue (default 1e-10 in float64 on the CPU, 1e-6 on a GPU).
        max_iterations: ARPACK restarts at most (default ``10·N``).
        ncv: Krylov subspace size (default ``min(N, 96)``; at least ``2·3 + 2``).
        seed: seed of the start vector.
        backend: product ``P x`` by ``"auto"``, ``"torch"`` or ``"triton"`` (see :class:`AttentionOperator`).

    Returns:
        :class:`SpectralGap` with fields of the batch shape. Heads of 3 tokens or fewer are solved
        densely (ARPACK needs more; their matrices are tiny).

    Example:
        >>> q, k = torch.randn(4, 2048, 64), torch.randn(4, 2048, 64)
        >>> r = spectral_gap_from_qk(q, k)
        >>> bool(r.converged.all()), r.gap.shape
        (True, torch.Size([4]))
    """
    if method not in ("auto", "arnoldi", "dense"):
        raise ValueError(f"method: expected 'auto', 'arnoldi' or 'dense', got {method!r}")
    if causal and method == "arnoldi":
        raise ValueError("method: 'arnoldi' is for non-causal attention; causal attention uses the exact diagonal rule")
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
    if method == "auto":
        method = "arnoldi"
    if tol is None:
        tol = 1e-10 if compute_dtype(qb) == torch.float64 and backend != "triton" else 1e-6
    g = Hq // kb.shape[1]
    lam2, iters, res, conv = [], [], [], []
    for b in range(B):
        for h in range(Hq):
            qi, ki = qb[b, h], kb[b, h // g]
            if valid is not None:
                qi, ki = qi[valid[b, h]], ki[valid[b, h]]
            n = qi.shape[0]
            if method == "dense" or n < _DENSE_BELOW:
                lam, it, r, c = _dense_gap(qi, ki, scale), 0, 0.0, True
            else:
                op = AttentionOperator(qi, ki, scale, backend=backend)
                lam, it, r, c = _arnoldi_gap(op, tol, max_iterations, ncv, seed)
            lam2.append(lam)
            iters.append(it)
            res.append(r)
            conv.append(c)
    lam2_t = torch.tensor(lam2, dtype=torch.complex128).reshape(batch)
    return SpectralGap(
        gap=1.0 - lam2_t.abs(),
        lambda2=lam2_t,
        iterations=torch.tensor(iters, dtype=torch.int64).reshape(batch),
        residual=torch.tensor(res, dtype=torch.float64).reshape(batch),
        converged=torch.tensor(conv, dtype=torch.bool).reshape(batch),
        method=method,
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
    return SpectralGap(
        gap=1.0 - lam2,
        lambda2=lam2.to(torch.complex128),
        iterations=torch.zeros(shape, dtype=torch.int64),
        residual=zeros,
        converged=torch.ones(shape, dtype=torch.bool),
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
