"""Which entries of an attention matrix the log-normal fit samples, the same on every device.

When a matrix has more valid entries than ``max_samples``, the fit of ``ln P`` takes ``max_samples``
of them. The dense path (:func:`attnstats.stats.lognormal.log_entries`) and the streaming one
(:func:`attnstats.sample_log_probs`) must take the same entries, on the CPU and on a GPU, for a whole
batch or one batch element at a time. So the draw is a pure function of ``(seed, matrix index,
count, size)``, computed with integer arithmetic that every device does alike.

The design is stratified: the ``count`` valid entries, enumerated in row-major order, are cut into
``size`` consecutive runs of (nearly) equal length, and one entry is drawn uniformly from each run.
Every entry is taken with probability ``size / count`` (to within one part in the run length), no
entry twice, the ranks come out sorted, and the sample spreads over the whole matrix (each run is a
stretch of rows). The uniform numbers come from a counter-based hash (Wellons' ``lowbias32``,
applied to the counter and keys derived from the seed and the matrix index), so that drawing the
sample of a matrix on a GPU is a handful of elementwise operations on ``size`` integers, with no
generator state and no host round trip.
"""
from __future__ import annotations

import functools

import torch

__all__ = ["check_sampling", "hash32", "seed_base", "matrix_keys", "sample_ranks"]

_MASK32 = 0xFFFFFFFF


def check_sampling(max_samples, seed) -> None:
    """Raise unless ``max_samples`` is an int ≥ 3 and ``seed`` an int ≥ 0 (bools are neither)."""
    if isinstance(max_samples, bool) or not isinstance(max_samples, int) or max_samples < 3:
        raise ValueError(f"max_samples: expected an int >= 3, got {max_samples!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed: expected an int >= 0, got {seed!r}")


def _mul32(x: torch.Tensor, a: int) -> torch.Tensor:
    # (x·a) mod 2³² for x in [0, 2³²) held in int64, without overflowing int64: the high half of x
    # contributes only the low 16 bits of x_hi·a_lo, shifted by 16.
    lo = (x & 0xFFFF) * a
    hi = ((x >> 16) * (a & 0xFFFF)) & 0xFFFF
    return (lo + (hi << 16)) & _MASK32


def hash32(x: torch.Tensor) -> torch.Tensor:
    """Wellons' ``lowbias32`` integer hash of ``x`` (int64 holding values in ``[0, 2³²)``), elementwise."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


@functools.lru_cache(maxsize=256)  # a pure function of an int; ~20 small torch calls on the host each time
def seed_base(seed: int) -> int:
    """The 32-bit key of a seed (any size, folded to 64 bits), from which each matrix's keys derive."""
    s = int(seed) & ((1 << 64) - 1)
    lo, hi = torch.tensor([s & _MASK32]), torch.tensor([((s >> 32) + 0x9E3779B9) & _MASK32])
    return int(hash32(lo ^ hash32(hi))[0])


def matrix_keys(seed: int, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Two 32-bit keys ``[M]`` per matrix from the seed and the matrix index ``index: [M]`` (int64)."""
    a = hash32(seed_base(seed) ^ (index & _MASK32))
    b = hash32((a + 0x7F4A7C15 + (index >> 32)) & _MASK32)
    return a, b


def _uniform53(a: torch.Tensor, b: torch.Tensor, counter: torch.Tensor) -> torch.Tensor:
    """Uniform float64 in ``[0, 1)`` with 53 random bits for each (key, counter) pair (broadcast)."""
    hi = hash32((hash32(counter ^ a) + 0x165667B1) & _MASK32) >> 11  # 21 bits
    lo = hash32(counter ^ b)  # 32 bits
    return ((hi << 32) | lo).to(torch.float64) * 2.0**-53


def sample_ranks(count: int, size: int, seed: int, index, device=None) -> torch.Tensor:
    """Ranks (0-based, in the row-major enumeration of a matrix's valid entries) that the fit samples.

    Args:
        count: valid entries per matrix (int ≥ 0).
        size: entries to take, ``max_samples`` (int ≥ 1).
        seed: seed of the sample (int ≥ 0).
        index: flat batch index of the matrix (int), or a 1-d int64 tensor ``[M]`` of them.
        device: where the ranks are built (default: the index tensor's device, else the CPU).

    Returns:
        int64 ranks, sorted and distinct: ``[k]`` for an int ``index``, ``[M, k]`` for a tensor, with
        ``k = min(count, size)``. ``count ≤ size`` gives every rank ``0 … count−1``. Otherwise one
        rank uniformly from each of the ``size`` runs ``[⌊i·count/size⌋, ⌊(i+1)·count/size⌋)``.
    """
    single = not isinstance(index, torch.Tensor)
    idx = torch.as_tensor([index] if single else index, dtype=torch.int64, device=device)
    if idx.dim() != 1:
        raise ValueError(f"index: expected an int or a 1-d tensor, got shape {tuple(idx.shape)}")
    if count <= size:
        out = torch.arange(count, device=idx.device).expand(idx.numel(), count)
        return out[0] if single else out
    i = torch.arange(size, device=idx.device, dtype=torch.int64)  # [S] run
    # exact run bounds in int64: i·count < 2⁶³ for any count and size a tensor could index
    start = (i * count) // size  # [S]
    length = ((i + 1) * count) // size - start  # [S] ≥ 1 since count > size
    a, b = matrix_keys(seed, idx)  # [M] each
    u = _uniform53(a[:, None], b[:, None], i[None, :])  # [M, S]
    offset = torch.minimum((u * length).to(torch.int64), length - 1)  # [M, S] rounding never reaches the next run
    out = start + offset
    return out[0] if single else out
