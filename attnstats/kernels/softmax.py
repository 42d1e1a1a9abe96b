"""Softmax attention (SA), the reference kernel: the same numbers as PyTorch SDPA."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..budget import check_dense_fits
from ..stats.spectral import spectral_gap as dense_spectral_gap
from ..validation import compute_dtype
from .base import Kernel, _register, check_qk4, check_real, check_qkv, full_mask, matrix_dtype, result_dtype

__all__ = ["SoftmaxAttention", "softmax_matrix"]


def softmax_matrix(q: torch.Tensor, k: torch.Tensor, valid, scale: float, dtype: torch.dtype) -> torch.Tensor:
    """``softmax(scale·q kᵀ)`` over the valid entries, computed in ``dtype``; rows with none are 0.

    Args:
        q: ``[..., N, d]``; k: ``[..., M, d]``; valid: bool ``[..., N, M]`` (True = attend) or None.
    """
    s = (q.to(dtype) @ k.to(dtype).transpose(-2, -1)) * scale
    if valid is None:
        return torch.softmax(s, dim=-1)
    s = s.masked_fill(~valid, float("-inf"))
    p = torch.softmax(s, dim=-1)
    return torch.where(valid.any(-1, keepdim=True), p, torch.zeros((), dtype=p.dtype, device=p.device))


class SoftmaxAttention(Kernel):
    """Softmax attention ``P = softmax(scale · q kᵀ)`` (docs/theory.md §1).

    Args:
        scale: score scale; None = ``1/sqrt(d)``.

    The output is ``torch.nn.functional.scaled_dot_product_attention`` on the inputs as given (same
    numbers as SDPA); rows with no valid key give 0 instead of NaN. ``matrix`` computes the
    probabilities in float64 on the CPU (≥ float32 on a GPU).
    """

    name = "softmax"

    def __init__(self, scale: float | None = None):
        super().__init__()
        self.scale = check_real(scale, "scale", low=0, strict=True, none_ok=True)

    def _scale(self, d: int) -> float:
        return d**-0.5 if self.scale is None else float(self.scale)

    def forward(self, q, k, v, *, causal: bool = False, mask=None) -> torch.Tensor:
        """Attention output ``[B, H, N, d_v]`` (SDPA)."""
        check_qkv(q, k, v, causal)
        dt = result_dtype(q, k, v)  # SDPA needs one dtype
        q, k, v = q.to(dt), k.to(dt), v.to(dt)
        if mask is None:
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=self._scale(q.shape[-1]))
        shape = (q.shape[0], q.shape[1], q.shape[-2], k.shape[-2])
        valid = full_mask(mask, shape, causal, q.device)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=valid, scale=self._scale(q.shape[-1]))
        # a row with no valid key has no distribution: 0, never NaN
        return torch.where(valid.any(-1)[..., None], out, torch.zeros((), dtype=out.dtype, device=out.device))

    def matrix(self, q, k, *, causal: bool = False, mask=None) -> torch.Tensor:
        """Dense row-stochastic ``[B, H, N, M]`` (float64 for float64 input, else float32)."""
        check_qk4(q, k, causal)
        shape = (q.shape[0], q.shape[1], q.shape[-2], k.shape[-2])
        cd = compute_dtype(q)
        check_dense_fits(shape, torch.finfo(cd).bits // 8, "the softmax attention matrix")
        valid = full_mask(mask, shape, causal, q.device)
        return softmax_matrix(q, k, valid, self._scale(q.shape[-1]), cd).to(matrix_dtype(q))

    def spectral_gap(self, q, k, *, causal: bool = False, mask=None) -> torch.Tensor:
        """Spectral gap ``[B, H]`` of the dense matrix (:func:`attnstats.spectral_gap`)."""
        check_qk4(q, k, causal, square=True)
        shape = (q.shape[0], q.shape[1], q.shape[-2], k.shape[-2])
        cd = compute_dtype(q)
        # the scores, the matrix and its checked copy are each this large
        check_dense_fits(shape, torch.finfo(cd).bits // 8, "the softmax attention matrix (for its spectral gap)")
        valid = full_mask(mask, shape, causal, q.device)
        p = softmax_matrix(q, k, valid, self._scale(q.shape[-1]), cd)
        return dense_spectral_gap(p, valid)


_register("softmax", SoftmaxAttention)
