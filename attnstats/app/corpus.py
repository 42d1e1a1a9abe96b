"""Corpora: real English text that is always at hand offline, and a user's corpus read from files.

The default corpus is the Python documentation topics that ship with CPython (module
``pydoc_data.topics``, the text behind ``help("topics")``, about 460k characters):
:func:`documentation_corpus` gives one document per topic, :func:`sentences` short sentences of it.
:func:`read_corpus` reads a user's corpus: a text file, a folder of them, JSONL, Parquet, or a dataset
saved by the ``datasets`` library.
"""
from __future__ import annotations

import random
import re

__all__ = ["CorpusError", "documentation_text", "documentation_corpus", "sentences", "read_corpus"]


class CorpusError(ValueError):
    """A corpus that cannot be read: ``argument`` (``"corpus"``, ``"text_field"``) and what is wrong."""

    def __init__(self, argument: str, detail: str):
        self.argument, self.detail = argument, detail
        super().__init__(f"{argument}: {detail}")


def _prose(text: str) -> str:
    lines = []
    for line in text.splitlines():
        # prose sits at the left margin; indented lines are code, grammar rules or tables
        if not line or line[0].isspace() or line.startswith(("*", "=", "-", "+", ">>>", "...")):
            continue
        lines.append(line.strip())
    return re.sub(r"\s+", " ", " ".join(lines)).strip()


def documentation_text() -> str:
    """The prose of the Python documentation topics: code examples, tables and markup removed."""
    from pydoc_data.topics import topics

    return re.sub(r"\s+", " ", " ".join(_prose(topics[name]) for name in sorted(topics))).strip()


def documentation_corpus() -> list[str]:
    """The documentation topics as a corpus: one document per topic (its prose), in name order."""
    from pydoc_data.topics import topics

    docs = [_prose(topics[name]) for name in sorted(topics)]
    return [d for d in docs if d]


def read_corpus(path, text_field: str = "text") -> list[str]:
    """Documents of a corpus on disk, in a fixed order.

    ``path`` is one of: a UTF-8 text file (``.txt``, ``.md``; documents separated by blank lines); a
    JSONL file (one JSON object per line, the document under ``text_field``); a Parquet file (column
    ``text_field``, read with pyarrow); a dataset saved with ``datasets.Dataset.save_to_disk`` (a folder
    with ``dataset_info.json``; column ``text_field``; a saved ``DatasetDict`` is refused, naming its
    splits); or a folder, whose files of those kinds are read
    in sorted path order. Empty documents are left out.

    Raises:
        CorpusError: a missing path, an unknown format, an unreadable file, a missing ``text_field``
            (naming the file and line or the columns there are), or a corpus with no text.
    """
    from pathlib import Path

    p = Path(path)
    if not p.exists():
        raise CorpusError("corpus", f"no such file or folder: {p}")
    if p.is_dir() and ((p / "dataset_info.json").is_file() or (p / "dataset_dict.json").is_file()):
        docs = _read_saved_dataset(p, text_field)
    elif p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in _READERS)
        if not files:
            raise CorpusError("corpus", f"{p} holds no .txt, .md, .jsonl or .parquet file")
        docs = [d for f in files for d in _READERS[f.suffix.lower()](f, text_field)]
    elif p.suffix.lower() in _READERS:
        docs = _READERS[p.suffix.lower()](p, text_field)
    else:
        raise CorpusError("corpus", f"{p}: unknown format {p.suffix or '(no suffix)'}; expected .txt, .md, .jsonl, "
                                    ".parquet, a folder of them, or a dataset saved with datasets")
    docs = [d for d in (x.strip() for x in docs) if d]
    if not docs:
        raise CorpusError("corpus", f"{p} holds no text")
    return docs


def _read_text(path, text_field) -> list[str]:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise CorpusError("corpus", f"{path} is not UTF-8 text") from None
    return re.split(r"\n\s*\n", text)


def _read_jsonl(path, text_field) -> list[str]:
    import json

    docs = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                raise CorpusError("corpus", f"{path}, line {number}: not JSON ({err.msg})") from None
            if not isinstance(obj, dict) or text_field not in obj:
                keys = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
                raise CorpusError("text_field", f"{path}, line {number}: no field {text_field!r} (fields: {keys})")
            if not isinstance(obj[text_field], str):
                raise CorpusError("text_field", f"{path}, line {number}: field {text_field!r} is "
                                                f"{type(obj[text_field]).__name__}, expected text")
            docs.append(obj[text_field])
    return docs


def _read_parquet(path, text_field) -> list[str]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise CorpusError("corpus", f"{path}: reading Parquet needs pyarrow: pip install 'attnstats[corpus]'") from None
    try:
        names = pq.read_schema(path).names
        if text_field not in names:
            raise CorpusError("text_field", f"{path}: no column {text_field!r} (columns: {names})")
        column = pq.read_table(path, columns=[text_field]).column(0).to_pylist()
    except CorpusError:
        raise
    except Exception as err:  # pyarrow's errors for a damaged file
        raise CorpusError("corpus", f"{path}: not a readable Parquet file ({str(err).splitlines()[0]})") from None
    return [x for x in column if isinstance(x, str)]


def _read_saved_dataset(path, text_field) -> list[str]:
    try:
        import datasets
    except ImportError:
        raise CorpusError("corpus", f"{path} is a saved dataset; reading it needs the datasets library: "
                                    "pip install datasets") from None
    ds = datasets.load_from_disk(str(path))
    if isinstance(ds, datasets.DatasetDict):
        raise CorpusError("corpus", f"{path} holds the splits {list(ds)}; give the folder of one split")
    if text_field not in ds.column_names:
        raise CorpusError("text_field", f"{path}: no column {text_field!r} (columns: {ds.column_names})")
    return [x for x in ds[text_field] if isinstance(x, str)]


_READERS = {".txt": _read_text, ".md": _read_text, ".jsonl": _read_jsonl, ".parquet": _read_parquet}


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
