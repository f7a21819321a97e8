"""POST /admin/trace in process: administrators only (401/403); no suspect URL fetched unless its host is
allowed (403 by default, 422 for a bad URL); 409 without probe data; and a perfect leaker (a licensee's marked
labels served as a model on loopback, allowed by address) is named, ranked first, and nobody else is."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from fastapi.testclient import TestClient

from sdb_core.watermark import apply_watermark, retemper
from service.crud.watermarks import issued_watermarks
from service.main import create_app
from tests._support.api import ApiHelper
from tests._support.suspects import predict_endpoint

BODY = {"model": "alpha", "suspect_url": "http://127.0.0.1:9/predict", "probes": 500, "decoys": 100}


def test_only_administrators_may_trace(api: ApiHelper, client: TestClient) -> None:
    assert client.post("/admin/trace", json=BODY).status_code == 401
    _, _, headers = api.user_with_key(scopes=["alpha"])
    r = client.post("/admin/trace", json=BODY, headers=headers)
    assert r.status_code == 403 and "administrator" in r.text


def test_no_suspect_url_is_fetched_by_default(api: ApiHelper, client: TestClient) -> None:
    r = client.post("/admin/trace", json=BODY, headers=api.admin)
    assert r.status_code == 403
    assert "SDB_TRACE_ALLOWED_HOSTS" in r.json()["detail"]
    r = client.post("/admin/trace", json={**BODY, "suspect_url": "gopher://x/"}, headers=api.admin)
    assert r.status_code in (403, 422)
    assert client.post("/admin/trace", json={**BODY, "probes": 10}, headers=api.admin).status_code == 422


def test_allowed_hosts_private_addresses_and_probe_data(make_settings: Any) -> None:
    settings = make_settings(trace_allowed_hosts=["localhost"], trace_probe_data=None)
    with TestClient(create_app(settings)) as client:
        api = ApiHelper(client)
        r = client.post("/admin/trace", json=BODY, headers=api.admin)  # an address, not the listed name
        assert r.status_code == 403, r.text
        body = {**BODY, "suspect_url": "http://localhost:9/predict"}
        r = client.post("/admin/trace", json=body, headers=api.admin)
        assert r.status_code == 409 and "SDB_TRACE_PROBE_DATA" in r.json()["detail"]
    settings = make_settings(trace_allowed_hosts=["localhost"], trace_probe_data="digits")
    with TestClient(create_app(settings)) as client:
        api = ApiHelper(client)
        api.user_with_key(scopes=["alpha"])
        r = client.post("/admin/trace", json=body, headers=ApiHelper(client).admin)
        assert r.status_code == 403 and "loopback" in r.json()["detail"], r.text


def test_a_perfect_leaker_is_named_and_nobody_else(make_settings: Any, box_dir: Path) -> None:
    settings = make_settings(trace_allowed_hosts=["127.0.0.1"], trace_probe_data="digits")
    with TestClient(create_app(settings)) as client:
        api = ApiHelper(client)
        keys = [api.user_with_key(scopes=["alpha"])[1] for _ in range(4)]
        leaker = keys[2]
        state = client.app.state.sdb  # type: ignore[attr-defined]
        served = state.models.get("alpha")
        with state.db.session() as s:
            issued = {w.key_id: w for w in issued_watermarks(s)}
        w = issued[leaker["id"]]
        wm = state.watermarks.watermark(w.key_id, w.prefix, w.slot, served)
        box = served.box

        def leak(x: np.ndarray) -> np.ndarray:  # the licensee's labels at T=4, answered at T=1
            t = torch.from_numpy(x)
            with torch.inference_mode():
                marked = apply_watermark(wm, t, torch.softmax(box.keyed_logits(t) / 4.0, dim=1))
            return retemper(marked, 0.25).numpy()

        with predict_endpoint(leak) as url:
            body = {"model": "alpha", "suspect_url": url, "probes": 1500, "decoys": 200}
            r = client.post("/admin/trace", json=body, headers=api.admin)
        assert r.status_code == 200, r.text
        report = r.json()
        top = report["keys"][0]
        assert top["key_id"] == leaker["id"] and top["verdict"] == "match" and top["corrected_p"] < 1e-6
        assert [m["key_id"] for m in report["matches"]] == [leaker["id"]]  # nobody else
        assert all(k["corrected_p"] >= 1e-3 for k in report["keys"][1:])
        assert report["watermarks_tested"] == 4 and report["decoys"]["count"] == 200
        events = client.get("/admin/events", params={"action": "trace.run"}, headers=api.admin).json()
        assert events["total"] == 1
