"""A small progress bar on stderr for long loops (analyses, sweeps, training)."""
from __future__ import annotations

import os
import sys
import time

__all__ = ["progress"]


def _enabled(stream) -> bool:
    flag = os.environ.get("ATTNSTATS_PROGRESS")
    if flag is not None:
        return flag not in ("0", "", "false", "no")
    return hasattr(stream, "isatty") and stream.isatty()


def progress(iterable, total: int | None = None, desc: str = "", stream=None, min_interval: float = 0.1):
    """Yield from ``iterable`` while drawing ``desc [####....] i/total  elapsed  eta`` on stderr.

    Drawn only when stderr is a terminal, or when the environment variable ``ATTNSTATS_PROGRESS=1``
    forces it (``0`` silences it); otherwise the items pass through untouched.
    """
    stream = stream or sys.stderr
    if total is None:
        try:
            total = len(iterable)
        except TypeError:
            total = None
    if not _enabled(stream):
        yield from iterable
        return
    start = last = time.monotonic()
    width = 28

    def draw(i: int, final: bool = False) -> None:
        elapsed = time.monotonic() - start
        if total:
            frac = i / total
            bar = "#" * int(frac * width) + "." * (width - int(frac * width))
            eta = elapsed / i * (total - i) if i else 0.0
            line = f"\r{desc} [{bar}] {i}/{total}  {elapsed:6.1f}s  eta {eta:6.1f}s"
        else:
            line = f"\r{desc} {i}  {elapsed:6.1f}s"
        stream.write(line + ("\n" if final else ""))
        stream.flush()

    i = 0
    draw(0)
    try:
        for item in iterable:
            yield item
            i += 1
            now = time.monotonic()
            if now - last >= min_interval:
                draw(i)
                last = now
    finally:
        draw(i, final=True)
