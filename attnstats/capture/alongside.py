"""Kernels evaluated alongside the captured softmax attention: ``record(model, alongside=["lln", "relu"])``.

Each kernel of :mod:`attnstats.kernels` runs on the record's own q and k, with the record's causal flag
and its statistics mask (:meth:`AttentionRecord.stats_mask`: key padding, pad-token queries removed),
so that SA and, say, LLN statistics of the same layer and head sit side by side in
:meth:`Recorder.frame` (column ``kernel``). Linearised kernels accept only such padding masks (plus
causality); an attention bias or softcap of the captured layer is not applied to them.
"""
from __future__ import annotations

import torch

from ..validation import compute_dtype

__all__ = ["resolve_kernels", "kernel_probs", "kernel_gap"]


def resolve_kernels(alongside) -> list:
    """``alongside`` (names or kernel objects) as a list of kernel objects with distinct names."""
    if alongside is None:
        return []
    if isinstance(alongside, str):
        alongside = [alongside]
    from ..kernels import get_kernel

    kernels, names = [], set()
    for i, item in enumerate(alongside):
        if isinstance(item, str):
            kernel = get_kernel(item)
        elif callable(getattr(item, "matrix", None)) and hasattr(item, "name"):
            kernel = item
        else:
            raise TypeError(
                f"alongside[{i}]: expected a kernel name (see attnstats.kernels.KERNEL_NAMES) or a kernel with "
                f".name and .matrix(q, k, causal=, mask=), got {type(item).__name__}"
            )
        if kernel.name in names:
            raise ValueError(f"alongside[{i}]: kernel name {kernel.name!r} appears twice; names label the frame rows")
        names.add(kernel.name)
        kernels.append(kernel)
    return kernels


def _resolve(kernel):
    if isinstance(kernel, str):
        from ..kernels import get_kernel

        return get_kernel(kernel)
    return kernel


def _qk(rec):
    b = rec.shape[0]
    q = rec.q.expand(b, *rec.q.shape[1:])
    k = rec.k.expand(b, *rec.k.shape[1:])
    dtype = compute_dtype(q)
    return q.to(dtype), k.to(dtype)


def kernel_probs(rec, kernel) -> torch.Tensor:
    """``kernel.matrix`` on the record's q, k: ``[B, H, Nq, Nk]`` row-stochastic over valid entries."""
    kernel = _resolve(kernel)
    q, k = _qk(rec)
    with torch.no_grad():
        return kernel.matrix(q, k, causal=rec.is_causal, mask=rec.stats_mask())


def kernel_gap(rec, kernel) -> torch.Tensor:
    """``kernel.spectral_gap`` on the record's q, k: ``[B, H]`` (exact r×r rule for linearised kernels)."""
    kernel = _resolve(kernel)
    q, k = _qk(rec)
    with torch.no_grad():
        return kernel.spectral_gap(q, k, causal=rec.is_causal, mask=rec.stats_mask())
