"""Shared fixtures: test boxes, SQLite and PostgreSQL databases (migrated or empty), settings, app, client.

`database_url` and `empty_database_url` are parametrized over SQLite and PostgreSQL; the PostgreSQL
parameter carries the `postgres` marker and is skipped when no server answers at SDB_TEST_POSTGRES_URL
(default postgresql://postgres@127.0.0.1:5432/test). Every test gets its own database: a copy of a
template migrated once per session (a file copy for SQLite, `CREATE DATABASE ... TEMPLATE` for PostgreSQL).
"""

from __future__ import annotations

import shutil
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from tests._support.api import TEST_ADMIN_TOKEN, TEST_JWT_SECRET, TEST_WATERMARK_SECRET, ApiHelper
from tests._support.postgres import PG_ADMIN_URL, create_pg_database, drop_pg_database, pg_available, pg_url
from tests._support.redis import SKIP_REASON, redis_available, redis_prefix

MODELS = ("alpha", "beta")


# ---------------------------------------------------------------------------- order of one pytest run

SLOW_MARKERS = ("slow", "e2e", "postgres", "browser", "docker")
_QUICK_FAILED = pytest.StashKey[bool]()


def _is_quick(item: pytest.Item) -> bool:
    return not any(item.get_closest_marker(m) for m in SLOW_MARKERS)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--quick-gate",
        action="store_true",
        help="skip the slow, e2e and PostgreSQL tests once a quick test has failed (scripts/test.sh)",
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Quick tests first, then slow / e2e / PostgreSQL / browser tests, and the Docker tests last (they build
    images); a stable sort keeps each group's order."""
    items.sort(key=lambda item: (not _is_quick(item), item.get_closest_marker("docker") is not None))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    report = yield
    if report.failed and _is_quick(item):
        item.config.stash[_QUICK_FAILED] = True
    return report


def pytest_runtest_setup(item: pytest.Item) -> None:
    config = item.config
    if config.getoption("--quick-gate") and config.stash.get(_QUICK_FAILED, False) and not _is_quick(item):
        pytest.skip("a quick test failed: the slow, e2e and PostgreSQL tests are not run")


# ---------------------------------------------------------------------------------------------- fixtures

BACKENDS = ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]


def _require(backend: str) -> None:
    if backend == "postgres" and not pg_available():
        pytest.skip(f"no PostgreSQL server at {PG_ADMIN_URL}")


@pytest.fixture(autouse=True)
def _few_torch_threads() -> None:
    """One intra-op thread in the test process: other test processes and servers share the 2 cores."""
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_num_threads(1)


@pytest.fixture(scope="session")
def _sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from service.db.migrate import upgrade

    path = tmp_path_factory.mktemp("db-template") / "template.db"
    upgrade(f"sqlite:///{path}")
    return path


@pytest.fixture(scope="session")
def _pg_template() -> Iterator[str]:
    if not pg_available():
        pytest.skip(f"no PostgreSQL server at {PG_ADMIN_URL}")
    from service.db.migrate import upgrade

    name = create_pg_database()
    try:
        upgrade(pg_url(name))
        yield name
    finally:
        drop_pg_database(name)


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    _require(request.param)
    return str(request.param)


@pytest.fixture
def database_url(backend: str, request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A database migrated to head (SQLite file or a fresh PostgreSQL database), dropped afterwards."""
    if backend == "sqlite":
        template: Path = request.getfixturevalue("_sqlite_template")
        path = tmp_path / "sdb.db"
        shutil.copyfile(template, path)
        yield f"sqlite:///{path}"
        return
    name = create_pg_database(template=request.getfixturevalue("_pg_template"))
    try:
        yield pg_url(name)
    finally:
        drop_pg_database(name)


@pytest.fixture
def empty_database_url(backend: str, tmp_path: Path) -> Iterator[str]:
    """A database without any table."""
    if backend == "sqlite":
        yield f"sqlite:///{tmp_path / 'empty.db'}"
        return
    name = create_pg_database()
    try:
        yield pg_url(name)
    finally:
        drop_pg_database(name)


@pytest.fixture
def redis_keys_prefix() -> Iterator[str]:
    """A Redis key prefix of this test (keys deleted afterwards); skipped when no Redis server answers at
    SDB_TEST_REDIS_URL (default redis://127.0.0.1:6379/0)."""
    if not redis_available():
        pytest.skip(SKIP_REASON)
    with redis_prefix() as prefix:
        yield prefix


@pytest.fixture(scope="session")
def box_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two untrained test boxes, `alpha` and `beta` (input 1x8x8, 10 classes, temperature 4)."""
    from sdb_core.artifact import make_test_box

    d = tmp_path_factory.mktemp("boxes")
    for i, name in enumerate(MODELS):
        make_test_box(d, name=name, seed=100 + i)
    return d


@pytest.fixture
def make_settings(database_url: str, box_dir: Path) -> Callable[..., Any]:
    from service.core.config import Settings

    def make(**overrides: Any) -> Settings:
        values: dict[str, Any] = {
            "demo": False,
            "database_url": database_url,
            "model_dir": box_dir,
            "default_model": "alpha",
            "device": "cpu",
            "torch_threads": 1,
            "jwt_secret": TEST_JWT_SECRET,
            "watermark_secret": TEST_WATERMARK_SECRET,
            "bootstrap_admin_token": TEST_ADMIN_TOKEN,
            "client_ip_salt": "test-salt-" + uuid.uuid4().hex,
            "max_batch_delay_ms": 1.0,
            "calibrate_forward_batch": False,  # ~0.3 s per model and app; tested in test_inference.py
            "gc_freeze": False,  # a full collection of the whole test process per app; test_gc_tuning.py
            "predict_rate_per_minute": 0,
            "distill_rate_per_minute": 0,
            "log_level": "DEBUG",
            "expose_metrics": True,
            # the tests read /predict calls back as rows (the default, sampled: test_aggregates.py)
            "predict_audit_rows": "on",
        }
        values.update(overrides)
        return Settings(**values)

    return make


@pytest.fixture
def settings(make_settings: Callable[..., Any]) -> Any:
    return make_settings()


@pytest.fixture
def app(settings: Any) -> FastAPI:
    from service.main import create_app

    return create_app(settings)


@pytest.fixture
def client(app: FastAPI) -> Iterator[TestClient]:
    """A TestClient with the app's lifespan running (schema checked, models loaded, audit writer on)."""
    with TestClient(app) as c:
        yield c


@pytest.fixture
def api(client: TestClient) -> ApiHelper:
    return ApiHelper(client)
