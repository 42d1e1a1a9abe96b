"""The memory budget that guards every dense N×N attention matrix.

Building ``P`` costs ``N²`` numbers per head; past the budget (2 GiB by default) attnstats raises
:class:`DenseTooLargeError` instead of running the machine out of memory, and points to the
streaming statistics, which never build ``P``.
"""
from __future__ import annotations

import contextlib
import math

__all__ = ["DenseTooLargeError", "get_memory_budget", "set_memory_budget", "memory_budget", "check_dense_fits"]

DEFAULT_MEMORY_BUDGET = 2 * 1024**3  # bytes

_budget = DEFAULT_MEMORY_BUDGET


class DenseTooLargeError(MemoryError):
    """A dense attention matrix would exceed the memory budget."""


def get_memory_budget() -> int:
    """The current budget in bytes for one dense attention tensor."""
    return _budget


def set_memory_budget(nbytes: int) -> None:
    """Set the budget in bytes for one dense attention tensor (default 2 GiB).

    Args:
        nbytes: a finite number ≥ 1 (int or float, rounded down); a bool is refused (``True`` would
            be a budget of one byte).
    """
    global _budget
    if isinstance(nbytes, bool) or not isinstance(nbytes, (int, float)):
        raise TypeError(f"nbytes: expected a number of bytes (int or float), got {type(nbytes).__name__} {nbytes!r}")
    if not math.isfinite(nbytes) or nbytes < 1:
        raise ValueError(f"nbytes: expected a finite number of bytes >= 1, got {nbytes!r}")
    _budget = int(nbytes)


@contextlib.contextmanager
def memory_budget(nbytes: int):
    """Context manager: use ``nbytes`` as the budget inside the block, restore the old one after."""
    old = _budget
    set_memory_budget(nbytes)
    try:
        yield
    finally:
        set_memory_budget(old)


def check_dense_fits(shape, bytes_per_element: int = 4, what: str = "the dense attention matrix") -> None:
    """Raise :class:`DenseTooLargeError` if a tensor of ``shape`` would exceed the budget."""
    nbytes = math.prod(int(s) for s in shape) * bytes_per_element
    if nbytes > _budget:
        raise DenseTooLargeError(
            f"{what} of shape {tuple(int(s) for s in shape)} needs {nbytes / 1024**3:.2f} GiB, more than the "
            f"memory budget of {_budget / 1024**3:.2f} GiB. Use attnstats.streaming_stats(q, k, ...) for "
            f"statistics that never build the N×N matrix, or raise the budget with "
            f"attnstats.set_memory_budget(nbytes) / attnstats.memory_budget(nbytes)."
        )
