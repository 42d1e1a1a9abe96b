"""Attention kernels that run on captured queries and keys: softmax, LLN, block-diagonal, LLN+Diag,
and linearised attention with ReLU, elu+1, exp and Performer (FAVOR+) feature maps.

Every kernel maps ``q, k: [B, H, N, d]``, ``v: [B, H, N, d_v]`` to ``[B, H, N, d_v]`` and exposes
``matrix(q, k)`` (dense row-stochastic ``[B, H, N, N]``) and ``spectral_gap(q, k)`` (``[B, H]``).
Get one by name with :func:`get_kernel`; :data:`KERNEL_NAMES` lists the names.
"""
from .base import _REGISTRY, Kernel, get_kernel
from .block_diagonal import BlockDiagonalAttention
from .linear import FEATURE_MAPS, LinearAttention
from .lln import LLNAttention
from .lln_diag import LLN_DIAG_MODES, LLNPlusDiagAttention
from .moment_matching import MomentMatching, fit_moment_matching
from .softmax import SoftmaxAttention
from .swap import KernelSwap, use_kernel

# the names get_kernel accepts, sorted: read from its registry, which the kernel modules imported above fill
KERNEL_NAMES: tuple[str, ...] = tuple(sorted(_REGISTRY))

__all__ = [
    "KERNEL_NAMES",
    "FEATURE_MAPS",
    "LLN_DIAG_MODES",
    "Kernel",
    "get_kernel",
    "SoftmaxAttention",
    "LLNAttention",
    "BlockDiagonalAttention",
    "LLNPlusDiagAttention",
    "LinearAttention",
    "fit_moment_matching",
    "MomentMatching",
    "use_kernel",
    "KernelSwap",
]
