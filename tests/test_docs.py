"""Every file the documentation names exists in the repository.

Read: every *.md file git knows of (tracked or new, not ignored), every docstring and comment of
attnstats/, the docstrings of the scripts in analyses/ and benchmarks/, and the ``--help`` text of
the ``attnstats`` command and of each subcommand. A path-like token (``docs/theory.md``,
``figures/x.png``, ``benchmarks/results/x.json``, ``tests/test_x.py::test_name``) must name a file
of the repository, relative to its root or, in a Markdown file, to that file's folder (as Markdown
links resolve); a ``::name`` after a test file must be a test in it. A bare name without a folder is
checked only when it is a Markdown file: ``stats.csv`` or ``dense.py`` alone name an output file or a
module of a folder the text names nearby. Not checked: URLs, globs and templates (``*``, ``<name>``,
``{x}``, ``$VAR``), and output the user makes: paths under attnstats-out/, figures-quick/, out/,
DIR/, /tmp, and the value of an ``--out`` or ``--csv`` option.
"""
import argparse
import ast
import io
import re
import subprocess
import tokenize
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

EXTENSIONS = "py|md|png|jpg|svg|pdf|json|csv|txt|log|toml|yaml|yml|cfg|ini|sh|ipynb|npz|npy|pt"
# A run of path characters ending in a known extension, not inside a longer word (``r.q.shape``,
# ``torch.log(x)`` and ``st.log_var`` are attributes, not files), with optional ``::test`` parts.
PATH = re.compile(
    r"(?<![\w\-./<>{}*$~])(?P<path>[\w\-./<>{}*$~]+\.(?:%s))(?P<node>(?:::[\w\-\[\].]+)*)(?![\w(/])" % EXTENSIONS
)
URL = re.compile(r"\w+://\S+")
TEMPLATE = set("<>{}*$~")
OUTPUT_PREFIXES = ("attnstats-out/", "figures-quick/", "out/", "DIR/", "/tmp/")
OUTPUT_OPTION = re.compile(r"--(?:out|csv)[ =]$")
# The theory document is docs/theory.md; these names are not in the repository.
FORBIDDEN = ("THEORY" + ".md", ".." + "/shared")


def markdown_files() -> list:
    try:
        out = subprocess.run(
            ["git", "ls-files", "--cached", "--others", "--exclude-standard", "*.md"],
            cwd=ROOT, capture_output=True, text=True, check=True,
        ).stdout.split()
    except (OSError, subprocess.CalledProcessError):  # not a git checkout: every .md but hidden folders
        out = [
            p.relative_to(ROOT).as_posix() for p in ROOT.rglob("*.md")
            if not any(part.startswith(".") or part.endswith(".egg-info") for part in p.relative_to(ROOT).parts)
        ]
    return sorted(f for f in out if (ROOT / f).is_file())


def docstrings(path: Path, comments: bool) -> list:
    """``(line, text)`` of each module, class and function docstring of ``path`` (and its comments)."""
    src = path.read_text(encoding="utf-8")
    out = []
    for node in ast.walk(ast.parse(src, filename=str(path))):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node, clean=False)
            if doc:
                out.append((node.body[0].lineno, doc))
    if comments:
        for tok in tokenize.generate_tokens(io.StringIO(src).readline):
            if tok.type == tokenize.COMMENT:
                out.append((tok.start[0], tok.string))
    return out


def help_texts() -> list:
    from attnstats.app.cli import build_parser

    parser = build_parser()
    out = [("attnstats --help", parser.format_help())]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                out.append((f"attnstats {name} --help", sub.format_help()))
    return out


def sources() -> dict:
    """``{file: [(where, folder it lives in or None, text)]}`` for the Markdown files and docstrings."""
    out = {}
    for name in markdown_files():
        out[name] = [(name, (ROOT / name).parent, (ROOT / name).read_text(encoding="utf-8"))]
    for folder, comments in (("attnstats", True), ("analyses", False), ("benchmarks", False)):
        for path in sorted((ROOT / folder).rglob("*.py")):
            if "__pycache__" in path.parts:
                continue
            rel = path.relative_to(ROOT).as_posix()
            out[rel] = [(f"{rel}:{line}", None, text) for line, text in docstrings(path, comments)]
    return out


def functions_of(path: Path) -> set:
    """``name`` and ``Class::name`` of every function and class of a test file."""
    names = set()
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        if isinstance(node, ast.ClassDef):
            names.update(f"{node.name}::{m.name}" for m in node.body if isinstance(m, ast.FunctionDef))
    return names


def broken_references(text: str, folder) -> list:
    """The path-like tokens of ``text`` that name no file of the repository, with why."""
    text = URL.sub(" ", text)
    bad = []
    for m in PATH.finditer(text):
        path, node = m.group("path"), m.group("node")
        if TEMPLATE & set(path) or path.startswith(OUTPUT_PREFIXES) or OUTPUT_OPTION.search(text[: m.start()]):
            continue
        path = path.removeprefix("./")
        if "/" not in path and not path.endswith(".md"):
            continue
        if path.startswith("/"):
            bad.append(f"{path}: an absolute path, not a file of the repository")
            continue
        candidates = [ROOT / path] + ([folder / path] if folder is not None else [])
        found = next((c for c in candidates if c.is_file()), None)
        if found is None:
            bad.append(f"{path}: no such file")
        elif node:
            test = node[2:]
            test = re.sub(r"\[.*$", "", test)  # a parametrised id names the same function
            if test not in functions_of(found):
                bad.append(f"{path}{node}: no test {test!r} in {path}")
    return bad


SOURCES = sources()


def test_reads_every_kind_of_source():
    assert {"README.md", "docs/theory.md", "benchmarks/RESULTS.md", "attnstats/stats/spectral.py"} <= set(SOURCES)
    assert any(w.startswith("attnstats/stats/") and texts for w, texts in SOURCES.items())


def test_checker_finds_what_it_should():
    # the rules themselves, on text whose answer is known
    assert broken_references("see docs/theory.md and tests/test_docs.py::test_checker_finds_what_it_should", None) == []
    assert broken_references("the tiles in `attnstats/streaming_triton.py`.", None) == [
        "attnstats/streaming_triton.py: no such file"
    ]
    assert broken_references("tests/test_docs.py::test_gone[3]", None) == [
        "tests/test_docs.py::test_gone[3]: no test 'test_gone' in tests/test_docs.py"
    ]
    assert broken_references("NOTES.md", None) == ["NOTES.md: no such file"]
    ignored = (
        "https://example.org/a/b.py, figures/<name>.png, analyses/*.py, attnstats-out/stats.csv, "
        "figures-quick/x.png, /tmp/x.json, $OUT/x.json, --out results/x.json, stats.csv, dense.py, "
        "r.q.shape, torch.log(x), m.log_var"
    )
    assert broken_references(ignored, None) == []
    # Markdown links resolve from the file's folder
    assert broken_references("results/gap_cpu_run1.json", ROOT / "benchmarks") == []


@pytest.mark.parametrize("source", sorted(SOURCES))
def test_named_files_exist(source):
    bad = [f"{where}: {b}" for where, folder, text in SOURCES[source] for b in broken_references(text, folder)]
    assert not bad, "files the repository does not hold:\n" + "\n".join(bad)


def test_help_names_existing_files():
    # imported here, not at collection: a command that fails to import fails this test alone
    texts = help_texts()
    assert {w for w, _ in texts} >= {"attnstats analyze --help", "attnstats reproduce --help", "attnstats validate --help"}
    bad = [f"{where}: {b}" for where, text in texts for b in broken_references(text, None)]
    bad += [f"{where}: refers to {f}" for where, text in texts for f in FORBIDDEN if f in text]
    assert not bad, "--help names files the repository does not hold:\n" + "\n".join(bad)


def text_files() -> list:
    """Every text file git knows of (tracked or new, not ignored), or every file when it is not a checkout."""
    try:
        names = subprocess.run(
            ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
            cwd=ROOT, capture_output=True, text=True, check=True,
        ).stdout.splitlines()
    except (OSError, subprocess.CalledProcessError):
        names = [p.relative_to(ROOT).as_posix() for p in ROOT.rglob("*") if ".git" not in p.parts]
    return [n for n in sorted(names) if n.endswith((".py", ".md", ".toml", ".txt", ".cfg", ".ini")) and (ROOT / n).is_file()]


def test_no_reference_outside_the_repository():
    # any file, any line: code and comments too, not only documentation
    found = [
        f"{name}:{i}: {needle}"
        for name in text_files()
        for i, line in enumerate((ROOT / name).read_text(encoding="utf-8", errors="replace").splitlines(), 1)
        for needle in FORBIDDEN
        if needle in line
    ]
    assert not found, "references to what the repository does not hold (the theory document is docs/theory.md):\n" + "\n".join(found)
