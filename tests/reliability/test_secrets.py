"""Secrets never leak: every endpoint gets good and bad requests while all logging is captured at DEBUG;
then every response (body and headers), every log record, the stdout/stderr of the process, the metrics
text, the OpenAPI schema and every row of every database table are searched for the box key (seed as
hex/base64/bytes, pattern values as text and float32 bytes), every API key secret, the JWT secret and the
watermark secret (API keys are watermarked by default).
Issued access tokens are also searched for outside the /auth/token answers that hand them out.
"""

from __future__ import annotations

import base64
import json
import logging
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from jose import jwt
from sqlalchemy import create_engine, inspect, text

from service.core.config import Settings
from service.main import create_app
from service.observability.metrics import render_metrics
from tests._support.bodies import npy_bytes
from tests._support.boxes import MODEL, BoxSecrets
from tests._support.db import run_migrations
from tests._support.server import ADMIN_TOKEN, JWT_SECRET

pytestmark = pytest.mark.slow

WATERMARK_SECRET = "rel-watermark-secret-" + uuid.uuid4().hex + uuid.uuid4().hex


@dataclass
class Recorder:
    """Every response of the test, with the secrets a response may legitimately carry."""

    responses: list[tuple[str, bytes, str, frozenset[str]]] = field(default_factory=list)
    statuses: dict[str, int] = field(default_factory=dict)

    def add(self, label: str, r: Any, allowed: frozenset[str] = frozenset()) -> Any:
        headers = "\n".join(f"{k}: {v}" for k, v in r.headers.items())
        self.responses.append((label, r.content, headers, allowed))
        self.statuses[label] = r.status_code
        return r


def _sample(n: int = 2, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 1, 8, 8)).astype(np.float32)


def _needles(box: BoxSecrets, api_keys: list[str]) -> dict[str, list[bytes]]:
    """Secret name -> byte strings whose presence anywhere means a leak."""
    seed_b64 = base64.b64encode(box.seed)
    needles: dict[str, list[bytes]] = {
        "box seed": [
            box.seed_hex.encode(),
            box.seed_hex.upper().encode(),
            box.seed_hex[:32].encode(),  # half the seed is already too much
            seed_b64.rstrip(b"="),
            base64.urlsafe_b64encode(box.seed).rstrip(b"="),
            box.seed,
        ],
        "box pattern": [],
        "JWT secret": [JWT_SECRET.encode(), JWT_SECRET[-32:].encode()],
        "watermark secret": [WATERMARK_SECRET.encode(), WATERMARK_SECRET[-32:].encode()],
    }
    pattern = np.asarray(box.pattern_values, dtype=np.float32)
    for scale in (1.0, 0.5):  # the pattern and the pre-scaled offset (1 - lam) * pattern the model holds
        vals = (pattern * np.float32(scale)).astype(np.float32)
        needles["box pattern"].append(vals[:8].tobytes())
        for v in vals[:32]:
            s = str(v)  # shortest float32 repr, e.g. "-1.2345679"
            if len(s.lstrip("-").replace(".", "").lstrip("0")) >= 7:
                needles["box pattern"].append(s.encode())
    for i, key in enumerate(api_keys):
        needles[f"API key {i}"] = [key.encode(), key[12:].encode()]  # whole, and past the public prefix
    return needles


def _search(haystack: bytes, needles: dict[str, list[bytes]], skip: frozenset[str]) -> list[str]:
    low = haystack.lower()
    hits = []
    for name, forms in needles.items():
        if name in skip:
            continue
        for form in forms:
            if form in haystack or (form.isascii() and len(form) >= 16 and form.lower() in low):
                hits.append(name)
                break
    return hits


@pytest.fixture
def app_and_db(model_dir: Path, tmp_path: Path) -> Iterator[tuple[FastAPI, str]]:
    url = f"sqlite:///{tmp_path / 'secrets.db'}"
    run_migrations(url)
    settings = Settings(
        database_url=url,
        model_dir=model_dir,
        default_model=MODEL,
        device="cpu",
        jwt_secret=JWT_SECRET,
        watermark_secret=WATERMARK_SECRET,
        bootstrap_admin_token=ADMIN_TOKEN,
        log_level="DEBUG",
        predict_rate_per_minute=0,
        distill_rate_per_minute=0,
    )
    yield create_app(settings), url


def _token_request(c: TestClient, rec: Recorder, label: str, secret: str, how: str = "form") -> str | None:
    if how == "form":
        r = c.post("/auth/token", data={"grant_type": "client_credentials", "client_secret": secret})
    elif how == "json":
        r = c.post("/auth/token", json={"api_key": secret})
    else:
        basic = base64.b64encode(f"id:{secret}".encode()).decode()
        r = c.post("/auth/token", headers={"Authorization": f"Basic {basic}"})
    rec.add(label, r)
    return str(r.json()["access_token"]) if r.status_code == 200 else None


def _bad_tokens(good: str) -> dict[str, str]:
    now = int(time.time())
    claims = json.loads(base64.urlsafe_b64decode(good.split(".")[1] + "==="))
    none_header = base64.urlsafe_b64encode(b'{"alg":"none","typ":"JWT"}').rstrip(b"=").decode()
    body = good.split(".")[1]
    return {
        "none": f"{none_header}.{body}.",
        "wrong-signature": jwt.encode(claims, "x" * 48, algorithm="HS256"),
        "expired": jwt.encode(
            {**claims, "iat": now - 7200, "nbf": now - 7200, "exp": now - 3600}, JWT_SECRET
        ),
        "wrong-aud": jwt.encode({**claims, "aud": "someone-else"}, JWT_SECRET),
        "tampered": good[:-4] + ("AAAA" if not good.endswith("AAAA") else "BBBB"),
        "jwt-secret-as-token": JWT_SECRET,
        "garbage": "not.a.token",
    }


def _exercise(c: TestClient, rec: Recorder, box: BoxSecrets) -> tuple[list[str], list[str]]:
    """Send the requests; returns (all API key secrets, all access tokens)."""
    keys = [ADMIN_TOKEN]
    tokens: list[str] = []
    for path in ("/healthz", "/readyz", "/metrics", "/openapi.json", "/docs", "/redoc"):
        rec.add(path, c.get(path))

    admin_token = _token_request(c, rec, "token admin", ADMIN_TOKEN)
    assert admin_token is not None
    tokens.append(admin_token)
    adm = {"Authorization": f"Bearer {admin_token}"}

    user = rec.add("create user", c.post("/admin/users", json={"name": "leak-test"}, headers=adm)).json()
    created = c.post(
        f"/admin/users/{user['id']}/keys", json={"scopes": [MODEL], "sample_quota": 6}, headers=adm
    )
    api_key = created.json()["api_key"]
    keys.append(api_key)
    rec.add("create key", created, allowed=frozenset({"API key 1"}))  # shown once, by design
    spare = c.post(f"/admin/users/{user['id']}/keys", json={"scopes": [MODEL]}, headers=adm)
    keys.append(spare.json()["api_key"])
    rec.add("create spare key", spare, allowed=frozenset({"API key 2"}))

    for how in ("form", "json", "basic"):
        t = _token_request(c, rec, f"token user {how}", api_key, how)
        assert t is not None
        tokens.append(t)
    user_token = tokens[-1]
    # Wrong API keys, and real secrets sent in malformed requests: never echoed back.
    wrong = "sdb_" + uuid.uuid4().hex + uuid.uuid4().hex
    for label, secret in {
        "unknown key": wrong,
        "right prefix wrong rest": api_key[:12] + wrong[12:],
        "jwt secret as key": JWT_SECRET,
        "box seed as key": box.seed_hex,
    }.items():
        assert _token_request(c, rec, f"token {label}", secret) is None
    rec.add(
        "token bad grant",
        c.post("/auth/token", data={"grant_type": "password", "client_secret": api_key, "username": "x"}),
    )
    form = {"content-type": "application/x-www-form-urlencoded"}
    dup = f"client_secret={api_key}&client_secret=x"
    rec.add("token duplicated field", c.post("/auth/token", content=dup, headers=form))
    rec.add("token wrong json", c.post("/auth/token", json={"api_key": [api_key], "extra": api_key}))
    rec.add("token xml", c.post("/auth/token", content=api_key, headers={"content-type": "text/xml"}))

    x = _sample()
    good_predicts: dict[str, dict[str, Any]] = {
        "predict json": {"json": {"model": MODEL, "inputs": x.tolist(), "top_k": 3}},
        "predict b64": {"json": {"inputs_b64": base64.b64encode(npy_bytes(x)).decode()}},
        "predict npy": {"content": npy_bytes(x), "headers": {"content-type": "application/x-npy"}},
    }
    for label, kw in good_predicts.items():
        r = rec.add(label, c.post("/predict", params={"model": MODEL} if "npy" in label else None, **kw))
        assert r.status_code == 200, r.text
    bad_predicts: dict[str, dict[str, Any]] = {
        "shape": {"json": {"model": MODEL, "inputs": [[1.0, 2.0]]}},
        "nan": {"content": b'{"inputs": [[NaN]]}', "headers": {"content-type": "application/json"}},
        "utf8": {"content": b'{"inputs": "\xff\xfe"}', "headers": {"content-type": "application/json"}},
        "model": {"json": {"model": "nope", "inputs": x.tolist()}},
        "field": {"json": {"model": MODEL, "inputs": x.tolist(), "box_key": box.seed_hex}},
        "b64": {"json": {"model": MODEL, "inputs_b64": "AAAA" + box.seed_hex}},
        "type": {"content": b"x", "headers": {"content-type": "text/plain"}},
        "empty": {"json": {"model": MODEL, "inputs": []}},
    }
    for label, kw in bad_predicts.items():
        r = rec.add(f"predict bad {label}", c.post("/predict", **kw))
        assert 400 <= r.status_code < 500, (label, r.status_code, r.text)

    bearer = {"Authorization": f"Bearer {user_token}"}
    body = {"model": MODEL, "inputs": x.tolist()}
    r = rec.add("distill ok", c.post("/distill-batch", json=body, headers=bearer))
    assert r.status_code == 200, r.text
    r = rec.add("distill T", c.post("/distill-batch", json={**body, "temperature": 2.5}, headers=bearer))
    assert r.status_code == 200, r.text
    r = rec.add("distill npy", c.post("/distill-batch", params={"model": MODEL}, content=npy_bytes(x),
                                      headers={**bearer, "content-type": "application/x-npy"}))  # fmt: skip
    assert r.status_code == 200, r.text
    r = rec.add("distill over quota", c.post("/distill-batch", json=body, headers=bearer))
    assert r.status_code == 429, r.text
    for label, bad in _bad_tokens(user_token).items():
        r = c.post("/distill-batch", json=body, headers={"Authorization": f"Bearer {bad}"})
        rec.add(f"distill token {label}", r)
        assert r.status_code == 401, (label, r.text)
    rec.add("distill no token", c.post("/distill-batch", json=body))
    rec.add(
        "distill token in query", c.post("/distill-batch", params={"access_token": user_token}, json=body)
    )
    r = rec.add("distill admin token", c.post("/distill-batch", json=body, headers=adm))
    assert r.status_code == 403, r.text
    rec.add(
        "distill bad input",
        c.post("/distill-batch", json={"model": MODEL, "inputs": [[0.0]]}, headers=bearer),
    )

    # Every admin route: anonymous, with a user token, and as admin (path ids filled with real ones).
    ids = {"user_id": str(user["id"]), "key_id": str(created.json()["id"])}
    for path, ops in c.app.openapi()["paths"].items():  # type: ignore[attr-defined]
        if not path.startswith("/admin"):
            continue
        concrete = path.format(**ids)
        for method in ops:
            if concrete.endswith(("/revoke", "/disable")):
                continue  # done below, last, so that the other calls still have a live key and user
            for who, headers in (("anon", {}), ("user", bearer), ("admin", adm)):
                call: dict[str, Any] = {"headers": headers}
                if method == "post" and concrete.endswith("/keys"):
                    call["json"] = {"scopes": [MODEL], "name": "x"}
                elif method == "post" and concrete.endswith("/users"):
                    call["json"] = {"name": f"u{uuid.uuid4().hex[:6]}"}
                r = c.request(method.upper(), concrete, **call)
                allowed: frozenset[str] = frozenset()
                if r.status_code == 201 and "api_key" in r.text:
                    keys.append(r.json()["api_key"])
                    allowed = frozenset({f"API key {len(keys) - 1}"})
                rec.add(f"{method} {path} {who}", r, allowed)
                expected = {"anon": 401, "user": 403}.get(who)
                assert expected is None or r.status_code == expected, (path, who, r.status_code)
    for p in ("/admin/audits?endpoint=/distill-batch&status=200", "/admin/usage/clients?kind=user",
              "/admin/events?action=token.issue"):  # fmt: skip
        rec.add(p, c.get(p, headers=adm))
    rec.add("revoke", c.post(f"/admin/keys/{ids['key_id']}/revoke", headers=adm))
    rec.add("revoked token", c.post("/distill-batch", json=body, headers=bearer))
    rec.add("disable", c.post(f"/admin/users/{ids['user_id']}/disable", headers=adm))
    rec.add("disabled user token", c.post("/auth/token", data={"client_secret": keys[2]}))
    rec.add("metrics after", c.get("/metrics"))
    return keys, tokens


def _database_dump(url: str) -> bytes:
    eng = create_engine(url)
    try:
        out = []
        with eng.connect() as conn:
            for table in inspect(conn).get_table_names():
                for row in conn.execute(text(f'SELECT * FROM "{table}"')):
                    out.append(f"{table}: {tuple(row)!r}")
        return "\n".join(out).encode()
    finally:
        eng.dispose()


def test_no_secret_anywhere(
    app_and_db: tuple[FastAPI, str],
    box_secrets: BoxSecrets,
    caplog: pytest.LogCaptureFixture,
    capfd: pytest.CaptureFixture[str],
) -> None:
    app, url = app_and_db
    caplog.set_level(logging.DEBUG)
    for name in ("sqlalchemy.engine", "sqlalchemy.pool", "service", "uvicorn", "fastapi", "jose"):
        caplog.set_level(logging.DEBUG, logger=name)  # loggers that set their own, quieter default level
    rec = Recorder()
    with TestClient(app, raise_server_exceptions=False) as c:
        keys, tokens = _exercise(c, rec, box_secrets)
        app_openapi = json.dumps(app.openapi()).encode()
    out, err = capfd.readouterr()
    needles = _needles(box_secrets, keys)
    token_needles = {f"access token {i}": [t.encode()] for i, t in enumerate(tokens)}

    # The search can fail: the one answer that shows a key's secret is found, and so is the key file's seed.
    shown_once = next(body for label, body, _, _ in rec.responses if label == "create key")
    assert _search(shown_once, needles, frozenset()) == ["API key 1"]
    key_file = (Path(app.state.sdb.settings.model_dir) / MODEL / "box_key.json").read_bytes()
    assert "box seed" in _search(key_file, needles, frozenset())

    leaks: list[str] = []
    for label, body, headers, allowed in rec.responses:
        for hit in _search(body, needles, allowed) + _search(headers.encode(), needles, allowed):
            leaks.append(f"response {label!r}: {hit}")
        if not label.startswith("token "):
            leaks += [f"response {label!r}: {hit}" for hit in _search(body, token_needles, frozenset())]
    # httpx/httpcore records are the test client's own (it logs the URLs the test sends), not the server's.
    server_records = [r for r in caplog.records if not r.name.startswith(("httpx", "httpcore"))]
    logs = "\n".join(
        f"{r.name} {r.levelname} {r.getMessage()} {r.exc_text or ''} {r.args!r}" for r in server_records
    ).encode()
    assert any(r.levelno == logging.DEBUG for r in server_records), "DEBUG logging was not captured"
    places = {
        "logs": logs,
        "stdout/stderr": (out + err).encode(),
        "metrics": render_metrics()[0],
        "openapi": app_openapi,
        "database": _database_dump(url),
    }
    for place, haystack in places.items():
        leaks += [f"{place}: {hit}" for hit in _search(haystack, needles, frozenset())]
        leaks += [f"{place}: {hit}" for hit in _search(haystack, token_needles, frozenset())]
    assert not leaks, leaks
    assert not {k: v for k, v in rec.statuses.items() if v >= 500}
