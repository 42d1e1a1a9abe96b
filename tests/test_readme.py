"""Every Python example in README.md runs: blocks of one section share a namespace, in order."""
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def sections():
    text = README.read_text(encoding="utf-8")
    out = {}
    for part in re.split(r"^## ", text, flags=re.M)[1:]:
        title = part.splitlines()[0].strip()
        blocks = re.findall(r"^```python\n(.*?)^```", part, flags=re.M | re.S)
        if blocks:
            out[title] = blocks
    return out


@pytest.mark.parametrize("title", sorted(sections()))
def test_readme_examples_run(title, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": "__readme__"}
    for block in sections()[title]:
        exec(compile(block, f"README.md: {title}", "exec"), namespace)
