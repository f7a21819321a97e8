"""The codebase's layout rules (docs/architecture.md): the dependency points one way, no module imports
another's private name, and no file outside the tests grows past 500 lines except those that hold one concern
that needs the length."""

from __future__ import annotations

import ast
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("sdb_core", "service", "sdb", "bench")
MAX_LINES = 500
# one concern each, that needs the length
LONG_FILES = {
    "README.md": "the newcomer's document: what it is, quick start, stories, configuration, API, deployment",
    "service/console/console.js": "the admin console's single-page app (no build step, one file)",
    "research/evaluation-rounds.md": "the dated evaluation rounds, a record (research, not product)",
}
TEXT = (".py", ".md", ".js", ".css", ".html", ".sh", ".toml", ".yml", ".yaml", ".ini", ".cfg")


def _modules() -> list[Path]:
    return [p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))]


def _imports(path: Path) -> list[ast.ImportFrom]:
    return [n for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.ImportFrom)]


def test_no_module_imports_a_private_name_of_another() -> None:
    found = [
        f"{p.relative_to(ROOT)}: from {n.module} import {a.name}"
        for p in _modules()
        for n in _imports(p)
        if n.module and n.module.split(".")[0] in PACKAGES
        for a in n.names
        if a.name.startswith("_")
    ]
    assert not found, found


def test_the_library_does_not_import_the_service_or_the_cli() -> None:
    found = [
        f"{p.relative_to(ROOT)}: {n.module}"
        for p in sorted((ROOT / "sdb_core").rglob("*.py"))
        for n in ast.walk(ast.parse(p.read_text()))
        if isinstance(n, ast.ImportFrom | ast.Import)
        for name in ([n.module or ""] if isinstance(n, ast.ImportFrom) else [a.name for a in n.names])
        if name.split(".")[0] in ("service", "sdb", "fastapi", "sqlalchemy")
    ]
    assert not found, found


def test_no_file_outside_the_tests_is_over_500_lines_unless_one_concern_needs_it() -> None:
    tracked = subprocess.run(
        ["git", "ls-files"], cwd=ROOT, check=True, capture_output=True, text=True
    ).stdout.split()
    long = {
        f: n
        for f in tracked
        if f.endswith(TEXT) and not f.startswith("tests/") and (ROOT / f).is_file()
        if (n := len((ROOT / f).read_text().splitlines())) > MAX_LINES
    }
    assert set(long) <= set(LONG_FILES), {f: n for f, n in long.items() if f not in LONG_FILES}
