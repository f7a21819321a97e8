"""Admin flows over real HTTP: the bootstrap admin's token, users and API keys, access tokens."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

import httpx

from tests._support.server import ADMIN_TOKEN


@dataclass
class Credentials:
    """What the admin setup produced: a user, its API key secret (shown once) and the admin's token."""

    admin_headers: dict[str, str]
    user_id: Any
    key_id: Any
    api_key: str
    key_info: dict[str, Any]


def admin_headers(base_url: str) -> dict[str, str]:
    """Exchange the bootstrap admin API key for an admin JWT."""
    r = httpx.post(base_url + "/auth/token", data=_token_form(ADMIN_TOKEN), timeout=10)
    if r.status_code != 200:
        r = httpx.post(base_url + "/auth/token", json=_token_json(ADMIN_TOKEN), timeout=10)
    r.raise_for_status()
    return {"Authorization": f"Bearer {r.json()['access_token']}"}


def _token_form(api_key: str) -> dict[str, str]:
    return {"grant_type": "client_credentials", "client_secret": api_key}


def _token_json(api_key: str) -> dict[str, str]:
    return {"api_key": api_key}


def get_token(base_url: str, api_key: str, client: httpx.Client | None = None) -> str:
    c = client or httpx.Client(timeout=10)
    r = c.post(base_url + "/auth/token", data=_token_form(api_key))
    if r.status_code != 200:
        r = c.post(base_url + "/auth/token", json=_token_json(api_key))
    r.raise_for_status()
    return str(r.json()["access_token"])


def create_user_and_key(
    base_url: str,
    *,
    scopes: list[str],
    quota: int | None = None,
    name: str | None = None,
    watermark: bool | None = None,
) -> Credentials:
    adm = admin_headers(base_url)
    uname = name or f"user-{uuid.uuid4().hex[:8]}"
    r = httpx.post(base_url + "/admin/users", json={"name": uname}, headers=adm, timeout=10)
    r.raise_for_status()
    user = r.json()
    body: dict[str, Any] = {"scopes": scopes}
    if quota is not None:
        body["sample_quota"] = quota
    if watermark is not None:
        body["watermark"] = watermark
    r = httpx.post(base_url + f"/admin/users/{user['id']}/keys", json=body, headers=adm, timeout=10)
    r.raise_for_status()
    key = r.json()
    return Credentials(adm, user["id"], key["id"], key["api_key"], key)
