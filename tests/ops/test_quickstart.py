"""Quick start command 1 (`scripts/run.sh`), minus the install step: it migrates the embedded SQLite
database, serves the shipped demo box in demo mode, and prints the URL, the docs URL and how to get the
first admin credentials, which then work. (The install itself is tried from a fresh copy of the tree; see
docs/operations.md.)"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import httpx
import pytest

from tests._support.net import free_port
from tests._support.ops import REPO, clean_env, sdb_executable
from tests._support.server import Server, server_process

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def test_run_script_serves_the_demo_box_and_explains_admin_bootstrap(
    servers: list[Server], tmp_path: Path
) -> None:
    port = free_port()
    db_url = f"sqlite:///{tmp_path / 'quickstart.db'}"
    env = clean_env(SDB_SKIP_SETUP="1", SDB_PORT=str(port), SDB_DATABASE_URL=db_url, SDB_TORCH_THREADS="1")
    server = server_process(["bash", str(REPO / "scripts" / "run.sh")], env, port, tmp_path / "run.log")
    servers.append(server)
    server.start()

    url = f"http://127.0.0.1:{port}"
    out = server.wait_for_log("API docs:", wait_s=30).logs()
    assert f"URL:        {url}" in out
    assert f"{url}/docs" in out
    assert "sdb admin bootstrap" in out
    assert "in demo mode" in out

    assert httpx.get(url + "/docs", timeout=10).status_code == 200
    models = [json.loads(p.read_text())["name"] for p in (REPO / "models").glob("*/manifest.json")]
    assert models, "the demo box ships in models/"

    # The printed instructions work: bootstrap the first admin, exchange its key for a token.
    r = subprocess.run(
        [sdb_executable(), "admin", "bootstrap"],
        env=clean_env(SDB_DATABASE_URL=db_url),
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    assert r.returncode == 0, r.stderr
    admin_key = r.stdout.strip().splitlines()[-1]
    token = httpx.post(url + "/auth/token", json={"api_key": admin_key}, timeout=10)
    assert token.status_code == 200, token.text
    listed = httpx.get(
        url + "/admin/models", headers={"Authorization": f"Bearer {token.json()['access_token']}"}, timeout=10
    )
    assert listed.status_code == 200
    assert {m["name"] for m in listed.json()} == set(models)

    assert server.stop() == 0, out[-3000:]


def test_run_script_does_not_report_running_when_another_process_holds_the_port(tmp_path: Path) -> None:
    import http.server
    import threading

    class Ready(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"{}")

        def log_message(self, *args: object) -> None:
            pass

    other = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), Ready)
    threading.Thread(target=other.serve_forever, daemon=True).start()
    port = other.server_address[1]
    env = clean_env(
        SDB_SKIP_SETUP="1",
        SDB_PORT=str(port),
        SDB_DATABASE_URL=f"sqlite:///{tmp_path / 'taken.db'}",
        SDB_TORCH_THREADS="1",
    )
    try:
        r = subprocess.run(
            ["bash", str(REPO / "scripts" / "run.sh")], env=env, capture_output=True, text=True, timeout=300
        )
    finally:
        other.shutdown()
    assert r.returncode != 0
    assert "sdb is running" not in r.stdout
    assert f"port {port}" in r.stderr and "in use" in r.stderr
