"""Every Python example in README.md runs on its own: each block in a fresh namespace, as a reader
who pastes only that block would run it."""
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def blocks():
    """``(section title, number of the block in its section, code)`` for each python block."""
    text = README.read_text(encoding="utf-8")
    out = []
    for part in re.split(r"^## ", text, flags=re.M)[1:]:
        title = part.splitlines()[0].strip()
        for i, code in enumerate(re.findall(r"^```python\n(.*?)^```", part, flags=re.M | re.S), 1):
            out.append((title, i, code))
    return out


def test_readme_has_examples():
    assert len(blocks()) >= 7


@pytest.mark.parametrize("title, number, code", blocks(), ids=[f"{t} #{i}" for t, i, _ in blocks()])
def test_readme_example_runs_alone(title, number, code, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    exec(compile(code, f"README.md: {title}, python block {number}", "exec"), {"__name__": "__readme__"})
