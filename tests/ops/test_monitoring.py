"""deploy/monitoring: the alert rules pass `promtool check rules` and their unit tests, the Prometheus
configuration passes `promtool check config`, every metric that the Grafana dashboard and the rules use
exists in a live /metrics output, and the compose `monitoring` profile mounts these files. A slow test runs
Debian's Prometheus against a real `sdb serve`: it scrapes it, loads the rules, raises the near-quota alert
from live data, and answers every query of the dashboard without an error.

promtool and prometheus come from Debian's `prometheus` package (scripts/test.sh installs it on CI).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import yaml
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from tests._support.api import ApiHelper
from tests._support.net import free_port
from tests._support.ops import REPO, clean_env, compose_config, sdb_executable
from tests._support.server import Server, server_process

MONITORING = REPO / "deploy" / "monitoring"
DASHBOARD = MONITORING / "grafana" / "dashboards" / "sdb.json"
RULES = MONITORING / "alerts.yml"
METRIC = re.compile(r"\bsdb_[a-z0-9_]+\b")
SUFFIXES = {
    "counter": ("_total", "_created"),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "summary": ("_sum", "_count", "_created"),
}


def tool(name: str) -> str:
    binary = shutil.which(name)
    if binary is None:
        if os.environ.get("CI"):
            pytest.fail(f"{name} is missing (Debian package prometheus; scripts/test.sh installs it on CI)")
        pytest.skip(f"{name} is missing (apt-get install prometheus)")
    return binary


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [tool("promtool"), *args], capture_output=True, text=True, cwd=MONITORING, timeout=120
    )


def test_rules_pass_promtool_check() -> None:
    r = promtool("check", "rules", str(RULES))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUCCESS: 7 rules found" in r.stdout


def test_rules_fire_in_promtool_unit_tests() -> None:
    r = promtool("test", "rules", "alerts.test.yml")
    assert r.returncode == 0, r.stdout + r.stderr


def test_prometheus_config_passes_promtool_check() -> None:
    r = promtool("check", "config", "prometheus.yml")
    assert r.returncode == 0, r.stdout + r.stderr


def test_rules_cover_the_required_alerts() -> None:
    rules = {r["alert"]: r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]}
    assert set(rules) == {
        "SdbHigh5xxRate",
        "SdbDatabaseDown",
        "SdbDistillFailingClosed",
        "SdbExtractionFlagRaised",
        "SdbApiKeyNearQuota",
        "SdbInferenceDeadlineHit",
        "SdbRedisFailing",
    }
    tested = {
        t["alertname"]
        for case in yaml.safe_load((MONITORING / "alerts.test.yml").read_text())["tests"]
        for t in case["alert_rule_test"]
        if t["exp_alerts"]
    }
    assert tested == set(rules), "every alert has a promtool test in which it fires"


def _exprs(node: Any) -> list[str]:
    if isinstance(node, dict):
        return [v for k, v in node.items() if k in ("expr", "definition") and isinstance(v, str)] + [
            e for v in node.values() for e in _exprs(v)
        ]
    if isinstance(node, list):
        return [e for v in node for e in _exprs(v)]
    return []


def used_metrics() -> dict[str, set[str]]:
    dashboard = json.loads(DASHBOARD.read_text())
    rules = yaml.safe_load(RULES.read_text())
    return {
        "dashboard": {m for e in _exprs(dashboard) for m in METRIC.findall(e)},
        "rules": {m for e in _exprs(rules) for m in METRIC.findall(e)},
    }


def exported_names(text: str) -> set[str]:
    """Sample names in an exposition text, including those of families that have no sample yet."""
    names: set[str] = set()
    for family in text_string_to_metric_families(text):
        names.add(family.name)
        names.update(family.name + s for s in SUFFIXES.get(family.type, ()))
        names.update(s.name for s in family.samples)
    return names


def test_dashboard_and_rules_use_only_exported_metrics(make_settings: Any) -> None:
    from service.main import create_app

    settings = make_settings(extraction_sample_threshold=3, predict_rate_per_minute=2)
    with TestClient(create_app(settings)) as client:
        api = ApiHelper(client)
        _, _, headers = api.user_with_key(sample_quota=4)
        assert api.distill(headers, n=4).status_code == 200
        assert api.distill(headers, n=1).status_code == 429  # quota spent
        x = np.zeros((4, 1, 8, 8), dtype="float32").tolist()
        codes = [client.post("/predict", json={"inputs": x}).status_code for _ in range(3)]
        assert codes[:2] == [200, 200] and codes[2] == 429  # flagged (4 > 3), then rate limited
        assert client.post("/distill-batch", json={"inputs": x}).status_code == 401
        text = client.get("/metrics").text
    exported = exported_names(text)
    used = used_metrics()
    assert len(used["dashboard"]) >= 12 and len(used["rules"]) >= 5
    for where, names in used.items():
        assert names <= exported, f"{where} uses metrics that /metrics does not export: {names - exported}"
    # The samples behind the required panels and alerts are live, not only declared.
    live = {s.name for f in text_string_to_metric_families(text) for s in f.samples}
    for name in (
        "sdb_http_requests_total",
        "sdb_http_request_duration_seconds_bucket",
        "sdb_inference_batch_size_bucket",
        "sdb_samples_distilled_total",
        "sdb_quota_rejections_total",
        "sdb_extraction_flags_total",
        "sdb_api_keys_near_quota",
        "sdb_database_up",
    ):
        assert name in live, name


def test_dashboard_panels_query_prometheus() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    titles = " ".join(p["title"].lower() for p in panels)
    for topic in ("request rate", "latency quantiles", "batch size", "quota", "4xx", "5xx", "extraction"):
        assert topic in titles, topic
    for p in panels:
        assert p["targets"] and all(t["expr"] for t in p["targets"])
        assert p["datasource"]["type"] == "prometheus"
    assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])


def _is_fraction(expr: str) -> bool:
    """A 0-1 quantity: a *_ratio gauge, or the share of one request count in all requests."""
    return "_ratio" in expr or bool(re.search(r"\) / sum\(rate\(sdb_http_requests_total\[", expr))


def _unit_of(panel: dict[str, Any], legend: str | None) -> str | None:
    unit = panel.get("fieldConfig", {}).get("defaults", {}).get("unit")
    for override in panel.get("fieldConfig", {}).get("overrides", []):
        if override["matcher"] == {"id": "byName", "options": legend}:
            for prop in override["properties"]:
                if prop["id"] == "unit":
                    unit = prop["value"]
    return str(unit) if unit is not None else None


def test_every_dashboard_series_has_the_unit_of_what_it_plots() -> None:
    # The 5xx panel plotted a share of all requests under req/s; the quota panel drew a 0-1 ratio and a
    # count of keys on one axis. A fraction is in percentunit; nothing else is.
    dashboard = json.loads(DASHBOARD.read_text())
    for panel in (p for p in dashboard["panels"] if p["type"] == "timeseries"):
        for target in panel["targets"]:
            unit = _unit_of(panel, target.get("legendFormat"))
            fraction = _is_fraction(target["expr"])
            assert (unit == "percentunit") == fraction, (panel["title"], target["expr"], unit)


def test_all_endpoints_means_the_api_not_metrics_scrapes_or_console_assets() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    (route,) = [v for v in dashboard["templating"]["list"] if v["name"] == "route"]
    # with allValue ".*" the "All" choice matched every route whatever the list held
    assert route.get("allValue") in (None, "")
    query = route["query"]["query"]
    match = re.search(r'route!~"([^"]+)"', query)
    assert match, query
    for noise in ("/metrics", "/console/{asset:path}", "/console", "/docs", "/openapi.json"):
        assert re.fullmatch(match.group(1), noise), noise
    for api in ("/predict", "/distill-batch", "/auth/token", "/admin/users"):
        assert not re.fullmatch(match.group(1), api), api


def test_compose_monitoring_profile(compose_cmd: list[str]) -> None:
    default = json.loads(compose_config(compose_cmd, REPO / ".env.example", "--format", "json").stdout)
    assert "prometheus" not in default["services"] and "grafana" not in default["services"]
    r = compose_config(compose_cmd, REPO / ".env.example", "--format", "json", profile="monitoring")
    services = json.loads(r.stdout)["services"]
    for name in ("prometheus", "grafana"):
        svc = services[name]
        assert svc["profiles"] == ["monitoring"]
        assert all(p["host_ip"] == "127.0.0.1" for p in svc["ports"])
        for mount in svc["volumes"]:
            if mount["type"] == "bind":
                assert Path(mount["source"]).exists(), mount["source"]
                assert mount["read_only"] is True
    prom = {m["target"]: Path(m["source"]) for m in services["prometheus"]["volumes"]}
    assert prom["/etc/prometheus/prometheus.yml"] == MONITORING / "prometheus.yml"
    assert prom["/etc/prometheus/alerts.yml"] == RULES
    targets = yaml.safe_load((MONITORING / "prometheus.yml").read_text())["scrape_configs"][0]
    assert targets["static_configs"][0]["targets"] == ["api:8000"]
    graf = services["grafana"]["environment"]
    assert graf["GF_AUTH_ANONYMOUS_ORG_ROLE"] == "Viewer" and graf["GF_AUTH_DISABLE_LOGIN_FORM"] == "true"


def _wait(what: str, check: Any, timeout_s: float = 60.0) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            found = check()
        except httpx.HTTPError:
            found = None
        if found:
            return found
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.5)


@pytest.mark.slow
@pytest.mark.e2e
def test_prometheus_scrapes_the_service_and_raises_alerts(servers: list[Server], tmp_path: Path) -> None:
    from sdb_core.artifact import make_test_box

    prometheus = tool("prometheus")
    make_test_box(tmp_path / "models", name="alpha")
    admin_key = "sdb_monitoring-test-admin-" + uuid.uuid4().hex
    env = clean_env(
        SDB_DATABASE_URL=f"sqlite:///{tmp_path / 'sdb.db'}",
        SDB_MODEL_DIR=str(tmp_path / "models"),
        SDB_JWT_SECRET=secrets.token_hex(32),
        SDB_BOOTSTRAP_ADMIN_TOKEN=admin_key,
        SDB_DEVICE="cpu",
        SDB_TORCH_THREADS="1",
        SDB_CALIBRATE_FORWARD_BATCH="false",
        SDB_EXPOSE_METRICS="true",
    )
    subprocess.run([sdb_executable(), "db", "upgrade"], env=env, check=True, capture_output=True, timeout=120)
    port = free_port()
    sdb = server_process([sdb_executable(), "serve", "--port", str(port)], env, port, tmp_path / "sdb.log")
    servers.append(sdb)
    sdb.start()

    # A key at 9 of its 10 samples: the near-quota gauge is 1.
    with httpx.Client(base_url=sdb.url, timeout=30) as c:
        admin_token = c.post("/auth/token", json={"api_key": admin_key}).json()["access_token"]
        admin = {"Authorization": f"Bearer {admin_token}"}
        user = c.post("/admin/users", json={"name": "monitored"}, headers=admin).json()
        key = c.post(
            f"/admin/users/{user['id']}/keys", json={"scopes": ["alpha"], "sample_quota": 10}, headers=admin
        )
        token = c.post("/auth/token", json={"api_key": key.json()["api_key"]}).json()["access_token"]
        x = np.zeros((9, 1, 8, 8), dtype="float32").tolist()
        r = c.post("/distill-batch", json={"inputs": x}, headers={"Authorization": f"Bearer {token}"})
        assert r.status_code == 200, r.text

    config = yaml.safe_load((MONITORING / "prometheus.yml").read_text())
    config["global"] = {"scrape_interval": "1s", "evaluation_interval": "1s"}
    config["rule_files"] = [str(RULES)]
    config["scrape_configs"][0]["static_configs"] = [{"targets": [f"127.0.0.1:{port}"]}]
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    prom_port = free_port()
    prom = Server(
        cmd=[
            prometheus,
            f"--config.file={tmp_path / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{prom_port}",
        ],
        env=clean_env(),
        port=prom_port,
        log_path=tmp_path / "prometheus.log",
        process_group=True,
        ready_path="/-/ready",
    )
    servers.append(prom)
    prom.start()
    api = prom.url + "/api/v1"

    rules = httpx.get(api + "/rules").json()["data"]["groups"]
    assert {r["name"] for g in rules for r in g["rules"]} >= {"SdbApiKeyNearQuota", "SdbDatabaseDown"}
    _wait(
        "the target up",
        lambda: any(t["health"] == "up" for t in httpx.get(api + "/targets").json()["data"]["activeTargets"]),
    )

    def near_quota_alert() -> list[dict[str, Any]]:
        alerts = httpx.get(api + "/alerts").json()["data"]["alerts"]
        return [a for a in alerts if a["labels"]["alertname"] == "SdbApiKeyNearQuota"]

    (alert,) = _wait("the near-quota alert", near_quota_alert)
    assert alert["state"] == "pending"  # `for: 5m`: evaluated true on live data, not yet firing
    assert not [
        a
        for a in httpx.get(api + "/alerts").json()["data"]["alerts"]
        if a["labels"]["alertname"] != "SdbApiKeyNearQuota"
    ]

    # Every dashboard query parses and runs on live data.
    exprs = _exprs(json.loads(DASHBOARD.read_text()))
    queries = [
        e.replace("$__rate_interval", "1m").replace("$route", ".*")
        for e in exprs
        if not e.startswith("label_values(")  # a Grafana template function, not PromQL
    ]
    assert len(queries) >= 20
    for q in queries:
        r = httpx.get(api + "/query", params={"query": q})
        assert r.status_code == 200 and r.json()["status"] == "success", (q, r.text)
    up = httpx.get(api + "/query", params={"query": "max(sdb_api_keys_near_quota)"}).json()
    assert up["data"]["result"][0]["value"][1] == "1"
