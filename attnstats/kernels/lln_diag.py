"""LLN+Diag attention: LLN attention plus exact softmax inside blocks of ``d`` tokens (docs/theory.md §4)."""
from __future__ import annotations

import torch
from torch import nn

from ..budget import check_dense_fits
from ..stats.spectral import spectral_gap as dense_spectral_gap
from . import block_diagonal_triton, lln_triton
from .base import Kernel, _register, check_qkv
from .block_diagonal import BlockDiagonalAttention
from .lln import LLNAttention

__all__ = ["LLNPlusDiagAttention", "LLN_DIAG_MODES"]

LLN_DIAG_MODES = ("average", "learnable_scale", "learnable_ratio")


class LLNPlusDiagAttention(Kernel):
    """``w_L ⊙ LLN(q, k, v) + w_D ⊙ BlockDiag(q, k, v)``, weights per head and value channel.

    Args:
        mode: ``"average"``: ``w_L = w_D = 1/2`` (fixed); ``"learnable_scale"``: two learnable
            tensors ``w_L = r``, ``w_D = p`` (initial 1/2); ``"learnable_ratio"``: one learnable
            ``w_L = r``, ``w_D = 1 − r`` (initial 1/2).
        num_heads, head_dim: shape ``[H, d_v]`` of the learnable weights (needed by the learnable
            modes only).
        block: tokens per softmax block; None = head dim.
        moment_matching, matching, a, b, eps, scale, chunk: passed to :class:`LLNAttention` (``scale``
            also to the block softmax).

    :meth:`matrix` returns ``w_L P_LLN + w_D P_Diag``, the matrix applied to value channel
    ``channel`` (weights equal over channels need no ``channel``). It is row-stochastic for
    ``average`` and ``learnable_ratio``; under ``learnable_scale`` its rows sum to ``r + p``.
    Both parts are computed in the compute dtype and combined there, then rounded once.
    """

    pairs_tokens = "block-diagonal attention"  # the Diag part pairs query i with key i

    def __init__(self, mode: str = "average", *, num_heads: int | None = None, head_dim: int | None = None,
                 block: int | None = None, moment_matching: bool = True, matching: str = "curve",
                 a: float | None = None, b: float | None = None, eps: float = 1e-8, scale: float | None = None,
                 chunk: int | None = None):
        super().__init__()
        if mode not in LLN_DIAG_MODES:
            raise ValueError(f"mode: unknown mode {mode!r}, expected one of {', '.join(LLN_DIAG_MODES)}")
        self.name = "lln_diag"
        self.mode = mode
        self.lln = LLNAttention(moment_matching=moment_matching, a=a, b=b, eps=eps, scale=scale, chunk=chunk,
                                matching=matching)
        self.diag = BlockDiagonalAttention(block=block, scale=scale)
        if mode != "average":
            for label, val in (("num_heads", num_heads), ("head_dim", head_dim)):
                if isinstance(val, bool) or not isinstance(val, int) or val < 1:
                    raise ValueError(f"{label}: mode {mode!r} learns weights of shape [num_heads, head_dim]; "
                                     f"expected a positive int, got {val!r}")
            self.r = nn.Parameter(torch.full((num_heads, head_dim), 0.5))
            if mode == "learnable_scale":
                self.p = nn.Parameter(torch.full((num_heads, head_dim), 0.5))

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}"

    def weights(self) -> tuple:
        """``(w_L, w_D)``: floats for ``average``, tensors ``[H, d_v]`` for the learnable modes."""
        if self.mode == "average":
            return 0.5, 0.5
        if self.mode == "learnable_ratio":
            return self.r, 1 - self.r
        return self.r, self.p

    def _check_heads(self, q, v=None):
        if self.mode == "average":
            return
        h, dv = self.r.shape
        if q.shape[1] != h or (v is not None and v.shape[-1] != dv):
            got = f"{q.shape[1]} heads" + ("" if v is None else f" and d_v = {v.shape[-1]}")
            raise ValueError(f"q, v: the learnable weights are for {h} heads and d_v = {dv}, got {got}")

    def forward(self, q, k, v, *, causal: bool = False, mask=None) -> torch.Tensor:
        """Attention output ``[B, H, N, d_v]``.

        CUDA inputs of one dtype with no mask take LLN's fused kernels (:mod:`~attnstats.kernels.lln_triton`,
        which also check q, k, v for NaN and inf), with the block softmax and the weighted sum folded in
        where that measured faster (:func:`~attnstats.kernels.lln_triton.fuses_diag`: blocks of 64 tokens,
        the default for head dim 64, half precision, up to 16k tokens); other calls run the block kernel
        of :mod:`~attnstats.kernels.block_diagonal_triton` after LLN's in the same autograd node, its
        backward adding its gradients to LLN's in place.
        """
        block = self.diag.block_size(q.shape[-1])
        fused = lln_triton.applies(q, k, v, mask) and block_diagonal_triton.applies(q, k, v, mask, block)
        check_qkv(q, k, v, causal, why="block-diagonal attention", finite=not fused)
        self._check_heads(q, v)
        if fused:
            wl, wd = self.weights()  # floats, or [H, d_v] each
            scale = self.diag._scale(q.shape[-1])
            blocks = min(block, q.shape[-2])  # the separate kernel's block (a short call is one block)
            separate = None if lln_triton.fuses_diag(q, v, block, causal) else blocks
            out = self.lln._fused_output(q, k, v, causal, diag=(scale, wl, wd, separate))  # [B, H, N, d_v]
            if out is not None:
                return out
            # causal keys spread too far for LLN's kernels (q, k, v are checked): its log-space path
            out_l = self.lln._output(q, k, v, causal, mask, checked=True)  # [B, H, N, d_v]
            return block_diagonal_triton.block_diagonal(q, k, v, scale, blocks, causal,
                                                        base=out_l, wl=wl, wd=wd)  # [B, H, N, d_v]
        out_l = self.lln._output(q, k, v, causal, mask, checked=True)  # [B, H, N, d_v]; inputs checked above
        out_d = self.diag._output(q, k, v, causal, mask)  # [B, H, N, d_v]
        wl, wd = self.weights()  # floats, or [H, d_v] each
        if self.mode != "average":
            wl, wd = wl[None, :, None, :], wd[None, :, None, :]  # [1, H, 1, d_v]
        return (wl * out_l + wd * out_d).to(out_l.dtype)  # [B, H, N, d_v]

    def _channel_weights(self, channel):
        """``(w_L, w_D)`` as ``[H]`` tensors (or floats) for one value channel."""
        if self.mode == "average":
            return 0.5, 0.5
        wl, wd = (w.detach() for w in self.weights())
        if channel is None:
            if not (bool((wl == wl[:, :1]).all()) and bool((wd == wd[:, :1]).all())):
                raise ValueError("channel: the learned weights differ across value channels, so each channel has "
                                 "its own matrix; pass channel=c (0 <= c < head_dim)")
            channel = 0
        if isinstance(channel, bool) or not isinstance(channel, int) or not 0 <= channel < wl.shape[1]:
            raise ValueError(f"channel: expected an int in [0, {wl.shape[1]}), got {channel!r}")
        return wl[:, channel], wd[:, channel]

    def matrix(self, q, k, *, causal: bool = False, mask=None, channel: int | None = None) -> torch.Tensor:
        """Dense ``w_L P_LLN + w_D P_Diag`` ``[B, H, N, N]`` for value channel ``channel``."""
        return super().matrix(q, k, causal=causal, mask=mask, channel=channel)

    def spectral_gap(self, q, k, *, causal: bool = False, mask=None, channel: int | None = None) -> torch.Tensor:
        """Spectral gap ``[B, H]`` of the dense :meth:`matrix` (:func:`attnstats.spectral_gap`)."""
        return super().spectral_gap(q, k, causal=causal, mask=mask, channel=channel)

    def _valid(self, mask, shape, causal: bool, device):
        """``(LLN's padding parts, the block kernel's bool [B, H, N, N] or None)``."""
        return self.lln._valid(mask, shape, causal, device), self.diag._valid(mask, shape, causal, device)

    def _matrix(self, q, k, valid, *, causal: bool, dtype: torch.dtype, channel: int | None = None) -> torch.Tensor:
        self._check_heads(q)
        wl, wd = self._channel_weights(channel)  # floats, or [H] each
        valid_l, valid_d = valid
        pl = self.lln._matrix(q, k, valid_l, causal=causal, dtype=dtype)  # [B, H, N, N]
        pd = self.diag._matrix(q, k, valid_d, causal=causal, dtype=dtype)  # [B, H, N, N]
        if not isinstance(wl, float):
            wl = wl.to(dtype)[None, :, None, None]  # [1, H, 1, 1]
            wd = wd.to(dtype)[None, :, None, None]
        return wl * pl + wd * pd  # [B, H, N, N]

    def _gap(self, q, k, valid, *, causal: bool, dtype: torch.dtype, channel: int | None = None) -> torch.Tensor:
        if self.mode == "learnable_scale":
            raise ValueError("mode: 'learnable_scale' makes a matrix whose rows sum to r + p, not 1; "
                             "a spectral gap needs a row-stochastic matrix ('average' or 'learnable_ratio')")
        shape = (q.shape[0], q.shape[1], q.shape[-2], k.shape[-2])
        check_dense_fits(shape, torch.finfo(dtype).bits // 8, f"the {self.name} attention matrix (for its spectral gap)")
        p = self._matrix(q, k, valid, causal=causal, dtype=dtype, channel=channel)  # [B, H, N, N]
        return dense_spectral_gap(p, valid[1])  # the block kernel's valid: the mask and the causal rule


_register("lln_diag", LLNPlusDiagAttention)
