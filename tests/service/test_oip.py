"""The Open Inference Protocol routes in-process: metadata and health, plain and keyed `infer` answering
exactly what /predict and /distill-batch answer (JSON and binary tensors), the error shape, and every
hostile input refused with 400/413/415/422 (never 500). The real clients drive a live server in
tests/e2e/test_oip_clients.py."""

from __future__ import annotations

import gzip
import uuid
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest
from fastapi.testclient import TestClient

from service.core.config import Settings
from service.db.migrate import upgrade
from service.main import create_app
from tests._support.api import TEST_ADMIN_TOKEN, TEST_JWT_SECRET, ApiHelper
from tests._support.db import audit_rows, count_audits
from tests._support.oip import HEADER_LENGTH, binary_request, json_request, outputs_of

MAX_SAMPLES = 8
MAX_BODY = 64 * 1024
INFER = "/v2/models/alpha/infer"


@pytest.fixture
def backend() -> str:
    return "sqlite"  # the shared flows' PostgreSQL behaviour is tested through /distill-batch


def inputs(n: int = 3, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, 1, 8, 8)).astype(np.float32) * 4


@pytest.fixture(scope="module")
def db_url(tmp_path_factory: pytest.TempPathFactory) -> str:
    url = f"sqlite:///{tmp_path_factory.mktemp('oip') / 'sdb.db'}"
    upgrade(url)
    return url


@pytest.fixture(scope="module")
def client(box_dir: Path, db_url: str) -> Iterator[TestClient]:
    settings = Settings(
        demo=False,
        database_url=db_url,
        model_dir=box_dir,
        default_model="alpha",
        device="cpu",
        torch_threads=1,
        jwt_secret=TEST_JWT_SECRET,
        bootstrap_admin_token=TEST_ADMIN_TOKEN,
        client_ip_salt="oip-" + uuid.uuid4().hex,
        calibrate_forward_batch=False,
        gc_freeze=False,
        predict_rate_per_minute=0,
        distill_rate_per_minute=0,
        max_request_samples=MAX_SAMPLES,
        max_body_bytes=MAX_BODY,
    )
    with TestClient(create_app(settings)) as c:
        yield c


@pytest.fixture(scope="module")
def api(client: TestClient) -> ApiHelper:
    return ApiHelper(client)


def predict(client: TestClient, x: np.ndarray, **extra: Any) -> dict[str, Any]:
    r = client.post("/predict", json={"model": "alpha", "inputs": x.tolist(), **extra})
    assert r.status_code == 200, r.text
    return dict(r.json())


# ---------------------------------------------------------------------------------- metadata, health


def test_server_metadata_and_health(client: TestClient) -> None:
    r = client.get("/v2")
    assert r.status_code == 200
    assert r.json()["name"] == "sdb" and "binary_tensor_data" in r.json()["extensions"]
    assert client.get("/v2/health/live").json() == {"live": True}
    assert client.get("/v2/health/ready").json() == {"ready": True}


def test_model_metadata_gives_shapes_with_a_batch_dimension(client: TestClient) -> None:
    for path in ("/v2/models/alpha", "/v2/models/alpha/versions/1"):
        r = client.get(path)
        assert r.status_code == 200, r.text
        meta = r.json()
        assert meta["name"] == "alpha" and meta["versions"] == ["1"]
        assert meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 1, 8, 8]}]
        outs = {o["name"]: (o["datatype"], o["shape"]) for o in meta["outputs"]}
        assert outs == {
            "label": ("INT64", [-1]),
            "class_name": ("BYTES", [-1]),
            "probabilities": ("FP32", [-1, 10]),
            "soft_labels": ("FP32", [-1, 10]),
            "logits": ("FP32", [-1, 10]),
        }
    assert client.get("/v2/models/alpha/ready").json() == {"name": "alpha", "ready": True}
    assert client.get("/v2/models/alpha/versions/1/ready").status_code == 200


@pytest.mark.parametrize(
    "method, path",
    [
        ("GET", "/v2/models/nope"),
        ("GET", "/v2/models/alpha/versions/7"),
        ("GET", "/v2/models/nope/ready"),
        ("POST", "/v2/models/nope/infer"),
        ("POST", "/v2/models/alpha/versions/7/infer"),
        ("GET", "/v2/no-such-route"),
    ],
)
def test_unknown_models_versions_and_routes_are_404_in_the_protocol_shape(
    client: TestClient, method: str, path: str
) -> None:
    r = client.request(method, path, json=json_request(inputs(1)))
    assert r.status_code == 404
    assert isinstance(r.json()["error"], str) and "detail" not in r.json()


def test_openapi_documents_the_protocol_routes(client: TestClient) -> None:
    paths = client.get("/openapi.json").json()["paths"]
    for p in (
        "/v2",
        "/v2/health/live",
        "/v2/health/ready",
        "/v2/models/{name}",
        "/v2/models/{name}/versions/{version}",
        "/v2/models/{name}/ready",
        "/v2/models/{name}/infer",
        "/v2/models/{name}/versions/{version}/infer",
    ):
        assert p in paths, p
    body = paths["/v2/models/{name}/infer"]["post"]["requestBody"]["content"]
    assert {"application/json", "application/octet-stream"} <= set(body)


# ------------------------------------------------------------------------------------------ plain path


def test_plain_infer_json_is_predicts_answer(client: TestClient) -> None:
    x = inputs(3)
    expected = predict(client, x)["predictions"]
    r = client.post(INFER, json=json_request(x, id="req-1"))
    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["model_name"], body["model_version"], body["id"]) == ("alpha", "1", "req-1")
    assert [o["name"] for o in body["outputs"]] == ["label", "class_name", "probabilities"]
    out = outputs_of(r.content, r.headers)
    assert out["label"].tolist() == [p["label"] for p in expected]
    assert out["class_name"].tolist() == [p["class_name"] for p in expected]
    np.testing.assert_array_equal(
        out["probabilities"], np.array([p["probabilities"] for p in expected], np.float32)
    )


def test_plain_infer_binary_is_predicts_answer(client: TestClient) -> None:
    x = inputs(4, seed=1)
    expected = predict(client, x)["predictions"]
    body, headers = binary_request(x, parameters={"binary_data_output": True})
    r = client.post(INFER, content=body, headers=headers)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/octet-stream" and HEADER_LENGTH in r.headers
    out = outputs_of(r.content, r.headers)
    assert out["label"].dtype == np.int64 and out["label"].tolist() == [p["label"] for p in expected]
    assert out["class_name"].tolist() == [p["class_name"] for p in expected]
    np.testing.assert_array_equal(
        out["probabilities"], np.array([p["probabilities"] for p in expected], np.float32)
    )


def test_nested_data_flat_rows_other_datatypes_and_gzip_give_the_same_answer(client: TestClient) -> None:
    x = np.round(inputs(2, seed=2))  # integral values, so that integer datatypes hold them exactly
    want = outputs_of(*_post(client, json_request(x)))["probabilities"]
    nested = json_request(x)
    nested["inputs"][0]["data"] = x.tolist()
    flat_rows = json_request(x.reshape(2, 64))
    as_int = json_request(x)
    as_int["inputs"][0].update(datatype="INT16", data=x.astype(np.int16).ravel().tolist())
    for req in (nested, flat_rows, as_int):
        np.testing.assert_array_equal(outputs_of(*_post(client, req))["probabilities"], want)
    for dt, arr in (
        ("FP64", x.astype(np.float64)),
        ("INT8", x.astype(np.int8)),
        ("FP16", x.astype(np.float16)),
    ):
        body, headers = binary_request(arr, datatype=dt)
        r = client.post(INFER, content=body, headers=headers)
        assert r.status_code == 200, (dt, r.text)
        np.testing.assert_array_equal(outputs_of(r.content, r.headers)["probabilities"], want)
    body, headers = binary_request(x)
    for encoding, packed in (("gzip", gzip.compress(body)), ("deflate", zlib.compress(body))):
        r = client.post(INFER, content=packed, headers={**headers, "content-encoding": encoding})
        assert r.status_code == 200, r.text
        np.testing.assert_array_equal(outputs_of(r.content, r.headers)["probabilities"], want)


def _post(client: TestClient, req: dict[str, Any]) -> tuple[bytes, Any]:
    r = client.post(INFER, json=req)
    assert r.status_code == 200, r.text
    return r.content, r.headers


def test_requested_outputs_binary_per_output_and_classification(client: TestClient) -> None:
    x = inputs(3, seed=4)
    expected = predict(client, x, top_k=3)["predictions"]
    req = json_request(
        x,
        outputs=[
            {"name": "probabilities", "parameters": {"classification": 3, "binary_data": True}},
            {"name": "label"},
        ],
    )
    r = client.post(INFER, json=req)
    assert r.status_code == 200, r.text
    out = outputs_of(r.content, r.headers)
    assert list(out) == ["probabilities", "label"] and out["probabilities"].shape == (3, 3)
    for row, pred in zip(out["probabilities"].tolist(), expected, strict=True):
        parsed = [s.split(":") for s in row]
        assert [int(i) for _, i, _ in parsed] == [t["label"] for t in pred["top_k"]]
        assert [name for _, _, name in parsed] == [t["class_name"] for t in pred["top_k"]]
        assert [np.float32(v) for v, _, _ in parsed] == [np.float32(t["probability"]) for t in pred["top_k"]]


def test_plain_infer_is_audited_as_the_plain_path(client: TestClient, db_url: str) -> None:
    queue = client.app.state.sdb.audit_queue  # type: ignore[attr-defined]
    assert queue.flush(10)
    before = audit_rows(db_url, "endpoint = '/predict'")
    client.post(INFER, json=json_request(inputs(7)))
    client.post(INFER, json={"inputs": "nope"})
    assert queue.flush(10)
    rows = audit_rows(db_url, "endpoint = '/predict'")[len(before) :]
    assert [(r.status, r.n_samples, r.model) for r in rows] == [(200, 7, "alpha"), (400, 0, None)]


def test_answered_samples_are_counted_once_on_both_paths(client: TestClient, api: ApiHelper) -> None:
    """The shared flows count what they answer (sdb_samples_total; `ServedModel.infer` does not): a 200 of
    N adds N on its path, once; a refused call adds nothing."""
    from prometheus_client import REGISTRY

    def count(path: str) -> float:
        return REGISTRY.get_sample_value("sdb_samples_total", {"model": "alpha", "path": path}) or 0.0

    _, _, headers = api.user_with_key(scopes=["alpha"], sample_quota=4)
    keyed = [{"name": "soft_labels"}]
    plain0, keyed0 = count("plain"), count("keyed")
    assert client.post(INFER, json=json_request(inputs(5))).status_code == 200
    assert client.post(INFER, json={"inputs": "nope"}).status_code == 400
    predict(client, inputs(2))
    assert client.post(INFER, json=json_request(inputs(3), outputs=keyed), headers=headers).status_code == 200
    assert client.post(INFER, json=json_request(inputs(3), outputs=keyed), headers=headers).status_code == 429
    assert (count("plain") - plain0, count("keyed") - keyed0) == (7.0, 3.0)


# ------------------------------------------------------------------------------------------ keyed path


def test_keyed_infer_is_distill_batchs_answer_and_counts_the_quota(
    client: TestClient, api: ApiHelper, db_url: str
) -> None:
    _, key, headers = api.user_with_key(scopes=["alpha"], sample_quota=100)
    x = inputs(3, seed=5)
    r = client.post(
        "/distill-batch", json={"model": "alpha", "inputs": x.tolist(), "temperature": 2.5}, headers=headers
    )
    assert r.status_code == 200, r.text
    want = r.json()
    for binary in (False, True):
        body, hdrs = binary_request(
            x,
            outputs=[{"name": "soft_labels", "parameters": {"binary_data": binary}}, {"name": "logits"}],
            parameters={"temperature": 2.5},
        )
        r = client.post(INFER, content=body, headers={**hdrs, **headers})
        assert r.status_code == 200, r.text
        out = outputs_of(r.content, r.headers)
        np.testing.assert_array_equal(out["soft_labels"], np.array(want["soft_labels"], np.float32))
        np.testing.assert_array_equal(out["logits"], np.array(want["logits"], np.float32))
        header = orjson.loads(r.content[: int(r.headers.get(HEADER_LENGTH, len(r.content)))])
        assert header["parameters"] == {"temperature": 2.5}
    assert r.headers["X-Quota-Used"] == "9" and r.headers["X-Quota-Remaining"] == "91"
    top = [{"name": "soft_labels", "parameters": {"classification": 2}}]
    r = client.post(
        INFER, json=json_request(x, outputs=top, parameters={"temperature": 2.5}), headers=headers
    )
    assert r.status_code == 200, r.text
    for row, soft in zip(
        outputs_of(r.content, r.headers)["soft_labels"].tolist(), want["soft_labels"], strict=True
    ):
        order = np.argsort(-np.array(soft, np.float32), kind="stable")[:2]
        assert [int(s.split(":")[1]) for s in row] == order.tolist()
    rows = audit_rows(db_url, "api_key_id = :k", {"k": key["id"]})
    assert [(row.endpoint, row.status, row.n_samples) for row in rows] == [("/distill-batch", 200, 3)] * 4
    # The key is watermarked (the default): both protocols answered its marked soft labels, and say so.
    assert key["watermarked"] and [row.watermark_id for row in rows] == [key["watermark_id"]] * 4


def test_keyed_outputs_without_a_token_are_refused_never_answered_plain(
    client: TestClient, db_url: str
) -> None:
    before = count_audits(db_url, "/distill-batch", "status = 401")
    for headers in ({}, {"Authorization": "Bearer not-a-token"}):
        r = client.post(
            INFER, json=json_request(inputs(1), outputs=[{"name": "soft_labels"}]), headers=headers
        )
        assert r.status_code == 401, r.text
        assert "soft_labels" not in r.text or "Bearer" in r.json()["error"]
        assert "outputs" not in r.json() and r.headers["WWW-Authenticate"].startswith("Bearer")
    assert count_audits(db_url, "/distill-batch", "status = 401") == before + 2


def test_keyed_refusals_map_onto_the_protocol_error_shape(client: TestClient, api: ApiHelper) -> None:
    _, _, other = api.user_with_key(scopes=["beta"])
    req = json_request(inputs(2), outputs=[{"name": "soft_labels"}])
    r = client.post(INFER, json=req, headers=other)
    assert r.status_code == 403 and r.json()["code"] == "insufficient_scope" and "alpha" in r.json()["error"]
    _, _, small = api.user_with_key(scopes=["alpha"], sample_quota=3)
    assert client.post(INFER, json=req, headers=small).status_code == 200
    r = client.post(INFER, json=req, headers=small)
    assert r.status_code == 429 and r.json()["code"] == "quota_exceeded"
    assert (
        r.json()["remaining"] == 1 and "quota" in r.json()["error"] and r.headers["X-Quota-Remaining"] == "1"
    )


def test_keyed_infer_has_distill_batchs_rate_limit(
    make_settings: Callable[..., Settings],
) -> None:
    with TestClient(create_app(make_settings(distill_rate_per_minute=1))) as c:
        _, _, headers = ApiHelper(c).user_with_key(scopes=["alpha"])
        req = json_request(inputs(1), outputs=[{"name": "soft_labels"}])
        assert c.post(INFER, json=req, headers=headers).status_code == 200
        r = c.post("/distill-batch", json={"model": "alpha", "inputs": inputs(1).tolist()}, headers=headers)
        assert r.status_code == 429  # one budget for both protocols
        r = c.post(INFER, json=req, headers=headers)
        assert r.status_code == 429 and r.json()["code"] == "rate_limited" and "Retry-After" in r.headers


# ------------------------------------------------------------------------------------------ hostile input


def _json(**tensor: Any) -> dict[str, Any]:
    t = {"name": "input", "shape": [1, 64], "datatype": "FP32", "data": [0.5] * 64}
    t.update(tensor)
    return {"inputs": [t]}


def _binary(
    x: np.ndarray, datatype: str = "FP32", size: int | None = None, extra: bytes = b"", **hdr: str
) -> tuple[bytes, dict[str, str]]:
    body, headers = binary_request(x, datatype=datatype, size=size)
    return body + extra, {**headers, **hdr}


ONE = np.zeros((1, 1, 8, 8), np.float32)
NAN = ONE.copy()
NAN[0, 0, 3, 3] = np.nan
BINARY_HEADER = orjson.dumps(
    {
        "inputs": [
            {"name": "input", "shape": [1, 64], "datatype": "FP32", "parameters": {"binary_data_size": 256}}
        ]
    }
)

# name -> (status, body or (body, headers), a word the error names)
HOSTILE: dict[str, tuple[int, Any, str]] = {
    "not json": (400, (b"{inputs", {}), "JSON"),
    "not an object": (400, (b"[1, 2]", {}), "object"),
    "NaN literal": (400, (orjson.dumps(_json()).replace(b"0.5", b"NaN", 1), {}), "JSON"),
    "no inputs": (400, {"inputs": []}, "inputs"),
    "two inputs": (400, {"inputs": [_json()["inputs"][0]] * 2}, "one input"),
    "wrong input name": (400, _json(name="x"), "input"),
    "unknown datatype": (400, _json(datatype="FP8"), "datatype"),
    "bytes datatype": (400, _json(datatype="BYTES", data=["a"] * 64), "BYTES"),
    "bool datatype": (400, _json(datatype="BOOL", data=[True] * 64), "BOOL"),
    "shape not a list": (400, _json(shape="1,64"), "shape"),
    "negative dim": (400, _json(shape=[1, -64]), "shape"),
    "too many dims": (400, _json(shape=[1] * 9 + [64]), "shape"),
    "data count vs shape": (400, _json(shape=[2, 64]), "needs 128"),
    "ragged data": (400, _json(data=[[0.5] * 64, [0.5] * 3]), "rectangular"),
    "strings in data": (400, _json(data=["a"] * 64), "numbers"),
    "floats for INT32": (400, _json(datatype="INT32"), "integers"),
    "out of INT8 range": (400, _json(datatype="INT8", data=[300] * 64), "range"),
    "no data": (400, {"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32"}]}, "data"),
    "data and binary": (400, _json(parameters={"binary_data_size": 256}), "both"),
    "bad id": (400, {**_json(), "id": 7}, "id"),
    "unknown output": (400, {**_json(), "outputs": [{"name": "secrets"}]}, "unknown output"),
    "output twice": (400, {**_json(), "outputs": [{"name": "label"}, {"name": "label"}]}, "twice"),
    "plain and keyed": (
        400,
        {**_json(), "outputs": [{"name": "label"}, {"name": "soft_labels"}]},
        "separately",
    ),
    "temperature on plain": (400, {**_json(), "parameters": {"temperature": 2.0}}, "temperature"),
    "temperature out of range": (
        400,
        {**_json(), "outputs": [{"name": "soft_labels"}], "parameters": {"temperature": 1e9}},
        "temperature",
    ),
    "classification on label": (
        400,
        {**_json(), "outputs": [{"name": "label", "parameters": {"classification": 2}}]},
        "classification",
    ),
    "classification zero": (
        400,
        {**_json(), "outputs": [{"name": "probabilities", "parameters": {"classification": 0}}]},
        "classification",
    ),
    "binary_data not bool": (
        400,
        {**_json(), "parameters": {"binary_data_output": "yes"}},
        "binary_data_output",
    ),
    "model shape": (422, _json(shape=[1, 3, 8, 8], data=[0.5] * 192), "shape"),
    "too large for float32": (422, _json(data=[1e39] * 64), "infinite"),
    "empty batch": (422, _json(shape=[0, 64], data=[]), "empty"),
    "batch over the limit": (
        413,
        _json(shape=[MAX_SAMPLES + 1, 64], data=[0.5] * 64 * (MAX_SAMPLES + 1)),
        "limit",
    ),
    "huge declared shape": (
        413,
        (BINARY_HEADER.replace(b"[1,64]", b"[1,1000000000000]"), {HEADER_LENGTH: "0"}),
        "limit",
    ),
    "declared size vs body": (400, _binary(ONE, size=256, extra=b"\0" * 8), "body holds"),
    "declared size vs shape": (400, _binary(ONE, size=252), "needs 256"),
    "huge declared size": (400, _binary(ONE, size=10**15), "needs 256"),
    "binary without declaration": (
        400,
        (orjson.dumps(_json()) + b"\0" * 8, {HEADER_LENGTH: str(len(orjson.dumps(_json())))}),
        "no input declares",
    ),
    "header length past body": (400, _binary(ONE, **{HEADER_LENGTH: "100000"}), HEADER_LENGTH),
    "header length not a number": (400, _binary(ONE, **{HEADER_LENGTH: "12abc"}), HEADER_LENGTH),
    "nan in binary": (422, _binary(NAN), "NaN"),
    "negative declared size": (400, _binary(ONE, size=-4), "binary_data_size"),
    "bad gzip": (400, (b"not gzip at all", {"content-encoding": "gzip"}), "gzip"),
    "gzip bomb": (413, (gzip.compress(b" " * (MAX_BODY * 4)), {"content-encoding": "gzip"}), "limit"),
    "unknown encoding": (415, (orjson.dumps(_json()), {"content-encoding": "br"}), "Content-Encoding"),
    "body over the limit": (413, (b"{" + b" " * MAX_BODY + b"}", {}), "limit"),
}


def _fix_huge_header(body: Any) -> Any:
    if isinstance(body, tuple) and body[1].get(HEADER_LENGTH) == "0":
        return body[0], {HEADER_LENGTH: str(len(body[0]))}
    return body


@pytest.mark.parametrize("name", HOSTILE)
def test_hostile_inputs_get_a_clear_4xx_never_a_500(client: TestClient, name: str) -> None:
    status, body, word = HOSTILE[name]
    body = _fix_huge_header(body)
    if isinstance(body, tuple):
        r = client.post(INFER, content=body[0], headers=body[1])
    else:
        r = client.post(INFER, json=body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert isinstance(error, str) and word.lower() in error.lower(), error
