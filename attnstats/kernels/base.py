"""The common interface of attnstats attention kernels, input checks and the name registry.

A kernel maps queries, keys and values ``q, k: [B, H, N, d]``, ``v: [B, H, N, d_v]`` to the
attention output ``[B, H, N, d_v]`` and exposes, for analysis, the dense row-stochastic matrix it
applies to ``v`` and that matrix's spectral gap. Masks are bool, broadcastable to ``[B, H, N, N]``,
True = attend.
"""
from __future__ import annotations

import math
import numbers

import torch
from torch import nn

from ..masks import full_mask  # the kernels' combined mask: attnstats' one rule for mask + causal
from ..masks import padding_parts as _padding_parts
from ..validation import check_finite, check_tensor

__all__ = [
    "Kernel",
    "get_kernel",
    "check_qkv",
    "check_qk4",
    "full_mask",
    "padding_parts",
    "result_dtype",
    "matrix_dtype",
    "check_real",
    "check_count",
]


class Kernel(nn.Module):
    """Base class of every attnstats attention kernel (an ``nn.Module``, so kernels can learn).

    Subclasses implement :meth:`forward` (the attention output), :meth:`matrix` (the dense
    row-stochastic matrix, guarded by the memory budget) and :meth:`spectral_gap`.
    """

    name: str = "kernel"

    def forward(self, q, k, v, *, causal: bool = False, mask=None) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def matrix(self, q, k, *, causal: bool = False, mask=None) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def spectral_gap(self, q, k, *, causal: bool = False, mask=None) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"name={self.name!r}"


def check_real(value, name: str, *, low: float | None = None, strict: bool = False, none_ok: bool = False):
    """``value`` as a float after checking it is a finite real number (not a bool) ``> low`` (``strict``)
    or ``>= low``; None passes when ``none_ok``. A kernel constant that is NaN or infinite would give
    NaN or uniform attention without any error, so it is refused where the kernel is built.
    """
    if value is None and none_ok:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name}: expected a real number{' or None' if none_ok else ''}, got {type(value).__name__} {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name}: expected a finite number, got {value!r}")
    if low is not None and (value <= low if strict else value < low):
        raise ValueError(f"{name}: expected a number {'>' if strict else '>='} {low}, got {value!r}")
    return value


def check_count(value, name: str, *, low: int = 1, none_ok: bool = True):
    """``value`` unchanged after checking it is an int (not a bool) ``>= low``, or None when ``none_ok``."""
    if value is None and none_ok:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        raise ValueError(f"{name}: expected an int >= {low}{' or None' if none_ok else ''}, got {value!r}")
    return int(value)


def _check_4d(x, name: str) -> torch.Tensor:
    check_tensor(x, name)
    if x.dim() != 4:
        raise ValueError(f"{name}: expected shape [B, H, N, d], got a {x.dim()}-d tensor of shape {tuple(x.shape)}")
    if x.shape[-2] == 0:
        raise ValueError(f"{name}: empty sequence (N = 0), expected N >= 1")
    return x


def check_qk4(q, k, causal: bool = False, square: bool = False, why: str | None = None) -> None:
    """Raise unless ``q: [B, H, N, d]`` and ``k: [B, H, M, d]`` are finite and match.

    ``N == M`` is required when ``causal``, ``square`` (a spectral gap needs a square matrix) or
    ``why`` (what needs it, for the message) is given.
    """
    _check_4d(q, "q")
    _check_4d(k, "k")
    if q.shape[:2] != k.shape[:2]:
        raise ValueError(
            f"q, k: batch and head dims differ, q is {tuple(q.shape)} and k is {tuple(k.shape)}; "
            "expected the same [B, H] (repeat shared key heads before calling a kernel)"
        )
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q, k: head dims differ, q has d = {q.shape[-1]} and k has d = {k.shape[-1]}")
    if (causal or square or why) and q.shape[-2] != k.shape[-2]:
        why = why or ("causal attention" if causal else "a spectral gap")
        raise ValueError(
            f"q, k: {why} needs as many queries as keys, got N = {q.shape[-2]} queries and {k.shape[-2]} keys"
        )
    if q.device != k.device:
        raise ValueError(f"q, k: on different devices, {q.device} and {k.device}")
    check_finite(q, "q")
    check_finite(k, "k")


def check_qkv(q, k, v, causal: bool = False, why: str | None = None) -> None:
    """Raise unless ``q, k, v`` are finite ``[B, H, N, d]``, ``[B, H, M, d]``, ``[B, H, M, d_v]``."""
    check_qk4(q, k, causal=causal, why=why)
    _check_4d(v, "v")
    if v.shape[:2] != k.shape[:2]:
        raise ValueError(f"v: batch and head dims {tuple(v.shape[:2])} differ from k's {tuple(k.shape[:2])}")
    if v.shape[-2] != k.shape[-2]:
        raise ValueError(
            f"v: has N = {v.shape[-2]} tokens but k has {k.shape[-2]}; expected one value per key"
        )
    if v.device != k.device:
        raise ValueError(f"v: on device {v.device}, expected k's device {k.device}")
    check_finite(v, "v")


def result_dtype(*xs: torch.Tensor) -> torch.dtype:
    """dtype of a kernel's output: the promoted dtype of its inputs."""
    dt = xs[0].dtype
    for x in xs[1:]:
        dt = torch.promote_types(dt, x.dtype)
    return dt


def work_dtype(dt: torch.dtype) -> torch.dtype:
    """dtype the output path computes in: float32 for half inputs (and float32), float64 for float64."""
    return torch.float64 if dt == torch.float64 else torch.float32


def matrix_dtype(q: torch.Tensor) -> torch.dtype:
    """dtype of :meth:`Kernel.matrix`: float64 for float64 input, float32 otherwise."""
    return torch.float64 if q.dtype == torch.float64 else torch.float32


def padding_parts(mask, shape, causal: bool, kernel: str):
    """``(query_valid [B, H, N] | None, key_valid [B, H, M] | None)`` of a padding mask for the
    linearised ``kernel``: features factorise ``P``, so a mask may only remove tokens (see
    :func:`attnstats.masks.padding_parts`, which names the first entry of any other mask)."""
    return _padding_parts(mask, shape, causal, user=f"kernel {kernel!r} is linearised and")


# name -> (constructor, fixed keyword arguments); filled by the kernel modules through _register, and
# the one list of kernel names (attnstats.kernels.KERNEL_NAMES is read from it)
_REGISTRY: dict = {}


def _register(name: str, factory, **fixed) -> None:
    _REGISTRY[name] = (factory, fixed)


def get_kernel(name: str, **kwargs) -> Kernel:
    """A new kernel by name (one of :data:`KERNEL_NAMES`), with keyword arguments for its class.

    ``softmax`` → :class:`SoftmaxAttention`; ``lln`` → :class:`LLNAttention`; ``lln_no_mm`` →
    LLN with ``α = β = 1``; ``block_diag`` → :class:`BlockDiagonalAttention`; ``lln_diag`` →
    :class:`LLNPlusDiagAttention`; ``relu``, ``elu_plus_one``, ``exp``, ``performer`` →
    :class:`LinearAttention` with that feature map.
    """
    if not isinstance(name, str):
        raise TypeError(f"name: expected a kernel name (str), got {type(name).__name__}")
    if name not in _REGISTRY:
        raise ValueError(f"name: unknown kernel {name!r}, expected one of {', '.join(sorted(_REGISTRY))}")
    factory, fixed = _REGISTRY[name]
    clash = sorted(set(fixed) & set(kwargs))
    if clash:
        raise ValueError(f"{clash[0]}: fixed by kernel name {name!r} ({clash[0]}={fixed[clash[0]]!r}), cannot be set")
    return factory(**fixed, **kwargs)
