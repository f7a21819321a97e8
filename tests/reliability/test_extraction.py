"""The extraction flag end to end: a heavy anonymous client is flagged in the admin API and in /metrics,
a light one is not, and neither is identified by its address."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from sqlalchemy import create_engine, text

from tests._support.admin import admin_headers
from tests._support.boxes import MODEL
from tests._support.server import ServerFactory

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

THRESHOLD = 20  # samples per window; the heavy client sends 3 x 8 = 24, the light one 8
WINDOW_S = 3600
HEAVY, LIGHT = "203.0.113.7", "198.51.100.9"


def _predict(c: httpx.Client, client_ip: str, n: int) -> None:
    x = np.random.default_rng(n).standard_normal((n, 1, 8, 8)).astype(np.float32)
    r = c.post(
        "/predict", json={"model": MODEL, "inputs": x.tolist()}, headers={"X-Forwarded-For": client_ip}
    )
    assert r.status_code == 200, r.text


def test_heavy_anonymous_client_is_flagged(start_server: ServerFactory, tmp_path: Path) -> None:
    srv = start_server(
        f"sqlite:///{tmp_path / 'x.db'}",
        trusted_proxies='["127.0.0.1/32"]',  # the test plays a proxy in front of two clients
        extraction_sample_threshold=THRESHOLD,
        extraction_window_s=WINDOW_S,
    )
    if time.time() % WINDOW_S > WINDOW_S - 10:  # keep the calls inside one epoch-aligned window
        time.sleep(11)
    adm = admin_headers(srv.url)
    with httpx.Client(base_url=srv.url, timeout=30) as c:
        for _ in range(3):
            _predict(c, HEAVY, 8)
        _predict(c, LIGHT, 8)

        # /predict audit rows are written asynchronously: poll until both clients show up.
        deadline = time.monotonic() + 20
        volumes: dict[str, Any] = {}
        while time.monotonic() < deadline:
            volumes = c.get("/admin/usage/clients", params={"kind": "anonymous"}, headers=adm).json()
            if volumes.get("total") == 2:
                break
            time.sleep(0.3)
        assert volumes["total"] == 2, volumes
        by_samples = {item["samples"]: item for item in volumes["items"]}
        assert set(by_samples) == {24, 8}
        assert by_samples[24]["flagged"] and not by_samples[8]["flagged"]

        r = c.get("/admin/extraction", headers=adm)
        assert r.status_code == 200
        flagged = r.json()["flagged"]
        assert [f["client"] for f in flagged] == [by_samples[24]["client"]]
        assert str(THRESHOLD) in r.json()["rule"]
        # Clients are named by a salted hash, never by their address.
        assert HEAVY not in r.text and LIGHT not in r.text and HEAVY not in str(volumes)

        metrics = c.get("/metrics").text
    assert 'sdb_extraction_flags_total{kind="anonymous"} 1.0' in metrics


def test_anonymous_id_is_the_same_in_every_process(start_server: ServerFactory, tmp_path: Path) -> None:
    """Two processes on one database (workers, or a restart) give one client one id: volumes add up."""
    url = f"sqlite:///{tmp_path / 'ids.db'}"
    for i in range(2):
        srv = start_server(url, migrate=i == 0)
        with httpx.Client(base_url=srv.url, timeout=30) as c:
            _predict(c, HEAVY, 2)
        srv.stop()  # flushes the /predict audit queue
    eng = create_engine(url)
    try:
        with eng.connect() as conn:  # the per-client aggregates (per-request rows are sampled by default)
            per_client = conn.execute(
                text(
                    "SELECT c.client_id, sum(u.requests) FROM client_usage u "
                    "JOIN audit_clients c ON c.id = u.client_ref GROUP BY c.client_id"
                )
            ).all()
            assert len(per_client) == 1 and per_client[0][1] == 2
    finally:
        eng.dispose()
