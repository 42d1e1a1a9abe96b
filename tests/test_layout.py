"""attnstats' structure: the import graph of the package, read statically, runs one way.

Every ``import`` and ``from ... import`` of every ``attnstats/**/*.py`` counts, also those inside
functions (a lazy import is still a dependency). The layers, highest first, are data below; a module
may import its own layer and the layers under it, never one above, and no two modules may import each
other through any chain. README's "Layout" section names every module and subpackage, and nothing else.
"""
import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "attnstats"

# Highest first: app -> capture -> frame -> metrics -> kernels -> stats -> {masks, validation, budget,
# theory}. A module belongs to the layer of the longest prefix below that names it or a package holding
# it. ``attnstats.__main__`` is the command's entry point (``python -m attnstats``): it is the command,
# so it sits with app; ``import attnstats`` never runs it.
LAYERS = (
    ("app", ("attnstats.app", "attnstats.__main__")),
    ("capture", ("attnstats.capture",)),
    ("frame", ("attnstats.frame", "attnstats.summary")),
    ("metrics", ("attnstats.metrics",)),
    ("kernels", ("attnstats.kernels",)),
    ("stats", ("attnstats.stats",)),
    ("base", ("attnstats.masks", "attnstats.validation", "attnstats.budget", "attnstats.theory",
              "attnstats.triton_launch", "attnstats.cuda_graphs")),
)
# ``attnstats/__init__.py`` gathers the public names: it may import every layer except app.
TOP = "attnstats"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict:
    """``{dotted name: path}`` of every module and package of attnstats."""
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py")) if "__pycache__" not in p.parts}


def resolve(importer: str, is_package: bool, node: ast.AST, known: dict) -> list:
    """The attnstats modules an import statement depends on, each the most specific one that exists:
    ``from . import online_triton`` depends on the submodule, ``from .dense import x`` on ``.dense``."""
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    else:
        if node.level:
            # the package a relative import starts from: the module's own package, then one up per dot
            base = importer.split(".") if is_package else importer.split(".")[:-1]
            if node.level > 1:
                base = base[: -(node.level - 1)]
            prefix = ".".join(base + ([node.module] if node.module else []))
        else:
            prefix = node.module
        names = [f"{prefix}.{alias.name}" if f"{prefix}.{alias.name}" in known else prefix for alias in node.names]
    out = []
    for name in names:
        if not (name == TOP or name.startswith(TOP + ".")):
            continue
        while name not in known:  # `import attnstats.stats.dense.x` or a name that is not a module
            name = name.rsplit(".", 1)[0]
        out.append(name)
    return out


def import_graph() -> dict:
    """``{module: {(imported module, line)}}`` over every import statement, at any depth."""
    known = modules()
    graph = {}
    for name, path in known.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        edges = graph.setdefault(name, set())
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                for target in resolve(name, path.name == "__init__.py", node, known):
                    if target != name:
                        edges.add((target, node.lineno))
    return graph


def layer_of(module: str):
    best = None
    for rank, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if module == prefix or module.startswith(prefix + "."):
                if best is None or len(prefix) > best[1]:
                    best = (rank, len(prefix))
    return None if best is None else best[0]


def where(module: str, line: int) -> str:
    return f"{modules()[module].relative_to(ROOT)}:{line}"


def test_graph_sees_relative_and_lazy_imports():
    # the resolver itself, on statements whose targets are known
    graph = import_graph()
    spectral = {t for t, _ in graph["attnstats.stats.spectral"]}
    assert {"attnstats.stats.dense", "attnstats.stats.online", "attnstats.validation"} <= spectral
    recorder = {t for t, _ in graph["attnstats.capture.recorder"]}
    assert "attnstats.capture.stats_store" in recorder  # imported inside a method
    assert {t for t, _ in graph["attnstats.__main__"]} == {"attnstats.app.cli"}


def test_every_module_has_a_layer():
    unplaced = [m for m in modules() if m != TOP and layer_of(m) is None]
    assert not unplaced, f"modules in no layer of tests/test_layout.py LAYERS (place them, and in README's Layout): {unplaced}"


def test_no_import_cycle():
    graph = {m: {t for t, _ in edges} for m, edges in import_graph().items()}
    cycles, state = [], {}

    def visit(m, stack):
        state[m] = "open"
        stack.append(m)
        for t in sorted(graph.get(m, ())):
            if state.get(t) == "open":
                cycles.append(stack[stack.index(t):] + [t])
            elif t not in state:
                visit(t, stack)
        stack.pop()
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m, [])
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_library_never_imports_app():
    bad = [
        f"{where(m, line)}: {m} imports {t}"
        for m, edges in import_graph().items()
        if layer_of(m) != 0
        for t, line in sorted(edges, key=lambda e: e[1])
        if layer_of(t) == 0
    ]
    assert not bad, "the library imports the command:\n" + "\n".join(bad)


def test_dependencies_run_one_way():
    names = [name for name, _ in LAYERS]
    bad = []
    for m, edges in import_graph().items():
        for t, line in sorted(edges, key=lambda e: e[1]):
            if t == TOP:
                # the package's __init__ imports every layer: importing it from inside closes a loop
                bad.append(f"{where(m, line)}: {m} imports the package {TOP} itself")
            elif m == TOP or layer_of(m) is None or layer_of(t) is None:
                continue  # app from __init__: test_library_never_imports_app; no layer: test_every_module_has_a_layer
            elif layer_of(t) < layer_of(m):
                bad.append(f"{where(m, line)}: {m} ({names[layer_of(m)]}) imports {t} ({names[layer_of(t)]})")
    assert not bad, "imports against " + " -> ".join(names) + ":\n" + "\n".join(bad)


def test_import_attnstats_loads_neither_the_command_nor_matplotlib():
    code = (
        "import sys, attnstats\n"
        "print(sorted(m for m in sys.modules if m == 'attnstats.app' or m.startswith('attnstats.app.')"
        " or m == 'matplotlib' or m.startswith('matplotlib.')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, f"import attnstats failed:\n{out.stderr}"
    assert out.stdout.strip() == "[]", f"import attnstats loads {out.stdout.strip()}"


# README's Layout section: a ```text block, one line per entry, two spaces of indentation per folder
# level, each line's first word a file or folder (folders end in "/").

def layout_entries() -> list:
    """Paths, relative to the repository root, named by README's Layout tree."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = re.search(r"^## Layout\n(.*?)(?=^## |\Z)", text, flags=re.M | re.S)
    assert section, "README.md has no '## Layout' section"
    block = re.search(r"^```text\n(.*?)^```", section.group(1), flags=re.M | re.S)
    assert block, "README's Layout section has no ```text tree"
    entries, folders = [], []
    for line in block.group(1).splitlines():
        if not line.strip():
            continue
        indent = len(line) - len(line.lstrip(" "))
        assert indent % 2 == 0, f"README Layout: odd indentation in {line!r}"
        depth = indent // 2
        assert depth <= len(folders), f"README Layout: {line!r} is indented under no folder"
        folders = folders[:depth]
        word = line.split()[0]
        path = "/".join(folders + [word.rstrip("/")])
        entries.append(path)
        if word.endswith("/"):
            folders.append(word.rstrip("/"))
    return entries


def test_readme_layout_names_exist():
    missing = [e for e in layout_entries() if not (ROOT / e).exists()]
    assert not missing, f"README's Layout names what the repository does not hold: {missing}"


def test_readme_layout_names_every_module_and_subpackage():
    named = set(layout_entries())
    want = set()
    for path in PACKAGE.rglob("*.py"):
        if "__pycache__" in path.parts:
            continue
        rel = path.relative_to(ROOT)
        if path.name == "__init__.py" and path.parent != PACKAGE:
            want.add(rel.parent.as_posix())  # a subpackage: its folder line describes it
        else:
            want.add(rel.as_posix())
    absent = sorted(want - named)
    assert not absent, f"README's Layout does not name: {absent}"
