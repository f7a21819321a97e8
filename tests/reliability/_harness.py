"""Real-server harness for the reliability tests: databases, migrations, uvicorn processes, admin setup.

Everything talks to the service over loopback HTTP only, through its documented interfaces (`alembic
upgrade head` on SDB_DATABASE_URL, SDB_* settings, the bootstrap admin token, /auth/token, /admin/*).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psycopg

REPO = Path(__file__).resolve().parents[2]
PYTHON = sys.executable
PG_ADMIN_URL = os.environ.get("SDB_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")
# Long enough for the >= 32-byte rule, and recognizable when searched for in outputs.
JWT_SECRET = "rel-jwt-secret-" + uuid.uuid4().hex + uuid.uuid4().hex
ADMIN_TOKEN = "rel-admin-bootstrap-" + uuid.uuid4().hex + uuid.uuid4().hex


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pg_parts(url: str = PG_ADMIN_URL) -> tuple[str, int]:
    u = httpx.URL(url.replace("postgresql+psycopg://", "postgresql://"))
    return u.host or "127.0.0.1", u.port or 5432


def pg_available() -> bool:
    try:
        with psycopg.connect(PG_ADMIN_URL, connect_timeout=2) as c:
            c.execute("SELECT 1")
        return True
    except Exception:
        return False


@contextlib.contextmanager
def pg_database(prefix: str = "sdb_rel") -> Iterator[str]:
    """A fresh PostgreSQL database; yields its name and drops it afterwards."""
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as c:
        c.execute(f'CREATE DATABASE "{name}"')
    try:
        yield name
    finally:
        with psycopg.connect(PG_ADMIN_URL, autocommit=True) as c:
            c.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def pg_url(dbname: str, port: int | None = None) -> str:
    host, default_port = pg_parts()
    return f"postgresql+psycopg://postgres@{host}:{port or default_port}/{dbname}"


def run_migrations(database_url: str) -> None:
    from service.db.migrate import upgrade

    upgrade(database_url)


def base_env(model_dir: Path, database_url: str, **overrides: Any) -> dict[str, str]:
    env = {
        k: v for k, v in os.environ.items() if not k.startswith("SDB_") and k != "PROMETHEUS_MULTIPROC_DIR"
    }
    env.update(
        {
            "SDB_DATABASE_URL": database_url,
            "SDB_MODEL_DIR": str(model_dir),
            "SDB_DEVICE": "cpu",
            "SDB_TORCH_THREADS": "1",
            "SDB_JWT_SECRET": JWT_SECRET,
            "SDB_BOOTSTRAP_ADMIN_TOKEN": ADMIN_TOKEN,
            "SDB_LOG_LEVEL": "DEBUG",
            "PYTHONUNBUFFERED": "1",
        }
    )
    for k, v in overrides.items():
        env[k if k.startswith(("SDB_", "PROMETHEUS")) else f"SDB_{k.upper()}"] = str(v)
    return env


@dataclass
class Server:
    """One `sdb serve` process (uvicorn) on a loopback port; logs go to `log_path`."""

    env: dict[str, str]
    log_path: Path
    port: int = field(default_factory=free_port)
    graceful_s: int = 10
    workers: int = 1
    ready_path: str = "/healthz"  # polled until it answers 200; "/readyz" also waits for the database
    proc: subprocess.Popen[bytes] | None = None
    _terminated: bool = False

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, wait_s: float = 90.0) -> Server:
        """Launch the process and wait until it is ready."""
        return self.launch().wait_ready(wait_s)

    def launch(self) -> Server:
        """Start the process without waiting (to start several at once, then `wait_ready` on each)."""
        # The production entry point (`sdb serve`): it turns uvicorn's own X-Forwarded-For handling off, so
        # that only SDB_TRUSTED_PROXIES decides whose forwarded address counts.
        cmd = [
            PYTHON, "-m", "sdb.cli", "serve", "--host", "127.0.0.1", "--port", str(self.port),
            "--graceful-timeout", str(self.graceful_s), "--workers", str(self.workers),
        ]  # fmt: skip
        self._log = self.log_path.open("ab")
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=self.env, stdout=self._log, stderr=subprocess.STDOUT)
        return self

    def wait_ready(self, wait_s: float = 90.0) -> Server:
        """Poll `ready_path` until it answers 200; stops the server and raises if it exits or times out."""
        assert self.proc is not None, "launch() first"
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.stop()
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.logs()[-4000:]}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(self.url + self.ready_path, timeout=1.0).status_code == 200:
                    return self
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"server did not answer {self.ready_path} in {wait_s}s:\n{self.logs()[-4000:]}")

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def terminate(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self._terminated = True

    def wait(self, timeout: float) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout=timeout)

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            if not self._terminated:  # a second SIGTERM makes uvicorn skip its graceful shutdown
                self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=self.graceful_s + 10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self._log.close()

    def rss_kib(self) -> int:
        assert self.proc is not None
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise RuntimeError("VmRSS not found")


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
) -> Credentials:
    adm = admin_headers(base_url)
    uname = name or f"user-{uuid.uuid4().hex[:8]}"
    r = httpx.post(base_url + "/admin/users", json={"name": uname}, headers=adm, timeout=10)
    r.raise_for_status()
    user = r.json()
    body: dict[str, Any] = {"scopes": scopes}
    if quota is not None:
        body["sample_quota"] = quota
    r = httpx.post(base_url + f"/admin/users/{user['id']}/keys", json=body, headers=adm, timeout=10)
    r.raise_for_status()
    key = r.json()
    return Credentials(adm, user["id"], key["id"], key["api_key"], key)


def count_audits(database_url: str, endpoint: str | None = None, where: str = "") -> int:
    """Rows in query_audits (optionally for one endpoint path, e.g. "/predict"), read straight from the DB."""
    from sqlalchemy import create_engine, text

    eng = create_engine(database_url)
    try:
        q = "SELECT count(*) FROM query_audits WHERE 1=1"
        params: dict[str, Any] = {}
        if endpoint is not None:
            q += " AND endpoint = :e"
            params["e"] = endpoint
        if where:
            q += f" AND {where}"
        with eng.connect() as c:
            return int(c.execute(text(q), params).scalar_one())
    finally:
        eng.dispose()
