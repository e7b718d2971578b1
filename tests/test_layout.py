"""The house rules of the layout (issue 16): the ground floor imports no room, and the rooms import each
other plainly — a broken import fails loudly instead of being skipped by a guard."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ROOMS = {"data_checks", "models", "monitoring", "flows", "serving", "replay"}


def _imports(path: Path) -> list[str]:
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            out.append(node.module or "")
    return out


def test_the_ground_floor_imports_no_room():
    """``recloop/`` imports nothing above it, not even inside a function (the CLI registers the rooms'
    commands by name, from ``ROOM_COMMANDS``)."""
    found = [f"{p.relative_to(REPO)}: {name}" for p in (REPO / "recloop").rglob("*.py")
             for name in _imports(p) if name.split(".")[0] in ROOMS]
    assert not found, found


def test_flows_have_no_guards_for_rooms_that_are_always_installed():
    """No ``except ImportError`` / ``find_spec`` in flows/: every room ships with the package."""
    found = []
    for path in (REPO / "flows").glob("*.py"):
        text = path.read_text(encoding="utf-8")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.ExceptHandler) and node.type is not None:
                names = {n.id for n in ast.walk(node.type) if isinstance(n, ast.Name)}
                if names & {"ImportError", "ModuleNotFoundError"}:
                    found.append(f"{path.name}:{node.lineno}")
        if "find_spec" in text:
            found.append(f"{path.name}: find_spec")
    assert not found, found


def test_demo_is_a_command_of_the_flows_room():
    from typer.testing import CliRunner

    from flows.commands import demo
    from recloop.cli import app

    assert demo.__module__ == "flows.commands" and not (REPO / "recloop" / "demo.py").exists()
    assert "demo" in CliRunner().invoke(app, ["--help"]).output
