"""`docker compose up` for real: the README's Docker section, step for step, on a local Docker engine.

1. build the image (`docker/offline/build.sh`: stand-in base images from Debian packages where no registry
   answers, torch from this machine's pip, then `docker build -f docker/Dockerfile -t sdb:latest .`);
2. a deployment directory as an operator has it: the committed docker-compose.yml, a `.env` with fresh
   secrets, `secrets/` (0700) with the JWT secret and a fresh master key (files 0644), and `models/` sealed
   under that master key with the image's own `sdb seal` (no chown: sealed files are ciphertext);
3. `docker compose up -d --wait`: db healthy -> migrate -> api healthy;
4. the user story over 127.0.0.1: /predict, `docker compose exec api sdb admin bootstrap`, an admin token, a
   user, an API key, its token, /distill-batch, the audit rows; neither the JWT secret nor the master key is
   in the api container's environment (`docker inspect`), and no plaintext weights are in its models;
5. the api container runs as uid 10001 and cannot write its code, its virtualenv or the models;
6. `docker compose restart api`: users, keys and audit rows are still there;
7. `docker compose down` (volumes kept), `up` again: the data is still there;
8. `docker compose down -v` at the end, also when a step failed.
The host talks to the stack on 127.0.0.1 only; api, migrate and db talk on compose's own network.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from tests._support.admin import get_token
from tests._support.net import free_port
from tests._support.ops import REPO, clean_env

# A first build (base images from Debian packages, torch, the dependencies) takes minutes.
pytestmark = [pytest.mark.docker, pytest.mark.slow, pytest.mark.timeout(1800)]

IMAGE = "sdb:latest"
MODEL = "digits-demo"
PREDICT_RATE = 2  # per minute; the end-to-end test makes one /predict call
BUILD_TIMEOUT_S = 1500  # a first build: base images from Debian packages, then torch and the dependencies


@dataclass
class Stack:
    """`docker compose ...` in one deployment directory, with the README's commands."""

    compose: list[str]
    directory: Path
    port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def run(self, *args: str, timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess[str]:
        r = subprocess.run(
            [*self.compose, *args],
            cwd=self.directory,
            env=clean_env(),
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if check:
            assert r.returncode == 0, f"docker compose {' '.join(args)} failed:\n{r.stdout}\n{r.stderr}"
        return r

    def up(self) -> None:
        r = self.run("up", "-d", "--wait", "--wait-timeout", "240", timeout=300, check=False)
        if r.returncode != 0:
            logs = self.run("logs", "--no-color", "--tail", "60", check=False).stdout
            pytest.fail(f"docker compose up -d --wait failed:\n{r.stderr}\n{logs}")

    def exec_api(self, *cmd: str) -> subprocess.CompletedProcess[str]:
        return self.run("exec", "-T", "api", *cmd, check=False)


def _write_env(path: Path, port: int, project: str) -> None:
    """.env.example with every change-me value replaced by a fresh secret (the README's instruction)."""
    lines, fresh = [], set()
    for line in (REPO / ".env.example").read_text().splitlines():
        key, sep, value = line.partition("=")
        if sep and not key.startswith("#") and value.startswith("change-me"):
            line = f"{key}={secrets.token_hex(32)}"
            fresh.add(key)
        lines.append(line)
    assert {"POSTGRES_PASSWORD", "REDIS_PASSWORD", "SDB_CLIENT_IP_SALT"} <= fresh, fresh
    # A free host port, and a project name of its own so that a real `sdb` stack on this engine is untouched;
    # a /predict limit small enough for test_redis_holds_the_predict_limit to reach.
    lines += [
        f"SDB_PORT={port}",
        f"COMPOSE_PROJECT_NAME={project}",
        f"SDB_PREDICT_RATE_PER_MINUTE={PREDICT_RATE}",
    ]
    path.write_text("\n".join(lines) + "\n")
    path.chmod(0o600)


def _write_secrets(directory: Path) -> None:
    """The README's step: secrets/ 0700, the JWT secret and a master key (64 hex characters), files 0644."""
    secrets_dir = directory / "secrets"
    secrets_dir.mkdir(mode=0o700)
    for name in ("sdb_jwt_secret", "sdb_seal_key"):
        (secrets_dir / name).write_text(secrets.token_hex(32) + "\n")
        (secrets_dir / name).chmod(0o644)


def _seal_models(directory: Path) -> None:
    """The README's step: `sdb seal` in the image, as the owner of models/ and secrets/ (here: this user)."""
    r = subprocess.run(
        [
            "docker",
            "run",
            "--rm",
            "--user",
            f"{os.getuid()}:{os.getgid()}",
            "-v",
            f"{directory / 'models'}:/app/models",
            "-v",
            f"{directory / 'secrets'}:/run/secrets:ro",
            IMAGE,
            "sdb",
            "seal",
            "/app/models",
            "--key-file",
            "/run/secrets/sdb_seal_key",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert not list((directory / "models").glob("*/weights.safetensors"))


@pytest.fixture(scope="module")
def image(docker_engine: str) -> str:
    """Step 1: build sdb:latest (and, where no registry answers, the stand-in base images)."""
    t0 = time.monotonic()
    r = subprocess.run(
        ["bash", "docker/offline/build.sh"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=BUILD_TIMEOUT_S,
    )
    assert r.returncode == 0, f"docker/offline/build.sh failed:\n{r.stdout[-6000:]}\n{r.stderr[-4000:]}"
    size = int(
        subprocess.run(
            [docker_engine, "image", "inspect", "-f", "{{.Size}}", IMAGE],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    )
    print(f"\nbuild: {time.monotonic() - t0:.0f} s, {IMAGE} {size / 1e6:.0f} MB")
    return IMAGE


@pytest.fixture(scope="module")
def stack(image: str, compose: list[str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """Step 2, and step 8 afterwards: the deployment directory, then `docker compose down -v` always."""
    directory = tmp_path_factory.mktemp("deploy")
    shutil.copy(REPO / "docker-compose.yml", directory / "docker-compose.yml")
    shutil.copytree(REPO / "models", directory / "models")
    _write_secrets(directory)
    _seal_models(directory)
    port = free_port()
    _write_env(directory / ".env", port, f"sdbtest{secrets.token_hex(4)}")
    s = Stack(compose=compose, directory=directory, port=port)
    try:
        yield s
    finally:
        s.run("down", "-v", "--remove-orphans", check=False, timeout=180)


def _auth(base: str, api_key: str) -> dict[str, str]:
    """Bearer headers with a fresh token for `api_key` (POST /auth/token)."""
    return {"Authorization": f"Bearer {get_token(base, api_key)}"}


def _state(base: str, admin_key: str) -> dict[str, list[Any]]:
    """What must survive restarts: the users, the API keys and the audit rows of /distill-batch."""
    admin = _auth(base, admin_key)
    users = httpx.get(base + "/admin/users", headers=admin)
    keys = httpx.get(base + "/admin/keys", headers=admin)
    audits = httpx.get(base + "/admin/audits", params={"endpoint": "/distill-batch"}, headers=admin)
    for r in (users, keys, audits):
        assert r.status_code == 200, r.text
    return {
        "users": sorted(u["name"] for u in users.json()["items"]),
        "keys": sorted(k["id"] for k in keys.json()["items"]),
        "audits": sorted(a["id"] for a in audits.json()["items"]),
    }


def test_compose_stack_end_to_end(stack: Stack) -> None:
    t0 = time.monotonic()
    stack.up()  # step 3
    print(f"\nup: {time.monotonic() - t0:.0f} s")
    base = stack.url
    x = np.random.default_rng(0).uniform(0, 16, size=(4, 1, 8, 8)).astype("float32").tolist()

    # Step 4: the README's user story. Anyone may predict.
    r = httpx.post(base + "/predict", json={"model": MODEL, "inputs": x})
    assert r.status_code == 200, r.text
    assert len(r.json()["predictions"]) == 4

    boot = stack.exec_api("sdb", "admin", "bootstrap")
    assert boot.returncode == 0, boot.stderr
    admin_key = boot.stdout.strip().splitlines()[-1]
    assert admin_key.startswith("sdb_")
    admin = _auth(base, admin_key)
    r = httpx.post(base + "/admin/users", json={"name": "alice"}, headers=admin)
    assert r.status_code == 201, r.text
    r = httpx.post(
        base + f"/admin/users/{r.json()['id']}/keys",
        json={"scopes": [MODEL], "sample_quota": 100, "name": "alice-laptop"},
        headers=admin,
    )
    assert r.status_code == 201, r.text
    alice_key = r.json()["api_key"]
    r = httpx.post(
        base + "/distill-batch", json={"model": MODEL, "inputs": x}, headers=_auth(base, alice_key)
    )
    assert r.status_code == 200, r.text
    soft = np.asarray(r.json()["soft_labels"])
    assert soft.shape == (4, 10) and np.allclose(soft.sum(axis=1), 1.0, atol=1e-4)
    assert r.headers["X-Quota-Remaining"] == "96"
    before = _state(base, admin_key)
    assert before["users"] == ["admin", "alice"] and len(before["keys"]) == 2 and len(before["audits"]) == 1

    # The secrets are files, not environment variables; the models hold ciphertext only.
    inspect = subprocess.run(
        ["docker", "inspect", "-f", "{{json .Config.Env}}", stack.run("ps", "-q", "api").stdout.strip()],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    for name in ("sdb_jwt_secret", "sdb_seal_key"):
        assert (stack.directory / "secrets" / name).read_text().strip() not in inspect
    assert "SDB_SEAL_KEY_FILE=/run/secrets/sdb_seal_key" in inspect and "SDB_REQUIRE_SEALED=true" in inspect
    assert stack.exec_api("test", "-e", f"/app/models/{MODEL}/weights.safetensors").returncode != 0

    # Step 5: uid 10001, and nothing but /app/var is writable.
    assert stack.exec_api("id", "-u").stdout.strip() == "10001"
    for path in ("/app/service", "/app/sdb_core", "/opt/venv/lib", f"/app/models/{MODEL}", "/app/models"):
        w = stack.exec_api("sh", "-c", f"touch {path}/.sdb-write-test")
        assert w.returncode != 0, f"the api container could write to {path}"
    assert stack.exec_api("sh", "-c", "touch /app/var/.sdb-write-test").returncode == 0
    assert stack.exec_api("sh", "-c", f"echo x >> /app/models/{MODEL}/seal.json").returncode != 0

    # Step 6: restart the service; the database keeps everything.
    stack.run("restart", "api")
    stack.up()
    assert _state(base, admin_key) == before
    r = httpx.post(
        base + "/distill-batch",
        json={"model": MODEL, "inputs": x[:1]},
        headers=_auth(base, alice_key),
    )
    assert r.status_code == 200 and r.headers["X-Quota-Remaining"] == "95", r.text

    # Step 7: down (volumes kept) and up again: the PostgreSQL volume keeps everything.
    stack.run("down", timeout=180)
    assert stack.run("ps", "-a", "-q").stdout.strip() == ""
    stack.up()
    after = _state(base, admin_key)
    assert after["users"] == before["users"] and after["keys"] == before["keys"]
    assert len(after["audits"]) == 2 and set(before["audits"]) <= set(after["audits"])
    print(f"stack steps 3-7: {time.monotonic() - t0:.0f} s")


def test_postgres_stand_in_runs_as_non_root(stack: Stack) -> None:
    """The stand-in postgres image (docker/offline) never runs as root; the official image is not checked."""
    labels = subprocess.run(
        ["docker", "image", "inspect", "-f", "{{json .Config.Labels}}", "postgres:16-bookworm"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    if "stand-in" not in (json.loads(labels) or {}).get("org.opencontainers.image.title", ""):
        pytest.skip("postgres:16-bookworm is not the docker/offline stand-in")
    stack.up()
    assert stack.run("exec", "-T", "db", "id", "-u").stdout.strip() != "0"
    assert stack.run("exec", "-T", "db", "pg_isready", "-U", "sdb", "-d", "sdb").returncode == 0


def _stand_in(image: str) -> bool:
    labels = subprocess.run(
        ["docker", "image", "inspect", "-f", "{{json .Config.Labels}}", image],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return "stand-in" in (json.loads(labels) or {}).get("org.opencontainers.image.title", "")


def test_redis_holds_the_predict_limit(stack: Stack) -> None:
    """The api counts /predict in the compose Redis: /readyz says so, the client's bucket is a key there,
    and deleting that key (and nothing in the api) gives the client its budget back."""
    stack.up()
    base = stack.url
    r = httpx.get(base + "/readyz", timeout=30)
    assert r.status_code == 200 and r.json()["redis"] == "ok", r.text
    x = np.zeros((1, 1, 8, 8), dtype="float32").tolist()
    statuses = [httpx.post(base + "/predict", json={"model": MODEL, "inputs": x}, timeout=30).status_code]
    while statuses[-1] == 200 and len(statuses) <= PREDICT_RATE + 1:
        statuses.append(
            httpx.post(base + "/predict", json={"model": MODEL, "inputs": x}, timeout=30).status_code
        )
    assert statuses[-1] == 429 and 200 in statuses, statuses

    def redis_cli(*args: str) -> str:
        quoted = " ".join(f"'{a}'" for a in args)
        r = stack.run(
            "exec", "-T", "redis", "sh", "-c", f'REDISCLI_AUTH="$REDIS_PASSWORD" redis-cli {quoted}'
        )
        return r.stdout.strip()

    keys = redis_cli("--scan", "--pattern", "sdb:rate:*").splitlines()
    assert len(keys) == 1 and keys[0].startswith("sdb:rate:anon-"), keys
    assert redis_cli("DEL", keys[0]) == "1"
    r = httpx.post(base + "/predict", json={"model": MODEL, "inputs": x}, timeout=30)
    assert r.status_code == 200, r.text
    if _stand_in("redis:7-bookworm"):
        assert stack.run("exec", "-T", "redis", "id", "-u").stdout.strip() != "0"
