"""The reliability page (``docs/readme/reliability.md``) maps each promise to a test: every test it names
must exist, so a renamed or deleted test cannot leave a promise pointing at nothing."""

from __future__ import annotations

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PAGE = REPO / "docs" / "readme" / "reliability.md"


def defined_test_names() -> set[str]:
    names = set()
    for path in (REPO / "tests").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                names.add(node.name)
    return names


def test_every_test_the_reliability_page_names_exists():
    text = PAGE.read_text(encoding="utf-8")
    named = set(re.findall(r"`(?:[\w/.]+::)?((?:test|no)_\w+)`", text))
    assert len(named) > 40, "the page names too few tests: has its format changed?"
    missing = sorted(named - defined_test_names())
    assert not missing, f"docs/readme/reliability.md names tests that do not exist: {missing}"


def test_every_test_file_the_reliability_page_names_exists():
    files = set(re.findall(r"`(tests/[\w/]+\.py)", PAGE.read_text(encoding="utf-8")))
    assert files and not sorted(f for f in files if not (REPO / f).is_file())
