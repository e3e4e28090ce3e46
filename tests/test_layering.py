"""The data flow runs one way: primitives -> capture -> planner -> rewrite -> runtime.

An import from a later stage into an earlier one is a design bug (DESIGN.md); only the
top-level API and CLI wire the stages together.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ORDER = ["primitives", "capture", "planner", "rewrite", "runtime"]
ROOT = Path(__file__).resolve().parent.parent / "whale"


def _whale_imports(path: Path) -> set[str]:
    """The whale subpackages a module imports (relative or absolute)."""
    tree = ast.parse(path.read_text())
    package = path.relative_to(ROOT).parts[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level == 0 and node.module and node.module.startswith("whale."):
                found.add(node.module.split(".")[1])
            elif node.level == 1:
                found.add(package)
            elif node.level == 2 and node.module:
                found.add(node.module.split(".")[0])
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("whale."):
                    found.add(alias.name.split(".")[1])
    return found


@pytest.mark.parametrize("stage", ORDER)
def test_no_stage_imports_a_later_one(stage):
    later = set(ORDER[ORDER.index(stage) + 1 :])
    offenders = {}
    for path in (ROOT / stage).rglob("*.py"):
        bad = _whale_imports(path) & later
        if bad:
            offenders[str(path.relative_to(ROOT))] = sorted(bad)
    assert not offenders, f"imports against the data flow: {offenders}"
