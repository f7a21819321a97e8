"""`sdb db upgrade|current|downgrade|prune`, `sdb admin bootstrap` (the first admin key, printed once) and the
settings check of `sdb serve`, run in-process through typer's CliRunner.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from sdb.cli import app as cli
from tests._support.api import TEST_JWT_SECRET, ApiHelper
from tests._support.server import Server, base_env

runner = CliRunner()


def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No SDB_* variable during the test, and whatever `sdb serve` sets is undone afterwards."""
    import os
    import signal

    for key in {k for k in os.environ if k.startswith("SDB_")} | {
        "SDB_DEMO",
        "SDB_JWT_SECRET",
        "SDB_MODEL_DIR",
        "SDB_DATABASE_URL",
        "SDB_HOST",
        "SDB_PORT",
        "PROMETHEUS_MULTIPROC_DIR",
    }:
        monkeypatch.setenv(key, "")
        monkeypatch.delenv(key)
    # `sdb serve` installs a SIGTERM handler for its own process: not for the test runner's
    monkeypatch.setattr(signal, "signal", lambda *a, **k: None)


def test_db_upgrade_current_downgrade(empty_database_url: str) -> None:
    r = runner.invoke(cli, ["db", "current", "--database-url", empty_database_url])
    assert r.exit_code == 0 and "OUTDATED" in r.output
    r = runner.invoke(cli, ["db", "upgrade", "--database-url", empty_database_url])
    assert r.exit_code == 0, r.output
    r = runner.invoke(cli, ["db", "current", "--database-url", empty_database_url])
    assert "up to date" in r.output
    r = runner.invoke(cli, ["db", "downgrade", "base", "--database-url", empty_database_url])
    assert r.exit_code == 0
    assert "OUTDATED" in runner.invoke(cli, ["db", "current", "--database-url", empty_database_url]).output


def test_db_prune_deletes_old_rows_once_and_reads_its_ages(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import json
    from datetime import timedelta

    from service.db.models import QueryAudit, SecurityEvent, utcnow
    from service.db.session import Database

    clean_env(monkeypatch)
    db = Database(database_url)
    with db.write() as s:
        for days in (10, 3):
            at = utcnow() - timedelta(days=days)
            s.add(QueryAudit(endpoint="/predict", n_samples=1, status=200, created_at=at))
            s.add(SecurityEvent(action="x", outcome="ok", detail={}, created_at=at))
    db.dispose()
    monkeypatch.setenv("SDB_RETAIN_EVENTS_DAYS", "5")
    args = ["db", "prune", "--predict-rows-days", "5", "--database-url", database_url]
    first = runner.invoke(cli, args)
    assert first.exit_code == 0, first.output
    out = json.loads(first.output)
    assert out["deleted"]["predict_rows"] == 1 and out["deleted"]["events"] == 1
    assert out["policy_days"] == {
        "predict_rows": 5.0,
        "distill_rows": 400.0,
        "aggregates": 400.0,
        "client_windows": 8.0,
        "events": 5.0,
    }
    second = json.loads(runner.invoke(cli, args).output)
    assert set(second["deleted"].values()) == {0}  # idempotent


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
def test_db_upgrade_reads_sdb_database_url(empty_database_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SDB_DATABASE_URL", empty_database_url)
    assert runner.invoke(cli, ["db", "upgrade"]).exit_code == 0
    assert "up to date" in runner.invoke(cli, ["db", "current"]).output


def test_bootstrap_prints_a_working_admin_key_once(make_settings: Any, database_url: str) -> None:
    from service.main import create_app

    r = runner.invoke(cli, ["admin", "bootstrap", "--name", "root", "--database-url", database_url])
    assert r.exit_code == 0, r.output
    secret = r.stdout.strip().splitlines()[-1]
    assert secret.startswith("sdb_") and len(secret) >= 40
    again = runner.invoke(cli, ["admin", "bootstrap", "--database-url", database_url])
    assert again.exit_code == 1 and "already exists" in again.output and "sdb_" not in again.output

    with TestClient(create_app(make_settings(bootstrap_admin_token=None))) as client:
        api = ApiHelper(client)
        headers = {"Authorization": f"Bearer {api.token(secret)}"}
        users = client.get("/admin/users", headers=headers)
        assert users.status_code == 200
        assert [(u["name"], u["role"]) for u in users.json()["items"]] == [("root", "admin")]


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
def test_bootstrap_refuses_an_unmigrated_database(empty_database_url: str) -> None:
    r = runner.invoke(cli, ["admin", "bootstrap", "--database-url", empty_database_url])
    assert r.exit_code == 1 and "sdb db upgrade" in r.output


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
def test_bootstrap_names_the_database_it_used(
    empty_database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SDB_DATABASE_URL", empty_database_url)
    r = runner.invoke(cli, ["admin", "bootstrap"])
    assert r.exit_code == 1 and empty_database_url in r.output


def test_serve_reads_sdb_host_and_sdb_port_and_says_every_setting_is_a_variable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import uvicorn

    started: list[Any] = []
    monkeypatch.setattr(uvicorn, "run", lambda *a, **k: started.append((a, k)))
    clean_env(monkeypatch)
    monkeypatch.setenv("SDB_JWT_SECRET", TEST_JWT_SECRET)
    monkeypatch.setenv("SDB_HOST", "127.0.0.2")
    monkeypatch.setenv("SDB_PORT", "8124")
    r = runner.invoke(cli, ["serve"])
    assert r.exit_code == 0, r.output
    ((_, kwargs),) = started
    assert (kwargs["host"], kwargs["port"]) == ("127.0.0.2", 8124)
    help_text = runner.invoke(cli, ["serve", "--help"]).output
    assert "SDB_" in help_text and "environment variable" in help_text


def test_serve_refuses_a_missing_or_short_jwt_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    import uvicorn

    started: list[Any] = []
    monkeypatch.setattr(uvicorn, "run", lambda *a, **k: started.append((a, k)))
    clean_env(monkeypatch)
    r = runner.invoke(cli, ["serve"])
    assert r.exit_code == 2 and "SDB_JWT_SECRET" in r.output
    monkeypatch.setenv("SDB_JWT_SECRET", "tooShortXyz")
    r = runner.invoke(cli, ["serve"])
    assert r.exit_code == 2 and "32 bytes" in r.output and "tooShortXyz" not in r.output
    assert not started
    monkeypatch.setenv("SDB_JWT_SECRET", TEST_JWT_SECRET)
    r = runner.invoke(cli, ["serve", "--port", "8123", "--workers", "2"])
    assert r.exit_code == 0, r.output
    ((args, kwargs),) = started
    assert args == ("service.main:create_app",) and kwargs["factory"] and kwargs["workers"] == 2
    assert kwargs["port"] == 8123 and kwargs["timeout_graceful_shutdown"] > 0
    assert TEST_JWT_SECRET not in r.output


def test_serve_demo_migrates_once_and_shares_one_generated_secret(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import os

    import uvicorn

    from service.db.migrate import check_schema
    from service.db.session import Database

    monkeypatch.setattr(uvicorn, "run", lambda *a, **k: None)
    clean_env(monkeypatch)
    url = f"sqlite:///{tmp_path / 'demo.db'}"
    r = runner.invoke(cli, ["serve", "--demo", "--workers", "2", "--database-url", url])
    assert r.exit_code == 0, r.output
    secret = os.environ["SDB_JWT_SECRET"]  # set for the workers, never printed
    assert len(secret) >= 32 and secret not in r.output
    db = Database(url)
    try:
        check_schema(db.engine)
    finally:
        db.dispose()


@pytest.mark.slow
@pytest.mark.e2e
@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
def test_sdb_serve_stops_cleanly_on_sigterm(database_url: str, box_dir: Path, tmp_path: Path) -> None:
    server = Server(base_env(box_dir, database_url), tmp_path / "serve.log", ready_path="/readyz")
    try:
        server.start(wait_s=90)
    finally:
        rc = server.stop()  # SIGTERM, then the graceful shutdown
    assert rc == 0
    assert "Application shutdown complete" in server.logs()


def _without_root_file_access() -> list[str]:
    """A command prefix under which this process's permission bits apply: none for an ordinary user; as root,
    setpriv dropping the capabilities that let root write any file (else the test is skipped)."""
    import os
    import shutil
    import subprocess

    if os.geteuid() != 0:
        return []
    caps = "-dac_override,-dac_read_search"
    prefix = ["setpriv", f"--inh-caps={caps}", f"--bounding-set={caps}"]
    if shutil.which("setpriv") is None or subprocess.run([*prefix, "true"], check=False).returncode != 0:
        pytest.skip("running as root without a working setpriv: every file is writable to this process")
    return prefix


@pytest.mark.slow
@pytest.mark.parametrize(
    ("case", "command"),
    [
        ("file", ["serve"]),
        ("file", ["db", "upgrade"]),
        ("file", ["admin", "bootstrap"]),
        ("directory", ["serve"]),
        ("directory", ["serve", "--demo"]),
    ],
)
def test_an_unwritable_database_is_one_line_naming_the_file(
    tmp_path: Path, case: str, command: list[str]
) -> None:
    import os
    import secrets
    import subprocess
    import sys

    from service.db.migrate import upgrade

    prefix = _without_root_file_access()
    var = tmp_path / "var"
    var.mkdir()
    db_file = var / "sdb.db"
    if case == "file":  # a migrated database that this user may read but not write
        upgrade(f"sqlite:///{db_file}")
        db_file.chmod(0o444)
    else:  # no database yet, in a directory this user may not write
        var.chmod(0o555)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SDB_")}
    env.update(SDB_DATABASE_URL=f"sqlite:///{db_file}", SDB_JWT_SECRET=secrets.token_hex(32))
    try:
        r = subprocess.run(
            [*prefix, sys.executable, "-m", "sdb.cli", *command],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
    finally:
        var.chmod(0o755)
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert len(lines) == 1, r.stderr[-3000:]
    shown = str(var if case == "directory" else db_file)
    assert shown in lines[0] and "not writable" in lines[0] and "SDB_DATABASE_URL" in lines[0], lines[0]
