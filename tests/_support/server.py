"""Real servers for tests and benchmarks: the environment of an `sdb serve` process, starting it, waiting for
it (and for what it logs), its CPU and memory, and stopping it."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from tests._support.net import free_port

REPO = Path(__file__).resolve().parents[2]
PYTHON = sys.executable
# Long enough for the >= 32-byte rule, and recognizable when searched for in outputs.
JWT_SECRET = "rel-jwt-secret-" + uuid.uuid4().hex + uuid.uuid4().hex
ADMIN_TOKEN = "rel-admin-bootstrap-" + uuid.uuid4().hex + uuid.uuid4().hex


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
            "SDB_EXPOSE_METRICS": "true",
            # tests count /predict calls as rows (the default, sampled: reliability/test_audit_counts.py)
            "SDB_PREDICT_AUDIT_ROWS": "on",
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
    args: list[str] = field(default_factory=list)  # more `sdb serve` options (e.g. "--no-access-log")
    cmd: list[str] | None = None  # another command line than `sdb serve` (e.g. scripts/run.sh)
    process_group: bool = False  # signal the whole process group (a script that runs `sdb serve`)
    proc: subprocess.Popen[bytes] | None = None
    _terminated: bool = False

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, wait_s: float = 120.0) -> Server:
        """Launch the process and wait until it is ready."""
        return self.launch().wait_ready(wait_s)

    def launch(self) -> Server:
        """Start the process without waiting (to start several at once, then `wait_ready` on each)."""
        # The production entry point (`sdb serve`): it turns uvicorn's own X-Forwarded-For handling off, so
        # that only SDB_TRUSTED_PROXIES decides whose forwarded address counts.
        cmd = self.cmd or [
            PYTHON, "-m", "sdb.cli", "serve", "--host", "127.0.0.1", "--port", str(self.port),
            "--graceful-timeout", str(self.graceful_s), "--workers", str(self.workers), *self.args,
        ]  # fmt: skip
        self._log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            cmd,
            cwd=REPO,
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=self.process_group,
        )
        return self

    def wait_ready(self, wait_s: float = 120.0) -> Server:
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

    def wait_for_log(self, text: str, count: int = 1, wait_s: float = 120.0) -> Server:
        """Wait until `text` appears `count` times in the log (e.g. once per worker's start-up)."""
        deadline = time.monotonic() + wait_s
        while self.logs().count(text) < count:
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"{text!r} not logged {count} time(s) in {wait_s}s:\n{self.logs()[-4000:]}"
                )
            time.sleep(0.2)
        return self

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def _signal(self, sig: int) -> None:
        assert self.proc is not None
        with contextlib.suppress(ProcessLookupError):
            if self.process_group:
                os.killpg(self.proc.pid, sig)
            else:
                self.proc.send_signal(sig)

    def terminate(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self._signal(signal.SIGTERM)
            self._terminated = True

    def wait(self, timeout: float) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout=timeout)

    def stop(self) -> int | None:
        """SIGTERM (once), wait for the graceful shutdown, SIGKILL past it; the exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            if not self._terminated:  # a second SIGTERM makes uvicorn skip its graceful shutdown
                self._signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=self.graceful_s + 20)
            except subprocess.TimeoutExpired:
                self._signal(signal.SIGKILL)
                self.proc.wait(timeout=10)
        if self.process_group:  # children the script's own process left behind (LitServe's workers)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signal.SIGKILL)
        self._log.close()
        return self.proc.returncode

    def rss_kib(self) -> int:
        assert self.proc is not None
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise RuntimeError("VmRSS not found")

    def cpu_s(self) -> float:
        """User + system CPU seconds of the server and its live descendants (workers, a script's server)."""
        assert self.proc is not None
        return process_tree_cpu_s(self.proc.pid)


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds of one process (all its threads), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def process_tree_cpu_s(pid: int) -> float:
    """CPU seconds of a process and of its live descendants, found through their parent ids in /proc."""
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            parents[int(stat.parent.name)] = int(stat.read_text().rsplit(")", 1)[1].split()[1])
    tree, frontier = {pid}, [pid]
    while frontier:
        parent = frontier.pop()
        children = [c for c, p in parents.items() if p == parent and c not in tree]
        tree.update(children)
        frontier += children
    total = 0.0
    for p in tree:
        with contextlib.suppress(OSError, ValueError, IndexError):  # a child that exited meanwhile
            total += process_cpu_s(p)
    return total


def server_process(cmd: list[str], env: dict[str, str], port: int, log_path: Path) -> Server:
    """A server that another command line starts (scripts/run.sh, a compose command), ready on /readyz and
    stopped through its process group."""
    return Server(env=env, log_path=log_path, port=port, cmd=cmd, process_group=True, ready_path="/readyz")


ServerFactory = Callable[..., Server]  # the reliability tests' `start_server(database_url, **settings)`
