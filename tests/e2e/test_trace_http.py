"""End to end over real HTTP: a real `sdb serve` (SQLite) issues three watermarked API keys; one licensee
passes on its /distill-batch soft labels: a suspect endpoint on loopback answers every query with the soft
labels it fetches from the service with that licensee's key (a perfect leak). POST /admin/trace (host allowed
by address) and `sdb trace --suspect-url` (a subprocess with the server's database and secret) both rank the
leaking key first with corrected p < 1e-6; the audit rows name its watermark; the trace never fetches a
host outside SDB_TRACE_ALLOWED_HOSTS."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import pytest

from sdb.client import SdbClient
from sdb_core.artifact import make_test_box
from tests._support.admin import create_user_and_key
from tests._support.db import audit_rows, run_migrations
from tests._support.server import PYTHON, REPO, Server, base_env
from tests._support.suspects import predict_endpoint

pytestmark = [pytest.mark.slow, pytest.mark.e2e]

SECRET = "e2e-watermark-secret-" + "c0ffee1234567890" * 3


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    work = tmp_path_factory.mktemp("trace-e2e")
    models = work / "models"
    make_test_box(models, name="tiny", seed=11)
    db_url = f"sqlite:///{work / 'sdb.db'}"
    run_migrations(db_url)
    env = base_env(
        models,
        db_url,
        watermark_secret=SECRET,
        trace_allowed_hosts='["127.0.0.1"]',
        trace_probe_data="digits",
        distill_rate_per_minute=0,
    )
    srv = Server(env, work / "server.log", ready_path="/readyz").start(wait_s=90)
    try:
        creds = [create_user_and_key(srv.url, scopes=["tiny"], name=f"licensee{i}") for i in range(3)]
        yield {"url": srv.url, "db_url": db_url, "models": models, "creds": creds, "env": env}
    finally:
        srv.stop()


def leaking_endpoint(base_url: str, api_key: str) -> Any:
    client = SdbClient(base_url, api_key)

    def leak(x: np.ndarray) -> np.ndarray:  # the licensee's soft labels at T=4, answered at T=1
        soft = client.distill_batch(x, model="tiny", temperature=4.0).soft_labels.astype(np.float64)
        p = np.exp(4.0 * np.log(np.clip(soft, 1e-30, None)))
        return p / p.sum(axis=1, keepdims=True)

    return predict_endpoint(leak)


def test_the_admin_route_and_the_command_name_the_leaking_key(world: dict[str, Any]) -> None:
    leaker = world["creds"][1]
    assert leaker.key_info["watermarked"] and leaker.key_info["watermark_id"].startswith("wm-")
    with leaking_endpoint(world["url"], leaker.api_key) as url:
        body = {"model": "tiny", "suspect_url": url, "probes": 1500, "decoys": 200}
        r = httpx.post(world["url"] + "/admin/trace", json=body, headers=leaker.admin_headers, timeout=120)
        assert r.status_code == 200, r.text
        top = r.json()["keys"][0]
        assert top["key_id"] == leaker.key_id and top["verdict"] == "match" and top["corrected_p"] < 1e-6
        assert [m["key_id"] for m in r.json()["matches"]] == [leaker.key_id]
        assert r.json()["watermarks_tested"] == 3  # the licensees (the bootstrap admin key is unmarked)

        env = {k: v for k, v in world["env"].items() if not k.startswith("PROMETHEUS")}
        cmd = [PYTHON, "-m", "sdb.cli", "trace", "--box", str(world["models"] / "tiny"), "--suspect-url", url]
        cmd += ["--probes", "1500", "--decoys", "200", "--json"]
        out = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr
        report = json.loads(out.stdout)
        assert report["keys"][0]["key_id"] == leaker.key_id and report["keys"][0]["corrected_p"] < 1e-6
        assert [m["key_id"] for m in report["matches"]] == [leaker.key_id]
    rows = audit_rows(world["db_url"], "endpoint = '/distill-batch' AND status = 200")
    assert rows and {r.watermark_id for r in rows} == {leaker.key_info["watermark_id"]}


def test_hosts_outside_the_allow_list_are_refused(world: dict[str, Any]) -> None:
    admin = world["creds"][0].admin_headers
    for url in (
        "http://localhost:1/predict",
        "http://169.254.169.254/latest/meta-data/",
        "file:///etc/passwd",
    ):
        body = {"model": "tiny", "suspect_url": url, "probes": 500}
        r = httpx.post(world["url"] + "/admin/trace", json=body, headers=admin, timeout=30)
        assert r.status_code in (403, 422), (url, r.text)
        assert "detail" in r.json()
    r = httpx.post(world["url"] + "/admin/trace", json={"suspect_url": "http://127.0.0.1:1/"}, timeout=30)
    assert r.status_code == 401
