"""Linear Log-Normal (LLN) attention (docs/theory.md §4).

Feature maps ``φ_Q(q) = exp(α q)``, ``φ_K(k) = exp(β k)`` element-wise (``r = d``). With moment
matching, ``α`` and ``β`` make the log-variance of the LLN matrix equal that of softmax attention
on the same q, k: ``σ̃ = sqrt((σ² − b)/(2a))``, ``α = σ̃/σ_q``, ``β = σ̃/σ_k``, where ``σ_q, σ_k`` are
the standard deviations of the whole q and k tensors (no gradient) and ``σ² = σ_q²σ_k²`` is the
score variance of softmax attention at its default scale ``1/sqrt(d)``.
"""
from __future__ import annotations

import torch

from .. import theory
from .base import _register, check_count, check_real
from .linear import LogFeatureAttention

__all__ = ["LLNAttention"]


def _std_or_one(x: torch.Tensor) -> float:
    """Standard deviation of all entries of ``x``; 1 for a constant (or one-entry) tensor, whose
    features do not depend on the temperature."""
    if x.numel() < 2:
        return 1.0
    s = float(x.detach().to(torch.float64).std())  # a Python float: one σ for the whole tensor
    return s if s > 0 else 1.0


class LLNAttention(LogFeatureAttention):
    """Linear Log-Normal attention ``P_ij ∝ Σ_l exp(α q_il + β k_jl)``.

    Args:
        moment_matching: if True, ``α, β`` from the moment-matching rule (see :meth:`alpha_beta`);
            if False, ``α = β = 1`` ("before moment matching").
        a, b: constants of the moment-matching regression ``σ_sm² = a·σ_t² + b`` (defaults: the
            paper's values for d = 64; refit for another head dim with
            :func:`attnstats.fit_moment_matching`).
        eps: added to each denominator (the stabilising shifts keep denominators ≥ 1).
        scale: the softmax scale whose score variance is matched; None = ``1/sqrt(d)``. With another
            scale ``c`` the matched variance is ``c²·d·σ_q²σ_k²``.
        chunk: tokens per chunk of the causal algorithm (default: chosen from memory).

    Computation is float32 for half and float32 inputs (float64 for float64); non-causal in
    ``O(N·d·d_v)``; causal by a chunked pure-PyTorch algorithm with ``O(N)`` memory; key-padding
    masks supported (padded keys get no attention, padded queries give 0).
    """

    def __init__(self, moment_matching: bool = True, a: float = theory.LLN_A, b: float = theory.LLN_B,
                 eps: float = 1e-8, scale: float | None = None, chunk: int | None = None):
        super().__init__()
        a = check_real(a, "a", low=0, strict=True)
        b = check_real(b, "b")
        eps = check_real(eps, "eps", low=0)
        scale = check_real(scale, "scale", low=0, strict=True, none_ok=True)
        chunk = check_count(chunk, "chunk")
        self.moment_matching = bool(moment_matching)
        self.name = "lln" if self.moment_matching else "lln_no_mm"
        self.a, self.b = float(a), float(b)
        self.eps = float(eps)
        self.scale = scale
        self.chunk = chunk

    def extra_repr(self) -> str:
        return f"moment_matching={self.moment_matching}, a={self.a}, b={self.b}, eps={self.eps}"

    @torch.no_grad()
    def alpha_beta(self, q: torch.Tensor, k: torch.Tensor) -> tuple[float, float]:
        """The temperatures ``(α, β)`` used for these q, k (Python floats).

        ``σ_q, σ_k`` are the standard deviations of all entries of ``q`` and ``k`` (``torch.std``,
        divisor ``M − 1``, in float64), as in the paper's reference implementation. Without moment matching, ``(1.0, 1.0)``. A constant tensor (σ = 0) gives features
        that do not depend on it, so its σ is replaced by 1.
        """
        if not self.moment_matching:
            return 1.0, 1.0
        sq, sk = _std_or_one(q), _std_or_one(k)  # Python floats
        d = q.shape[-1]
        # a softmax scale c gives scores of variance c²·d·σ_q²σ_k²: match that by rescaling σ_q, σ_k
        c = 1.0 if self.scale is None else float(self.scale) * d**0.5
        alpha, beta = theory.lln_alpha_beta(sq * c**0.5, sk * c**0.5, self.a, self.b)
        return float(alpha) * c**0.5, float(beta) * c**0.5

    def log_features(self, q: torch.Tensor, k: torch.Tensor, dtype: torch.dtype):
        """``(α q, β k)`` in ``dtype``: the logarithms of the LLN features."""
        alpha, beta = self.alpha_beta(q, k)  # Python floats
        return q.to(dtype) * alpha, k.to(dtype) * beta  # [B, H, N, d], [B, H, M, d]: r = d features


_register("lln", LLNAttention, moment_matching=True)
_register("lln_no_mm", LLNAttention, moment_matching=False)
