"""Database faults and graceful shutdown against a real server on PostgreSQL behind a cuttable proxy.

The shared PostgreSQL server is never stopped: the server under test reaches it through `PgProxy`, which
the tests cut (every connection aborted, new ones refused), slow down and restore.
"""

from __future__ import annotations

import concurrent.futures as cf
import signal
import time
from typing import Any

import httpx
import numpy as np
import pytest

from tests._support.admin import create_user_and_key, get_token
from tests._support.boxes import MODEL
from tests._support.db import count_audits, run_migrations
from tests._support.pgproxy import PgProxy
from tests._support.postgres import pg_url
from tests._support.server import Server, ServerFactory

pytestmark = [pytest.mark.postgres, pytest.mark.e2e, pytest.mark.slow]

RECOVERY_S = 20.0  # pool_pre_ping + the connect timeout: the server must recover well within this
FAST_FAIL_S = 5.0  # "fails fast": well below an HTTP client's usual timeout (the DB connect timeout is 3 s)


def _inputs(n: int, seed: int = 0) -> list[Any]:
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, 1, 8, 8)).astype(np.float32).tolist()


def _predict(c: httpx.Client, n: int = 2, seed: int = 0) -> httpx.Response:
    return c.post("/predict", json={"model": MODEL, "inputs": _inputs(n, seed)})


def _distill(c: httpx.Client, token: str, n: int = 2, seed: int = 0) -> httpx.Response:
    return c.post(
        "/distill-batch",
        json={"model": MODEL, "inputs": _inputs(n, seed)},
        headers={"Authorization": f"Bearer {token}"},
    )


def _wait_until(pred: Any, timeout: float, step: float = 0.25) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(step)
    return False


def _proxied_server(start_server: ServerFactory, pg_db: str, proxy: PgProxy, **settings: Any) -> Server:
    run_migrations(pg_url(pg_db))
    return start_server(pg_url(pg_db, proxy.port), migrate=False, **settings)


def test_database_down_then_back(start_server: ServerFactory, pg_db: str, pg_proxy: PgProxy) -> None:
    srv = _proxied_server(start_server, pg_db, pg_proxy)
    creds = create_user_and_key(srv.url, scopes=[MODEL])
    token = get_token(srv.url, creds.api_key)
    answered_predict = 0
    with httpx.Client(base_url=srv.url, timeout=30) as c:
        assert c.get("/readyz").status_code == 200
        assert _predict(c).status_code == 200
        answered_predict += 1
        assert _distill(c, token).status_code == 200

        pg_proxy.cut()
        for i in range(5):
            r = _predict(c, seed=i)
            answered_predict += 1
            assert r.status_code == 200, r.text
        t0 = time.monotonic()
        r = _distill(c, token)
        elapsed = time.monotonic() - t0
        assert r.status_code == 503, r.text
        assert elapsed < FAST_FAIL_S
        assert "soft_labels" not in r.text and "logits" not in r.text
        assert r.headers["content-type"].startswith("application/json")
        r = c.get("/readyz")
        assert r.status_code == 503
        assert r.json()["database"] != "ok"
        # Everything else that needs the database answers a fast, clean 503 too (never a 500 or a hang).
        form = {"grant_type": "client_credentials", "client_secret": creds.api_key}
        calls: list[tuple[str, str, dict[str, Any]]] = [
            ("POST", "/auth/token", {"data": form}),
            ("GET", "/admin/users", {"headers": creds.admin_headers}),
            ("GET", "/admin/audits", {"headers": creds.admin_headers}),
        ]
        for method, path, kw in calls:
            t0 = time.monotonic()
            r = c.request(method, path, **kw)
            assert r.status_code == 503, (path, r.status_code, r.text)
            assert time.monotonic() - t0 < FAST_FAIL_S
            assert creds.api_key not in r.text

        pg_proxy.restore()
        assert _wait_until(lambda: c.get("/readyz").status_code == 200, RECOVERY_S)
        r = _distill(c, token, seed=9)
        assert r.status_code == 200, r.text
        assert len(r.json()["soft_labels"]) == 2
        assert _predict(c, seed=9).status_code == 200
        answered_predict += 1

    # /predict answered while the database was down: its audit rows were kept and written on recovery.
    direct = pg_url(pg_db)
    assert _wait_until(lambda: count_audits(direct, "/predict") == answered_predict, RECOVERY_S), (
        f"{count_audits(direct, '/predict')} /predict audit rows for {answered_predict} answers"
    )
    # Exactly the two answered /distill-batch calls are recorded as answered; the refused one charged nothing.
    assert count_audits(direct, "/distill-batch", "status = 200") == 2
    assert count_audits(direct, "/distill-batch", "status = 102") == 0


def test_slow_database_does_not_block_predict(
    start_server: ServerFactory, pg_db: str, pg_proxy: PgProxy
) -> None:
    delay = 1.0  # per forwarded chunk: one SQL round trip costs >= 2 s
    srv = _proxied_server(start_server, pg_db, pg_proxy)
    creds = create_user_and_key(srv.url, scopes=[MODEL])
    token = get_token(srv.url, creds.api_key)

    def distill(i: int) -> int:
        with httpx.Client(base_url=srv.url, timeout=60) as c:
            return _distill(c, token, seed=i).status_code

    with httpx.Client(base_url=srv.url, timeout=60) as c, cf.ThreadPoolExecutor(4) as pool:
        assert _predict(c).status_code == 200  # warm
        pg_proxy.slow(delay)
        # Distill calls now wait on the database; /predict must not wait behind them.
        pending = [pool.submit(distill, i) for i in range(3)]
        time.sleep(0.3)
        latencies = []
        for i in range(5):
            t0 = time.monotonic()
            r = _predict(c, seed=i)
            latencies.append(time.monotonic() - t0)
            assert r.status_code == 200, r.text
        assert max(latencies) < delay, latencies
        assert any(not f.done() for f in pending), "the distill calls should still wait on the slow database"
        pg_proxy.restore()
        statuses = [f.result(timeout=60) for f in pending]
    # A slow (not dead) database only delays the licensed path; it must not fail it.
    assert statuses == [200, 200, 200]


def test_sigterm_finishes_inflight_requests(
    start_server: ServerFactory, pg_db: str, pg_proxy: PgProxy
) -> None:
    srv = _proxied_server(start_server, pg_db, pg_proxy, graceful_s=30)
    n_distill, n_predict = 4, 8
    # One key per call: calls on one key serialize on its row lock, these must be in flight together.
    tokens = [
        get_token(srv.url, create_user_and_key(srv.url, scopes=[MODEL]).api_key) for _ in range(n_distill)
    ]

    def distill(i: int) -> int:
        with httpx.Client(base_url=srv.url, timeout=60) as c:
            return _distill(c, tokens[i], seed=i).status_code

    def predict(i: int) -> int:
        with httpx.Client(base_url=srv.url, timeout=60) as c:
            return _predict(c, n=256, seed=i).status_code

    direct = pg_url(pg_db)
    # A slow database keeps the /distill-batch calls in flight for seconds, and the /predict audit rows
    # in the writer's queue.
    pg_proxy.slow(0.25)
    with cf.ThreadPoolExecutor(n_distill + n_predict) as pool:
        predicts = [pool.submit(predict, i) for i in range(n_predict)]
        statuses = [f.result(timeout=60) for f in predicts]
        distills = [pool.submit(distill, i) for i in range(n_distill)]
        # In flight for sure: their quota is reserved (audit status 102) and their answers not yet sent. A
        # request only sent, not yet accepted, at SIGTERM would be refused: that is not "in flight".
        assert _wait_until(
            lambda: count_audits(direct, "/distill-batch", "status = 102") == n_distill, 30, 0.05
        )
        assert not any(f.done() for f in distills)
        srv.terminate()
        statuses += [f.result(timeout=90) for f in distills]
    # uvicorn re-raises the caught SIGTERM once it has shut down cleanly, so -SIGTERM is a clean exit too.
    assert srv.wait(timeout=60) in (0, -signal.SIGTERM)
    assert "Application shutdown complete" in srv.logs()
    pg_proxy.restore()

    assert statuses == [200] * (n_distill + n_predict)
    assert count_audits(direct, "/distill-batch", "status = 200") == n_distill
    assert count_audits(direct, "/distill-batch", "status = 102") == 0
    assert count_audits(direct, "/predict") == n_predict


def test_partitioned_database_never_hangs_a_request(
    start_server: ServerFactory, pg_db: str, pg_proxy: PgProxy
) -> None:
    """Connections that stay open but carry nothing (a partition, a hung server): nothing waits forever."""
    inference_timeout = 4.0  # the request deadline is this + 5 s (service.middleware.DeadlineMiddleware)
    srv = _proxied_server(start_server, pg_db, pg_proxy, inference_timeout_s=inference_timeout)
    creds = create_user_and_key(srv.url, scopes=[MODEL])
    token = get_token(srv.url, creds.api_key)
    limit = inference_timeout + 5 + FAST_FAIL_S
    with httpx.Client(base_url=srv.url, timeout=60) as c:
        assert _distill(c, token).status_code == 200
        pg_proxy.partition()
        t0 = time.monotonic()
        r = c.get("/readyz")
        assert r.status_code == 503 and time.monotonic() - t0 < FAST_FAIL_S
        assert _predict(c).status_code == 200
        t0 = time.monotonic()
        r = _distill(c, token)
        assert time.monotonic() - t0 < limit
        assert r.status_code in (503, 504), r.text
        assert "soft_labels" not in r.text
        pg_proxy.restore()
        assert _wait_until(lambda: c.get("/readyz").status_code == 200, RECOVERY_S)
        assert _wait_until(lambda: _distill(c, token).status_code == 200, RECOVERY_S)
        assert _predict(c).status_code == 200


def test_lost_commit_answer_writes_no_duplicate_audit_row(
    start_server: ServerFactory, pg_db: str, pg_proxy: PgProxy
) -> None:
    """The database commits a /predict audit batch but the answer to COMMIT is lost: the writer cannot know,
    retries when the database returns, and must not record the same call twice."""
    srv = _proxied_server(start_server, pg_db, pg_proxy)
    with httpx.Client(base_url=srv.url, timeout=30) as c:
        pg_proxy.cut_after_next_commit()  # the next COMMIT through the proxy is the audit writer's
        assert _predict(c).status_code == 200
        assert _wait_until(lambda: pg_proxy.is_down, RECOVERY_S)
        pg_proxy.restore()
        assert _predict(c, seed=1).status_code == 200
    srv.stop()
    assert count_audits(pg_url(pg_db), "/predict") == 2
