"""Triton kernel for the exact one-sided Smirnov tail of :mod:`attnstats.stats.kolmogorov`.

``S_n(d) = d · Σ_{j ≤ ⌊n(1−d)⌋} C(n, j) (1 − d − j/n)^(n−j) (d + j/n)^(j−1)`` has ``n + 1`` terms per
test; the PyTorch form (``kolmogorov._smirnov_one_n``, the reference) builds ``[T, n + 1]`` float64
tables for them, about 1 ms of passes on an H100 for the 128 fits of 100,000 samples that one
``record(..., store="stats")`` block makes. Here each ``(test, chunk of j)`` program forms its terms in
registers and keeps an online log-sum-exp (running maximum and the sum scaled to it); a few PyTorch
operations merge the chunks. ``ln C(n, j)`` is one row shared by every test of that ``n``, computed by
the caller with ``lgamma`` as in the reference.
"""
from __future__ import annotations

import math

import torch

from ..triton_launch import interpreting, launch, on_device
from .online_triton import _HAVE_TRITON, available

__all__ = ["available", "smirnov_sf_one_n"]

if _HAVE_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _smirnov_kernel(D, LOGB, OUT, N, CHUNKS, CHUNK: tl.constexpr, BLOCK: tl.constexpr):
        # OUT[t, c, :] = (max, Σ exp(term − max)) of the log terms j in chunk c of test t (d = D[t]);
        # LOGB [N + 1] float64 ln C(N, j)
        t = tl.program_id(0)
        c = tl.program_id(1)
        d = tl.load(D + t)
        nf = N.to(tl.float64)
        jmax = tl.floor(nf * (1.0 - d))  # the last term of the sum
        run_max = tl.full([BLOCK], float("-inf"), dtype=tl.float64)
        run_sum = tl.zeros([BLOCK], dtype=tl.float64)
        for j0 in range(c * CHUNK, c * CHUNK + CHUNK, BLOCK):
            j = j0 + tl.arange(0, BLOCK)  # [BLOCK]
            jf = j.to(tl.float64)
            ok = (jf <= jmax) & (j <= N)
            frac = jf / nf
            a = tl.log(tl.maximum(1.0 - frac - d, 0.0)) * (nf - jf)  # −inf where the base is 0: that term is 0
            b = tl.log(frac + d) * (jf - 1.0)
            term = tl.where(ok, a + b + tl.load(LOGB + j, mask=ok, other=0.0), float("-inf"))  # [BLOCK]
            new_max = tl.maximum(run_max, term)
            safe = tl.where(new_max == float("-inf"), 0.0, new_max)  # no term yet: nothing to rescale
            run_sum = run_sum * tl.exp(run_max - safe) + tl.exp(term - safe)
            run_max = new_max
        top = tl.max(run_max, 0)
        safe_top = tl.where(top == float("-inf"), 0.0, top)
        out = OUT + (t * CHUNKS + c) * 2
        tl.store(out, top)
        tl.store(out + 1, tl.sum(run_sum * tl.exp(run_max - safe_top), 0))


def smirnov_sf_one_n(n: int, d: torch.Tensor) -> torch.Tensor:
    """``S_n(d)`` of every ``d: [T]`` float64 (one ``n``), on d's device: ``[T]`` float64 in ``[0, 1]``,
    the numbers of ``kolmogorov._smirnov_one_n`` (float64 log-sum-exp in another order)."""
    if not _HAVE_TRITON:
        raise ImportError("the fused Smirnov sum needs Triton: pip install 'attnstats[triton]'")
    d = d.to(torch.float64).contiguous()
    t = d.shape[0]
    j = torch.arange(n + 1, dtype=torch.float64, device=d.device)
    log_binom = (math.lgamma(n + 1) - torch.lgamma(j + 1) - torch.lgamma(n - j + 1)).contiguous()  # [n + 1]
    chunk, block = (32, 16) if interpreting() else (4096, 256)
    chunks = max(1, triton.cdiv(n + 1, chunk))
    part = torch.empty(t, chunks, 2, dtype=torch.float64, device=d.device)  # [T, C, 2]
    if t:
        with on_device(d):
            launch(_smirnov_kernel, (t, chunks), d, log_binom, part, n, chunks, CHUNK=chunk, BLOCK=block)
    top = part[:, :, 0].amax(1)  # [T]
    safe = torch.where(torch.isinf(top), 0.0, top)
    total = safe + torch.log((part[:, :, 1] * torch.exp(part[:, :, 0] - safe[:, None])).sum(1)) + torch.log(d)
    return total.exp().clamp(0.0, 1.0)
