"""`sdb admin users|keys|audits|usage`: the admin API from the command line (JSON out, no curl or jq)."""

from __future__ import annotations

import json
import os
from typing import Annotated, Any

import typer

from sdb.client import SdbClient

URL_HELP = "Base URL of the service (default: SDB_URL, else http://127.0.0.1:8000)."
KEY_HELP = "An administrator's API key (default: SDB_ADMIN_KEY; never put it on the command line)."

Url = Annotated[str | None, typer.Option("--url", help=URL_HELP)]
AdminKey = Annotated[str | None, typer.Option("--admin-key", envvar="SDB_ADMIN_KEY", help=KEY_HELP)]
Limit = Annotated[int, typer.Option(min=1, max=1000, help="Page size.")]
Offset = Annotated[int, typer.Option(min=0, help="Rows to skip.")]

users_app = typer.Typer(help="Users: list, create, disable, enable.", no_args_is_help=True)
keys_app = typer.Typer(
    help="API keys: list, create (the secret is shown once), revoke, watermark on/off.", no_args_is_help=True
)


def _client(url: str | None, admin_key: str | None) -> SdbClient:
    if not admin_key:
        raise typer.BadParameter("give an administrator's API key in SDB_ADMIN_KEY (or --admin-key)")
    return SdbClient(url or os.environ.get("SDB_URL") or "http://127.0.0.1:8000", admin_key, max_retries=2)


def _run(url: str | None, admin_key: str | None, method: str, path: str, **kwargs: Any) -> None:
    with _client(url, admin_key) as client:
        typer.echo(json.dumps(client.call(method, path, **kwargs), indent=2))


@users_app.command("list")
def users_list(url: Url = None, admin_key: AdminKey = None, limit: Limit = 100, offset: Offset = 0) -> None:
    """List users."""
    _run(url, admin_key, "GET", "/admin/users", params={"limit": limit, "offset": offset})


@users_app.command("create")
def users_create(
    name: Annotated[str, typer.Argument(help="Unique user name.")],
    role: Annotated[str, typer.Option(help="user or admin.")] = "user",
    url: Url = None,
    admin_key: AdminKey = None,
) -> None:
    """Create a user."""
    _run(url, admin_key, "POST", "/admin/users", json={"name": name, "role": role})


@users_app.command("disable")
def users_disable(user_id: int, url: Url = None, admin_key: AdminKey = None) -> None:
    """Disable a user (their tokens stop at once)."""
    _run(url, admin_key, "POST", f"/admin/users/{user_id}/disable")


@users_app.command("enable")
def users_enable(user_id: int, url: Url = None, admin_key: AdminKey = None) -> None:
    """Enable a disabled user."""
    _run(url, admin_key, "POST", f"/admin/users/{user_id}/enable")


@keys_app.command("list")
def keys_list(
    user_id: Annotated[int | None, typer.Option(help="Only this user's keys.")] = None,
    url: Url = None,
    admin_key: AdminKey = None,
    limit: Limit = 100,
    offset: Offset = 0,
) -> None:
    """List API keys (never their secrets)."""
    params: dict[str, Any] = {"limit": limit, "offset": offset}
    if user_id is not None:
        params["user_id"] = user_id
    _run(url, admin_key, "GET", "/admin/keys", params=params)


@keys_app.command("create")
def keys_create(
    user_id: Annotated[int, typer.Argument(help="The key's user.")],
    scope: Annotated[
        list[str] | None, typer.Option(help="A model the key may distill (repeat; `*`: all).")
    ] = None,
    quota: Annotated[int | None, typer.Option(help="Samples the key may pull in total.")] = None,
    expires_in_s: Annotated[int | None, typer.Option(help="Expiry, seconds from now.")] = None,
    name: Annotated[str | None, typer.Option(help="A label for the key.")] = None,
    watermark: Annotated[
        bool, typer.Option(help="Mark the key's /distill-batch soft labels with its own watermark.")
    ] = True,
    url: Url = None,
    admin_key: AdminKey = None,
) -> None:
    """Issue an API key; its secret is printed ONCE (field `api_key`)."""
    body: dict[str, Any] = {"scopes": scope or [], "watermark": watermark}
    for field, value in (("sample_quota", quota), ("expires_in_s", expires_in_s), ("name", name)):
        if value is not None:
            body[field] = value
    _run(url, admin_key, "POST", f"/admin/users/{user_id}/keys", json=body)


@keys_app.command("revoke")
def keys_revoke(key_id: int, url: Url = None, admin_key: AdminKey = None) -> None:
    """Revoke an API key (its live tokens stop at once)."""
    _run(url, admin_key, "POST", f"/admin/keys/{key_id}/revoke")


@keys_app.command("watermark")
def keys_watermark(
    key_id: int,
    on: Annotated[bool, typer.Option("--on/--off", help="Turn the key's watermark on or off.")] = True,
    url: Url = None,
    admin_key: AdminKey = None,
) -> None:
    """Turn an API key's watermark on or off (its watermark id stays: the key stays traceable)."""
    _run(url, admin_key, "POST", f"/admin/keys/{key_id}/watermark", json={"enabled": on})


def audits(
    user_id: Annotated[int | None, typer.Option(help="Only this user's calls.")] = None,
    endpoint: Annotated[str | None, typer.Option(help="/predict or /distill-batch.")] = None,
    status: Annotated[int | None, typer.Option(help="Only this status code.")] = None,
    since: Annotated[str | None, typer.Option(help="From this time (ISO 8601).")] = None,
    url: Url = None,
    admin_key: AdminKey = None,
    limit: Limit = 100,
    offset: Offset = 0,
) -> None:
    """Audited calls, newest first."""
    params = {"user_id": user_id, "endpoint": endpoint, "status": status, "since": since}
    query = {k: v for k, v in params.items() if v is not None} | {"limit": limit, "offset": offset}
    _run(url, admin_key, "GET", "/admin/audits", params=query)


def usage(
    since: Annotated[str | None, typer.Option(help="From this time (ISO 8601).")] = None,
    url: Url = None,
    admin_key: AdminKey = None,
    limit: Limit = 100,
    offset: Offset = 0,
) -> None:
    """Per-user usage: requests, answered, samples, refusals, by model."""
    query: dict[str, Any] = {"limit": limit, "offset": offset}
    if since is not None:
        query["since"] = since
    _run(url, admin_key, "GET", "/admin/usage", params=query)


def register(admin_app: typer.Typer) -> None:
    """Add the admin API commands to `sdb admin` (beside `bootstrap`)."""
    admin_app.add_typer(users_app, name="users")
    admin_app.add_typer(keys_app, name="keys")
    admin_app.command("audits")(audits)
    admin_app.command("usage")(usage)
