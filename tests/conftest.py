"""Shared fixtures: test boxes, SQLite and PostgreSQL databases (migrated or empty), settings, app, client.

`database_url` and `empty_database_url` are parametrized over SQLite and PostgreSQL; the PostgreSQL
parameter carries the `postgres` marker and is skipped when no server answers at SDB_TEST_POSTGRES_URL
(default postgresql://postgres@127.0.0.1:5432/test). Every test gets its own database: a copy of a
template migrated once per session (a file copy for SQLite, `CREATE DATABASE ... TEMPLATE` for PostgreSQL).
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

PG_ADMIN_URL = os.environ.get("SDB_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")
TEST_JWT_SECRET = "test-jwt-secret-" + "x" * 40
TEST_ADMIN_TOKEN = "sdb_test-bootstrap-admin-" + uuid.uuid4().hex
MODELS = ("alpha", "beta")

_pg_ok: bool | None = None


def pg_available() -> bool:
    global _pg_ok
    if _pg_ok is None:
        try:
            import psycopg

            with psycopg.connect(PG_ADMIN_URL, connect_timeout=2) as c:
                c.execute("SELECT 1")
            _pg_ok = True
        except Exception:
            _pg_ok = False
    return _pg_ok


def _pg_exec(sql: str) -> None:
    import psycopg

    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as c:
        c.execute(sql)


def pg_url_for(dbname: str) -> str:
    from sqlalchemy.engine import make_url

    return (
        make_url(PG_ADMIN_URL).set(drivername="postgresql+psycopg", database=dbname).render_as_string(False)
    )


def create_pg_database(template: str | None = None) -> str:
    name = f"sdb_t_{uuid.uuid4().hex[:16]}"
    _pg_exec(f'CREATE DATABASE "{name}"' + (f' TEMPLATE "{template}"' if template else ""))
    return name


def drop_pg_database(name: str) -> None:
    _pg_exec(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


BACKENDS = ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]


def _require(backend: str) -> None:
    if backend == "postgres" and not pg_available():
        pytest.skip(f"no PostgreSQL server at {PG_ADMIN_URL}")


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
        upgrade(pg_url_for(name))
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
        yield pg_url_for(name)
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
        yield pg_url_for(name)
    finally:
        drop_pg_database(name)


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
    from service.config import Settings

    def make(**overrides: Any) -> Settings:
        values: dict[str, Any] = {
            "demo": False,
            "database_url": database_url,
            "model_dir": box_dir,
            "default_model": "alpha",
            "device": "cpu",
            "torch_threads": 1,
            "jwt_secret": TEST_JWT_SECRET,
            "bootstrap_admin_token": TEST_ADMIN_TOKEN,
            "client_ip_salt": "test-salt",
            "max_batch_delay_ms": 1.0,
            "calibrate_forward_batch": False,  # ~0.3 s per model and app; tested in test_inference.py
            "predict_rate_per_minute": 0,
            "distill_rate_per_minute": 0,
            "log_level": "DEBUG",
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


class ApiHelper:
    """Admin and user flows over a TestClient: bootstrap admin token, users, keys, tokens, distill calls."""

    def __init__(self, client: TestClient) -> None:
        self.client = client
        self._admin: dict[str, str] | None = None

    def token(self, api_key: str, **extra: str) -> str:
        r = self.client.post(
            "/auth/token", data={"grant_type": "client_credentials", "client_secret": api_key, **extra}
        )
        assert r.status_code == 200, r.text
        return str(r.json()["access_token"])

    @property
    def admin(self) -> dict[str, str]:
        if self._admin is None:
            self._admin = {"Authorization": f"Bearer {self.token(TEST_ADMIN_TOKEN)}"}
        return self._admin

    def create_user(self, name: str | None = None, role: str = "user") -> dict[str, Any]:
        r = self.client.post(
            "/admin/users",
            json={"name": name or f"u{uuid.uuid4().hex[:10]}", "role": role},
            headers=self.admin,
        )
        assert r.status_code == 201, r.text
        return dict(r.json())

    def issue_key(self, user_id: int, **body: Any) -> dict[str, Any]:
        body.setdefault("scopes", ["alpha"])
        r = self.client.post(f"/admin/users/{user_id}/keys", json=body, headers=self.admin)
        assert r.status_code == 201, r.text
        return dict(r.json())

    def user_with_key(self, **key: Any) -> tuple[dict[str, Any], dict[str, Any], dict[str, str]]:
        """(user, key incl. its secret, Authorization headers of a fresh token)."""
        user = self.create_user()
        k = self.issue_key(user["id"], **key)
        return user, k, {"Authorization": f"Bearer {self.token(k['api_key'])}"}

    def distill(self, headers: dict[str, str], n: int = 2, model: str = "alpha", **body: Any) -> Any:
        import numpy as np

        x = np.random.default_rng(n).normal(size=(n, 1, 8, 8)).astype("float32")
        return self.client.post(
            "/distill-batch", json={"model": model, "inputs": x.tolist(), **body}, headers=headers
        )


@pytest.fixture
def api(client: TestClient) -> ApiHelper:
    return ApiHelper(client)


def audit_rows(database_url: str, where: str = "1=1", params: dict[str, Any] | None = None) -> list[Any]:
    """Rows of query_audits read straight from the database (a separate engine)."""
    from sqlalchemy import text

    from service.db.session import make_engine

    eng = make_engine(database_url)
    try:
        with eng.connect() as c:
            return list(
                c.execute(text(f"SELECT * FROM query_audits WHERE {where} ORDER BY id"), params or {})
            )
    finally:
        eng.dispose()


def write_evaluation_report(box: Path, seeds: tuple[int, ...] = (0, 1)) -> dict[str, Any]:
    """An `sdb evaluate` report (results.json shape, made by sdb_core.evaluate's own summarize and checks
    from made-up per-seed figures) saved as the box's evaluation.json; returns the report."""
    import json

    from sdb_core.evaluate import METHODS, check_targets, summarize

    runs = [
        {
            "teacher": {"normal": 99 - s, "box_plain": 98.5 - s, "box_keyed": 98.9 - s, "box_wrong_key": 60},
            "students": {"full": {"small_cnn": {m: 90.0 + i + s for i, m in enumerate(METHODS)}}},
        }
        for s in seeds
    ]
    summary = summarize(runs)
    checks = check_targets(summary)
    report = {"config": {"seeds": list(seeds)}, "runs": runs, "summary": summary, "checks": checks}
    (box / "evaluation.json").write_text(json.dumps(report))
    return report
