"""Kernels evaluated alongside the captured softmax attention: ``record(model, alongside=["lln", "relu"])``.

Each kernel of :mod:`attnstats.kernels` runs on the record's own q and k, with the record's causal flag
and its statistics mask (:meth:`AttentionRecord.stats_mask`: key padding, pad-token queries removed),
so that SA and, say, LLN statistics of the same layer and head sit side by side in
:meth:`Recorder.frame` (column ``kernel``). Linearised kernels accept only such padding masks (plus
causality); an attention bias or softcap of the captured layer is not applied to them.
"""
from __future__ import annotations

__all__ = ["resolve_kernels"]


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
