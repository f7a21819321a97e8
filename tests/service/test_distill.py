"""POST /distill-batch on SQLite and PostgreSQL: keyed soft labels, quota and rate limits, one audit row per
call written with the quota in one transaction, exact quota under 50 concurrent calls, and fail-closed 503
when the database is unavailable (while /predict keeps answering).
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch
from fastapi import FastAPI
from fastapi.testclient import TestClient

from sdb_core.artifact import load_box
from service.core.state import set_state
from service.crud import audits, quota
from service.crud.audits import STATUS_RESERVED
from service.db.session import Database
from service.inference.registry import InferenceTimeout
from tests._support.api import ApiHelper
from tests._support.bodies import MALFORMED_NPY_HEADERS, npy_bytes, npy_with_header
from tests._support.db import audit_rows
from tests._support.server import ADMIN_TOKEN, Server, base_env


def sample(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, 1, 8, 8)).astype(np.float32)


def key_used(database_url: str, key_id: int) -> int:
    from sqlalchemy import text

    db = Database(database_url)
    try:
        with db.session() as s:
            return int(
                s.execute(text("SELECT samples_used FROM api_keys WHERE id = :i"), {"i": key_id}).scalar_one()
            )
    finally:
        db.dispose()


def test_soft_labels_are_the_keyed_path_at_the_requested_temperature(
    api: ApiHelper, client: TestClient, box_dir: Path
) -> None:
    _, _key, headers = api.user_with_key(scopes=["alpha"], watermark=False)  # the exact keyed path
    box = load_box(box_dir / "alpha")
    x = sample(5, seed=3)
    with torch.inference_mode():
        keyed = box.keyed_logits(torch.from_numpy(x)).numpy()
        plain = box.plain_logits(torch.from_numpy(x)).numpy()
    for temperature, body_extra in ((box.temperature, {}), (2.5, {"temperature": 2.5})):
        r = client.post(
            "/distill-batch", json={"model": "alpha", "inputs": x.tolist(), **body_extra}, headers=headers
        )
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["model"] == "alpha" and body["temperature"] == pytest.approx(temperature)
        logits = np.asarray(body["logits"])
        soft = np.asarray(body["soft_labels"])
        np.testing.assert_allclose(logits, keyed, rtol=1e-4, atol=1e-4)
        expected = torch.softmax(torch.from_numpy(keyed) / temperature, dim=1).numpy()
        np.testing.assert_allclose(soft, expected, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(soft.sum(axis=1), 1.0, atol=1e-5)
    # the keyed path is not the plain path (the server really applied the box key)
    assert np.abs(keyed - plain).max() > 1e-4


@pytest.mark.parametrize("header", MALFORMED_NPY_HEADERS.values(), ids=MALFORMED_NPY_HEADERS.keys())
def test_a_malformed_npy_header_is_422_and_audited(
    api: ApiHelper, client: TestClient, database_url: str, header: str
) -> None:
    _, key, headers = api.user_with_key(scopes=["alpha"])
    body = npy_with_header(header, b"\0" * 256)
    raw = client.post(
        "/distill-batch?model=alpha", content=body, headers={**headers, "content-type": "application/x-npy"}
    )
    b64 = client.post(
        "/distill-batch",
        json={"model": "alpha", "inputs_b64": base64.b64encode(body).decode()},
        headers=headers,
    )
    for r in (raw, b64):
        assert r.status_code == 422 and ".npy" in r.json()["detail"], r.text
    rows = audit_rows(database_url, "api_key_id = :k", {"k": key["id"]})
    assert [r.status for r in rows] == [422, 422]


def test_npy_and_base64_bodies(api: ApiHelper, client: TestClient) -> None:
    _, _, headers = api.user_with_key(scopes=["alpha"])
    x = sample(3)
    r1 = client.post(
        "/distill-batch?model=alpha&temperature=2",
        content=npy_bytes(x),
        headers={**headers, "content-type": "application/x-npy"},
    )
    r2 = client.post(
        "/distill-batch",
        json={"model": "alpha", "inputs_b64": base64.b64encode(npy_bytes(x)).decode(), "temperature": 2},
        headers=headers,
    )
    assert r1.status_code == r2.status_code == 200, (r1.text, r2.text)
    np.testing.assert_allclose(r1.json()["soft_labels"], r2.json()["soft_labels"], rtol=1e-6)
    bad = client.post(
        "/distill-batch?model=alpha&temperature=-1",
        content=npy_bytes(x),
        headers={**headers, "content-type": "application/x-npy"},
    )
    assert bad.status_code == 422


def test_temperature_must_be_a_json_number(api: ApiHelper, client: TestClient) -> None:
    _, _, headers = api.user_with_key(scopes=["alpha"])
    for bad in (True, False, "4", None):  # `true` used to be accepted as 1.0
        body = {} if bad is None else {"temperature": bad}
        r = api.distill(headers, n=1, **body)
        assert (r.status_code == 200) == (bad is None), (bad, r.text)
        if bad is not None:
            assert r.status_code == 422 and "temperature" in r.text, r.text
    assert api.distill(headers, n=1, temperature=4).status_code == 200  # a JSON integer is a number


def test_quota_headers_and_429_once_spent(api: ApiHelper, client: TestClient, database_url: str) -> None:
    _, key, headers = api.user_with_key(scopes=["alpha"], sample_quota=10)
    r = api.distill(headers, n=4)
    assert r.status_code == 200
    assert (r.headers["x-quota-limit"], r.headers["x-quota-used"], r.headers["x-quota-remaining"]) == (
        "10",
        "4",
        "6",
    )
    assert api.distill(headers, n=6).headers["x-quota-remaining"] == "0"
    r = api.distill(headers, n=1)
    assert r.status_code == 429
    detail = r.json()["detail"]
    assert detail["error"] == "quota_exceeded" and detail["remaining"] == 0 and detail["quota"] == 10
    assert "quota" in detail["message"]
    # the quota is a total for the key's life: the answer says it never resets, and no Retry-After
    assert detail["resets"] == "never" and "administrator" in detail["message"]
    assert "retry-after" not in r.headers
    assert key_used(database_url, key["id"]) == 10


def test_unlimited_key_reports_unlimited(api: ApiHelper) -> None:
    _, _, headers = api.user_with_key(scopes=["*"])
    r = api.distill(headers, model="beta")
    assert r.status_code == 200 and r.headers["x-quota-remaining"] == "unlimited"


def test_answers_are_finite_or_refused_with_422_and_nothing_charged(
    api: ApiHelper, app: FastAPI, client: TestClient, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, key, headers = api.user_with_key(scopes=["alpha"], sample_quota=100)
    model = app.state.sdb.models.get("alpha")

    async def overflowing(path: str, x: Any) -> Any:
        return np.full((len(x), model.num_classes), np.inf, np.float32)

    with monkeypatch.context() as m:
        m.setattr(model, "infer", overflowing)
        r = api.distill(headers, n=2)
    assert r.status_code == 422 and "finite" in r.json()["detail"], r.text
    tiny = api.distill(headers, n=2, temperature=5e-324)
    assert tiny.status_code == 422 and "temperature" in tiny.text, tiny.text
    assert key_used(database_url, key["id"]) == 0
    low = api.distill(headers, n=2, temperature=0.01)  # the lowest temperature: still finite soft labels
    assert low.status_code == 200
    assert np.isfinite(np.array(low.json()["soft_labels"], dtype=np.float64)).all()
    assert [r.status for r in audit_rows(database_url, "api_key_id = :k", {"k": key["id"]})] == [
        422,
        422,
        200,
    ]


def test_answered_samples_are_counted_once(api: ApiHelper, client: TestClient) -> None:
    """The route counts the samples it answers (sdb_samples_total, path keyed, and
    sdb_samples_distilled_total) once, at the end: a 200 of 3 adds 3, refused calls add nothing."""
    from prometheus_client import REGISTRY

    _, _, headers = api.user_with_key(scopes=["alpha"], sample_quota=5)

    def counts() -> tuple[float, float]:
        keyed = REGISTRY.get_sample_value("sdb_samples_total", {"model": "alpha", "path": "keyed"})
        distilled = REGISTRY.get_sample_value("sdb_samples_distilled_total", {"model": "alpha"})
        return keyed or 0.0, distilled or 0.0

    before = counts()
    assert api.distill(headers, n=3).status_code == 200
    assert api.distill(headers, n=3).status_code == 429  # the quota is spent
    assert api.distill(headers, n=2, temperature=5e-324).status_code == 422
    after = counts()
    assert (after[0] - before[0], after[1] - before[1]) == (3.0, 3.0)


def test_exactly_one_audit_row_per_call_with_its_outcome(
    api: ApiHelper, client: TestClient, database_url: str
) -> None:
    user, key, headers = api.user_with_key(scopes=["alpha"], sample_quota=5)
    before = len(audit_rows(database_url, "endpoint = '/distill-batch'"))
    statuses = [
        api.distill(headers, n=3).status_code,  # 200
        api.distill(headers, n=3).status_code,  # 429 quota
        api.distill(headers, n=2, model="beta").status_code,  # 403 scope
        api.distill({}, n=1).status_code,  # 401
        api.distill(headers, n=2, model="nope").status_code,  # 404
        client.post(
            "/distill-batch", json={"model": "alpha", "inputs": []}, headers=headers
        ).status_code,  # 422
        api.distill(headers, n=2).status_code,  # 200
    ]
    assert statuses == [200, 429, 403, 401, 404, 422, 200]
    rows = audit_rows(database_url, "endpoint = '/distill-batch'")[before:]
    assert [r.status for r in rows] == statuses
    ok = [r for r in rows if r.status == 200]
    assert sum(r.n_samples for r in ok) == key_used(database_url, key["id"]) == 5
    assert all(r.user_id == user["id"] and r.api_key_id == key["id"] for r in rows if r.status != 401)
    assert all(r.input_digest and len(r.input_digest) == 64 for r in ok)
    assert all(r.latency_ms is not None and r.latency_ms >= 0 for r in ok)


def test_rate_limit_per_key_answers_429_with_retry_after(
    make_settings: Any, monkeypatch: pytest.MonkeyPatch, database_url: str
) -> None:
    from service.main import create_app

    now = [1_000_000 * 60 + 5.0]  # fixed inside one minute window
    monkeypatch.setattr(quota, "_clock", lambda: now[0])
    with TestClient(create_app(make_settings(distill_rate_per_minute=3))) as client:
        api = ApiHelper(client)
        _, key, headers = api.user_with_key(scopes=["alpha"])
        _, _, other = api.user_with_key(scopes=["alpha"])
        answers = [api.distill(headers, n=1) for _ in range(4)]
        assert [r.status_code for r in answers] == [200, 200, 200, 429]
        assert answers[0].headers["x-ratelimit-remaining"] == "2"
        assert int(answers[3].headers["retry-after"]) == 55
        assert answers[3].json()["detail"]["error"] == "rate_limited"
        assert api.distill(other, n=1).status_code == 200  # per key, not global
        now[0] += 60  # next window
        assert api.distill(headers, n=1).status_code == 200
    assert key_used(database_url, key["id"]) == 4


async def _burst(app: FastAPI, headers: dict[str, str], n_requests: int, n: int) -> list[int]:
    x = sample(n).tolist()
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=60) as c:
        results = await asyncio.gather(
            *(
                c.post("/distill-batch", json={"model": "alpha", "inputs": x}, headers=headers)
                for _ in range(n_requests)
            )
        )
    return [r.status_code for r in results]


def test_quota_is_exact_under_50_concurrent_calls(make_settings: Any, database_url: str) -> None:
    from service.main import create_app

    app = create_app(make_settings())
    with TestClient(app) as client:
        api = ApiHelper(client)
        _, key, headers = api.user_with_key(scopes=["alpha"], sample_quota=40)
        before = len(audit_rows(database_url))

        async def run() -> list[int]:
            return await _burst(app, headers, 50, 3)

        statuses = client.portal.call(run) if client.portal else asyncio.run(run())
    counts = Counter(statuses)
    assert counts == {200: 13, 429: 37}, counts  # 13 * 3 = 39 <= 40 < 42
    rows = audit_rows(database_url)[before:]
    assert len(rows) == 50
    assert Counter(r.status for r in rows) == counts
    assert sum(r.n_samples for r in rows if r.status == 200) == 39 == key_used(database_url, key["id"])
    assert not [r for r in rows if r.status == STATUS_RESERVED]


def test_inference_failure_gives_the_samples_back(
    api: ApiHelper, app: FastAPI, client: TestClient, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, key, headers = api.user_with_key(scopes=["alpha"], sample_quota=10)
    model = app.state.sdb.models.get("alpha")

    async def boom(path: str, x: Any) -> Any:
        raise RuntimeError("forward pass failed")

    monkeypatch.setattr(model, "infer", boom)
    r = api.distill(headers, n=4)
    assert r.status_code == 500
    assert "forward pass" not in r.text
    assert key_used(database_url, key["id"]) == 0
    assert audit_rows(database_url, "api_key_id = :k", {"k": key["id"]})[-1].status == 500


def test_a_missed_inference_deadline_is_503_on_both_routes(
    api: ApiHelper, app: FastAPI, client: TestClient, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, key, headers = api.user_with_key(scopes=["alpha"], sample_quota=10)
    model = app.state.sdb.models.get("alpha")

    async def late(path: str, x: Any) -> Any:
        raise InferenceTimeout("inference on 'alpha' missed its 30 s deadline")

    monkeypatch.setattr(model, "infer", late)
    distilled = api.distill(headers, n=4)
    predicted = client.post("/predict", json={"model": "alpha", "inputs": sample(1).tolist()})
    for r in (distilled, predicted):
        assert r.status_code == 503 and r.headers["retry-after"] == "1" and "deadline" in r.text
    assert audit_rows(database_url, "api_key_id = :k", {"k": key["id"]})[-1].status == 503
    assert key_used(database_url, key["id"]) == 0


def test_database_down_fails_closed_and_predict_keeps_answering(
    api: ApiHelper, app: FastAPI, client: TestClient, database_url: str
) -> None:
    _, _key, headers = api.user_with_key(scopes=["alpha"])
    assert api.distill(headers).status_code == 200
    real = app.state.sdb
    # a database that refuses connections at once (nothing listens on port 1)
    set_state(app, dataclasses.replace(real, db=Database("postgresql+psycopg://postgres@127.0.0.1:1/none")))
    try:
        r = api.distill(headers)
        assert r.status_code == 503
        assert "soft_labels" not in r.text and r.headers.get("retry-after")
        assert (
            client.post("/predict", json={"model": "alpha", "inputs": sample(1).tolist()}).status_code == 200
        )
        assert client.get("/admin/users", headers=api.admin).status_code == 503
    finally:
        app.state.sdb.db.dispose()
        set_state(app, real)
    assert api.distill(headers).status_code == 200


@pytest.mark.parametrize("backend", [pytest.param("postgres", marks=pytest.mark.postgres)], indirect=True)
def test_pool_recovers_by_itself_after_connections_are_killed(
    api: ApiHelper, app: FastAPI, database_url: str
) -> None:
    import psycopg
    from sqlalchemy.engine import make_url

    _, _, headers = api.user_with_key(scopes=["alpha"])
    assert api.distill(headers).status_code == 200
    dbname = make_url(database_url).database
    admin_url = (
        make_url(database_url).set(drivername="postgresql", database="postgres").render_as_string(False)
    )
    with psycopg.connect(admin_url, autocommit=True) as c:
        c.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE datname = %s AND pid <> pg_backend_pid()",
            (dbname,),
        )
    # pool_pre_ping replaces the dead pooled connections: no error reaches the client
    assert api.distill(headers).status_code == 200


def test_response_never_contains_the_box_key(api: ApiHelper, client: TestClient, box_dir: Path) -> None:
    from sdb_core.keys import load_key

    key = load_key(box_dir / "alpha" / "box_key.json")
    _, _, headers = api.user_with_key(scopes=["alpha"])
    r = api.distill(headers, n=2)
    assert r.status_code == 200
    assert key.seed.hex() not in r.text
    assert set(r.json()) == {"model", "version", "temperature", "soft_labels", "logits"}
    models = client.get("/admin/models", headers=api.admin)
    assert key.seed.hex() not in models.text and "box_key" not in models.text
    assert "seed" not in client.get("/openapi.json").text.lower()


@pytest.mark.parametrize("stage", ["reserve", "inference"])
def test_abandoned_call_releases_its_reservation(
    stage: str, make_settings: Any, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A call cancelled mid-way (client gone, deadline, shutdown) leaves no quota charged for nothing and
    no row stuck in the reserved state."""
    import threading

    from service.main import create_app

    app = create_app(make_settings())
    with TestClient(app) as client:
        api = ApiHelper(client)
        _, key, headers = api.user_with_key(scopes=["alpha"], sample_quota=10)
        real_reserve = quota.reserve_distill
        release = threading.Event()

        def slow_reserve(*a: Any, **k: Any) -> Any:
            release.wait(5)
            return real_reserve(*a, **k)

        if stage == "reserve":
            monkeypatch.setattr(quota, "reserve_distill", slow_reserve)
        else:
            model = app.state.sdb.models.get("alpha")

            async def hang(path: str, x: Any) -> Any:
                await asyncio.sleep(30)

            monkeypatch.setattr(model, "infer", hang)

        async def call_and_cancel() -> None:
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
                task = asyncio.ensure_future(
                    c.post(
                        "/distill-batch",
                        json={"model": "alpha", "inputs": sample(4).tolist()},
                        headers=headers,
                    )
                )
                await asyncio.sleep(0.5)
                task.cancel()
                release.set()
                with pytest.raises(asyncio.CancelledError):
                    await task
                await asyncio.sleep(1.0)  # let the release run

        assert client.portal is not None
        client.portal.call(call_and_cancel)
        monkeypatch.undo()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and key_used(database_url, key["id"]) != 0:
            time.sleep(0.1)
        assert key_used(database_url, key["id"]) == 0
        rows = audit_rows(database_url, "api_key_id = :k", {"k": key["id"]})
        assert [r.status for r in rows] == [499]
        assert api.distill(headers, n=10).status_code == 200  # the whole quota is still there


@pytest.mark.slow
@pytest.mark.e2e
def test_quota_is_exact_across_two_server_processes(database_url: str, box_dir: Path, tmp_path: Path) -> None:
    """Two uvicorn processes on one database (SQLite file in WAL, or PostgreSQL) share one quota exactly;
    they also start together without tripping over the bootstrap admin or the models table."""
    from concurrent.futures import ThreadPoolExecutor

    env = base_env(box_dir, database_url, distill_rate_per_minute=0)
    servers = [Server(env, tmp_path / f"server{i}.log") for i in range(2)]
    try:
        for srv in servers:  # both start at once
            srv.launch()
        for srv in servers:
            srv.wait_ready(90)
        urls = [srv.url for srv in servers]

        def post(url: str, path: str, **kw: Any) -> httpx.Response:
            return httpx.post(url + path, timeout=60, **kw)

        adm = post(urls[0], "/auth/token", json={"api_key": ADMIN_TOKEN}).json()["access_token"]
        admin = {"Authorization": f"Bearer {adm}"}
        user = post(urls[0], "/admin/users", json={"name": "two-procs"}, headers=admin).json()
        key = post(
            urls[1],
            f"/admin/users/{user['id']}/keys",
            json={"scopes": ["alpha"], "sample_quota": 40},
            headers=admin,
        ).json()
        token = post(urls[1], "/auth/token", json={"api_key": key["api_key"]}).json()["access_token"]
        headers = {"Authorization": f"Bearer {token}"}
        body = {"model": "alpha", "inputs": sample(3).tolist()}
        with ThreadPoolExecutor(50) as pool:
            statuses = list(
                pool.map(
                    lambda i: post(urls[i % 2], "/distill-batch", json=body, headers=headers).status_code,
                    range(50),
                )
            )
    finally:
        for srv in servers:
            srv.stop()
    assert Counter(statuses) == {200: 13, 429: 37}
    rows = audit_rows(database_url, "api_key_id = :k", {"k": key["id"]})
    assert Counter(r.status for r in rows) == {200: 13, 429: 37}
    assert key_used(database_url, key["id"]) == 39


def test_stale_reservations_are_released_once_and_never_confirmed_after(
    api: ApiHelper, database_url: str
) -> None:
    """A reservation never confirmed (the database failed at the confirm) gives its samples back once, and
    the late confirm of such a call fails instead of answering uncharged."""
    from service.core.security import verify_token

    _, key, headers = api.user_with_key(scopes=["alpha"], sample_quota=10)
    token = headers["Authorization"].removeprefix("Bearer ")
    claims = verify_token(api.client.app.state.sdb.tokens, token)  # type: ignore[attr-defined]
    db = Database(database_url)
    try:
        grant = quota.reserve_distill(
            db, claims, model="alpha", n_samples=4, client_id=None, digest=None, rate_per_minute=0
        )
        assert key_used(database_url, key["id"]) == 4
        assert quota.release_stale_reservations(db, older_than_s=60) == 0  # still fresh
        later = time.time() + 120
        assert quota.release_stale_reservations(db, older_than_s=60, now=later) == 1
        assert quota.release_stale_reservations(db, older_than_s=60, now=later) == 0
        assert key_used(database_url, key["id"]) == 0
        with pytest.raises(quota.ReservationReleased):
            quota.finalize_distill(db, grant, status=200, latency_ms=1.0)
        quota.finalize_distill(db, grant, status=503, latency_ms=1.0)  # no second refund
        assert key_used(database_url, key["id"]) == 0
    finally:
        db.dispose()
    rows = audit_rows(database_url, "api_key_id = :k", {"k": key["id"]})
    assert [r.status for r in rows] == [audits.STATUS_RELEASED]
    assert api.distill(headers, n=10).status_code == 200  # the whole quota is there again
