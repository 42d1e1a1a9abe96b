"""Block-diagonal softmax attention: exact softmax inside consecutive blocks of tokens (docs/theory.md §4)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..stats.dense import softmax_attention
from ..masks import valid_parts
from . import block_diagonal_triton
from .base import Kernel, _register, check_qkv, check_real, full_mask, work_dtype

__all__ = ["BlockDiagonalAttention", "block_mask"]


def block_mask(n: int, block: int, device=None) -> torch.Tensor:
    """``[N, N]`` bool, True where tokens ``i`` and ``j`` lie in the same block of ``block`` tokens
    (consecutive, non-overlapping; the remainder forms one last smaller block)."""
    ids = torch.arange(n, device=device) // block  # [N]: block of each token
    return ids[:, None] == ids[None, :]  # [N, N]


class BlockDiagonalAttention(Kernel):
    """Softmax attention restricted to consecutive non-overlapping blocks of ``block`` tokens.

    Args:
        block: tokens per block; None = the head dim ``d`` (the "Diag" part of LLN+Diag).
        scale: score scale; None = ``1/sqrt(d)``.

    Causal attention applies the causal rule inside each block. A further mask is applied inside
    the blocks. A query whose block holds no key it may attend to (a padding token in an all-padding
    block) attends like softmax attention over its valid keys instead, so every row with a valid key
    stays a distribution; a row with no valid key at all gives 0. Cost ``O(N·block·d)``.
    """

    name = "block_diag"
    pairs_tokens = "block-diagonal attention"  # blocks pair query i with key i

    def __init__(self, block: int | None = None, scale: float | None = None):
        super().__init__()
        if block is not None and (isinstance(block, bool) or not isinstance(block, int) or block <= 0):
            raise ValueError(f"block: expected a positive int number of tokens per block or None, got {block!r}")
        self.block = block
        self.scale = check_real(scale, "scale", low=0, strict=True, none_ok=True)

    def extra_repr(self) -> str:
        return f"block={self.block}"

    def block_size(self, d: int) -> int:
        """Tokens per block for head dim ``d``."""
        return d if self.block is None else self.block

    def _scale(self, d: int) -> float:
        return d**-0.5 if self.scale is None else float(self.scale)

    def _fallback(self, q, k, v, rows, valid, dtype):
        """Softmax attention rows over all their valid keys (``@ v`` when ``v`` is given), ``[R, N]``
        or ``[R, d_v]``, for the ``(b, h, i)`` in ``rows [R, 3]``; ``valid``: bool ``[B, H, N, N]``."""
        scale = self._scale(q.shape[-1])
        outs = []
        for s in range(0, rows.shape[0], 256):
            bi, hi, ii = rows[s : s + 256].unbind(-1)  # [R'] each
            # every such row has a valid key: a distribution, never the all-zero row
            p = softmax_attention(q[bi, hi, ii, None, :], k[bi, hi], scale=scale, mask=valid[bi, hi, ii, None, :],
                                  dtype=dtype)[:, 0]  # [R', N]
            outs.append(p if v is None else (p[:, None, :] @ v[bi, hi].to(dtype))[:, 0])  # [R', N] or [R', d_v]
        return torch.cat(outs, 0)

    def _missing_rows(self, q, valid):
        """``(b, h, i)`` of rows with a valid key somewhere but none in their block, ``[R, 3]``, or None;
        ``valid``: bool ``[B, H, N, N]`` (mask and causal rule) or None."""
        if valid is None:
            return None
        blocks = block_mask(q.shape[-2], self.block_size(q.shape[-1]), q.device)  # [N, N]
        missing = valid.any(-1) & ~(valid & blocks).any(-1)  # [B, H, N]
        return torch.nonzero(missing, as_tuple=False) if bool(missing.any()) else None

    def forward(self, q, k, v, *, causal: bool = False, mask=None) -> torch.Tensor:
        """Attention output ``[B, H, N, d_v]``: all blocks of one size in a single SDPA call.

        The whole blocks are laid out as ``[B, H·N/C, C, d]`` (the remainder block, if any, as one more
        call), so SDPA's fused kernels run every block at once; a mask enters as its ``C × C``
        diagonal blocks (``O(N·C)``, never ``N × N``).
        """
        check_qkv(q, k, v, causal, why="block-diagonal attention")  # blocks pair query i with key i
        return self._output(q, k, v, causal, mask)

    def _output(self, q, k, v, causal: bool, mask) -> torch.Tensor:
        """:meth:`forward` after its input checks (a kernel combining this one checks once); CUDA inputs
        with no mask go to the fused kernel (:mod:`attnstats.kernels.block_diagonal_triton`)."""
        b, h, n, d = q.shape
        size = min(self.block_size(d), n)
        if block_diagonal_triton.applies(q, k, v, mask, size):
            return block_diagonal_triton.block_diagonal(q, k, v, self._scale(d), size, causal)  # [B, H, N, d_v]
        m = full_mask(mask, (b, h, n, n), False, q.device)  # broadcast view [B, H, N, N] or None
        main = n - n % size
        parts = [self._blocks(q, k, v, m, 0, main, size, causal)]  # ([B, H, main, d_v], [B, H, main] | None)
        if main < n:
            parts.append(self._blocks(q, k, v, m, main, n, n - main, causal))
        out = torch.cat([o for o, _ in parts], dim=-2)  # [B, H, N, d_v]
        if m is None:
            return out
        in_block = torch.cat([r for _, r in parts], dim=-1)  # [B, H, N]: the query has a key in its block
        if bool(in_block.all()):
            return out
        has_key, _ = valid_parts(mask, causal, (b, h, n, n), q.device)  # [B, H, N]
        missing = has_key & ~in_block  # [B, H, N]
        if bool(missing.any()):
            rows = torch.nonzero(missing, as_tuple=False)  # [R, 3]
            valid = full_mask(mask, (b, h, n, n), causal, q.device)  # [B, H, N, N] broadcast view: rows read only
            bi, hi, ii = rows.unbind(-1)  # [R] each
            out[bi, hi, ii] = self._fallback(q, k, v, rows, valid, work_dtype(out.dtype)).to(out.dtype)  # [R, d_v]
        return out

    def _blocks(self, q, k, v, m, start: int, stop: int, size: int, causal: bool):
        """Tokens ``start:stop`` (a whole number of blocks of ``size``) through one SDPA call.

        Returns ``(out [B, H, stop − start, d_v], in_block [B, H, stop − start] | None)``: ``in_block``
        says which queries have a valid key in their block (None without a mask).
        """
        b, h, _, d = q.shape
        dv = v.shape[-1]
        nb = (stop - start) // size
        qb = q[:, :, start:stop].reshape(b, h * nb, size, d)  # [B, H·nb, C, d]
        kb = k[:, :, start:stop].reshape(b, h * nb, size, d)  # [B, H·nb, C, d]
        vb = v[:, :, start:stop].reshape(b, h * nb, size, dv)  # [B, H·nb, C, d_v]
        scale = self._scale(d)
        if m is None:
            ob = F.scaled_dot_product_attention(qb, kb, vb, is_causal=causal, scale=scale)  # [B, H·nb, C, d_v]
            return ob.reshape(b, h, stop - start, dv), None
        idx = torch.arange(start, stop, device=q.device).reshape(nb, size)  # [nb, C]
        mb = m[:, :, idx[:, :, None], idx[:, None, :]]  # [B, H, nb, C, C]: the diagonal blocks only
        if causal:
            mb = mb & torch.ones(size, size, dtype=torch.bool, device=q.device).tril()  # [B, H, nb, C, C]
        mb = mb.reshape(b, h * nb, size, size)  # [B, H·nb, C, C]
        ob = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=mb, scale=scale)  # [B, H·nb, C, d_v]
        has = mb.any(-1)  # [B, H·nb, C]
        ob = torch.where(has[..., None], ob, torch.zeros((), dtype=ob.dtype, device=ob.device))  # no NaN rows
        return ob.reshape(b, h, stop - start, dv), has.reshape(b, h, stop - start)

    def _matrix(self, q, k, valid, *, causal: bool, dtype: torch.dtype) -> torch.Tensor:
        """The dense matrix ``[B, H, N, N]``; ``valid`` (mask and causal rule) is further cut to the
        blocks. The base :meth:`~attnstats.kernels.Kernel.spectral_gap` takes the dense gap of it: 0
        whenever there are two or more blocks (each block contributes an eigenvalue 1)."""
        shape = (q.shape[0], q.shape[1], q.shape[-2], k.shape[-2])
        blocks = block_mask(shape[-1], self.block_size(q.shape[-1]), q.device)  # [N, N]
        in_blocks = blocks.expand(shape) if valid is None else valid & blocks  # [B, H, N, N]
        p = softmax_attention(q, k, scale=self._scale(q.shape[-1]), mask=in_blocks, dtype=dtype)  # [B, H, N, N]
        rows = self._missing_rows(q, valid)  # [R, 3] or None
        if rows is not None:
            bi, hi, ii = rows.unbind(-1)  # [R] each
            p[bi, hi, ii] = self._fallback(q, k, None, rows, valid, dtype)  # [R, N]
        return p


_register("block_diag", BlockDiagonalAttention)
