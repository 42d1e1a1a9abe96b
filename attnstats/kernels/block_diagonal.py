"""Block-diagonal softmax attention: exact softmax inside consecutive blocks of tokens (docs/theory.md §4)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..budget import check_dense_fits
from ..stats.spectral import spectral_gap as dense_spectral_gap
from ..validation import compute_dtype
from .base import Kernel, _register, check_qk4, check_real, check_qkv, full_mask, matrix_dtype, work_dtype
from .softmax import softmax_matrix

__all__ = ["BlockDiagonalAttention", "block_mask"]


def block_mask(n: int, block: int, device=None) -> torch.Tensor:
    """``[N, N]`` bool, True where tokens ``i`` and ``j`` lie in the same block of ``block`` tokens
    (consecutive, non-overlapping; the remainder forms one last smaller block)."""
    ids = torch.arange(n, device=device) // block
    return ids[:, None] == ids[None, :]


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

    def _valid(self, shape, causal, mask, d, device):
        blocks = block_mask(shape[-1], self.block_size(d), device)
        m = full_mask(mask, shape, causal, device)
        return blocks.expand(shape) if m is None else m & blocks

    def row_has_key(self, q, *, causal: bool = False, mask=None) -> torch.Tensor:
        """``[B, H, N]`` bool: True where the query's block holds at least one key it may attend to."""
        b, h, n, d = q.shape
        m = full_mask(mask, (b, h, n, n), False, q.device)
        if m is None:
            return torch.ones(b, h, n, dtype=torch.bool, device=q.device)
        size = self.block_size(d)
        rows = []
        for s in range(0, n, size):
            e = min(s + size, n)
            mb = m[:, :, s:e, s:e]
            if causal:
                mb = mb & torch.ones(e - s, e - s, dtype=torch.bool, device=q.device).tril()
            rows.append(mb.any(-1))
        return torch.cat(rows, dim=-1)

    def _fallback(self, q, k, v, rows, causal, mask, dtype):
        """Softmax attention rows (``@ v`` when ``v`` is given) for the ``(b, h, i)`` in ``rows [R, 3]``."""
        b, h, n, d = q.shape
        m = full_mask(mask, (b, h, n, n), causal, q.device)
        outs = []
        for s in range(0, rows.shape[0], 256):
            bi, hi, ii = rows[s : s + 256].unbind(-1)
            sc = (q[bi, hi, ii, None, :].to(dtype) @ k[bi, hi].to(dtype).transpose(-2, -1))[:, 0] * self._scale(d)
            p = torch.softmax(sc.masked_fill(~m[bi, hi, ii], float("-inf")), dim=-1)
            outs.append(p if v is None else (p[:, None, :] @ v[bi, hi].to(dtype))[:, 0])
        return torch.cat(outs, 0)

    def _missing_rows(self, q, causal, mask):
        """``(b, h, i)`` of rows with a valid key somewhere but none in their block, ``[R, 3]``."""
        if mask is None:
            return None
        b, h, n, _ = q.shape
        anywhere = full_mask(mask, (b, h, n, n), causal, q.device).any(-1)
        missing = anywhere & ~self.row_has_key(q, causal=causal, mask=mask)
        return torch.nonzero(missing, as_tuple=False) if bool(missing.any()) else None

    def forward(self, q, k, v, *, causal: bool = False, mask=None) -> torch.Tensor:
        """Attention output ``[B, H, N, d_v]``; blocks are computed one by one with SDPA."""
        check_qkv(q, k, v, causal, why="block-diagonal attention")  # blocks pair query i with key i
        b, h, n, d = q.shape
        size = self.block_size(d)
        m = full_mask(mask, (b, h, n, n), False, q.device)
        outs = []
        for s in range(0, n, size):
            e = min(s + size, n)
            qb, kb, vb = q[:, :, s:e], k[:, :, s:e], v[:, :, s:e]
            if m is None:
                outs.append(F.scaled_dot_product_attention(qb, kb, vb, is_causal=causal, scale=self._scale(d)))
                continue
            mb = m[:, :, s:e, s:e]
            if causal:
                mb = mb & torch.ones(e - s, e - s, dtype=torch.bool, device=q.device).tril()
            ob = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=mb, scale=self._scale(d))
            outs.append(torch.where(mb.any(-1)[..., None], ob, torch.zeros((), dtype=ob.dtype, device=ob.device)))
        out = torch.cat(outs, dim=-2)
        rows = self._missing_rows(q, causal, mask)
        if rows is not None:
            bi, hi, ii = rows.unbind(-1)
            out[bi, hi, ii] = self._fallback(q, k, v, rows, causal, mask, work_dtype(out.dtype)).to(out.dtype)
        return out

    def _dense(self, q, k, causal, mask, dtype):
        shape = (q.shape[0], q.shape[1], q.shape[-2], k.shape[-2])
        valid = self._valid(shape, causal, mask, q.shape[-1], q.device)
        p = softmax_matrix(q, k, valid, self._scale(q.shape[-1]), dtype)
        rows = self._missing_rows(q, causal, mask)
        if rows is not None:
            bi, hi, ii = rows.unbind(-1)
            p[bi, hi, ii] = self._fallback(q, k, None, rows, causal, mask, dtype)
        return p

    def matrix(self, q, k, *, causal: bool = False, mask=None) -> torch.Tensor:
        """Dense row-stochastic block-diagonal matrix ``[B, H, N, N]``."""
        check_qk4(q, k, causal, why="block-diagonal attention")
        shape = (q.shape[0], q.shape[1], q.shape[-2], k.shape[-2])
        cd = compute_dtype(q)
        check_dense_fits(shape, torch.finfo(cd).bits // 8, "the block-diagonal attention matrix")
        return self._dense(q, k, causal, mask, cd).to(matrix_dtype(q))

    def spectral_gap(self, q, k, *, causal: bool = False, mask=None) -> torch.Tensor:
        """Spectral gap ``[B, H]`` of the dense matrix (0 whenever there are two or more blocks:
        each block contributes an eigenvalue 1)."""
        check_qk4(q, k, causal, why="block-diagonal attention")
        shape = (q.shape[0], q.shape[1], q.shape[-2], k.shape[-2])
        cd = compute_dtype(q)
        check_dense_fits(shape, torch.finfo(cd).bits // 8, "the block-diagonal attention matrix (for its spectral gap)")
        return dense_spectral_gap(self._dense(q, k, causal, mask, cd), full_mask(mask, shape, causal, q.device))


_register("block_diag", BlockDiagonalAttention)
