"""GET /admin/audits/export (CSV, same filters as /admin/audits), GET /admin/usage/timeline (calls over
time per endpoint), and the manifest metrics and evaluation figures that /admin/models gives for each model
(what the console's Models page shows).
"""

from __future__ import annotations

import csv
import io
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from service.db.audit_queue import AuditRecord
from service.db.models import QueryAudit
from tests._support.api import ApiHelper
from tests._support.evaluation import write_evaluation_report


def _rows(text: str) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(text)))


def test_export_is_csv_of_the_filtered_audits(api: ApiHelper, client: TestClient) -> None:
    _, k1, h1 = api.user_with_key()
    _, k2, h2 = api.user_with_key()
    assert api.distill(h1, n=3).status_code == 200
    assert api.distill(h1, n=5).status_code == 200
    assert api.distill(h2, n=2).status_code == 200
    r = client.get("/admin/audits/export", params={"key_id": k1["id"]}, headers=api.admin)
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/csv")
    assert "attachment" in r.headers["content-disposition"]
    assert r.headers["x-total-count"] == "2"
    rows = _rows(r.text)
    assert [int(x["n_samples"]) for x in rows] == [5, 3]  # newest first
    assert {x["api_key_id"] for x in rows} == {str(k1["id"])}
    assert all(x["endpoint"] == "/distill-batch" and x["status"] == "200" for x in rows)
    # The JSON page and the export agree.
    page = client.get("/admin/audits", params={"key_id": k1["id"]}, headers=api.admin).json()
    assert [str(a["id"]) for a in page["items"]] == [x["id"] for x in rows]
    # limit caps the rows, not the total.
    r = client.get("/admin/audits/export", params={"limit": 1}, headers=api.admin)
    assert len(_rows(r.text)) == 1 and int(r.headers["x-total-count"]) >= 3
    assert client.get("/admin/audits/export?limit=0", headers=api.admin).status_code == 422
    assert client.get("/admin/audits/export?status=42", headers=api.admin).status_code == 422
    assert k2["api_key"] not in r.text


def test_export_neutralizes_spreadsheet_formulas(api: ApiHelper, client: TestClient, app: Any) -> None:
    with app.state.sdb.db.write() as s:
        s.add(QueryAudit(endpoint="/predict", model="=HYPERLINK(1)", client_id="@x", n_samples=1, status=200))
    rows = _rows(client.get("/admin/audits/export", headers=api.admin).text)
    mine = next(x for x in rows if x["model"].endswith("HYPERLINK(1)"))
    assert mine["model"] == "'=HYPERLINK(1)" and mine["client_id"] == "'@x"


def test_export_is_for_admins_only_and_recorded(api: ApiHelper, client: TestClient) -> None:
    assert client.get("/admin/audits/export").status_code == 401
    _, _, user = api.user_with_key(scopes=["*"])
    assert client.get("/admin/audits/export", headers=user).status_code == 403
    client.get("/admin/audits/export", params={"endpoint": "/predict"}, headers=api.admin)
    events = client.get("/admin/events", params={"action": "audit.export"}, headers=api.admin).json()
    assert events["total"] == 1 and events["items"][0]["outcome"] == "ok"
    assert set(events["items"][0]["detail"]) == {"rows", "total"}


def test_models_give_manifest_metrics_and_evaluation(make_settings: Any, tmp_path: Path) -> None:
    from sdb_core.artifact import make_test_box, read_manifest
    from service.main import create_app

    box = make_test_box(tmp_path, name="gamma", seed=7)
    report = write_evaluation_report(box)
    (tmp_path / "broken").mkdir()
    make_test_box(tmp_path, name="delta", seed=8)
    (tmp_path / "delta" / "evaluation.json").write_text("{not json")
    manifest = read_manifest(box)
    assert manifest["metrics"] == {}  # make_test_box records none; the demo box's are checked below
    with TestClient(create_app(make_settings(model_dir=tmp_path, default_model="gamma"))) as client:
        api = ApiHelper(client)
        models = {m["name"]: m for m in client.get("/admin/models", headers=api.admin).json()}
    gamma = models["gamma"]["info"]
    assert gamma["metrics"] == {}
    assert gamma["evaluation"]["seeds"] == [0, 1]
    assert gamma["evaluation"]["summary"] == json.loads(json.dumps(report["summary"]))
    assert gamma["evaluation"]["checks"] == report["checks"]
    assert models["delta"]["info"]["evaluation"] is None  # unreadable report: ignored with a warning


def test_demo_box_metrics_come_from_its_manifest(make_settings: Any, tmp_path: Path) -> None:
    from sdb_core.artifact import read_manifest
    from service.main import create_app

    demo = Path(__file__).resolve().parents[2] / "models" / "digits-demo"
    if not demo.is_dir():
        pytest.skip("no demo box under models/")
    (tmp_path / demo.name).symlink_to(demo, target_is_directory=True)
    settings = make_settings(model_dir=tmp_path, default_model=demo.name)
    with TestClient(create_app(settings)) as client:
        api = ApiHelper(client)
        (model,) = client.get("/admin/models", headers=api.admin).json()
    expected = read_manifest(demo)["metrics"]
    assert model["info"]["metrics"] == expected
    assert {"plain_top1", "keyed_top1", "wrong_key_top1"} <= set(expected)
    assert model["info"]["evaluation"] is None


def test_timeline_counts_calls_per_endpoint_and_bucket(api: ApiHelper, client: TestClient, app: Any) -> None:
    _, _, headers = api.user_with_key(sample_quota=5)
    assert api.distill(headers, n=3).status_code == 200
    assert api.distill(headers, n=3).status_code == 429  # over the quota: refused
    now = datetime.now(UTC)
    two_hours_ago = now - timedelta(hours=2)
    queue = app.state.sdb.audit_queue
    for n, at in ((7, two_hours_ago), (4, two_hours_ago), (9, now - timedelta(days=3))):
        queue.submit(AuditRecord("/predict", None, "anon-t", n, 200, 1.0, None, at))
    assert queue.flush()
    r = client.get("/admin/usage/timeline", params={"bucket_s": 3600}, headers=api.admin)
    assert r.status_code == 200
    t = r.json()
    assert t["bucket_s"] == 3600
    series = {x["endpoint"]: x["buckets"] for x in t["series"]}
    (distill,) = series["/distill-batch"]
    assert (distill["requests"], distill["answered"], distill["refused"], distill["samples"]) == (2, 1, 1, 3)
    (predict,) = series["/predict"]  # the 3-day-old row is outside the default 24 hours
    assert (predict["requests"], predict["samples"]) == (2, 11)
    start = datetime.fromisoformat(predict["start"])
    assert start.timestamp() % 3600 == 0 and start <= two_hours_ago < start + timedelta(hours=1)
    week = client.get(
        "/admin/usage/timeline",
        params={"since": (now - timedelta(days=7)).isoformat(), "bucket_s": 86400},
        headers=api.admin,
    ).json()
    (week_predict,) = [x["buckets"] for x in week["series"] if x["endpoint"] == "/predict"]
    assert sum(b["samples"] for b in week_predict) == 20
    assert client.get("/admin/usage/timeline?bucket_s=59", headers=api.admin).status_code == 422
    since = (now - timedelta(days=30)).isoformat()
    too_many = client.get("/admin/usage/timeline", params={"since": since, "bucket_s": 60}, headers=api.admin)
    assert too_many.status_code == 422
    assert client.get("/admin/usage/timeline").status_code == 401
    _, _, user = api.user_with_key(scopes=["*"])
    assert client.get("/admin/usage/timeline", headers=user).status_code == 403


def test_audits_filter_by_user_and_key_name_and_name_the_caller(api: ApiHelper, client: TestClient) -> None:
    """`user_name` / `key_name` select the same rows as the ids (a key name may be shared: every key so
    named); an unknown name is a 404 that says so, a malformed one a 422; each row names its user and key."""
    u1, k1, h1 = api.user_with_key(name="ci-runner")
    u2 = api.create_user()
    k2 = api.issue_key(u2["id"], name="ci-runner")
    h2 = {"Authorization": f"Bearer {api.token(k2['api_key'])}"}
    _, k3, h3 = api.user_with_key()  # a key with no name
    for h, n in ((h1, 2), (h1, 3), (h2, 4), (h3, 1)):
        assert api.distill(h, n=n).status_code == 200

    def get(path: str = "/admin/audits", status: int = 200, **params: Any) -> Any:
        r = client.get(path, params=params, headers=api.admin)
        assert r.status_code == status, r.text
        return r.json() if status != 200 or path.endswith("audits") else r.text

    by_name = get(user_name=u1["name"])
    assert [a["id"] for a in by_name["items"]] == [a["id"] for a in get(user_id=u1["id"])["items"]]
    assert by_name["total"] == 2
    assert get(key_name="ci-runner")["total"] == 3  # both keys named ci-runner, of two users
    assert get(key_name="ci-runner", user_name=u2["name"])["total"] == 1
    assert get(key_name="ci-runner", key_id=k1["id"])["total"] == 2  # AND the id filters
    assert get(user_name=u2["name"], user_id=u1["id"])["total"] == 0
    assert len(_rows(get("/admin/audits/export", key_name="ci-runner"))) == 3

    for params, word in (
        ({"user_name": "nobody-here"}, "no user named"),
        ({"key_name": "nope"}, "no API key"),
    ):
        for path in ("/admin/audits", "/admin/audits/export"):
            assert word in get(path, 404, **params)["detail"]
    assert get(user_name="bad name!", status=422)
    assert get(key_name="", status=422)

    rows = {a["api_key_id"]: a for a in get(user_name=u2["name"])["items"] + get(key_id=k3["id"])["items"]}
    assert (rows[k2["id"]]["user_name"], rows[k2["id"]]["key_name"]) == (u2["name"], "ci-runner")
    assert rows[k3["id"]]["user_name"] is not None and rows[k3["id"]]["key_name"] is None
    schema = client.get("/openapi.json").json()["paths"]["/admin/audits"]["get"]
    assert {"user_name", "key_name", "user_id", "key_id"} <= {p["name"] for p in schema["parameters"]}
    assert "404" in schema["responses"]
