"""The README stays true: two quick-start commands (the second is what CI runs), every route documented."""

from __future__ import annotations

import re

from service.config import Settings
from service.main import create_app

from ._support import REPO

README = (REPO / "README.md").read_text()


def _section(title: str) -> str:
    return README.split(f"## {title}\n", 1)[1].split("\n## ", 1)[0]


def test_quick_start_is_two_commands_and_ci_runs_the_second() -> None:
    block = re.search(r"```bash\n(.*?)```", _section("Quick start"), flags=re.DOTALL)
    assert block is not None
    commands = [line.split("#", 1)[0].strip() for line in block.group(1).splitlines() if line.strip()]
    assert commands == ["./scripts/run.sh", "./scripts/test.sh"]
    ci = (REPO / ".ci" / "run").read_text()
    assert "scripts/test.sh" in ci
    for script in ("run.sh", "test.sh", "setup.sh"):
        assert (REPO / "scripts" / script).stat().st_mode & 0o111, f"scripts/{script} must be executable"


def test_readme_opens_with_what_sdb_is_and_a_diagram() -> None:
    head = README.split("## Quick start", 1)[0]
    assert "```mermaid" in head
    assert "/predict" in head and "/distill-batch" in head


def test_every_route_is_in_the_api_table() -> None:
    paths = create_app(Settings.model_validate({"demo": True})).openapi()["paths"]
    assert "/distill-batch" in paths
    table = re.sub(r"\{[^}]*\}", "{}", _section("API"))
    undocumented = [
        f"{method.upper()} {path}"
        for path, methods in paths.items()
        for method in methods
        if f"{method.upper()} {re.sub(r'{[^}]*}', '{}', path)}" not in table
    ]
    assert not undocumented, f"routes missing from the README's API table: {undocumented}"
