"""`sdb admin users|keys|audits|usage` against a running app: the admin API without curl or jq."""

from __future__ import annotations

import json
from typing import Any

import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from sdb.cli import app as cli
from sdb.client import SdbClient
from tests._support.api import TEST_ADMIN_TOKEN

runner = CliRunner()


@pytest.fixture
def admin_cli(client: TestClient, monkeypatch: pytest.MonkeyPatch) -> Any:
    """Runs `sdb admin ...` with SDB_ADMIN_KEY set, its HTTP calls going to the in-process app."""
    import sdb.commands.admin

    def in_process(url: str | None, admin_key: str | None) -> SdbClient:
        assert admin_key == TEST_ADMIN_TOKEN
        c = SdbClient("http://testserver", admin_key)
        c._http = client  # the TestClient is an httpx.Client
        c.close = lambda: None  # type: ignore[method-assign]  # the fixture closes the TestClient
        return c

    monkeypatch.setattr(sdb.commands.admin, "_client", in_process)
    monkeypatch.setenv("SDB_ADMIN_KEY", TEST_ADMIN_TOKEN)

    def run(*args: str) -> Any:
        r = runner.invoke(cli, ["admin", *args])
        assert r.exit_code == 0, r.output
        return json.loads(r.stdout)

    return run


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
def test_admin_commands_manage_users_and_keys_and_read_audits_and_usage(admin_cli: Any) -> None:
    bob = admin_cli("users", "create", "bob")
    assert bob["name"] == "bob" and bob["role"] == "user"
    assert "bob" in [u["name"] for u in admin_cli("users", "list")["items"]]
    key = admin_cli("keys", "create", str(bob["id"]), "--scope", "alpha", "--quota", "100", "--name", "cli")
    assert key["api_key"].startswith("sdb_") and key["scopes"] == ["alpha"] and key["sample_quota"] == 100
    listed = admin_cli("keys", "list", "--user-id", str(bob["id"]))["items"]
    assert [k["id"] for k in listed] == [key["id"]] and "api_key" not in listed[0]
    assert admin_cli("keys", "revoke", str(key["id"]))["revoked_at"] is not None
    assert admin_cli("users", "disable", str(bob["id"]))["disabled"] is True
    assert set(admin_cli("audits", "--limit", "5")) == {"items", "total", "total_capped", "limit", "offset"}
    assert "bob" in [u["name"] for u in admin_cli("usage")["items"]]
