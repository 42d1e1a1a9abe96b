"""Progress bars on stderr for long loops (analyses, sweeps, training): a thin wrapper over tqdm.

Bars are drawn when stderr is a terminal; the environment variable ``ATTNSTATS_PROGRESS=1`` forces
them (also into a log file or a pipe) and ``ATTNSTATS_PROGRESS=0`` silences them.
"""
from __future__ import annotations

import os
import sys

from tqdm import tqdm

__all__ = ["progress", "progress_enabled"]


def progress_enabled(stream=None) -> bool:
    """Whether a bar is drawn on ``stream`` (default stderr): ``ATTNSTATS_PROGRESS`` if set, else
    whether ``stream`` is a terminal."""
    stream = stream or sys.stderr
    flag = os.environ.get("ATTNSTATS_PROGRESS")
    if flag is not None:
        return flag.strip().lower() not in ("0", "", "false", "no", "off")
    return hasattr(stream, "isatty") and stream.isatty()


_enabled = progress_enabled  # the name callers used before


def progress(iterable=None, total: int | None = None, desc: str = "", stream=None, min_interval: float = 0.1,
             **options) -> tqdm:
    """A tqdm bar over ``iterable`` (or, with ``iterable=None``, one advanced by ``.update(n)``).

    Iterating yields the items of ``iterable`` whether or not the bar is drawn; it is drawn on
    ``stream`` (default stderr) only when :func:`progress_enabled` says so. ``total`` defaults to
    ``len(iterable)``; ``min_interval`` is the least time between redraws in seconds; ``options`` go to
    ``tqdm`` (``unit=``, ``leave=``, ...). Use it as an iterator or as a context manager.
    """
    stream = stream or sys.stderr
    return tqdm(iterable, total=total, desc=desc or None, file=stream, mininterval=min_interval,
                disable=not progress_enabled(stream), dynamic_ncols=True, **options)
