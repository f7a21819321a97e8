"""POST /auth/token and token checks over HTTP, on SQLite and PostgreSQL: hostile tokens are 401, the key
and user are re-checked in the database on every call, scopes and the admin role give 403, and every
non-public route refuses anonymous calls.
"""

from __future__ import annotations

import base64
import time
from typing import Any

from fastapi import FastAPI
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient
from jose import jwt
from starlette.routing import Route

from tests._support.api import TEST_ADMIN_TOKEN, TEST_JWT_SECRET, ApiHelper
from tests._support.tokens import ATTACKS, forge, good_claims

PUBLIC_ROUTES = {
    ("GET", "/"),  # a redirect to /docs
    ("POST", "/predict"),
    ("POST", "/auth/token"),
    ("GET", "/healthz"),
    ("GET", "/readyz"),
    ("GET", "/metrics"),
    ("GET", "/openapi.json"),
    ("GET", "/docs"),
    ("GET", "/docs/oauth2-redirect"),
    ("GET", "/redoc"),
    ("HEAD", "/openapi.json"),
    ("HEAD", "/docs"),
    ("HEAD", "/docs/oauth2-redirect"),
    ("HEAD", "/redoc"),
    # the admin console's static files: no data in them, the page signs in with an admin key (test_console.py)
    ("GET", "/console"),
    ("GET", "/console/{asset:path}"),
    # the Open Inference Protocol: public as /predict; its keyed outputs need a token (test_oip.py)
    ("GET", "/v2"),
    ("GET", "/v2/health/live"),
    ("GET", "/v2/health/ready"),
    ("GET", "/v2/models/{name}"),
    ("GET", "/v2/models/{name}/versions/{version}"),
    ("GET", "/v2/models/{name}/ready"),
    ("GET", "/v2/models/{name}/versions/{version}/ready"),
    ("POST", "/v2/models/{name}/infer"),
    ("POST", "/v2/models/{name}/versions/{version}/infer"),
}


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def test_token_by_form_json_and_basic_credentials(api: ApiHelper, client: TestClient) -> None:
    _, key, _ = api.user_with_key(scopes=["alpha", "beta"])
    secret = key["api_key"]
    r1 = client.post("/auth/token", data={"grant_type": "client_credentials", "client_secret": secret})
    r2 = client.post("/auth/token", json={"api_key": secret})
    basic = base64.b64encode(f"anything:{secret}".encode()).decode()
    r3 = client.post(
        "/auth/token", data={"grant_type": "client_credentials"}, headers={"Authorization": f"Basic {basic}"}
    )
    for r in (r1, r2, r3):
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["token_type"] == "bearer"
        assert 0 < body["expires_in"] <= 900
        assert body["scope"] == "alpha beta"
        claims = jwt.get_unverified_claims(body["access_token"])
        assert claims["jti"] == str(key["id"]) and claims["sub"] == str(key["user_id"])
        assert secret not in r.text


def test_token_scope_can_be_narrowed_but_never_widened(api: ApiHelper, client: TestClient) -> None:
    _, key, _ = api.user_with_key(scopes=["alpha"])
    r = client.post(
        "/auth/token",
        data={"grant_type": "client_credentials", "client_secret": key["api_key"], "scope": "alpha beta"},
    )
    # RFC 6749 5.2: a scope the key does not hold is an error, not a silently narrower token
    assert r.status_code == 400 and r.json()["detail"]["error"] == "invalid_scope", r.text
    assert api.token(key["api_key"], scope="alpha")
    # a wildcard key can be narrowed to one model; the narrowed token cannot use the others
    _, wild, _ = api.user_with_key(scopes=["*"])
    narrow = api.token(wild["api_key"], scope="beta")
    assert claims_of_token(narrow)["scope"] == "beta"
    assert api.distill(bearer(narrow), model="beta").status_code == 200
    assert api.distill(bearer(narrow), model="alpha").status_code == 403


def test_bad_token_requests(api: ApiHelper, client: TestClient) -> None:
    _, key, _ = api.user_with_key()
    r = client.post("/auth/token", data={"grant_type": "password", "client_secret": key["api_key"]})
    assert r.status_code == 400 and r.json()["detail"]["error"] == "unsupported_grant_type"
    assert client.post("/auth/token", data={"grant_type": "client_credentials"}).status_code == 400
    assert client.post("/auth/token", content=b"x", headers={"content-type": "text/plain"}).status_code == 415
    assert (
        client.post("/auth/token", content=b"{", headers={"content-type": "application/json"}).status_code
        == 400
    )


def test_a_deeply_nested_json_body_is_a_400_not_a_500(client: TestClient) -> None:
    # json.loads recurses once per level: ~1,000 levels used to raise RecursionError (a 500 and a traceback)
    for depth in (1_000, 100_000):
        body = b'{"api_key": ' + b"[" * depth + b"]" * depth + b"}"
        r = client.post("/auth/token", content=body, headers={"content-type": "application/json"})
        assert r.status_code == 400 and r.json()["detail"]["error"] == "invalid_request", r.text


def test_a_scope_naming_no_served_model_is_invalid_scope(api: ApiHelper, client: TestClient) -> None:
    # a `*` key holds every model, but a token for a model the service does not serve is a client error
    _, wild, _ = api.user_with_key(scopes=["*"])
    for scope in ("no-such-model", "alpha no-such-model"):
        r = client.post(
            "/auth/token",
            data={"grant_type": "client_credentials", "client_secret": wild["api_key"], "scope": scope},
        )
        assert r.status_code == 400, (scope, r.text)
        detail = r.json()["detail"]
        assert detail["error"] == "invalid_scope" and "'no-such-model'" in detail["message"], r.text
        assert "alpha" in detail["message"]  # the answer names the served models
    assert claims_of_token(api.token(wild["api_key"], scope="alpha"))["scope"] == "alpha"


def test_unknown_and_wrong_keys_get_the_same_401(api: ApiHelper, client: TestClient) -> None:
    _, key, _ = api.user_with_key()
    secret = key["api_key"]
    same_prefix = secret[:-4] + ("AAAA" if not secret.endswith("AAAA") else "BBBB")
    answers = [
        client.post("/auth/token", data={"grant_type": "client_credentials", "client_secret": s})
        for s in (same_prefix, "sdb_" + "z" * 43, "nonsense")
    ]
    assert {r.status_code for r in answers} == {401}
    assert len({r.text for r in answers}) == 1
    assert all(secret not in r.text for r in answers)


def test_revoked_or_expired_key_and_disabled_user_cannot_get_tokens(
    api: ApiHelper, client: TestClient
) -> None:
    _user, key, _ = api.user_with_key()
    assert client.post(f"/admin/keys/{key['id']}/revoke", headers=api.admin).status_code == 200
    r = client.post("/auth/token", json={"api_key": key["api_key"]})
    assert r.status_code == 401

    user2, key2, _ = api.user_with_key()
    assert client.post(f"/admin/users/{user2['id']}/disable", headers=api.admin).status_code == 200
    assert client.post("/auth/token", json={"api_key": key2["api_key"]}).status_code == 401

    _, key3, _ = api.user_with_key(expires_in_s=1)
    time.sleep(1.1)
    assert client.post("/auth/token", json={"api_key": key3["api_key"]}).status_code == 401


def test_a_missing_or_bad_token_gets_one_oauth_answer_everywhere(api: ApiHelper, client: TestClient) -> None:
    answers = {
        "missing": [api.distill({}), client.get("/admin/users")],
        "invalid": [api.distill(bearer("not.a.token")), client.get("/admin/users", headers=bearer("x.y.z"))],
    }
    for kind, responses in answers.items():
        bodies = [r.json()["detail"] for r in responses]
        assert all(r.status_code == 401 for r in responses), kind
        assert bodies[0] == bodies[1], (kind, bodies)  # the same wording on /distill-batch and /admin
        assert set(bodies[0]) == {"error", "message"}
    assert answers["missing"][0].json()["detail"]["error"] == "invalid_request"
    assert "missing access token" in answers["missing"][0].json()["detail"]["message"]
    assert answers["invalid"][0].json()["detail"]["error"] == "invalid_token"
    bad_key = client.post(
        "/auth/token", data={"grant_type": "client_credentials", "client_secret": "sdb_x" * 9}
    )
    assert bad_key.status_code == 401 and bad_key.json()["detail"]["error"] == "invalid_client"


def test_token_exchange_records_the_keys_last_use(api: ApiHelper, client: TestClient) -> None:
    api.token(TEST_ADMIN_TOKEN)
    keys = client.get("/admin/keys", headers=api.admin).json()["items"]
    bootstrap = next(k for k in keys if k["name"] == "bootstrap")
    assert bootstrap["last_used_at"] is not None


def test_hostile_tokens_are_401_on_distill_and_admin(api: ApiHelper, client: TestClient) -> None:
    api.user_with_key(scopes=["alpha"])
    for attack in sorted(ATTACKS):
        token = ATTACKS[attack]()
        r = api.distill(bearer(token))
        assert r.status_code == 401, (attack, r.text)
        assert r.headers["www-authenticate"].startswith("Bearer")
        assert client.get("/admin/users", headers=bearer(token)).status_code == 401, attack


def test_forged_token_with_the_real_secret_still_needs_a_live_key(api: ApiHelper, client: TestClient) -> None:
    user, key, _ = api.user_with_key(scopes=["alpha"])
    claims = good_claims(sub=str(user["id"]), jti=str(key["id"]), iss="sdb", aud="sdb-distill", scope="alpha")
    assert api.distill(bearer(forge({"alg": "HS256"}, claims, secret=TEST_JWT_SECRET))).status_code == 200
    # the right secret, but a key id that does not exist, or a key that belongs to someone else
    assert (
        api.distill(bearer(forge({"alg": "HS256"}, {**claims, "jti": "999999"}, TEST_JWT_SECRET))).status_code
        == 401
    )
    assert (
        api.distill(bearer(forge({"alg": "HS256"}, {**claims, "sub": "1"}, TEST_JWT_SECRET))).status_code
        == 401
    )


def test_revoked_key_and_disabled_user_stop_live_tokens_at_once(api: ApiHelper, client: TestClient) -> None:
    _, key, headers = api.user_with_key(scopes=["alpha"])
    assert api.distill(headers).status_code == 200
    assert client.post(f"/admin/keys/{key['id']}/revoke", headers=api.admin).status_code == 200
    assert api.distill(headers).status_code == 401

    user2, _, headers2 = api.user_with_key(scopes=["alpha"])
    assert api.distill(headers2).status_code == 200
    assert client.post(f"/admin/users/{user2['id']}/disable", headers=api.admin).status_code == 200
    assert api.distill(headers2).status_code == 401
    assert client.post(f"/admin/users/{user2['id']}/enable", headers=api.admin).status_code == 200
    assert api.distill(headers2).status_code == 200


def test_admin_key_revocation_stops_admin_tokens(api: ApiHelper, client: TestClient) -> None:
    admin2 = api.create_user(role="admin")
    k = api.issue_key(admin2["id"], scopes=[])
    h = bearer(api.token(k["api_key"]))
    assert client.get("/admin/users", headers=h).status_code == 200
    client.post(f"/admin/keys/{k['id']}/revoke", headers=api.admin)
    assert client.get("/admin/users", headers=h).status_code == 401


def test_scope_and_role_give_403(api: ApiHelper, client: TestClient) -> None:
    _, _, headers = api.user_with_key(scopes=["alpha"])
    r = api.distill(headers, model="beta")
    assert r.status_code == 403 and r.json()["detail"]["error"] == "insufficient_scope"
    for method, path in [("GET", "/admin/users"), ("POST", "/admin/users"), ("GET", "/admin/audits")]:
        assert client.request(method, path, headers=headers, json={"name": "x"}).status_code == 403
    # the admin's own key has no model scope: administration and distillation are separate
    assert api.distill(api.admin).status_code == 403


def test_token_in_the_query_string_is_ignored(api: ApiHelper, client: TestClient) -> None:
    _, key, _ = api.user_with_key(scopes=["alpha"])
    token = api.token(key["api_key"])
    r = client.post(
        f"/distill-batch?access_token={token}", json={"model": "alpha", "inputs": [[[[0.0] * 8] * 8]]}
    )
    assert r.status_code in (401, 422)
    assert client.get(f"/admin/users?access_token={token}").status_code == 401


def _fill(path: str) -> str:
    return path.replace("{user_id}", "1").replace("{key_id}", "1")


def all_routes(app: FastAPI) -> list[tuple[str, set[str]]]:
    """(path, methods) of every route, including those of included routers."""
    try:  # FastAPI >= 0.16x wraps included routers; this walks through them
        from fastapi.routing import iter_route_contexts
    except ImportError:  # pragma: no cover - older FastAPI: included routes are flat
        return [(r.path, set(r.methods or ())) for r in app.routes if isinstance(r, APIRoute | Route)]
    return [(rc.path, set(rc.methods or ())) for rc in iter_route_contexts(app.routes)]


def test_every_non_public_route_rejects_anonymous_calls(app: FastAPI, client: TestClient) -> None:
    routes = all_routes(app)
    paths = {p for p, _ in routes}
    assert {"/distill-batch", "/admin/users", "/predict"} <= paths  # the walk does see included routers
    checked = 0
    for path, methods in routes:
        for method in methods:
            if (method, path) in PUBLIC_ROUTES:
                continue
            for headers in (
                {},
                {"Authorization": "Bearer not-a-token"},
                {"Authorization": f"Basic {TEST_ADMIN_TOKEN}"},
            ):
                r = client.request(method, _fill(path), headers=headers, json={})
                assert r.status_code == 401, (method, path, headers, r.status_code, r.text)
            checked += 1
    assert checked >= 15


def test_other_methods_do_not_bypass(client: TestClient) -> None:
    for method in ("GET", "PUT", "DELETE", "PATCH"):
        assert client.request(method, "/distill-batch").status_code == 405
    assert client.request("DELETE", "/admin/users").status_code == 405


def test_api_key_secret_is_not_accepted_as_a_bearer_token(api: ApiHelper, client: TestClient) -> None:
    _, key, _ = api.user_with_key(scopes=["alpha"])
    assert api.distill(bearer(key["api_key"])).status_code == 401
    assert client.get("/admin/users", headers=bearer(TEST_ADMIN_TOKEN)).status_code == 401


def test_auth_failures_are_counted_in_metrics(api: ApiHelper, client: TestClient) -> None:
    def failures(text: str) -> float:
        return sum(
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith("sdb_auth_failures_total{")
        )

    before = failures(client.get("/metrics").text)
    api.distill({})
    api.distill(bearer("x.y.z"))
    after = failures(client.get("/metrics").text)
    assert after - before >= 2


def claims_of_token(token: str) -> dict[str, Any]:
    return dict(jwt.get_unverified_claims(token))


def test_a_key_holder_reads_its_own_quota_left(api: ApiHelper, client: TestClient) -> None:
    _, key, headers = api.user_with_key(scopes=["alpha"], sample_quota=10, name="laptop")
    assert api.distill(headers, n=4).status_code == 200
    r = client.get("/auth/key", headers=headers)
    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["id"], body["name"], body["scopes"]) == (key["id"], "laptop", ["alpha"])
    assert (body["sample_quota"], body["samples_used"], body["samples_remaining"]) == (10, 4, 6)
    assert key["api_key"] not in r.text and "api_key" not in body
    _, _, unlimited = api.user_with_key(scopes=["*"])
    assert client.get("/auth/key", headers=unlimited).json()["samples_remaining"] is None
    assert client.get("/auth/key").status_code == 401
