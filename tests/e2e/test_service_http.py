"""End to end over real HTTP on SQLite and PostgreSQL: the access rules of /distill-batch, audits, metrics.

Each backend gets a fresh database migrated with Alembic, a real `sdb serve` (uvicorn) on a free loopback
port, and an administrator created by the documented CLI (`sdb admin bootstrap`, which prints the admin's
API key once). The admin creates a user and issues an API key scoped to one of two models; then every
refusal the service promises is checked, and finally the audit table and /metrics are compared with the
exact number of calls this test made.
"""

from __future__ import annotations

import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from jose import jwt
from sqlalchemy import text

from sdb_core.artifact import make_test_box
from service.db.session import make_engine
from tests._support.db import run_migrations
from tests._support.postgres import pg_available, pg_database, pg_url
from tests._support.server import JWT_SECRET, PYTHON, REPO, Server, base_env

pytestmark = [pytest.mark.slow, pytest.mark.e2e]

QUOTA = 12
ISSUER, AUDIENCE = "sdb", "sdb-distill"  # the Settings defaults, which the server below runs with


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("e2e-http-models")
    make_test_box(d, name="alpha", seed=11)
    make_test_box(d, name="beta", seed=12)
    return d


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'sdb.db'}"
        return
    if not pg_available():
        pytest.skip("no PostgreSQL server at SDB_TEST_POSTGRES_URL")
    with pg_database("sdb_e2e") as name:
        yield pg_url(name)


@pytest.fixture
def server(models: Path, database_url: str, tmp_path: Path) -> Iterator[tuple[Server, str]]:
    run_migrations(database_url)
    env = base_env(models, database_url, predict_rate_per_minute=0, distill_rate_per_minute=0)
    env.pop("SDB_BOOTSTRAP_ADMIN_TOKEN")
    boot = subprocess.run(
        [PYTHON, "-m", "sdb.cli", "admin", "bootstrap", "--name", "root"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    admin_key = boot.stdout.strip().splitlines()[-1]
    assert admin_key.startswith("sdb_"), "bootstrap prints the admin API key on its last stdout line"
    srv = Server(env=env, log_path=tmp_path / "server.log").start()
    try:
        yield srv, admin_key
    finally:
        srv.stop()


def token_for(base: str, api_key: str) -> str:
    r = httpx.post(base + "/auth/token", data={"grant_type": "client_credentials", "client_secret": api_key})
    assert r.status_code == 200, r.text
    return str(r.json()["access_token"])


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def forged(claims: dict[str, Any], secret: str = JWT_SECRET, **overrides: Any) -> str:
    return jwt.encode({**claims, **overrides}, secret, algorithm="HS256")


def alg_none(claims: dict[str, Any]) -> str:
    import base64
    import json

    def b64(obj: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()

    return f"{b64({'alg': 'none', 'typ': 'JWT'})}.{b64(claims)}."


def metric_total(metrics: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in metrics.splitlines():
        if not line.startswith(name + "{"):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_access_rules_audits_and_metrics_over_http(server: tuple[Server, str], database_url: str) -> None:
    srv, admin_key = server
    base = srv.url
    admin = bearer(token_for(base, admin_key))
    x = np.random.default_rng(0).normal(size=(3, 1, 8, 8)).astype("float32").tolist()
    calls = {"distill": 0, "predict": 0}

    def distill(headers: dict[str, str] | None, model: str = "alpha", n: int = 3) -> httpx.Response:
        calls["distill"] += 1
        return httpx.post(base + "/distill-batch", json={"model": model, "inputs": x[:n]}, headers=headers)

    # Anyone may predict.
    calls["predict"] += 1
    r = httpx.post(base + "/predict", json={"model": "alpha", "inputs": x})
    assert r.status_code == 200, r.text
    assert len(r.json()["predictions"]) == 3

    # An administrator creates a user and issues an API key for model alpha with a sample quota.
    r = httpx.post(base + "/admin/users", json={"name": "licensee"}, headers=admin)
    assert r.status_code == 201, r.text
    user_id = r.json()["id"]
    r = httpx.post(
        base + f"/admin/users/{user_id}/keys",
        json={"scopes": ["alpha"], "sample_quota": QUOTA},
        headers=admin,
    )
    assert r.status_code == 201, r.text
    api_key = r.json()["api_key"]
    good = token_for(base, api_key)
    claims = jwt.get_unverified_claims(good)

    # Every kind of bad credential is a 401 with a JSON body, and nothing is charged.
    now = int(time.time())
    bad_tokens = {
        "malformed": "not-a-jwt",
        "expired": forged(claims, iat=now - 600, nbf=now - 600, exp=now - 300),
        "wrong audience": forged(claims, aud="someone-else"),
        "alg none": alg_none(claims),
        "wrong signature": forged(claims, secret="another-secret-of-sufficient-length-0123456789"),
    }
    assert distill(None).status_code == 401
    for name, tok in bad_tokens.items():
        r = distill(bearer(tok))
        assert r.status_code == 401, (name, r.text)
        assert r.headers["content-type"].startswith("application/json") and r.json(), name

    # A valid token works, and the response reports the remaining quota.
    r = distill(bearer(good))
    assert r.status_code == 200, r.text
    assert len(r.json()["soft_labels"]) == 3
    assert r.headers["X-Quota-Remaining"] == str(QUOTA - 3)

    # A model outside the key's scope: 403.
    r = distill(bearer(good), model="beta")
    assert r.status_code == 403, r.text

    # Spend the quota: 3 + 3 + 3 = 9 of 12, then 3 more = 12, then the next call is 429 with a clear body.
    for _ in range(3):
        assert distill(bearer(good)).status_code == 200
    r = distill(bearer(good))
    assert r.status_code == 429, r.text
    assert "quota" in r.text.lower()

    # A revoked key's live token stops working at once.
    r = httpx.post(base + f"/admin/users/{user_id}/keys", json={"scopes": ["alpha"]}, headers=admin)
    second_id, second_key = r.json()["id"], r.json()["api_key"]
    second = token_for(base, second_key)
    assert distill(bearer(second)).status_code == 200
    assert httpx.post(base + f"/admin/keys/{second_id}/revoke", headers=admin).status_code == 200
    r = distill(bearer(second))
    assert r.status_code == 401, r.text

    # The audit table holds exactly one row per call (predict rows are written in the background).
    engine = make_engine(database_url)
    try:
        deadline = time.monotonic() + 20
        while True:
            with engine.connect() as c:
                counts = dict(
                    c.execute(text("SELECT endpoint, COUNT(*) FROM query_audits GROUP BY endpoint")).all()
                )
            if counts.get("/predict", 0) >= calls["predict"] or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        with engine.connect() as c:
            served = c.execute(
                text("SELECT COALESCE(SUM(n_samples), 0) FROM query_audits WHERE endpoint='/distill-batch'")
            ).scalar_one()
    finally:
        engine.dispose()
    assert counts.get("/distill-batch") == calls["distill"], counts
    assert counts.get("/predict") == calls["predict"], counts
    assert served == QUOTA + 3  # the first key's whole quota and one call of the second key

    # /metrics counts the same calls (no label holds a user, key or address).
    metrics = httpx.get(base + "/metrics").text
    assert metric_total(metrics, "sdb_http_requests_total", route="/distill-batch") == calls["distill"]
    assert metric_total(metrics, "sdb_http_requests_total", route="/predict") == calls["predict"]
    assert metric_total(metrics, "sdb_samples_distilled_total") == QUOTA + 3
    assert metric_total(metrics, "sdb_quota_rejections_total") == 1
    assert metric_total(metrics, "sdb_auth_failures_total") >= len(bad_tokens) + 2
    assert not re.search(r'(user|key|client|address|ip)(_id)?="', metrics)
