"""POST /predict: input forms, answers, bad input (4xx naming the problem), rate limit, audits."""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from fastapi import FastAPI
from fastapi.testclient import TestClient

from sdb_core.artifact import load_box, make_test_box
from service.core.config import Settings
from service.core.state import ServiceState
from service.db.audit_queue import AuditQueue, AuditQueueConfig
from service.inference.loading import load_registry
from service.routes import health, predict
from tests._support.apps import route_app
from tests._support.bodies import MALFORMED_NPY_HEADERS, npy_bytes, npy_with_header
from tests._support.net import free_port

MODEL = "test-box"
SHAPE = (1, 8, 8)
NPY = {"content-type": "application/x-npy"}


class AuditSpy:
    """Stands in for the service's audit queue: keeps the submitted rows."""

    def __init__(self) -> None:
        self.rows: list[Any] = []

    def submit(self, record: Any) -> None:
        self.rows.append(record)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("predict-models")
    make_test_box(d, name=MODEL, seed=3)
    return d


def build_app(model_dir: Path, audit_queue: Any = None, **overrides: Any) -> FastAPI:
    settings = Settings(demo=True, model_dir=model_dir, torch_threads=1, **overrides)
    return route_app(
        settings,
        predict.router,
        health.router,
        models=load_registry(settings),
        audit_queue=audit_queue if audit_queue is not None else AuditSpy(),
    )


def state(app: FastAPI) -> ServiceState:
    return app.state.sdb  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def app(model_dir: Path) -> Iterator[FastAPI]:
    app = build_app(model_dir, max_request_samples=8, predict_rate_per_minute=0)
    yield app
    state(app).models.close()


@pytest.fixture(scope="module")
def client(app: FastAPI) -> Iterator[TestClient]:
    with TestClient(app) as c:
        yield c


def inputs(n: int = 3, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((n, *SHAPE), dtype=np.float32) * 16


def test_the_three_input_forms_give_the_plain_path_probabilities(client: TestClient, model_dir: Path) -> None:
    x = inputs()
    answers = [
        client.post("/predict", json={"model": MODEL, "inputs": x.tolist()}),
        client.post("/predict", json={"inputs_b64": base64.b64encode(npy_bytes(x)).decode()}),
        client.post(
            f"/predict?model={MODEL}", content=npy_bytes(x), headers={"content-type": "application/x-npy"}
        ),
    ]
    box = load_box(model_dir / MODEL)
    expected = torch.softmax(box.plain_logits(torch.from_numpy(x)), dim=1).numpy()
    for r in answers:
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["model"] == MODEL and body["version"] == box.version
        probs = np.array([p["probabilities"] for p in body["predictions"]])
        np.testing.assert_allclose(probs, expected, rtol=1e-4, atol=1e-6)
        assert [p["label"] for p in body["predictions"]] == expected.argmax(1).tolist()
        assert [p["class_name"] for p in body["predictions"]] == [
            box.class_names[i] for i in expected.argmax(1)
        ]
        assert all(p.get("top_k") is None for p in body["predictions"])


def test_top_k_lists_the_most_probable_classes_in_order(client: TestClient) -> None:
    r = client.post("/predict", json={"inputs": inputs(2).tolist(), "top_k": 3})
    assert r.status_code == 200
    for p in r.json()["predictions"]:
        top = p["top_k"]
        assert len(top) == 3 and top[0]["label"] == p["label"]
        assert [t["probability"] for t in top] == sorted((t["probability"] for t in top), reverse=True)
        assert top[0]["probability"] == pytest.approx(max(p["probabilities"]))


def test_top_k_on_raw_npy_via_query(client: TestClient) -> None:
    r = client.post(
        "/predict?top_k=2", content=npy_bytes(inputs(1)), headers={"content-type": "application/x-npy"}
    )
    assert r.status_code == 200 and len(r.json()["predictions"][0]["top_k"]) == 2


def test_security_headers_on_answers(client: TestClient) -> None:
    r = client.post("/predict", json={"inputs": inputs(1).tolist()})
    assert r.headers["cache-control"] == "no-store"
    assert r.headers["x-content-type-options"] == "nosniff"


BAD_JSON: list[tuple[str, bytes, int, str]] = [
    ("unknown field", b'{"inputs": [[0]], "extra": 1}', 422, "extra"),
    ("both inputs", b'{"inputs": [[0]], "inputs_b64": "AA=="}', 422, "exactly one"),
    ("no inputs", b'{"model": "test-box"}', 422, "exactly one"),
    ("wrong shape", b'{"inputs": [[1, 2, 3]]}', 422, "shape"),
    ("strings", b'{"inputs": [["a"]]}', 422, "numbers"),
    ("empty batch", b'{"inputs": []}', 422, "empty"),
    ("NaN", b'{"inputs": [[' + b",".join([b"NaN"] + [b"0"] * 63) + b"]]}", 422, "NaN"),
    ("infinity", b'{"inputs": [[' + b",".join([b"1e39"] + [b"0"] * 63) + b"]]}", 422, "NaN"),
    ("over the sample limit", b'{"inputs": [' + b",".join([b"[0]"] * 9) + b"]}", 422, "limit"),
    ("bad base64", b'{"inputs_b64": "%%%"}', 422, "base64"),
    ("base64 of non-npy", b'{"inputs_b64": "aGVsbG8gd29ybGQ="}', 422, ".npy"),
    ("unknown model", b'{"model": "nope", "inputs": [[0]]}', 404, "unknown model"),
    ("not JSON", b"{inputs:", 422, "json"),
    ("non-UTF-8", b'{"inputs": "\xff\xfe"}', 422, "UTF-8"),
    ("top_k zero", b'{"inputs": [[0]], "top_k": 0}', 422, "top_k"),
]


@pytest.mark.parametrize(("case", "body", "status", "needle"), BAD_JSON, ids=[c[0] for c in BAD_JSON])
def test_bad_json_bodies_are_4xx_naming_the_problem(
    client: TestClient, case: str, body: bytes, status: int, needle: str
) -> None:
    r = client.post("/predict", content=body, headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    assert needle.lower() in r.text.lower()
    assert r.headers["content-type"] == "application/json"


def test_bad_npy_bodies(client: TestClient) -> None:
    good = npy_bytes(inputs(2))
    cases = [
        (good[:-5], 422, "truncated"),
        (npy_bytes(inputs(2).astype(np.int32)), 422, "float32"),
        (b"\x93NUMPY", 422, ".npy"),
        (npy_bytes(np.zeros((9, *SHAPE), np.float32)), 422, "limit"),
        (npy_bytes(np.zeros((2, 3, 8, 8), np.float32)), 422, "shape"),
    ]
    for body, status, needle in cases:
        r = client.post("/predict", content=body, headers=NPY)
        assert r.status_code == status and needle in r.text, r.text


@pytest.mark.parametrize("header", MALFORMED_NPY_HEADERS.values(), ids=MALFORMED_NPY_HEADERS.keys())
def test_a_malformed_npy_header_is_422_raw_and_as_base64(client: TestClient, header: str) -> None:
    body = npy_with_header(header, b"\0" * 256)
    raw = client.post("/predict", content=body, headers=NPY)
    b64 = client.post("/predict", json={"inputs_b64": base64.b64encode(body).decode()})
    for r in (raw, b64):
        assert r.status_code == 422 and ".npy" in r.json()["detail"], r.text


def test_inputs_that_drive_the_outputs_out_of_range_are_422(client: TestClient) -> None:
    x = np.full((1, *SHAPE), 3e38, np.float32)
    x[..., ::2] = -3e38  # finite float32 inputs whose plain-path logits are NaN on this box
    r = client.post("/predict", json={"inputs": x.tolist()})
    assert r.status_code == 422 and "finite" in r.json()["detail"], r.text
    assert "null" not in r.text


def test_pickled_npy_is_refused(client: TestClient) -> None:
    buf = io.BytesIO()
    np.save(buf, np.array([{"rce": 1}], dtype=object), allow_pickle=True)
    r = client.post("/predict", content=buf.getvalue(), headers=NPY)
    assert r.status_code == 422 and "pickle" in r.text


@pytest.mark.parametrize(
    "content_type", ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data", ""]
)
def test_wrong_content_type_is_415(client: TestClient, content_type: str) -> None:
    r = client.post("/predict", content=b'{"inputs": [[0]]}', headers={"content-type": content_type})
    assert r.status_code == 415 and "content type" in r.json()["detail"]


@pytest.mark.parametrize(
    ("query", "needle"),
    [
        ("?top_k=0", "top_k"),
        ("?top_k=x", "top_k"),
        ("?nope=1", "unknown query"),
        ("?model=a&model=b", "more than once"),
    ],
)
def test_bad_query_parameters_are_422(client: TestClient, query: str, needle: str) -> None:
    r = client.post(
        "/predict" + query, content=npy_bytes(inputs(1)), headers={"content-type": "application/x-npy"}
    )
    assert r.status_code == 422 and needle in r.text


@pytest.mark.parametrize("top_k", [True, "2", 2.0])
def test_top_k_must_be_a_json_integer(client: TestClient, top_k: object) -> None:
    # no bool-as-int (`true` was top_k=1), no numeric strings, no floats in JSON; the query keeps text
    r = client.post("/predict", json={"inputs": inputs(1).tolist(), "top_k": top_k})
    assert r.status_code == 422 and "top_k" in r.text, r.text
    ok = client.post("/predict?top_k=2", content=npy_bytes(inputs(1)), headers=NPY)
    assert ok.status_code == 200 and len(ok.json()["predictions"][0]["top_k"]) == 2, ok.text


def test_conflicting_model_in_query_and_body(client: TestClient) -> None:
    r = client.post("/predict?model=other", json={"model": MODEL, "inputs": inputs(1).tolist()})
    assert r.status_code == 422


def test_wrong_method_is_405(client: TestClient) -> None:
    assert client.get("/predict").status_code == 405


def test_every_call_is_audited_once_with_an_anonymous_client_id(app: FastAPI, client: TestClient) -> None:
    spy: AuditSpy = state(app).audit_queue  # type: ignore[assignment]
    before = len(spy.rows)
    client.post("/predict", json={"inputs": inputs(2).tolist()})
    client.post("/predict", json={"inputs": []})
    client.post("/predict", json={"model": "nope", "inputs": [[0]]})
    rows = spy.rows[before:]
    assert [(r.status, r.n_samples, r.model) for r in rows] == [
        (200, 2, MODEL),
        (422, 0, None),
        (404, 0, None),
    ]
    assert all(r.endpoint == "/predict" for r in rows)
    assert rows[0].input_digest and len(rows[0].input_digest) == 64
    ids = {r.client_id for r in rows}
    assert len(ids) == 1 and "testclient" not in next(iter(ids))  # a salted hash, never the address


def test_predict_answers_while_the_audit_database_fails(model_dir: Path) -> None:
    class DeadDatabase:
        def write(self) -> Any:
            raise OSError("database is down")

    queue = AuditQueue(DeadDatabase(), AuditQueueConfig(interval_s=0.01, retry_s=0.05, flush_timeout_s=0.1))  # type: ignore[arg-type]
    queue.start()
    app = build_app(model_dir, audit_queue=queue)
    with TestClient(app) as c:
        for _ in range(3):
            assert c.post("/predict", json={"inputs": inputs(1).tolist()}).status_code == 200
    assert queue.pending == 3  # kept for when the database returns
    queue.close()
    state(app).models.close()


def test_rate_limit_is_429_with_retry_after_and_ignores_forged_forwarded_for(model_dir: Path) -> None:
    app = build_app(model_dir, predict_rate_per_minute=2)
    with TestClient(app) as c:
        body = {"inputs": inputs(1).tolist()}
        assert c.post("/predict", json=body).status_code == 200
        assert c.post("/predict", json=body, headers={"x-forwarded-for": "203.0.113.9"}).status_code == 200
        r = c.post("/predict", json=body, headers={"x-forwarded-for": "198.51.100.7"})
        assert r.status_code == 429
        assert int(r.headers["retry-after"]) >= 1 and "rate limit" in r.json()["detail"]
        assert c.get("/healthz").status_code == 200  # other routes are not limited
    state(app).models.close()


def test_redis_down_and_failure_mode_closed_is_503_with_retry_after(model_dir: Path) -> None:
    """SDB_REDIS_FAILURE_MODE=closed: a call that cannot be counted is refused, and audited as such."""
    audits = AuditSpy()
    url = f"redis://127.0.0.1:{free_port()}/0"
    app = build_app(
        model_dir,
        audit_queue=audits,
        predict_rate_per_minute=5,
        redis_url=url,
        redis_failure_mode="closed",
        redis_retry_s=7,
    )
    with TestClient(app) as c:
        r = c.post("/predict", json={"inputs": inputs(1).tolist()})
    assert r.status_code == 503 and r.headers["retry-after"] == "7"
    assert "rate limit cannot be checked" in r.json()["detail"] and url not in r.text
    assert [row.status for row in audits.rows] == [503]
    state(app).models.close()


def test_no_model_loaded_is_503(tmp_path: Path) -> None:
    app = build_app(tmp_path / "empty")
    with TestClient(app) as c:
        r = c.post("/predict", json={"inputs": [[0]]})
    assert r.status_code == 503 and "no model" in r.text


def test_openapi_documents_both_body_forms_with_examples(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    op = spec["paths"]["/predict"]["post"]
    content = op["requestBody"]["content"]
    assert set(content) == {"application/json", "application/x-npy"}
    assert content["application/json"]["schema"]["examples"]
    assert {p["name"] for p in op["parameters"]} == {"model", "top_k"}
    assert "PredictResponse" in spec["components"]["schemas"]
