"""End to end: the Open Inference Protocol's real clients against a live server serving both shipped boxes.

`tritonclient.http` (binary tensors, its default, and JSON tensors: health, metadata, plain infer with and
without `classification`, keyed infer with the token as a header) and kserve's `InferenceRESTClient` (v2,
JSON and binary inputs) get exactly the numbers /predict and /distill-batch give for the same inputs.
The clients are imported by the tests that use them (kserve alone takes seconds), never at collection.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import pytest

from sdb_core.artifact import read_manifest
from tests._support.db import run_migrations
from tests._support.server import ADMIN_TOKEN, REPO, Server, base_env

pytestmark = [pytest.mark.slow, pytest.mark.e2e]

BOXES = sorted(p.parent for p in (REPO / "models").glob("*/manifest.json"))
MODELS = {read_manifest(d)["name"]: tuple(read_manifest(d)["input_shape"]) for d in BOXES}
TEMPERATURE = 2.0


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    if len(MODELS) < 2:
        pytest.skip("the shipped boxes are not in models/")
    work = tmp_path_factory.mktemp("oip-server")
    models = work / "models"
    models.mkdir()
    for d in BOXES:
        (models / d.name).symlink_to(d, target_is_directory=True)
    db_url = f"sqlite:///{work / 'sdb.db'}"
    run_migrations(db_url)
    srv = Server(
        base_env(models, db_url, predict_rate_per_minute=0), work / "server.log", ready_path="/readyz"
    )
    try:
        yield srv.start(wait_s=120).url
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def token(server: str) -> str:
    def post(path: str, body: dict[str, Any], headers: dict[str, str] | None = None) -> Any:
        r = httpx.post(server + path, json=body, headers=headers, timeout=30)
        r.raise_for_status()
        return r.json()

    admin = {"Authorization": "Bearer " + post("/auth/token", {"client_secret": ADMIN_TOKEN})["access_token"]}
    user = post("/admin/users", {"name": "oip-client"}, admin)
    key = post(f"/admin/users/{user['id']}/keys", {"scopes": sorted(MODELS)}, admin)
    return str(post("/auth/token", {"client_secret": key["api_key"]})["access_token"])


@pytest.fixture(scope="module")
def tritonhttp() -> Any:
    return pytest.importorskip("tritonclient.http")


@pytest.fixture(scope="module")
def triton(server: str, tritonhttp: Any) -> Iterator[Any]:
    client = tritonhttp.InferenceServerClient(url=server.removeprefix("http://"))
    yield client
    client.close()


def sample(model: str, n: int = 5, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((n, *MODELS[model]), dtype=np.float32)


def predict(server: str, model: str, x: np.ndarray, top_k: int | None = None) -> list[dict[str, Any]]:
    body: dict[str, Any] = {"model": model, "inputs": x.tolist(), **({"top_k": top_k} if top_k else {})}
    r = httpx.post(server + "/predict", json=body, timeout=60)
    assert r.status_code == 200, r.text
    return list(r.json()["predictions"])


def distill(server: str, token: str, model: str, x: np.ndarray) -> dict[str, Any]:
    body = {"model": model, "inputs": x.tolist(), "temperature": TEMPERATURE}
    r = httpx.post(
        server + "/distill-batch", json=body, headers={"Authorization": f"Bearer {token}"}, timeout=60
    )
    assert r.status_code == 200, r.text
    return dict(r.json())


def test_tritonclient_health_and_metadata(triton: Any) -> None:
    assert triton.is_server_live() and triton.is_server_ready()
    assert "binary_tensor_data" in triton.get_server_metadata()["extensions"]
    for model, shape in MODELS.items():
        assert triton.is_model_ready(model) and triton.is_model_ready(model, "1")
        meta = triton.get_model_metadata(model)
        assert meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, *shape]}]
        assert {o["name"] for o in meta["outputs"]} == {
            "label",
            "class_name",
            "probabilities",
            "soft_labels",
            "logits",
        }
    assert not triton.is_model_ready("no-such-model")


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
@pytest.mark.parametrize("model", sorted(MODELS))
def test_tritonclient_plain_infer_is_predicts_answer(
    server: str, triton: Any, tritonhttp: Any, model: str, binary: bool
) -> None:
    x = sample(model, seed=1)
    expected = predict(server, model, x, top_k=3)
    inp = tritonhttp.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x, binary_data=binary)
    outputs = [
        tritonhttp.InferRequestedOutput("label", binary_data=binary),
        tritonhttp.InferRequestedOutput("class_name", binary_data=binary),
        tritonhttp.InferRequestedOutput("probabilities", binary_data=binary),
    ]
    result = triton.infer(model, [inp], outputs=outputs, request_id="r1")
    assert result.get_response()["id"] == "r1"
    assert result.as_numpy("label").tolist() == [p["label"] for p in expected]
    names = [v.decode() if isinstance(v, bytes) else v for v in result.as_numpy("class_name").tolist()]
    assert names == [p["class_name"] for p in expected]
    probs = np.array([p["probabilities"] for p in expected], np.float32)
    np.testing.assert_array_equal(result.as_numpy("probabilities"), probs)
    # all outputs by default (binary), and Triton's classification extension as /predict's top_k
    inp.set_data_from_numpy(x, binary_data=binary)
    default = triton.infer(model, [inp])
    np.testing.assert_array_equal(default.as_numpy("probabilities"), probs)
    top = triton.infer(
        model, [inp], outputs=[tritonhttp.InferRequestedOutput("probabilities", class_count=3)]
    )
    for row, pred in zip(top.as_numpy("probabilities").tolist(), expected, strict=True):
        got = [(np.float32(v), int(i), n) for v, i, n in (s.decode().split(":") for s in row)]
        assert got == [(np.float32(t["probability"]), t["label"], t["class_name"]) for t in pred["top_k"]]


@pytest.mark.parametrize("model", sorted(MODELS))
def test_tritonclient_keyed_infer_with_the_token_is_distill_batchs_answer(
    server: str, triton: Any, tritonhttp: Any, token: str, model: str
) -> None:
    x = sample(model, n=4, seed=2)
    expected = distill(server, token, model, x)
    inp = tritonhttp.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    outputs = [tritonhttp.InferRequestedOutput("soft_labels"), tritonhttp.InferRequestedOutput("logits")]
    result = triton.infer(
        model,
        [inp],
        outputs=outputs,
        headers={"Authorization": f"Bearer {token}"},
        parameters={"temperature": TEMPERATURE},
    )
    np.testing.assert_array_equal(
        result.as_numpy("soft_labels"), np.array(expected["soft_labels"], np.float32)
    )
    np.testing.assert_array_equal(result.as_numpy("logits"), np.array(expected["logits"], np.float32))
    from tritonclient.utils import InferenceServerException

    with pytest.raises(InferenceServerException) as refused:
        triton.infer(model, [inp], outputs=outputs)  # no token: refused, never the plain path's answer
    assert refused.value.status() == "401" and "Bearer" in refused.value.message()


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_kserve_rest_client_v2(server: str, token: str, binary: bool) -> None:
    pytest.importorskip("kserve")
    from kserve import InferenceRESTClient, InferInput, InferRequest, RESTConfig
    from kserve.protocol.infer_type import RequestedOutput

    async def run() -> None:
        async with InferenceRESTClient(RESTConfig(protocol="v2")) as client:
            assert await client.is_server_live(server) and await client.is_server_ready(server)
            for model in sorted(MODELS):
                assert await client.is_model_ready(server, model)
                x = sample(model, n=3, seed=3)
                inp = InferInput("input", list(x.shape), "FP32")
                inp.set_data_from_numpy(x, binary_data=binary)
                res = await client.infer(server, InferRequest(model, [inp]), model_name=model)
                out = {o.name: o.as_numpy() for o in res.outputs}
                expected = predict(server, model, x)
                assert out["label"].tolist() == [p["label"] for p in expected]
                np.testing.assert_array_equal(
                    out["probabilities"], np.array([p["probabilities"] for p in expected], np.float32)
                )
                inp = InferInput("input", list(x.shape), "FP32")
                inp.set_data_from_numpy(x, binary_data=binary)
                req = InferRequest(
                    model,
                    [inp],
                    parameters={"temperature": TEMPERATURE},
                    request_outputs=[RequestedOutput("soft_labels")],
                )
                res = await client.infer(
                    server, req, model_name=model, headers={"Authorization": f"Bearer {token}"}
                )
                soft = {o.name: o.as_numpy() for o in res.outputs}["soft_labels"]
                want = distill(server, token, model, x)["soft_labels"]
                np.testing.assert_array_equal(soft, np.array(want, np.float32))
                with pytest.raises(httpx.HTTPStatusError) as refused:
                    await client.infer(server, req, model_name=model)
                assert refused.value.response.status_code == 401

    asyncio.run(run())


def test_the_readmes_tritonclient_example_runs(server: str, token: str, tritonhttp: Any) -> None:
    readme = (REPO / "README.md").read_text().split("## Open Inference Protocol\n", 1)[1].split("\n## ", 1)[0]
    code = (
        readme.split("```python\n", 1)[1]
        .split("```", 1)[0]
        .replace("127.0.0.1:8000", server.removeprefix("http://"))
    )
    scope: dict[str, Any] = {"token": token}
    exec(compile(code, "README.md", "exec"), scope)
    assert scope["labels"].shape == (4,) and scope["probs"].shape == (4, 10)
    np.testing.assert_allclose(scope["soft_labels"].sum(axis=1), 1.0, atol=1e-5)
