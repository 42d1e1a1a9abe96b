"""The matrix-free eigen-solver behind :func:`attnstats.spectral_gap_from_qk` for long heads.

``P = softmax(scale · q kᵀ)`` is applied as ``x ↦ P x``, attention with ``V = x``, tile by tile (or by
the fused Triton kernel on CUDA), so ``P`` never exists whole. ARPACK (implicitly restarted Arnoldi)
runs on ``A = (I − 1 1ᵀ/N) P``, which keeps ``λ_2 … λ_N`` and sends ``λ_1 = 1`` to 0. Each result is
checked: a second run on ``Aᵀ`` gives the left eigenvector, hence the condition number of ``λ_2`` and a
first-order error bound (:func:`arnoldi_gap`).
"""
from __future__ import annotations

import math

import numpy as np
import torch

from .online import streaming_row_accumulators
from ..validation import compute_dtype

__all__ = ["AttentionOperator", "arnoldi_gap", "certify_tol", "first_order_bound", "fused_products_run", "ARNOLDI_MIN_TOKENS"]


class AttentionOperator:
    """``x ↦ P x`` for the heads ``P_m = softmax(scale · q_m k_mᵀ)``, never holding more than a tile of ``P``.

    Args:
        q: ``[M, N, d]`` queries of ``M`` heads, or ``[N, d]`` for one head; k: keys of the same shape
            (padding already removed).
        scale: logit scale.
        tile_bytes: memory of one ``rows × N`` tile of ``P`` on the PyTorch path (default 64 MiB).
        backend: ``"auto"`` (the fused Triton product on CUDA when Triton imports), ``"torch"``
            (tiles of ``P``, float64 on the CPU, float32 on a GPU) or ``"triton"``.

    The products take and give ``[A, N, c]`` for ``A`` of the heads (``heads``, default all), or
    ``[N, c]`` when the operator was made from one head's ``[N, d]``.
    """

    def __init__(self, q: torch.Tensor, k: torch.Tensor, scale: float, tile_bytes: int = 64 * 1024**2, backend="auto"):
        if backend not in ("auto", "torch", "triton"):
            raise ValueError(f"backend: expected 'auto', 'torch' or 'triton', got {backend!r}")
        self.one_head = q.dim() == 2
        if self.one_head:
            q, k = q[None], k[None]  # [1, N, d]
        if backend == "auto":
            backend = "triton" if fused_products_run(q) else "torch"
        self.backend = backend
        self.dtype = compute_dtype(q)
        self.scale = scale
        self.heads, self.n = q.shape[0], q.shape[1]
        self.calls = 0
        if backend == "triton":
            # The fused product needs LSE up front: one streaming pass. q, k keep their dtype
            # (bf16 products are exact in the float32 accumulator).
            rows, _, _ = streaming_row_accumulators(q[None], k[None], scale=scale, backend="triton")
            self.q, self.k, self.lse = q, k, rows.lse[0]  # [M, N, d], [M, N, d], [M, N]
            self.dtype = torch.float32
            self._row_sums = None  # [M, N] of exp(s − lse), for the transposed product (see rmatmat)
            self.p = None
            return
        self.q = q.to(self.dtype)  # [M, N, d]
        self.k = k.to(self.dtype)  # [M, N, d]
        self.kt = self.k.transpose(1, 2).contiguous()  # [M, d, N]
        itemsize = torch.finfo(self.dtype).bits // 8
        self.rows = max(1, min(self.n, tile_bytes // (itemsize * self.n)))
        # When every head's P fits in one tile, each is built once: a solve takes hundreds of
        # products, and rebuilding P costs d/c times a product with it.
        whole = self.rows == self.n and self.heads * self.n * self.n * itemsize <= tile_bytes
        self.p = self._tile(slice(None), 0, self.n) if whole else None  # [M, N, N] or None

    def _tile(self, h, i0: int, i1: int) -> torch.Tensor:
        """Rows ``i0:i1`` of ``P`` of head(s) ``h`` in the compute dtype (PyTorch path): ``[..., i1 − i0, N]``.

        A tile of the operator, kept apart from :func:`attnstats.stats.dense.softmax_attention`: it
        reads the transposed keys made once for the whole solve.
        """
        s = (self.q[h, i0:i1] @ self.kt[h]) * self.scale  # [..., rows, N]
        return torch.softmax(s, dim=-1)  # [..., rows, N]

    def _heads(self, x: torch.Tensor, heads):
        """``x`` as ``[A, N, c]``, and ``(heads, heads as a list, P of those heads or None)``: the fused
        product takes ``heads`` as a tensor on the device (given so, nothing waits for a copy), the
        PyTorch tiles a list."""
        x = x[None] if self.one_head else x  # [A, N, c]
        count = self.heads if heads is None else len(heads)
        if count != x.shape[0]:
            raise ValueError(f"x: one slice per head, expected {count}, got {x.shape[0]}")
        if self.backend == "triton":
            if heads is not None and not (isinstance(heads, torch.Tensor) and heads.device == self.q.device):
                heads = torch.as_tensor([int(h) for h in heads], device=self.q.device)  # [A]
            return x, heads, None, None
        listed = list(range(self.heads)) if heads is None else [int(h) for h in heads]
        p = None if self.p is None else (self.p if heads is None else self.p[listed])  # [A, N, N]
        return x, heads, listed, p

    def matmat(self, x: torch.Tensor, heads: torch.Tensor | None = None) -> torch.Tensor:
        """``P x`` for ``x: [A, N, c]`` (same device), as attention with ``V = x``: head ``heads[a]`` (int
        ``[A]``, default all) multiplies ``x[a]``."""
        self.calls += 1
        x, heads, listed, p = self._heads(x, heads)
        if self.backend == "triton":
            from .online_triton import attention_products

            cols = [attention_products(self.q, self.k, self.lse, x[..., i:i + 31].float(), self.scale, heads=heads)
                    for i in range(0, x.shape[-1], 31)]  # [A, N, ≤ 31] each
            out = torch.cat(cols, -1)  # [A, N, c]
        else:
            x = x.to(self.dtype)  # [A, N, c]
            if p is not None:
                out = p @ x  # [A, N, N] @ [A, N, c]
            else:
                out = torch.empty_like(x)  # [A, N, c]
                for a, h in enumerate(listed):
                    for i0 in range(0, self.n, self.rows):
                        i1 = min(self.n, i0 + self.rows)
                        out[a, i0:i1] = self._tile(h, i0, i1) @ x[a]  # [rows, N] @ [N, c]
        return out[0] if self.one_head else out

    def rmatmat(self, x: torch.Tensor, heads: torch.Tensor | None = None) -> torch.Tensor:
        """``Pᵀ x``, as :meth:`matmat`: the left eigenvectors that certify an eigenvalue need it."""
        self.calls += 1
        x, heads, listed, p = self._heads(x, heads)
        if self.backend == "triton":
            from .online_triton import attention_products, attention_row_sums

            if self._row_sums is None:  # once per operator: what matmat normalises each row by
                self._row_sums = attention_row_sums(self.q, self.k, self.lse, self.scale)  # [M, N]
            cols = [attention_products(self.q, self.k, self.lse, x[..., i:i + 32].float(), self.scale,
                                       transpose=True, heads=heads, row_sums=self._row_sums)
                    for i in range(0, x.shape[-1], 32)]  # [A, N, ≤ 32] each
            out = torch.cat(cols, -1)  # [A, N, c]
        else:
            x = x.to(self.dtype)  # [A, N, c]
            if p is not None:
                out = p.transpose(1, 2) @ x  # [A, N, N] @ [A, N, c]
            else:
                out = torch.zeros_like(x)  # [A, N, c]
                for a, h in enumerate(listed):
                    for i0 in range(0, self.n, self.rows):
                        i1 = min(self.n, i0 + self.rows)
                        out[a] += self._tile(h, i0, i1).T @ x[a, i0:i1]  # [N, rows] @ [rows, c]
        return out[0] if self.one_head else out


def fused_products_run(q: torch.Tensor) -> bool:
    """True where the fused Triton products serve heads like ``q [..., N, d]``: a CUDA tensor, Triton
    importable, and a head dim the kernels take."""
    from . import online_triton

    return q.device.type == "cuda" and online_triton.available() and q.shape[-1] in (16, 32, 64, 128, 256)


def first_order_bound(u: np.ndarray, v: np.ndarray, residual: float, lam_left: complex, lam: complex) -> float:
    """``κ(λ)·residual + |θ_left − θ_right|``, the error bound of a certified eigenvalue, with
    ``κ = ‖u‖‖v‖ / |uᵀv|`` (``v`` the right eigenvector of ``A``, ``u`` the right eigenvector of ``Aᵀ``
    next to ``λ``, so that ``ū`` is ``A``'s left one: ``uᵀv`` without a conjugate); ``inf`` when
    ``uᵀv = 0``. The two solves must agree on ``λ`` as well: their distance is part of the error."""
    overlap = abs(np.dot(u, v))
    if overlap == 0:
        return math.inf
    return float(np.linalg.norm(u) * np.linalg.norm(v) / overlap * residual + abs(lam_left - lam))


_NEV = 3  # eigenvalues ARPACK is asked for (λ_2, its conjugate, one more); the largest modulus is |λ_2|
_NCV = 96  # Krylov basis size: a larger basis restarts less (measured on H100, N = 16k: 0.92 s vs 1.43 s at 32)
ARNOLDI_MIN_TOKENS = 2 * _NEV + 3  # heads with fewer tokens are always solved densely (ARPACK needs nev + 1 < ncv ≤ N)
def certify_tol(dtype: torch.dtype) -> float:
    """Largest first-order error bound ``κ(λ_2)·‖r‖`` on ``|λ_2|`` accepted as certified."""
    return 1e-6 if dtype == torch.float64 else 1e-3


def arnoldi_gap(op: AttentionOperator, tol: float, max_iterations: int | None, ncv: int | None, seed: int):
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
            y = op.rmatmat(x - x.mean(0, keepdim=True))  # [N, c]
        else:  # A x = P x − mean(P x)
            y = op.matmat(x)  # [N, c]
            y = y - y.mean(0, keepdim=True)  # [N, c]
        return y.double().cpu().numpy().reshape(v.shape)  # as v: [N] or [N, c]

    def apply_c(v: np.ndarray, transpose: bool = False) -> np.ndarray:
        return apply(v.real, transpose) + 1j * apply(v.imag, transpose) if np.iscomplexobj(v) else apply(v, transpose)

    rng = np.random.default_rng(seed)
    v0 = rng.standard_normal(n)  # [N]
    v0 -= v0.mean()
    op.calls = 0
    # Rank-one attention (identical queries or keys) makes A vanish up to rounding, and ARPACK stops
    # on a zero Krylov vector. Three random vectors that A sends to rounding level (the error of a
    # product, ~sqrt(N)·eps relative) mean λ_2 = 0: a random direction sees about a 1/sqrt(N) share
    # of ‖A‖, and the factor 100 covers an unlucky draw (all three below 1/100 of it: odds ~1e-6).
    probes = rng.standard_normal((n, 3))  # [N, 3]
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
            vals, vecs = eigs(A, k=nev, which="LM", v0=v0, ncv=ncv, tol=tol, maxiter=max_iterations)  # [nev], [N, nev]
            return vals, vecs, True
        except ArpackNoConvergence as err:
            return err.eigenvalues, err.eigenvectors, False
        except ArpackError:  # a breakdown ARPACK cannot restart from: reported as not converged
            return np.zeros(0, complex), np.zeros((n, 0), complex), False

    vals, vecs, converged = solve(False)
    if len(vals) == 0:  # a breakdown: the start vector's images were all that A showed of itself
        return 0j, op.calls, level, False, vanishing_bound
    i = int(np.argmax(np.abs(vals)))
    lam, v = complex(vals[i]), vecs[:, i]  # λ_2, its right eigenvector [N]
    residual = float(np.linalg.norm(apply_c(v) - lam * v) / np.linalg.norm(v))
    iterations = op.calls
    lvals, lvecs, _ = solve(True)
    bound = math.inf
    if len(lvals):
        j = int(np.argmin(np.abs(lvals - lam)))
        bound = first_order_bound(lvecs[:, j], v, residual, lvals[j], lam)  # u: the eigenvector of Aᵀ next to λ_2
    return lam, iterations, residual, converged, bound
