"""Prometheus metrics: what /predict counts, bounded labels without clients or secrets, multiprocess mode."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from sdb_core.artifact import make_test_box
from service.core.config import Settings
from service.inference.loading import load_registry
from service.observability import metrics
from service.routes import health, predict
from tests._support.apps import route_app


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(text: str, name: str, **labels: str) -> float:
    return samples(text).get((name, tuple(sorted(labels.items()))), 0.0)


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> TestClient:
    d = tmp_path_factory.mktemp("metrics-models")
    make_test_box(d, name="metric-box")
    settings = Settings(
        demo=True, model_dir=d, torch_threads=1, predict_rate_per_minute=0, expose_metrics=True
    )
    models = load_registry(settings)
    app = route_app(settings, predict.router, health.router, health.metrics_router, models=models)
    with TestClient(app) as c:
        yield c
    models.close()


def test_predict_is_counted_by_route_model_and_status(client: TestClient) -> None:
    before = client.get("/metrics").text
    x = np.zeros((3, 1, 8, 8), np.float32).tolist()
    assert client.post("/predict", json={"model": "metric-box", "inputs": x}).status_code == 200
    assert client.post("/predict", json={"model": "metric-box", "inputs": []}).status_code == 422
    assert client.post("/predict", json={"model": "attacker-chosen-name", "inputs": x}).status_code == 404
    after = client.get("/metrics").text

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("sdb_http_requests_total", route="/predict", model="metric-box", status="200") == 1
    assert delta("sdb_http_requests_total", route="/predict", model="metric-box", status="422") == 1
    assert delta("sdb_http_requests_total", route="/predict", model="none", status="404") == 1
    assert delta("sdb_http_request_duration_seconds_count", route="/predict", model="metric-box") == 2
    assert delta("sdb_samples_total", model="metric-box", path="plain") == 3
    assert delta("sdb_inference_batch_size_count", model="metric-box", path="plain") >= 1
    assert delta("sdb_inference_batch_size_sum", model="metric-box", path="plain") == 3
    assert "attacker-chosen-name" not in after


def test_no_client_address_or_id_in_labels(client: TestClient) -> None:
    client.post("/predict", json={"inputs": []}, headers={"x-forwarded-for": "198.51.100.77"})
    text = client.get("/metrics").text
    for _, labels in samples(text):
        for _, v in labels:
            assert "testclient" not in v and "198.51.100.77" not in v and not v.startswith("anon-")


def test_unknown_model_names_are_folded() -> None:
    metrics.register_models(["known"])
    assert metrics.model_label("known") == "known"
    assert metrics.model_label("x" * 100) == metrics.UNKNOWN
    assert metrics.model_label(None) == metrics.NONE


SCRIPT = """
from service.observability import metrics
metrics.register_models(["m"])
metrics.record_request("/distill-batch", "m", 200, 0.01, ("m", "keyed", {n}))
metrics.record_auth_failure("expired")
"""


def test_multiprocess_mode_sums_the_workers(tmp_path: Path) -> None:
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    for n in (3, 4):
        subprocess.run([sys.executable, "-c", SCRIPT.format(n=n)], env=env, check=True, timeout=60)
    render = (
        "import sys; from service.observability.metrics import render_metrics as r; "
        "sys.stdout.write(r()[0].decode())"
    )
    out = subprocess.run(
        [sys.executable, "-c", render], env=env, check=True, timeout=60, capture_output=True, text=True
    ).stdout
    assert value(out, "sdb_samples_distilled_total", model="m") == 7
    assert value(out, "sdb_auth_failures_total", reason="expired") == 2


def test_a_multiproc_dir_set_after_start_does_not_blank_the_metrics(
    client: TestClient, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))  # e.g. `sdb serve --workers 2` in-process
    assert "sdb_http_requests_total" in client.get("/metrics").text


def test_event_counters_start_at_zero_so_the_first_event_is_an_increase() -> None:
    # A labelled counter first exported at 1 has no rise for increase() to see: the first extraction flag or
    # inference timeout would never raise its alert, and the panels show "No data" instead of 0.
    from service.observability import metrics

    metrics.register_models(["metric-box"])
    exported = samples(metrics.render_metrics()[0].decode())
    expected = [
        ("sdb_extraction_flags_total", (("kind", "anonymous"),)),
        ("sdb_inference_timeouts_total", (("model", "metric-box"), ("path", "keyed"))),
        ("sdb_inference_timeouts_total", (("model", "metric-box"), ("path", "plain"))),
        ("sdb_quota_rejections_total", (("model", "metric-box"),)),
        ("sdb_rate_limited_total", (("route", "/distill-batch"),)),
        ("sdb_rate_limited_total", (("route", "/predict"),)),
        ("sdb_redis_fallbacks_total", (("action", "local"), ("operation", "rate_limit"))),
        ("sdb_redis_fallbacks_total", (("action", "refused"), ("operation", "rate_limit"))),
        ("sdb_redis_fallbacks_total", (("action", "local"), ("operation", "extraction"))),
    ]
    missing = [series for series in expected if series not in exported]
    assert not missing, missing
