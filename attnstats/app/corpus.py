"""Real English text that is always at hand offline: the Python documentation topics that ship with
CPython (module ``pydoc_data.topics``, the text behind ``help("topics")``, about 460k characters).
"""
from __future__ import annotations

import random
import re

__all__ = ["documentation_text", "sentences"]


def documentation_text() -> str:
    """The prose of the Python documentation topics: code examples, tables and markup removed."""
    from pydoc_data.topics import topics

    lines = []
    for name in sorted(topics):
        for line in topics[name].splitlines():
            # prose sits at the left margin; indented lines are code, grammar rules or tables
            if not line or line[0].isspace() or line.startswith(("*", "=", "-", "+", ">>>", "...")):
                continue
            lines.append(line.strip())
    return re.sub(r"\s+", " ", " ".join(lines))


def sentences(n: int = 8, min_words: int = 6, max_words: int = 40, seed: int = 0) -> list[str]:
    """``n`` sentences of the documentation text with ``min_words``…``max_words`` words, drawn
    reproducibly from ``seed`` (different lengths, so a batch of them is padded)."""
    if n < 1:
        raise ValueError(f"n: expected at least 1 sentence, got {n}")
    parts = re.split(r"(?<=[.!?])\s+(?=[A-Z])", documentation_text())
    pool = sorted({s for s in parts if min_words <= len(s.split()) <= max_words and s[-1] in ".!?"})
    if len(pool) < n:
        raise ValueError(f"n: only {len(pool)} sentences have {min_words}–{max_words} words, asked for {n}")
    return random.Random(seed).sample(pool, n)
