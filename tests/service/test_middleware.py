"""Middleware: body limit (Content-Length, chunked, lying length), deadline, generic 500, headers,
validation errors without echoed input."""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi import FastAPI, Request
from fastapi.testclient import TestClient
from pydantic import BaseModel

from service.core.config import Settings
from service.core.errors import install_error_handlers
from service.middleware import BodyLimitMiddleware, install_middleware

LIMIT = 1024


class Secretive(BaseModel):
    api_key: str
    n: int


def make_app() -> FastAPI:
    settings = Settings(demo=True, max_body_bytes=LIMIT, inference_timeout_s=0.2)
    app = FastAPI()
    app.state.seen_bytes = 0
    install_middleware(app, settings)
    install_error_handlers(app)

    @app.post("/echo")
    async def echo(request: Request) -> dict[str, int]:
        body = await request.body()
        app.state.seen_bytes = len(body)
        return {"n": len(body)}

    @app.post("/model")
    async def model(body: Secretive) -> dict[str, int]:
        return {"n": body.n}

    @app.get("/boom")
    async def boom() -> None:
        raise RuntimeError("secret internals /etc/passwd")

    @app.get("/slow")
    async def slow() -> dict[str, str]:
        await asyncio.sleep(10)
        return {"status": "late"}

    return app


@pytest.fixture(scope="module")
def client() -> Iterator[TestClient]:
    with TestClient(make_app(), raise_server_exceptions=False) as c:
        yield c


def test_body_under_the_limit_passes(client: TestClient) -> None:
    r = client.post("/echo", content=b"x" * LIMIT)
    assert r.status_code == 200 and r.json() == {"n": LIMIT}


def test_content_length_over_the_limit_is_413_before_reading(client: TestClient) -> None:
    r = client.post("/echo", content=b"x" * (LIMIT + 1))
    assert r.status_code == 413 and "limit" in r.json()["detail"]


def test_chunked_body_over_the_limit_is_413(client: TestClient) -> None:
    def chunks() -> Iterator[bytes]:
        for _ in range(10):
            yield b"y" * 300

    r = client.post("/echo", content=chunks())
    assert r.status_code == 413


def test_invalid_content_length_is_400(client: TestClient) -> None:
    r = client.post("/echo", content=b"x", headers={"content-length": "abc"})
    assert r.status_code == 400


def _run_asgi(
    app: Any, headers: list[tuple[bytes, bytes]], chunks: list[bytes]
) -> tuple[list[dict[str, Any]], int]:
    """Drive an ASGI app with hand-made body messages (a lying Content-Length cannot be sent by httpx)."""
    sent: list[dict[str, Any]] = []
    pulled = 0
    messages = [
        {"type": "http.request", "body": c, "more_body": i < len(chunks) - 1} for i, c in enumerate(chunks)
    ]

    async def receive() -> dict[str, Any]:
        nonlocal pulled
        if messages:
            pulled += 1
            return messages.pop(0)
        await asyncio.sleep(3600)
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/", "headers": headers, "query_string": b""}
    asyncio.run(app(scope, receive, send))
    return sent, pulled


def test_lying_content_length_is_caught_while_streaming() -> None:
    seen: list[int] = []

    async def reader(scope: Any, receive: Any, send: Any) -> None:
        total = 0
        while True:
            m = await receive()
            if m["type"] == "http.disconnect":
                break
            total += len(m.get("body", b""))
            if not m.get("more_body"):
                break
        seen.append(total)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    app = BodyLimitMiddleware(reader, limit=LIMIT)
    sent, pulled = _run_asgi(app, [(b"content-length", b"10")], [b"z" * 600] * 20)
    assert sent[0]["status"] == 413
    assert seen[0] <= LIMIT  # the app never saw more than the limit
    assert pulled <= 2  # and the rest of the body was never read
    assert [m for m in sent if m["type"] == "http.response.start"] == [sent[0]]  # the app's 200 was dropped


def test_unhandled_error_is_a_generic_500_without_trace(client: TestClient) -> None:
    r = client.get("/boom")
    assert r.status_code == 500
    assert r.json() == {"detail": "internal server error"}
    assert "passwd" not in r.text and "Traceback" not in r.text


def test_deadline_gives_504_and_the_app_keeps_serving(monkeypatch: pytest.MonkeyPatch) -> None:
    app = FastAPI()
    settings = Settings(demo=True, inference_timeout_s=0.05)
    install_middleware(app, settings)
    # The whole-request deadline is the inference deadline plus a margin; shorten it for the test.
    for m in app.user_middleware:
        if "seconds" in m.kwargs:
            m.kwargs["seconds"] = 0.2

    @app.get("/slow")
    async def slow() -> dict[str, str]:
        await asyncio.sleep(5)
        return {"status": "late"}

    @app.get("/fast")
    async def fast() -> dict[str, str]:
        return {"status": "ok"}

    with TestClient(app) as c:
        r = c.get("/slow")
        assert r.status_code == 504 and "within" in r.json()["detail"]
        assert c.get("/fast").json() == {"status": "ok"}


def test_security_headers_everywhere(client: TestClient) -> None:
    for r in (client.post("/echo", content=b"a"), client.get("/nope"), client.get("/boom")):
        assert r.headers["cache-control"] == "no-store"
        assert r.headers["x-content-type-options"] == "nosniff"


def test_validation_errors_do_not_echo_the_input(client: TestClient) -> None:
    secret = "sdb_live_THIS-IS-A-SECRET-VALUE"
    r = client.post("/model", json={"api_key": secret, "n": "not a number", "extra": secret})
    assert r.status_code == 422
    assert secret not in r.text
    assert r.json()["detail"][0]["loc"] == ["body", "n"]


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
@pytest.mark.parametrize("path", ["/predict", "/distill-batch"])
def test_an_oversized_chunked_body_is_413_in_the_answer_the_log_the_audit_and_the_metrics(
    make_settings: Any, database_url: str, caplog: pytest.LogCaptureFixture, path: str
) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    from service.main import create_app
    from tests._support.api import ApiHelper
    from tests._support.db import audit_rows

    def chunks() -> Iterator[bytes]:
        for _ in range(20):
            yield b" " * 1024

    def counted(text: str, status: str) -> float:
        return sum(
            s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
            if s.name == "sdb_http_requests_total"
            and (s.labels["route"], s.labels["status"]) == (path, status)
        )

    app = create_app(make_settings(max_body_bytes=4096))
    with TestClient(app, raise_server_exceptions=False) as c:
        headers = {"content-type": "application/json"}
        if path == "/distill-batch":
            api = ApiHelper(c)
            headers.update(api.user_with_key(scopes=["alpha"])[2])
        before = c.get("/metrics").text
        caplog.clear()
        with caplog.at_level(logging.INFO):
            r = c.post(path, content=chunks(), headers=headers)
        app.state.sdb.audit_queue.flush()
        after = c.get("/metrics").text
    assert r.status_code == 413
    records = [rec for rec in caplog.records if rec.levelno >= logging.WARNING]
    assert [rec.levelno for rec in records] == [logging.WARNING], [rec.getMessage() for rec in records]
    assert [row.status for row in audit_rows(database_url, "endpoint = :p", {"p": path})] == [413]
    assert counted(after, "413") - counted(before, "413") == 1
    assert counted(after, "500") == counted(before, "500")


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
def test_a_client_that_goes_away_mid_body_is_499_not_500(
    make_settings: Any, database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    from service.main import create_app
    from tests._support.db import audit_rows

    app = create_app(make_settings())
    sent: list[dict[str, Any]] = []
    messages = [
        {"type": "http.request", "body": b'{"inputs": [', "more_body": True},
        {"type": "http.disconnect"},
    ]

    async def receive() -> dict[str, Any]:
        return messages.pop(0)

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/predict",
        "raw_path": b"/predict",
        "query_string": b"",
        "root_path": "",
        "headers": [(b"content-type", b"application/json")],
        "client": ("127.0.0.1", 5000),
        "server": ("testserver", 80),
    }

    def count(text: str, status: str) -> float:
        label = f'route="/predict",status="{status}"'
        m = re.search(r"sdb_http_requests_total\{[^}]*" + re.escape(label) + r"\} (\S+)", text)
        return float(m.group(1)) if m else 0.0

    with TestClient(app) as c:
        before = c.get("/metrics").text
        caplog.clear()
        with caplog.at_level(logging.INFO):
            assert c.portal is not None
            c.portal.call(app, scope, receive, send)
        app.state.sdb.audit_queue.flush()
        metrics_text = c.get("/metrics").text
    assert not [m for m in sent if m["type"] == "http.response.start"]  # nobody to answer
    assert [rec.levelno for rec in caplog.records if rec.levelno >= logging.WARNING] == [logging.WARNING]
    assert [row.status for row in audit_rows(database_url, "endpoint = '/predict'")] == [499]
    assert count(metrics_text, "499") - count(before, "499") == 1
    assert count(metrics_text, "500") == count(before, "500")
