"""`sdb serve --workers 2`: metrics, the per-key rate limit and audits add up as with one process."""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests._support.admin import create_user_and_key, get_token
from tests._support.boxes import MODEL
from tests._support.db import count_audits
from tests._support.server import ServerFactory

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

ONE_SAMPLE = {"model": MODEL, "inputs": [[[[0.25] * 8] * 8]]}
PREDICT_TOTAL = re.compile(r'^sdb_http_requests_total\{[^}]*route="/predict"[^}]*\} (\S+)$', re.M)


def test_two_workers(start_server: ServerFactory, tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'w.db'}"
    rate = 4
    srv = start_server(url, workers=2, distill_rate_per_minute=rate, predict_rate_per_minute=0)
    n_predict = 30
    # A new connection per request, so that the kernel spreads the calls over both workers.
    for _ in range(n_predict):
        assert httpx.post(srv.url + "/predict", json=ONE_SAMPLE, timeout=30).status_code == 200

    # Each /metrics call is answered by one worker; every answer must carry the sum over both.
    totals = set()
    for _ in range(6):
        r = httpx.get(srv.url + "/metrics", timeout=30)
        totals.add(sum(float(v) for v in PREDICT_TOTAL.findall(r.text)))
    assert totals == {float(n_predict)}

    # One client is one anonymous id whichever worker answers it (else its volume, and the extraction
    # flag, would be split across workers).
    creds = create_user_and_key(srv.url, scopes=[MODEL])
    deadline = time.monotonic() + 20
    clients: dict[str, Any] = {}
    while time.monotonic() < deadline:
        clients = httpx.get(
            srv.url + "/admin/usage/clients",
            params={"kind": "anonymous"},
            headers=creds.admin_headers,
            timeout=30,
        ).json()
        if sum(item["requests"] for item in clients["items"]) == n_predict:
            break
        time.sleep(0.3)
    assert [item["requests"] for item in clients["items"]] == [n_predict], clients

    token = get_token(srv.url, creds.api_key)
    if time.time() % 60 > 45:  # fixed one-minute windows: keep the calls inside one
        time.sleep(60 - time.time() % 60 + 0.1)
    statuses = [
        httpx.post(
            srv.url + "/distill-batch",
            json=ONE_SAMPLE,
            headers={"Authorization": f"Bearer {token}"},
            timeout=30,
        ).status_code
        for _ in range(rate + 2)
    ]
    assert statuses == [200] * rate + [429, 429]

    srv.stop()
    assert count_audits(url, "/predict") == n_predict
    assert count_audits(url, "/distill-batch", "status = 200") == rate
    assert count_audits(url, "/distill-batch", "status = 429") == 2
