"""Softmax attention (SA), the reference kernel: the same numbers as PyTorch SDPA."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..stats.dense import softmax_attention
from .base import Kernel, _register, check_qkv, check_real, full_mask, result_dtype

__all__ = ["SoftmaxAttention"]


class SoftmaxAttention(Kernel):
    """Softmax attention ``P = softmax(scale · q kᵀ)`` (docs/theory.md §1).

    Args:
        scale: score scale; None = ``1/sqrt(d)``.

    The output is ``torch.nn.functional.scaled_dot_product_attention`` on the inputs as given (same
    numbers as SDPA); rows with no valid key give 0 instead of NaN. ``matrix`` is
    :func:`attnstats.stats.dense.softmax_attention`, computed in float64 on the CPU (≥ float32 on a
    GPU); ``spectral_gap`` is the dense gap of that matrix.
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
        q, k, v = q.to(dt), k.to(dt), v.to(dt)  # [B, H, N, d], [B, H, M, d], [B, H, M, d_v]
        if mask is None:
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=self._scale(q.shape[-1]))  # [B, H, N, d_v]
        shape = (q.shape[0], q.shape[1], q.shape[-2], k.shape[-2])
        valid = full_mask(mask, shape, causal, q.device)  # [B, H, N, M]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=valid, scale=self._scale(q.shape[-1]))  # [B, H, N, d_v]
        # a row with no valid key has no distribution: 0, never NaN
        return torch.where(valid.any(-1)[..., None], out, torch.zeros((), dtype=out.dtype, device=out.device))  # [B, H, N, d_v]

    def _matrix(self, q, k, valid, *, causal: bool, dtype: torch.dtype) -> torch.Tensor:
        # valid already holds the causal rule
        return softmax_attention(q, k, scale=self._scale(q.shape[-1]), mask=valid, dtype=dtype)  # [B, H, N, M]


_register("softmax", SoftmaxAttention)
