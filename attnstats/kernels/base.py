"""The common interface of attnstats attention kernels, input checks and the name registry.

A kernel maps queries, keys and values ``q, k: [B, H, N, d]``, ``v: [B, H, N, d_v]`` to the
attention output ``[B, H, N, d_v]`` and exposes, for analysis, the dense row-stochastic matrix it
applies to ``v`` and that matrix's spectral gap. Masks are bool, broadcastable to ``[B, H, N, N]``,
True = attend.

The kernel template. :class:`Kernel` owns everything that is the same for every kernel: the checks
of ``q, k``, the memory budget, the dtype policy (compute in :func:`attnstats.validation.compute_dtype`,
return :func:`matrix_dtype`) and the dispatch of :meth:`Kernel.matrix` and :meth:`Kernel.spectral_gap`.
A kernel writes only its mathematics:

- ``forward(q, k, v, *, causal=False, mask=None)``: the output; it starts with :func:`check_qkv` and
  picks its own output dtype (:func:`result_dtype`, :func:`work_dtype`);
- ``_matrix(q, k, valid, *, causal, dtype)``: the dense matrix ``[B, H, N, M]`` in ``dtype``;
- ``_gap(q, k, valid, *, causal, dtype)`` (optional): the spectral gap ``[B, H]``; by default the
  dense gap of ``_matrix``, after a budget check;
- ``_valid(mask, shape, causal, device)`` (optional): what ``_matrix`` and ``_gap`` receive as
  ``valid``; by default :func:`full_mask`, the bool ``[B, H, N, M]`` of ``mask`` and the causal rule
  (or None when every entry is valid). Linearised kernels take padding parts instead.

A minimal kernel, uniform attention over the valid keys::

    class UniformAttention(Kernel):
        name = "uniform"

        def forward(self, q, k, v, *, causal=False, mask=None):
            check_qkv(q, k, v, causal)
            p = self.matrix(q, k, causal=causal, mask=mask)  # [B, H, N, M]
            return (p @ v.to(p.dtype)).to(result_dtype(q, k, v))  # [B, H, N, d_v]

        def _matrix(self, q, k, valid, *, causal, dtype):
            shape = (q.shape[0], q.shape[1], q.shape[-2], k.shape[-2])
            w = torch.ones(shape, dtype=dtype, device=q.device)  # [B, H, N, M]
            if valid is not None:
                w = w * valid
            return w / w.sum(-1, keepdim=True).clamp_min(1)  # rows with no valid key stay 0

Register it under a name with ``_register("uniform", UniformAttention)`` so that :func:`get_kernel`
finds it. tests/test_kernels.py runs this very kernel through the template.
"""
from __future__ import annotations

import math
import numbers

import torch
from torch import nn

from ..budget import check_dense_fits
from ..masks import full_mask  # the kernels' combined mask: attnstats' one rule for mask + causal
from ..masks import padding_parts as _padding_parts
from ..stats.spectral import spectral_gap as dense_spectral_gap
from ..validation import check_finite, check_tensor, compute_dtype

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

    Subclasses write :meth:`forward` and ``_matrix`` (and may write ``_gap`` and ``_valid``); the
    public :meth:`matrix` and :meth:`spectral_gap` are written once, here (see the module docstring
    for the template and a minimal kernel).

    Attributes:
        name: the kernel's name (:data:`KERNEL_NAMES`), used in messages.
        pairs_tokens: what, besides causal attention and a spectral gap, makes the kernel pair query
            ``i`` with key ``i`` (so ``N == M`` is required), for the message; None when nothing does.
    """

    name: str = "kernel"
    pairs_tokens: str | None = None

    def forward(self, q, k, v, *, causal: bool = False, mask=None) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def _matrix(self, q, k, valid, *, causal: bool, dtype: torch.dtype) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def _valid(self, mask, shape, causal: bool, device):
        """The mask as ``_matrix`` and ``_gap`` take it: bool ``[B, H, N, M]`` (mask and causal rule
        combined) or None when every entry is valid."""
        return full_mask(mask, shape, causal, device)

    def _gap(self, q, k, valid, *, causal: bool, dtype: torch.dtype) -> torch.Tensor:
        """Spectral gap ``[B, H]`` of the dense ``_matrix``; ``valid`` must be :func:`full_mask`'s."""
        shape = (q.shape[0], q.shape[1], q.shape[-2], k.shape[-2])
        # the matrix and the eigen-solver's copy of it are each this large
        check_dense_fits(shape, torch.finfo(dtype).bits // 8, f"the {self.name} attention matrix (for its spectral gap)")
        return dense_spectral_gap(self._matrix(q, k, valid, causal=causal, dtype=dtype), valid)

    def matrix(self, q, k, *, causal: bool = False, mask=None, **options) -> torch.Tensor:
        """Dense row-stochastic ``[B, H, N, M]`` (float64 for float64 input, else float32), guarded by
        the memory budget; rows with no valid key are 0. ``options`` go to the kernel's ``_matrix``."""
        check_qk4(q, k, causal, why=self.pairs_tokens)
        shape = (q.shape[0], q.shape[1], q.shape[-2], k.shape[-2])
        dtype = compute_dtype(q)
        check_dense_fits(shape, torch.finfo(dtype).bits // 8, f"the {self.name} attention matrix")
        valid = self._valid(mask, shape, causal, q.device)
        return self._matrix(q, k, valid, causal=causal, dtype=dtype, **options).to(matrix_dtype(q))

    def spectral_gap(self, q, k, *, causal: bool = False, mask=None, **options) -> torch.Tensor:
        """Spectral gap ``1 − |λ_2|`` ``[B, H]`` of :meth:`matrix` (needs ``N == M``), computed in
        :func:`attnstats.validation.compute_dtype`. ``options`` go to the kernel's ``_gap``."""
        check_qk4(q, k, causal, square=True, why=self.pairs_tokens)
        shape = (q.shape[0], q.shape[1], q.shape[-2], k.shape[-2])
        valid = self._valid(mask, shape, causal, q.device)
        return self._gap(q, k, valid, causal=causal, dtype=compute_dtype(q), **options)

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


def check_qk4(q, k, causal: bool = False, square: bool = False, why: str | None = None, finite: bool = True) -> None:
    """Raise unless ``q: [B, H, N, d]`` and ``k: [B, H, M, d]`` are finite and match.

    ``N == M`` is required when ``causal``, ``square`` (a spectral gap needs a square matrix) or
    ``why`` (what needs it, for the message) is given. ``finite=False`` leaves the finiteness check to
    the caller (:func:`check_qkv` checks q, k, v with one device sync).
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
    if finite:
        check_all_finite(q=q, k=k)


def check_all_finite(**tensors: torch.Tensor) -> None:
    """Raise naming the first tensor (by keyword) and index holding NaN or Inf; one host sync for all."""
    flags = [torch.isfinite(x).all() for x in tensors.values()]  # 0-dim bool tensors, still on the device
    if bool(torch.stack(flags).all()):
        return
    for name, x in tensors.items():
        check_finite(x, name)


def check_qkv(q, k, v, causal: bool = False, why: str | None = None, finite: bool = True) -> None:
    """Raise unless ``q, k, v`` are finite ``[B, H, N, d]``, ``[B, H, M, d]``, ``[B, H, M, d_v]``.

    ``finite=False`` checks shapes and devices only: the caller checks finiteness itself (LLN reads it
    off σ_q, σ_k in the one transfer its temperatures need)."""
    check_qk4(q, k, causal=causal, why=why, finite=False)
    _check_4d(v, "v")
    if v.shape[:2] != k.shape[:2]:
        raise ValueError(f"v: batch and head dims {tuple(v.shape[:2])} differ from k's {tuple(k.shape[:2])}")
    if v.shape[-2] != k.shape[-2]:
        raise ValueError(
            f"v: has N = {v.shape[-2]} tokens but k has {k.shape[-2]}; expected one value per key"
        )
    if v.device != k.device:
        raise ValueError(f"v: on device {v.device}, expected k's device {k.device}")
    if finite:
        check_all_finite(q=q, k=k, v=v)


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
