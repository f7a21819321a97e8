"""docker-compose.yml: `docker compose config` passes; the model matches docs/operations.md."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tests._support.ops import REPO, compose_config

SECRETS = ("POSTGRES_PASSWORD", "REDIS_PASSWORD", "SDB_CLIENT_IP_SALT")


def test_compose_config_passes_for_default_and_gpu_profile(compose_cmd: list[str]) -> None:
    compose_config(compose_cmd, REPO / ".env.example", "--quiet")
    compose_config(compose_cmd, REPO / ".env.example", "--quiet", profile="gpu")


def test_compose_config_refuses_missing_secrets(compose_cmd: list[str], tmp_path: Path) -> None:
    example = (REPO / ".env.example").read_text().splitlines()
    for secret in SECRETS:
        env_file = tmp_path / f"without-{secret}.env"
        env_file.write_text("\n".join(line for line in example if not line.startswith(f"{secret}=")) + "\n")
        r = compose_config(compose_cmd, env_file, "--quiet", check=False)
        assert r.returncode != 0, f"compose accepted a configuration without {secret}"
        assert secret in r.stderr


def test_env_example_holds_placeholders_and_env_is_ignored() -> None:
    values = dict(
        line.split("=", 1)
        for line in (REPO / ".env.example").read_text().splitlines()
        if line and not line.startswith("#")
    )
    assert set(SECRETS) <= set(values)
    for name in SECRETS:
        assert values[name].startswith("change-me"), f"{name} in .env.example must be a placeholder"
    ignored = (REPO / ".gitignore").read_text().splitlines()
    assert ".env" in ignored
    assert ".env" in (REPO / ".dockerignore").read_text().splitlines()


def test_postgres_has_named_volume_and_healthcheck(compose_json: dict[str, Any]) -> None:
    db = compose_json["services"]["db"]
    assert db["image"].startswith("postgres:")
    volumes = [v for v in db["volumes"] if v["type"] == "volume"]
    assert volumes and volumes[0]["source"] in compose_json["volumes"]
    assert volumes[0]["target"] == "/var/lib/postgresql/data"
    assert "pg_isready" in " ".join(db["healthcheck"]["test"])
    assert "ports" not in db, "PostgreSQL must not be published on the host"


def test_redis_shares_the_predict_limits_of_every_api_service(compose_json: dict[str, Any]) -> None:
    services = compose_json["services"]
    redis = services["redis"]
    assert redis["image"].startswith("redis:7")
    assert "ports" not in redis, "Redis must not be published on the host"
    assert "redis-cli ping" in " ".join(redis["healthcheck"]["test"])
    command = " ".join(redis["command"])
    assert "--requirepass" in command and "$REDIS_PASSWORD" in command  # from .env, not in the file
    for name in ("api", "api-gpu"):
        api = services[name]
        url = api["environment"]["SDB_REDIS_URL"]
        assert url.startswith("redis://:") and url.endswith("@redis:6379/0")
        assert api["depends_on"]["redis"]["condition"] == "service_healthy"


def test_migrations_run_once_before_the_service(compose_json: dict[str, Any]) -> None:
    services = compose_json["services"]
    migrate = services["migrate"]
    assert migrate["command"] == ["sdb", "db", "upgrade"]
    assert migrate["restart"] == "no"
    assert migrate["depends_on"]["db"]["condition"] == "service_healthy"
    for name in ("api", "api-gpu"):
        api = services[name]
        assert api["command"][:2] == ["sdb", "serve"]
        assert api["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
        mounts = {v["target"]: v for v in api["volumes"]}
        models = mounts["/app/models"]
        assert models["type"] == "bind" and models["read_only"] is True
        assert Path(models["source"]) == REPO / "models"
        assert api["environment"]["SDB_MODEL_DIR"] == "/app/models"
        assert api["environment"]["SDB_DATABASE_URL"].startswith("postgresql+psycopg://sdb:")
        assert "@db:5432/" in api["environment"]["SDB_DATABASE_URL"]
        assert all(p["host_ip"] == "127.0.0.1" for p in api["ports"])


def test_gpu_profile_reserves_an_nvidia_device(compose_json: dict[str, Any]) -> None:
    gpu = compose_json["services"]["api-gpu"]
    assert gpu["profiles"] == ["gpu"]
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices)
    assert gpu["build"]["args"]["TORCH_VARIANT"].startswith("cu")
    assert gpu["environment"]["SDB_DEVICE"] == "cuda"
    # The default `docker compose up` (no profile) starts no GPU service.
    assert "profiles" not in compose_json["services"]["api"]


def test_every_image_volume_is_a_named_volume_that_down_v_removes(compose_json: dict[str, Any]) -> None:
    # An image VOLUME without a mount becomes an anonymous volume that `docker compose down -v` leaves behind
    # (Redis keeps /data, even with persistence off): every such path is mounted from a named volume.
    image_volumes = {"db": "/var/lib/postgresql/data", "redis": "/data"}
    for service, path in image_volumes.items():
        mounts = compose_json["services"][service].get("volumes", [])
        named = [m for m in mounts if m["type"] == "volume" and m["target"] == path]
        assert named and named[0]["source"] in compose_json["volumes"], (service, mounts)


def test_every_image_has_an_offline_stand_in_or_the_readme_says_it_has_none() -> None:
    import re

    import yaml

    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    build_sh = (REPO / "docker" / "offline" / "build.sh").read_text()
    stand_ins = dict(re.findall(r"([\w./-]+:[\w.-]+)=([\w-]+\.Dockerfile)", build_sh))
    deployment = (REPO / "README.md").read_text().split("## Deployment", 1)[1].split("\n## ", 1)[0]
    for name, service in compose["services"].items():
        image = service["image"]
        if image.startswith("sdb:"):
            continue  # built from docker/Dockerfile
        if image in stand_ins:
            assert (REPO / "docker" / "offline" / stand_ins[image]).is_file(), image
            continue
        # no stand-in: the README's deployment section and build.sh both say so, naming the image
        assert image in deployment and "registry" in deployment, (name, image)
        assert image in build_sh and "cannot be had" in build_sh, (name, image)
    assert "prom/prometheus:v2.53.2" in stand_ins


def test_jwt_secret_and_master_key_are_compose_secrets(compose_json: dict[str, Any]) -> None:
    """Files mounted at /run/secrets, read through SDB_*_FILE: not in any container's environment."""
    defined = compose_json["secrets"]
    assert {"sdb_jwt_secret", "sdb_seal_key"} <= set(defined)
    assert all(Path(defined[name]["file"]).parent == REPO / "secrets" for name in defined)
    for name in ("api", "api-gpu", "migrate"):
        env = compose_json["services"][name]["environment"]
        assert "SDB_JWT_SECRET" not in env and env["SDB_JWT_SECRET_FILE"] == "/run/secrets/sdb_jwt_secret"
    for name in ("api", "api-gpu"):
        service = compose_json["services"][name]
        assert {s["source"] for s in service["secrets"]} == {"sdb_jwt_secret", "sdb_seal_key"}
        assert service["environment"]["SDB_SEAL_KEY_FILE"] == "/run/secrets/sdb_seal_key"
        assert service["environment"]["SDB_REQUIRE_SEALED"] == "true"
    ignored = (REPO / ".gitignore").read_text().splitlines()
    assert "/secrets/" in ignored and "secrets/" in (REPO / ".dockerignore").read_text().splitlines()
