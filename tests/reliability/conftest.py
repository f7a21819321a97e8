"""Fixtures of the reliability tests: a test box, its secrets, databases, the fault proxy, servers."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sdb_core.artifact import make_test_box
from tests._support.boxes import MODEL, BoxSecrets
from tests._support.db import run_migrations
from tests._support.pgproxy import PgProxy
from tests._support.postgres import PG_ADMIN_URL, pg_available, pg_database
from tests._support.server import Server, ServerFactory, base_env


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("rel-models")
    make_test_box(d, name=MODEL, seed=1234)
    return d


@pytest.fixture(scope="session")
def box_secrets(model_dir: Path) -> BoxSecrets:
    return BoxSecrets.of(model_dir / MODEL / "box_key.json")


@pytest.fixture
def pg_db() -> Iterator[str]:
    """A fresh PostgreSQL database (its name), dropped afterwards; skipped, like the rest of the suite's
    PostgreSQL tests, when no server answers at SDB_TEST_POSTGRES_URL."""
    if not pg_available():
        pytest.skip(f"no PostgreSQL server answers at {PG_ADMIN_URL}")
    with pg_database("sdb_rel") as name:
        yield name


@pytest.fixture
def pg_proxy() -> Iterator[PgProxy]:
    proxy = PgProxy().start()
    try:
        yield proxy
    finally:
        proxy.stop()


@pytest.fixture
def start_server(model_dir: Path, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[ServerFactory]:
    """Start real uvicorn servers: `start_server(database_url, migrate=True, workers=1, **settings)` (`sdb
    serve --workers`; the other keywords are SDB_ settings); all stopped after.

    On a failed test the tail of each server's log is printed, so a crash is visible in the report.
    """
    servers: list[Server] = []

    def factory(
        database_url: str, *, migrate: bool = True, graceful_s: int = 10, workers: int = 1, **settings: Any
    ) -> Server:
        if migrate:
            run_migrations(database_url)
        env = base_env(model_dir, database_url, **settings)
        srv = Server(
            env=env, log_path=tmp_path / f"server{len(servers)}.log", graceful_s=graceful_s, workers=workers
        )
        servers.append(srv)
        return srv.start()

    yield factory
    for srv in servers:
        srv.stop()
    rep = getattr(request.node, "rep_call", None)
    if rep is not None and rep.failed:
        for i, srv in enumerate(servers):
            print(f"--- server {i} log (tail) ---\n{srv.logs()[-3000:]}")


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    rep = yield
    if rep.when == "call":
        item.rep_call = rep  # type: ignore[attr-defined]
    return rep
