"""/healthz, /readyz (models AND database), /metrics exposure."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from sdb_core.artifact import make_test_box
from service.core.config import Settings
from service.inference.loading import load_registry
from service.inference.registry import ModelRegistry
from service.routes import health
from tests._support.apps import route_app
from tests._support.net import free_port
from tests._support.redis import REDIS_URL


class FakeDatabase:
    def __init__(self, behaviour: str) -> None:
        self.behaviour = behaviour

    def probe(self) -> str:
        if self.behaviour == "raise":
            raise OSError("connection refused")
        if self.behaviour == "hang":
            time.sleep(3)
        return "ok" if self.behaviour == "ok" else "unreachable"


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Any:
    d = tmp_path_factory.mktemp("health-models")
    make_test_box(d, name="test-box")
    reg = load_registry(Settings(demo=True, model_dir=d, torch_threads=1), warm_up=False)
    yield reg
    reg.close()


def build(registry: Any, db: Any, **overrides: Any) -> FastAPI:
    settings = Settings(demo=True, **overrides)
    models = registry if registry is not None else ModelRegistry.from_boxes([])
    return route_app(settings, health.router, health.metrics_router, models=models, db=db)


def test_healthz_is_alive_whatever_the_database() -> None:
    with TestClient(build(None, FakeDatabase("raise"))) as c:
        r = c.get("/healthz")
    assert r.status_code == 200 and r.json() == {"status": "ok"}


def test_ready_when_models_and_database_are(registry: Any) -> None:
    with TestClient(build(registry, FakeDatabase("ok"))) as c:
        r = c.get("/readyz")
    assert r.status_code == 200
    assert r.json() == {"status": "ready", "models": ["test-box"], "database": "ok", "redis": "off"}


@pytest.mark.redis
def test_ready_with_redis(registry: Any, redis_keys_prefix: str) -> None:
    app = build(
        registry,
        FakeDatabase("ok"),
        redis_url=REDIS_URL,
        redis_key_prefix=redis_keys_prefix,
        expose_metrics=True,
    )
    with TestClient(app) as c:
        r = c.get("/readyz")
        text = c.get("/metrics").text
    assert r.status_code == 200 and r.json()["status"] == "ready" and r.json()["redis"] == "ok"
    assert "sdb_redis_up 1.0" in text


@pytest.mark.parametrize(
    ("mode", "code", "status"), [("open", 200, "degraded"), ("closed", 503, "not ready")]
)
def test_redis_down_is_degraded_or_not_ready_by_failure_mode(
    registry: Any, mode: str, code: int, status: str
) -> None:
    """Fail open: /predict still answers (each process counts), so the service stays in rotation."""
    url = f"redis://127.0.0.1:{free_port()}/0"
    with TestClient(
        build(registry, FakeDatabase("ok"), redis_url=url, redis_failure_mode=mode, expose_metrics=True)
    ) as c:
        r = c.get("/readyz")
        text = c.get("/metrics").text
    assert r.status_code == code
    assert r.json() == {"status": status, "models": ["test-box"], "database": "ok", "redis": "unreachable"}
    assert "sdb_redis_up 0.0" in text


@pytest.mark.parametrize("behaviour", ["down", "raise"])
def test_not_ready_when_the_database_is_unreachable(registry: Any, behaviour: str) -> None:
    with TestClient(build(registry, FakeDatabase(behaviour))) as c:
        r = c.get("/readyz")
    assert r.status_code == 503 and r.json()["database"] == "unreachable"


def test_a_hung_database_gives_503_within_the_ping_timeout(
    registry: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(health, "DB_PING_TIMEOUT_S", 0.2)
    with TestClient(build(registry, FakeDatabase("hang"))) as c:
        r = c.get("/readyz")
        assert r.status_code == 503
        assert c.get("/healthz").status_code == 200  # the event loop was never blocked


def test_not_ready_without_models() -> None:
    empty = ModelRegistry.from_boxes([])
    with TestClient(build(empty, FakeDatabase("ok"))) as c:
        r = c.get("/readyz")
    assert r.status_code == 503 and r.json()["models"] == []


def test_metrics_are_off_the_public_port_unless_a_setting_says_so(registry: Any) -> None:
    with TestClient(build(registry, FakeDatabase("ok"))) as c:  # the default: not served
        assert c.get("/metrics").status_code == 404
    with TestClient(build(registry, FakeDatabase("ok"), expose_metrics=True)) as c:
        r = c.get("/metrics")
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
        assert "sdb_http_requests_total" in r.text


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
@pytest.mark.parametrize("expose", [True, False])
def test_openapi_lists_metrics_only_when_it_is_served(make_settings: Any, expose: bool) -> None:
    from service.main import create_app

    with TestClient(create_app(make_settings(expose_metrics=expose))) as c:
        paths = c.get("/openapi.json").json()["paths"]
        assert c.get("/metrics").status_code == (200 if expose else 404)
    assert {"/healthz", "/readyz"} <= set(paths)
    assert ("/metrics" in paths) == expose


@pytest.fixture
def small_disk(tmp_path: Path) -> Any:
    """A 4 MiB tmpfs mounted for this test (root with mount rights only; else skipped)."""
    import subprocess

    mount = tmp_path / "small-disk"
    mount.mkdir()
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)], capture_output=True, check=False
    )
    if r.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs to fill ({r.stderr.decode().strip()[:200]})")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def _fill(directory: Path) -> Path:
    filler = directory / "filler"
    with filler.open("wb") as f:
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError:
            pass
    return filler


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
def test_readiness_sees_a_full_disk_under_the_database(
    make_settings: Any, database_url: str, small_disk: Path
) -> None:
    import shutil

    from sqlalchemy.engine import make_url

    from service.main import create_app

    shutil.copyfile(str(make_url(database_url).database), small_disk / "sdb.db")
    app = create_app(make_settings(database_url=f"sqlite:///{small_disk / 'sdb.db'}"))
    with TestClient(app) as c:
        assert c.get("/readyz").json()["database"] == "ok"
        filler = _fill(small_disk)
        r = c.get("/readyz")
        assert r.status_code == 503 and r.json()["database"] == "full", r.text
        filler.unlink()
        r = c.get("/readyz")
        assert r.status_code == 200 and r.json()["database"] == "ok", r.text


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
def test_the_root_sends_people_to_the_docs(settings: Any) -> None:
    from service.main import create_app

    with TestClient(create_app(settings)) as c:
        r = c.get("/", follow_redirects=False)
        assert r.status_code in (302, 307) and r.headers["location"] == "/docs"
        assert c.get("/").status_code == 200  # the docs page itself


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
def test_the_docs_page_loads_nothing_from_outside(settings: Any) -> None:
    import re

    from service.main import create_app

    with TestClient(create_app(settings)) as c:
        page = c.get("/docs")
        assert page.status_code == 200
        assets = re.findall(r"""(?:src|href)=['"]([^'"]+)['"]""", page.text) + re.findall(
            r"""url: ['"]([^'"]+)['"]""", page.text
        )
        assert assets and all(a.startswith("/") for a in assets), assets  # no CDN: works offline
        for asset in assets:
            assert c.get(asset).status_code == 200, asset
