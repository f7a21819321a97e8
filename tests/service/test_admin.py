"""The admin API on SQLite and PostgreSQL: users, keys (secret shown once), audits with filters and
pagination, usage, samples over time per user and per anonymous client with the extraction flag, models,
and the security events of admin actions.
"""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime, timedelta
from typing import Any

from fastapi import FastAPI
from fastapi.testclient import TestClient

from service.db.audit_queue import AuditRecord
from tests._support.api import TEST_ADMIN_TOKEN, ApiHelper


def test_users_create_list_get_disable(api: ApiHelper, client: TestClient) -> None:
    a = api.create_user("alice")
    assert a["role"] == "user" and not a["disabled"]
    r = client.post("/admin/users", json={"name": "alice"}, headers=api.admin)
    assert r.status_code == 409
    assert client.post("/admin/users", json={"name": "bad name\n"}, headers=api.admin).status_code == 422
    assert (
        client.post("/admin/users", json={"name": "x", "role": "root"}, headers=api.admin).status_code == 422
    )
    for i in range(3):
        api.create_user(f"user{i}")
    page = client.get("/admin/users?limit=2&offset=1", headers=api.admin).json()
    assert page["total"] == 5 and page["limit"] == 2 and len(page["items"]) == 2  # admin + alice + 3
    assert client.get(f"/admin/users/{a['id']}", headers=api.admin).json()["name"] == "alice"
    assert client.get("/admin/users/99999", headers=api.admin).status_code == 404
    d = client.post(f"/admin/users/{a['id']}/disable", headers=api.admin).json()
    assert d["disabled"] and d["disabled_at"]


def test_admin_cannot_disable_itself(api: ApiHelper, client: TestClient) -> None:
    me = client.get("/admin/users", headers=api.admin).json()["items"][0]
    assert me["role"] == "admin"
    assert client.post(f"/admin/users/{me['id']}/disable", headers=api.admin).status_code == 409


def test_key_secret_is_shown_once_and_only_its_hash_is_stored(
    api: ApiHelper, client: TestClient, database_url: str
) -> None:
    user = api.create_user()
    created = api.issue_key(
        user["id"], scopes=["alpha", "beta"], sample_quota=100, expires_in_s=3600, name="lab"
    )
    secret = created["api_key"]
    assert secret.startswith("sdb_") and created["prefix"] == secret[:12]
    assert created["scopes"] == ["alpha", "beta"] and created["sample_quota"] == 100
    assert datetime.fromisoformat(created["expires_at"]) > datetime.now(UTC) + timedelta(minutes=59)
    listed = client.get(f"/admin/users/{user['id']}/keys", headers=api.admin)
    assert listed.status_code == 200 and listed.json()["total"] == 1
    assert secret not in listed.text and "api_key" not in listed.json()["items"][0]
    everything = (
        client.get("/admin/keys", headers=api.admin).text
        + client.get("/admin/events", headers=api.admin).text
    )
    assert secret not in everything and hashlib.sha256(secret.encode()).hexdigest() not in everything

    from sqlalchemy import create_engine, text

    eng = create_engine(database_url.replace("postgresql+psycopg", "postgresql+psycopg"))
    try:
        with eng.connect() as c:
            dump = " ".join(
                str(row)
                for t in ("api_keys", "users", "security_events", "query_audits")
                for row in c.execute(text(f"SELECT * FROM {t}"))
            )
    finally:
        eng.dispose()
    assert secret not in dump and TEST_ADMIN_TOKEN not in dump
    assert hashlib.sha256(secret.encode()).hexdigest() in dump  # the hash is what is kept


def test_key_validation(api: ApiHelper, client: TestClient) -> None:
    user = api.create_user()
    url = f"/admin/users/{user['id']}/keys"
    for bad in (
        {"scopes": ["bad scope"]},
        {"scopes": ["alpha"], "sample_quota": -1},
        {"scopes": ["alpha"], "expires_at": "2001-01-01T00:00:00Z"},
        {"scopes": ["alpha"], "unknown": 1},
    ):
        assert client.post(url, json=bad, headers=api.admin).status_code == 422, bad
    assert client.post("/admin/users/99999/keys", json={"scopes": []}, headers=api.admin).status_code == 404
    client.post(f"/admin/users/{user['id']}/disable", headers=api.admin)
    assert client.post(url, json={"scopes": ["alpha"]}, headers=api.admin).status_code == 409


def test_names_and_labels_refuse_a_trailing_newline(api: ApiHelper, client: TestClient) -> None:
    # Python's `$` matches before a final newline; every pattern of the schemas must refuse "alice\n"
    assert client.post("/admin/users", json={"name": "alice\n"}, headers=api.admin).status_code == 422
    user = api.create_user("alice")
    url = f"/admin/users/{user['id']}/keys"
    assert client.post(url, json={"scopes": ["alpha"], "name": "lab\n"}, headers=api.admin).status_code == 422
    assert client.get("/admin/audits?model=alpha%0A", headers=api.admin).status_code == 422


def test_key_numbers_are_strict(api: ApiHelper, client: TestClient) -> None:
    user = api.create_user()
    url = f"/admin/users/{user['id']}/keys"
    for bad in (
        {"sample_quota": True},
        {"sample_quota": "100"},
        {"sample_quota": 1.5},
        {"expires_in_s": True},
        {"expires_in_s": "3600"},
    ):
        r = client.post(url, json={"scopes": ["alpha"], **bad}, headers=api.admin)
        assert r.status_code == 422, (bad, r.text)
    assert client.get(url, headers=api.admin).json()["total"] == 0


def test_key_scopes_must_name_served_models(api: ApiHelper, client: TestClient) -> None:
    user = api.create_user()
    url = f"/admin/users/{user['id']}/keys"
    for scopes in (["no-such-model"], ["alpha", "no-such-model"], ["alpha\n"], ["*\n"]):
        r = client.post(url, json={"scopes": scopes}, headers=api.admin)
        assert r.status_code == 422, (scopes, r.text)
    r = client.post(url, json={"scopes": ["no-such-model"]}, headers=api.admin)
    assert "no-such-model" in r.text and "alpha" in r.text, r.text  # names the unknown and the served models
    assert client.get(url, headers=api.admin).json()["total"] == 0
    ok = client.post(url, json={"scopes": ["alpha", "*"]}, headers=api.admin)
    assert ok.status_code == 201 and ok.json()["scopes"] == ["*", "alpha"], ok.text


def test_revoke_key(api: ApiHelper, client: TestClient) -> None:
    _, key, _ = api.user_with_key()
    r = client.post(f"/admin/keys/{key['id']}/revoke", headers=api.admin)
    assert r.status_code == 200 and r.json()["revoked_at"]
    assert client.post("/admin/keys/99999/revoke", headers=api.admin).status_code == 404


def _predict(client: TestClient, n: int, ip_headers: dict[str, str] | None = None) -> None:
    r = client.post(
        "/predict", json={"model": "alpha", "inputs": [[[[0.5] * 8] * 8]] * n}, headers=ip_headers or {}
    )
    assert r.status_code == 200, r.text


def test_audits_filters_and_pagination(api: ApiHelper, client: TestClient, app: FastAPI) -> None:
    u1, _k1, h1 = api.user_with_key(scopes=["alpha", "beta"])
    u2, k2, h2 = api.user_with_key(scopes=["alpha"])
    for _ in range(3):
        assert api.distill(h1, n=2).status_code == 200
    assert api.distill(h1, n=1, model="beta").status_code == 200
    assert api.distill(h2, n=5).status_code == 200
    _predict(client, 2)
    app.state.sdb.audit_queue.flush()

    def get(**params: Any) -> dict[str, Any]:
        r = client.get("/admin/audits", params=params, headers=api.admin)
        assert r.status_code == 200, r.text
        return dict(r.json())

    assert get(user_id=u1["id"])["total"] == 4
    assert get(key_id=k2["id"])["total"] == 1
    assert get(model="beta")["total"] == 1
    assert get(endpoint="/predict")["total"] == 1
    assert get(endpoint="/distill-batch", status=200)["total"] == 5
    page1, page2 = get(user_id=u1["id"], limit=3), get(user_id=u1["id"], limit=3, offset=3)
    ids = [a["id"] for a in page1["items"] + page2["items"]]
    assert len(ids) == len(set(ids)) == 4 and ids == sorted(ids, reverse=True)  # newest first, no overlap
    future = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
    past = (datetime.now(UTC) - timedelta(hours=1)).isoformat()
    assert get(since=future)["total"] == 0
    assert get(since=past, until=future, user_id=u2["id"])["total"] == 1
    assert client.get("/admin/audits?limit=0", headers=api.admin).status_code == 422


def test_usage_summary(api: ApiHelper, client: TestClient) -> None:
    u1, _, h1 = api.user_with_key(scopes=["alpha", "beta"], sample_quota=5)
    api.distill(h1, n=2)
    api.distill(h1, n=3, model="beta")
    assert api.distill(h1, n=1).status_code == 429
    page = client.get("/admin/usage", headers=api.admin).json()
    assert set(page) == {"items", "total", "limit", "offset", "total_capped"}  # every list endpoint
    rows = {u["user_id"]: u for u in page["items"]}
    assert page["total"] >= len(page["items"]) >= 2
    one = client.get("/admin/usage", params={"limit": 1, "offset": 1}, headers=api.admin).json()
    assert len(one["items"]) == 1 and one["total"] == page["total"]
    me = rows[u1["id"]]
    assert (me["requests"], me["answered"], me["samples"], me["rejected"]) == (3, 2, 5, 1)
    assert me["by_model"] == {"alpha": 2, "beta": 3}
    assert me["last_seen"] is not None


def test_samples_over_time_per_user_and_per_anonymous_client(make_settings: Any, database_url: str) -> None:
    from service.main import create_app

    app = create_app(make_settings(extraction_sample_threshold=5, extraction_window_s=3600))
    with TestClient(app) as client:
        api = ApiHelper(client)
        u1, _, h1 = api.user_with_key(scopes=["alpha"])
        api.distill(h1, n=4)
        api.distill(h1, n=3)
        _predict(client, 4)
        _predict(client, 3)  # 7 > 5 within the window: flagged
        app.state.sdb.audit_queue.flush()
        # an older window, recorded through the audit queue: a second anonymous client below the threshold
        app.state.sdb.audit_queue.submit(
            AuditRecord(
                endpoint="/predict",
                model="alpha",
                client_id="anon-old",
                n_samples=2,
                status=200,
                latency_ms=1.0,
                input_digest=None,
                created_at=datetime.now(UTC) - timedelta(hours=5),
            )
        )
        app.state.sdb.audit_queue.flush()

        users = client.get("/admin/usage/clients", params={"kind": "user"}, headers=api.admin).json()
        mine = next(i for i in users["items"] if i["client"] == str(u1["id"]))
        assert mine["samples"] == 7 and mine["requests"] == 2 and not mine["flagged"]
        assert sum(b["samples"] for b in mine["series"]) == 7

        anon = client.get(
            "/admin/usage/clients", params={"kind": "anonymous", "bucket_s": 3600}, headers=api.admin
        ).json()
        assert anon["total"] == 2
        by_id = {i["client"]: i for i in anon["items"]}
        old = by_id.pop("anon-old")
        (live,) = by_id.values()
        assert live["samples"] == 7 and live["max_window_samples"] == 7 and live["flagged"]
        assert old["samples"] == 2 and not old["flagged"] and len(old["series"]) == 1
        assert anon["items"][0]["client"] == live["client"]  # sorted by volume

        ex = client.get("/admin/extraction", headers=api.admin).json()
        assert [f["client"] for f in ex["flagged"]] == [live["client"]]
        assert "5" in ex["rule"] and ex["threshold_samples"] == 5
        assert client.get("/admin/usage/clients?bucket_s=1", headers=api.admin).status_code == 422


def test_models_listed_with_metadata(api: ApiHelper, client: TestClient) -> None:
    models = client.get("/admin/models", headers=api.admin).json()
    assert [m["name"] for m in models] == ["alpha", "beta"]
    for m in models:
        assert m["loaded"] and m["info"]["input_shape"] == [1, 8, 8] and m["info"]["num_classes"] == 10
        assert not any("key" in k.lower() for k in m["info"])


def test_admin_actions_are_security_events(api: ApiHelper, client: TestClient) -> None:
    _user, key, _ = api.user_with_key()
    client.post(f"/admin/keys/{key['id']}/revoke", headers=api.admin)
    client.post("/auth/token", json={"api_key": "sdb_" + "q" * 43})
    client.get("/admin/users", headers={"Authorization": "Bearer forged.token.value"})
    events = client.get("/admin/events", params={"limit": 100}, headers=api.admin).json()["items"]
    actions = [(e["action"], e["outcome"]) for e in events]
    for expected in [
        ("user.create", "ok"),
        ("key.issue", "ok"),
        ("key.revoke", "ok"),
        ("token.issue", "ok"),
        ("token.issue", "denied"),
        ("admin.bootstrap", "ok"),
        ("auth.failure", "denied"),
    ]:
        assert expected in actions, expected
    assert (
        client.get("/admin/events", params={"action": "key.revoke"}, headers=api.admin).json()["total"] == 1
    )


def test_user_token_is_403_on_admin_reads(api: ApiHelper, client: TestClient) -> None:
    _, _, headers = api.user_with_key(scopes=["*"])
    for path in ("/admin/users", "/admin/audits", "/admin/usage", "/admin/models", "/admin/keys"):
        assert client.get(path, headers=headers).status_code == 403, path


def test_hostile_admin_parameters_are_4xx_not_5xx(api: ApiHelper, client: TestClient) -> None:
    for path, params in [
        ("/admin/users/9223372036854775808", {}),
        ("/admin/audits", {"user_id": 2**70}),
        ("/admin/audits", {"model": "a\x00b"}),
        ("/admin/audits", {"since": "9999-12-31T23:59:59-23:59"}),
        ("/admin/audits", {"until": "0001-01-01T00:00:00+01:00"}),
        ("/admin/usage/clients", {"until": "0001-01-01T00:30:00"}),
        ("/admin/events", {"action": "x" * 1000}),
    ]:
        r = client.get(path, params=params, headers=api.admin)
        assert 400 <= r.status_code < 500, (path, params, r.status_code, r.text)
    user = api.create_user()
    r = client.post(
        f"/admin/users/{user['id']}/keys", json={"scopes": ["alpha"], "name": "a\x00b"}, headers=api.admin
    )
    assert r.status_code == 422


def test_an_admin_cannot_revoke_the_key_they_are_signed_in_with(api: ApiHelper, client: TestClient) -> None:
    # Revoking one's own key (or disabling one's own account) is the only way to remove the last working
    # admin credential through the API: refused, so that an administrator can never lock everyone out.
    me = client.get("/admin/keys", headers=api.admin).json()["items"][0]
    r = client.post(f"/admin/keys/{me['id']}/revoke", headers=api.admin)
    assert r.status_code == 409 and "signed in with" in r.json()["detail"], r.text
    assert client.get("/admin/users", headers=api.admin).status_code == 200  # still signed in
    # another admin may revoke it, and the first admin may revoke the other admin's key
    admin2 = api.create_user("admin2", role="admin")
    other = api.issue_key(admin2["id"], scopes=[])
    other_headers = {"Authorization": f"Bearer {api.token(other['api_key'])}"}
    r = client.post(f"/admin/keys/{other['id']}/revoke", headers=other_headers)
    assert r.status_code == 409, r.text
    assert client.post(f"/admin/keys/{me['id']}/revoke", headers=other_headers).status_code == 200
    assert client.get("/admin/users", headers=other_headers).status_code == 200
