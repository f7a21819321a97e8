"""Scale-out: two `sdb serve` processes on two loopback ports, one PostgreSQL database, one quota and one
revocation list. Everything goes through the documented interfaces: `sdb db upgrade`, `sdb admin
bootstrap`, then the HTTP API (admin -> user -> API key -> token -> /distill-batch)."""

from __future__ import annotations

import secrets
import subprocess
from pathlib import Path
from typing import Any

import httpx
import pytest

from sdb_core.artifact import make_test_box
from tests._support.net import free_port
from tests._support.ops import clean_env, sdb_executable
from tests._support.server import Server, server_process

pytestmark = [pytest.mark.e2e, pytest.mark.postgres, pytest.mark.slow]

MODEL = "scale-box"
INPUT_SHAPE = (1, 8, 8)
BATCH = 3
QUOTA = 10  # 3 calls of 3 samples fit (9); the 4th would need 12 > 10


def _sdb(env: dict[str, str], *args: str) -> str:
    r = subprocess.run([sdb_executable(), *args], env=env, capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, f"sdb {' '.join(args)}:\n{r.stdout}\n{r.stderr}"
    return r.stdout


def _token(client: httpx.Client, server: Server, api_key: str) -> dict[str, str]:
    r = client.post(server.url + "/auth/token", json={"api_key": api_key})
    assert r.status_code == 200, r.text
    return {"Authorization": f"Bearer {r.json()['access_token']}"}


def _distill(client: httpx.Client, server: Server, headers: dict[str, str]) -> httpx.Response:
    inputs: list[Any] = [[[[0.1 * i] * INPUT_SHAPE[2]] * INPUT_SHAPE[1]] for i in range(BATCH)]
    return client.post(
        server.url + "/distill-batch", json={"model": MODEL, "inputs": inputs}, headers=headers
    )


def _issue_key(
    client: httpx.Client, server: Server, admin: dict[str, str], user_id: int, **body: Any
) -> dict[str, Any]:
    r = client.post(
        server.url + f"/admin/users/{user_id}/keys", json={"scopes": [MODEL], **body}, headers=admin
    )
    assert r.status_code == 201, r.text
    return dict(r.json())


def test_two_servers_enforce_one_quota_and_one_revocation_list(
    pg_database: str, servers: list[Server], tmp_path: Path
) -> None:
    make_test_box(tmp_path / "models", name=MODEL, input_shape=INPUT_SHAPE)
    env = clean_env(
        SDB_DATABASE_URL=pg_database,
        SDB_MODEL_DIR=str(tmp_path / "models"),
        SDB_JWT_SECRET=secrets.token_hex(32),  # shared by both processes, as in docs/operations.md
        SDB_CLIENT_IP_SALT=secrets.token_hex(16),
        SDB_DEVICE="cpu",
        SDB_TORCH_THREADS="1",
    )
    _sdb(env, "db", "upgrade")
    admin_key = _sdb(env, "admin", "bootstrap").strip().splitlines()[-1]

    a, b = (
        server_process(
            [sdb_executable(), "serve", "--host", "127.0.0.1", "--port", str(port)],
            env,
            port,
            tmp_path / f"{n}.log",
        )
        for n, port in (("a", free_port()), ("b", free_port()))
    )
    servers.extend([a, b])
    a.start()
    b.start()

    with httpx.Client(timeout=30) as client:
        admin = _token(client, a, admin_key)
        r = client.post(
            b.url + "/admin/users", json={"name": "scale-user"}, headers=_token(client, b, admin_key)
        )
        assert r.status_code == 201, r.text
        user_id = r.json()["id"]

        # One quota: calls alternate between the servers; the quota is spent after QUOTA // BATCH calls in
        # total, not per server, and from then on both servers refuse.
        key = _issue_key(client, a, admin, user_id, sample_quota=QUOTA)
        user = _token(client, b, key["api_key"])
        answered = 0
        for call in range(2 * (QUOTA // BATCH) + 2):
            server = (a, b)[call % 2]
            r = _distill(client, server, user)
            if r.status_code != 200:
                break
            answered += 1
            assert r.headers["X-Quota-Remaining"] == str(QUOTA - answered * BATCH)
        assert r.status_code == 429, r.text
        assert answered == QUOTA // BATCH
        assert {_distill(client, s, user).status_code for s in (a, b)} == {429}
        used = client.get(b.url + "/admin/keys", headers=admin).json()["items"]
        assert next(k for k in used if k["id"] == key["id"])["samples_used"] == answered * BATCH

        # One revocation list: a key revoked through server a is refused at once by server b, for live
        # tokens and for new token requests alike.
        key2 = _issue_key(client, b, admin, user_id)
        user2 = _token(client, a, key2["api_key"])
        assert _distill(client, b, user2).status_code == 200
        assert client.post(a.url + f"/admin/keys/{key2['id']}/revoke", headers=admin).status_code == 200
        assert _distill(client, b, user2).status_code == 401
        assert _distill(client, a, user2).status_code == 401
        assert client.post(b.url + "/auth/token", json={"api_key": key2["api_key"]}).status_code == 401
