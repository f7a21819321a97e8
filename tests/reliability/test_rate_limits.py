"""Rate limits seen end to end on real servers: 429 + Retry-After, bucket identity, several processes."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests._support.admin import create_user_and_key, get_token
from tests._support.boxes import MODEL
from tests._support.postgres import pg_url
from tests._support.server import ServerFactory

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

ONE_SAMPLE = {"model": MODEL, "inputs": [[[[0.5] * 8] * 8]]}


def _retry_after(r: httpx.Response) -> int:
    assert r.status_code == 429, r.text
    value = int(r.headers["Retry-After"])
    assert 1 <= value <= 60
    return value


def _predict(c: httpx.Client, **headers: str) -> httpx.Response:
    return c.post("/predict", json=ONE_SAMPLE, headers=headers)


def _distill(url: str, token: str) -> httpx.Response:
    return httpx.post(
        url + "/distill-batch", json=ONE_SAMPLE, headers={"Authorization": f"Bearer {token}"}, timeout=30
    )


def _start_of_fresh_minute(margin_s: float = 15.0) -> None:
    """The per-key limit uses fixed one-minute windows: keep a test's calls inside one window."""
    into = time.time() % 60
    if into > 60 - margin_s:
        time.sleep(60 - into + 0.1)


def _sqlite(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'rl.db'}"


def test_predict_rate_per_client_and_forged_forwarded_for(
    start_server: ServerFactory, tmp_path: Path
) -> None:
    rate = 5
    # The peer (127.0.0.1) is not a trusted proxy: X-Forwarded-For from it must not pick the bucket.
    srv = start_server(_sqlite(tmp_path), predict_rate_per_minute=rate, trusted_proxies='["10.0.0.0/8"]')
    with httpx.Client(base_url=srv.url, timeout=30) as c:
        for _ in range(rate):
            assert _predict(c).status_code == 200
        r = _predict(c)
        _retry_after(r)
        assert "rate limit" in r.json()["detail"]
        for i in range(5):
            forged = _predict(c, **{"X-Forwarded-For": f"203.0.113.{i}", "X-Real-IP": f"198.51.100.{i}"})
            _retry_after(forged)
        metrics = c.get("/metrics").text
    assert 'sdb_rate_limited_total{route="/predict"}' in metrics


def test_forwarded_for_is_used_from_a_trusted_proxy(start_server: ServerFactory, tmp_path: Path) -> None:
    """Control for the test above: when the peer IS trusted, each forwarded client has its own bucket."""
    srv = start_server(_sqlite(tmp_path), predict_rate_per_minute=2, trusted_proxies='["127.0.0.1/32"]')
    with httpx.Client(base_url=srv.url, timeout=30) as c:
        for _ in range(2):
            assert _predict(c, **{"X-Forwarded-For": "203.0.113.1"}).status_code == 200
        _retry_after(_predict(c, **{"X-Forwarded-For": "203.0.113.1"}))
        assert _predict(c, **{"X-Forwarded-For": "203.0.113.2"}).status_code == 200


def test_distill_rate_per_key(start_server: ServerFactory, tmp_path: Path) -> None:
    rate = 3
    srv = start_server(_sqlite(tmp_path), distill_rate_per_minute=rate)
    first = create_user_and_key(srv.url, scopes=[MODEL])
    other = create_user_and_key(srv.url, scopes=[MODEL])
    token, other_token = get_token(srv.url, first.api_key), get_token(srv.url, other.api_key)
    _start_of_fresh_minute()
    statuses = [_distill(srv.url, token).status_code for _ in range(rate)]
    assert statuses == [200] * rate
    r = _distill(srv.url, token)
    _retry_after(r)
    body: dict[str, Any] = r.json()["detail"]
    assert body["error"] == "rate_limited"
    # Another key keeps its own budget.
    assert _distill(srv.url, other_token).status_code == 200


@pytest.mark.postgres
def test_distill_rate_shared_by_two_server_processes(start_server: ServerFactory, pg_db: str) -> None:
    """The per-key counter lives in the database: two processes on one PostgreSQL share the budget."""
    rate = 4
    a = start_server(pg_url(pg_db), distill_rate_per_minute=rate)
    b = start_server(pg_url(pg_db), migrate=False, distill_rate_per_minute=rate)
    creds = create_user_and_key(a.url, scopes=[MODEL])
    token = get_token(b.url, creds.api_key)
    _start_of_fresh_minute()
    statuses = [_distill(srv.url, token).status_code for srv in (a, b, a, b)]
    assert statuses == [200] * rate
    _retry_after(_distill(a.url, token))
    _retry_after(_distill(b.url, token))
    # Both refusals are audited, by whichever process answered them.
    r = httpx.get(
        a.url + "/admin/audits",
        params={"endpoint": "/distill-batch", "status": 429},
        headers=creds.admin_headers,
        timeout=30,
    )
    assert r.status_code == 200
    assert r.json()["total"] == 2
    assert json.dumps(r.json()).count(creds.api_key) == 0
