"""The compose services' commands and environment, run outside Docker against the local PostgreSQL.

CI has no Docker engine, so this is how the compose file's `migrate` and `api` services are exercised: the
resolved compose model (`docker compose config --format json`, with .env.example) gives each service's
command and environment; only the database host (the `db` container -> a fresh database on 127.0.0.1), the
Redis host (the `redis` container -> the local Redis, under a key prefix of this test) and the listening
address (0.0.0.0:8000 -> a free loopback port) are changed; the compose secrets (/run/secrets/NAME) are
files of this test, and the models directory a copy of ./models sealed under this test's master key (as
the README's deployment steps seal them).
"""

from __future__ import annotations

import json
import secrets
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import numpy as np
import pytest
from sqlalchemy.engine import make_url

from tests._support.net import free_port
from tests._support.ops import clean_env, sdb_executable
from tests._support.redis import REDIS_URL, redis_available, redis_prefix
from tests._support.server import Server, server_process

pytestmark = [pytest.mark.e2e, pytest.mark.postgres, pytest.mark.slow]


def local_command(cmd: list[str], port: int | None = None) -> list[str]:
    """The image's `sdb ...` command with this environment's `sdb` and, for `serve`, a loopback port."""
    assert cmd[0] == "sdb", f"compose commands start with the documented `sdb` command: {cmd}"
    out = [sdb_executable(), *cmd[1:]]
    if port is not None:
        out[out.index("--host") + 1] = "127.0.0.1"
        out[out.index("--port") + 1] = str(port)
    return out


REDIS_PREFIX = f"sdbtest:{uuid.uuid4().hex[:12]}:"
# .env.example's values are placeholders, which the service refuses (tested below): real secrets instead.
SECRETS = {"SDB_CLIENT_IP_SALT": secrets.token_hex(16)}


@pytest.fixture
def deployment(tmp_path: Path) -> tuple[Path, Path]:
    """secrets/ (the compose secrets' files) and a copy of ./models sealed under secrets/sdb_seal_key."""
    import shutil

    from sdb_core.artifact import seal_artifact
    from sdb_core.seal import new_master_key
    from tests._support.ops import REPO

    secrets_dir, models = tmp_path / "secrets", tmp_path / "models"
    secrets_dir.mkdir(mode=0o700)
    (secrets_dir / "sdb_jwt_secret").write_text(secrets.token_hex(32) + "\n")
    master = new_master_key(secrets_dir / "sdb_seal_key")
    shutil.copytree(REPO / "models", models)
    for box in sorted(p.parent for p in models.glob("*/manifest.json")):
        seal_artifact(box, master)
    return secrets_dir, models


def local_env(
    service: dict[str, Any],
    database_url: str,
    placeholders: bool = False,
    deployment: tuple[Path, Path] | None = None,
) -> dict[str, str]:
    env = {k: str(v) for k, v in service["environment"].items()}
    if not placeholders:
        env.update({k: v for k, v in SECRETS.items() if k in env})
    for name, value in list(env.items()):
        if name.endswith("_FILE") and value.startswith("/run/secrets/"):
            assert deployment is not None, f"{name}: a compose secret, and no secrets directory given"
            env[name] = str(deployment[0] / value.removeprefix("/run/secrets/"))
    compose_url, local_url = make_url(env["SDB_DATABASE_URL"]), make_url(database_url)
    assert compose_url.drivername == local_url.drivername  # same driver, only the server differs
    assert compose_url.host == "db"
    env["SDB_DATABASE_URL"] = database_url
    if "SDB_REDIS_URL" in env and not placeholders:
        assert urlsplit(env["SDB_REDIS_URL"]).hostname == "redis"
        env["SDB_REDIS_URL"] = REDIS_URL  # the local Redis; its keys under this test's prefix
        env["SDB_REDIS_KEY_PREFIX"] = REDIS_PREFIX
    for mount in service.get("volumes", []):
        if mount["target"] == env["SDB_MODEL_DIR"]:
            # the bind mount's host side (./models), or the sealed copy of it
            env["SDB_MODEL_DIR"] = str(deployment[1]) if deployment is not None else mount["source"]
    env["SDB_TORCH_THREADS"] = "1"  # CI has two cores and other tests running
    return clean_env(**env)


@pytest.fixture
def redis_cleanup() -> Iterator[None]:
    """The keys the local `api` writes to the local Redis (if one answers) are deleted afterwards."""
    if not redis_available():
        yield
        return
    with redis_prefix(REDIS_PREFIX):
        yield


def test_migrate_then_serve_as_compose_does(
    compose_json: dict[str, Any],
    pg_database: str,
    servers: list[Server],
    tmp_path: Path,
    redis_cleanup: None,
    deployment: tuple[Path, Path],
) -> None:
    services = compose_json["services"]
    migrate, api = services["migrate"], services["api"]
    api_env = local_env(api, pg_database, deployment=deployment)
    assert Path(api_env["SDB_MODEL_DIR"]).is_dir()
    assert api_env["SDB_REQUIRE_SEALED"] == "true" and "SDB_JWT_SECRET" not in api_env

    # The repository's models as they are (not sealed): SDB_REQUIRE_SEALED, compose's default, refuses them.
    unsealed = subprocess.run(
        local_command(api["command"], free_port()),
        env={**api_env, "SDB_MODEL_DIR": str(Path(__file__).resolve().parents[2] / "models")},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert unsealed.returncode == 1 and "SDB_REQUIRE_SEALED=true" in unsealed.stderr, unsealed.stderr
    assert len(unsealed.stderr.strip().splitlines()) == 1 and "Traceback" not in unsealed.stderr

    # Compose run on .env.example's placeholders: the service refuses to start, naming the problem.
    placeholder = subprocess.run(
        local_command(api["command"], free_port()),
        env=local_env(api, pg_database, placeholders=True, deployment=deployment),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert placeholder.returncode != 0 and "placeholder" in placeholder.stdout + placeholder.stderr

    # Before the migrations, the service refuses to start and names the command to run.
    early = subprocess.run(
        local_command(api["command"], free_port()), env=api_env, capture_output=True, text=True, timeout=120
    )
    assert early.returncode != 0
    assert "sdb db upgrade" in early.stdout + early.stderr

    r = subprocess.run(
        local_command(migrate["command"]),
        env=local_env(migrate, pg_database, deployment=deployment),
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert r.returncode == 0, r.stdout + r.stderr

    port = free_port()
    server = server_process(local_command(api["command"], port), api_env, port, tmp_path / "api.log")
    servers.append(server)
    server.start()
    assert httpx.get(server.url + "/healthz", timeout=5).status_code == 200  # the image's HEALTHCHECK
    if redis_available():
        assert httpx.get(server.url + "/readyz", timeout=5).json()["redis"] == "ok"

    # The mounted models directory is what the service serves.
    manifests = [json.loads(p.read_text()) for p in Path(api_env["SDB_MODEL_DIR"]).glob("*/manifest.json")]
    assert manifests
    for manifest in manifests:
        x = np.zeros((2, *manifest["input_shape"]), dtype=np.float32).tolist()
        answer = httpx.post(
            server.url + "/predict", json={"model": manifest["name"], "inputs": x}, timeout=30
        )
        assert answer.status_code == 200, answer.text
        assert answer.json()["model"] == manifest["name"]
        assert len(answer.json()["predictions"]) == 2
    assert server.stop() == 0, server.logs()[-3000:]
