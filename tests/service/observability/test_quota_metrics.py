"""The database gauges on /metrics: quota consumption over usable keys, and database reachability."""

from __future__ import annotations

from typing import Any

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from tests._support.api import ApiHelper


def gauges(client: TestClient) -> dict[str, float]:
    text = client.get("/metrics").text
    names = ("sdb_database_up", "sdb_api_key_quota_used_ratio_max", "sdb_api_keys_near_quota")
    return {
        s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples if s.name in names
    }


def test_quota_gauges_follow_the_keys(api: ApiHelper, client: TestClient) -> None:
    assert gauges(client) == {
        "sdb_database_up": 1.0,
        "sdb_api_key_quota_used_ratio_max": 0.0,
        "sdb_api_keys_near_quota": 0.0,
    }
    _, k1, h1 = api.user_with_key(sample_quota=10)
    _, k2, h2 = api.user_with_key(sample_quota=100)
    api.user_with_key()  # no quota: never counted
    assert api.distill(h1, n=5).status_code == 200
    assert api.distill(h2, n=95).status_code == 200
    g = gauges(client)
    assert g["sdb_api_key_quota_used_ratio_max"] == 0.95 and g["sdb_api_keys_near_quota"] == 1.0
    assert api.distill(h1, n=4).status_code == 200  # 9 of 10
    assert gauges(client)["sdb_api_keys_near_quota"] == 2.0
    # A revoked key is not usable: it no longer counts.
    client.post(f"/admin/keys/{k2['id']}/revoke", headers=api.admin)
    g = gauges(client)
    assert g["sdb_api_key_quota_used_ratio_max"] == 0.9 and g["sdb_api_keys_near_quota"] == 1.0
    assert k1["api_key"] not in client.get("/metrics").text


def test_database_down_is_reported_not_raised(
    app: Any, client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*args: Any, **kwargs: Any) -> Any:
        raise OSError("database unreachable")

    monkeypatch.setattr(app.state.sdb.db, "session", broken)
    r = client.get("/metrics")
    assert r.status_code == 200
    assert gauges(client) == {"sdb_database_up": 0.0}
    assert "sdb_http_requests_total" in r.text
