"""Imports point one way: api -> services -> engine / persistence; jobs -> app; nothing back.

Read from the source with `ast`, so a lazy import inside a function counts as much as one at the top.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def imports_of(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def modules(folder: str) -> list[Path]:
    return sorted((ROOT / folder).rglob("*.py"))


def offending(folder: str, forbidden: tuple[str, ...], allowed: tuple[str, ...] = ()) -> dict[str, list[str]]:
    found = {}
    for path in modules(folder):
        rel = str(path.relative_to(ROOT))
        if rel in allowed:
            continue
        bad = sorted(n for n in imports_of(path) if n.split(".")[0] in forbidden or n.startswith(forbidden))
        if bad:
            found[rel] = bad
    return found


@pytest.mark.parametrize("folder, forbidden", [
    ("app/engine", ("flask", "app.api", "app.services", "jobs", "sqlalchemy", "persistence.models")),
    ("app/services", ("flask", "redis", "app.api", "jobs")),
    ("persistence", ("app", "jobs", "flask", "redis")),
])
def test_each_layer_imports_only_the_layers_below_it(folder, forbidden):
    assert offending(folder, forbidden) == {}


def test_no_module_of_app_imports_the_jobs_but_the_command_line_that_starts_them():
    assert offending("app", ("jobs",), allowed=("app/cli.py",)) == {}


def test_no_module_of_app_is_longer_than_one_sitting():
    long = {str(p.relative_to(ROOT)): n for p in modules("app") if (n := len(p.read_text().splitlines())) > 420}
    assert long == {}
