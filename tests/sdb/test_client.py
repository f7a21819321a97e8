"""sdb.client against a scripted server (httpx.MockTransport): tokens, retries, encodings, teachers."""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Callable

import httpx
import numpy as np
import pytest
import torch

from sdb.client import SdbClient, SdbError, remote_teacher

API_KEY = "sdb_test_0123456789abcdef0123456789abcdef"
C = 4


def decode(body: dict) -> np.ndarray:  # type: ignore[type-arg]
    return np.load(io.BytesIO(base64.b64decode(body["inputs_b64"])), allow_pickle=False)


class FakeServer:
    """Keyed logits = row sums * [1, 2, 3, 4]; plain probabilities = softmax of the same."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str | None]] = []
        self.tokens_issued = 0
        self.script: list[Callable[[httpx.Request], httpx.Response | None]] = []

    def logits(self, x: np.ndarray) -> np.ndarray:
        return x.reshape(len(x), -1).sum(1, keepdims=True) * np.arange(1, C + 1, dtype=np.float32)

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.calls.append((request.url.path, request.headers.get("authorization")))
        if self.script:
            scripted = self.script.pop(0)(request)
            if scripted is not None:
                return scripted
        if request.url.path == "/auth/token":
            body = json.loads(request.content)
            if body.get("client_secret") != API_KEY:
                return httpx.Response(401, json={"detail": "invalid client"})
            self.tokens_issued += 1
            return httpx.Response(200, json={"access_token": f"tok{self.tokens_issued}", "expires_in": 900})
        body = json.loads(request.content)
        x = decode(body)
        z = self.logits(x)
        if request.url.path == "/distill-batch":
            if request.headers.get("authorization") != f"Bearer tok{self.tokens_issued}":
                return httpx.Response(401, json={"detail": "invalid token"})
            t = body.get("temperature", 4.0)
            e = np.exp((z - z.max(1, keepdims=True)) / t)
            soft = e / e.sum(1, keepdims=True)
            return httpx.Response(
                200,
                json={
                    "model": "m",
                    "version": "1",
                    "temperature": t,
                    "soft_labels": soft.tolist(),
                    "logits": z.tolist(),
                },
            )
        e = np.exp(z - z.max(1, keepdims=True))
        p = e / e.sum(1, keepdims=True)
        preds = [
            {"label": int(r.argmax()), "class_name": str(r.argmax()), "probabilities": r.tolist()} for r in p
        ]
        return httpx.Response(200, json={"model": "m", "version": "1", "predictions": preds})


@pytest.fixture
def server() -> FakeServer:
    return FakeServer()


@pytest.fixture
def sleeps() -> list[float]:
    return []


@pytest.fixture
def client(server: FakeServer, sleeps: list[float]) -> SdbClient:
    return SdbClient("http://sdb.test", API_KEY, transport=httpx.MockTransport(server), sleep=sleeps.append)


def x_of(n: int) -> np.ndarray:
    return np.random.default_rng(n).random((n, 1, 2, 2), dtype=np.float32)


def test_distill_batch_sends_npy_and_reuses_one_token(client: SdbClient, server: FakeServer) -> None:
    x = x_of(3)
    for _ in range(2):
        out = client.distill_batch(x, model="m", temperature=2.0)
        np.testing.assert_allclose(out.logits, server.logits(x), rtol=1e-6)
        np.testing.assert_allclose(out.soft_labels.sum(1), 1.0, rtol=1e-5)
        assert out.temperature == 2.0
    assert server.tokens_issued == 1
    assert [p for p, _ in server.calls] == ["/auth/token", "/distill-batch", "/distill-batch"]


def test_expired_token_is_refreshed_once(client: SdbClient, server: FakeServer) -> None:
    client.distill_batch(x_of(1))
    server.tokens_issued += 1  # the server no longer accepts tok1
    client.distill_batch(x_of(1))
    assert [p for p, _ in server.calls].count("/auth/token") == 2


def test_bad_api_key_is_a_clear_error(server: FakeServer) -> None:
    c = SdbClient("http://sdb.test", "sdb_wrong", transport=httpx.MockTransport(server))
    with pytest.raises(SdbError) as exc:
        c.distill_batch(x_of(1))
    assert exc.value.status_code == 401
    assert "sdb_wrong" not in repr(c) and API_KEY not in repr(SdbClient("http://x", API_KEY))


def test_429_with_retry_after_and_503_are_retried(
    client: SdbClient, server: FakeServer, sleeps: list[float]
) -> None:
    server.script = [
        lambda r: httpx.Response(429, json={"detail": "slow down"}, headers={"Retry-After": "3"}),
        lambda r: httpx.Response(503, json={"detail": "busy"}),
    ]
    probs = client.predict_proba(x_of(2))
    assert probs.shape == (2, C)
    assert sleeps[0] == 3.0 and len(sleeps) == 2


def test_quota_429_without_retry_after_is_final(
    client: SdbClient, server: FakeServer, sleeps: list[float]
) -> None:
    client.token()
    server.script = [lambda r: httpx.Response(429, json={"detail": {"error": "quota_exceeded"}})]
    with pytest.raises(SdbError) as exc:
        client.distill_batch(x_of(1))
    assert exc.value.status_code == 429 and sleeps == []


def test_connection_errors_are_retried_then_raised(server: FakeServer, sleeps: list[float]) -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused", request=request)

    flaky = FakeServer()
    flaky.script = [lambda r: refuse(r), lambda r: refuse(r)]
    c = SdbClient("http://sdb.test", transport=httpx.MockTransport(flaky), sleep=sleeps.append)
    assert c.predict(x_of(1))["model"] == "m"
    assert len(sleeps) == 2 and sleeps[1] > 0

    dead = SdbClient(
        "http://sdb.test", transport=httpx.MockTransport(refuse), sleep=sleeps.append, max_retries=2
    )
    with pytest.raises(httpx.ConnectError):
        dead.predict(x_of(1))


def test_4xx_is_not_retried(client: SdbClient, server: FakeServer, sleeps: list[float]) -> None:
    server.script = [lambda r: httpx.Response(422, json={"detail": "inputs must have shape [N, 1, 8, 8]"})]
    with pytest.raises(SdbError, match="shape"):
        client.predict(x_of(1))
    assert sleeps == []


def test_datasets_go_in_batches(client: SdbClient, server: FakeServer) -> None:
    x = x_of(10)
    out = client.distill_dataset(x, batch_size=4, progress=False)
    np.testing.assert_allclose(out.logits, server.logits(x), rtol=1e-6)
    assert [p for p, _ in server.calls].count("/distill-batch") == 3
    probs = client.predict_dataset(x, batch_size=6, progress=False)
    assert probs.shape == (10, C)


def test_remote_teachers(server: FakeServer) -> None:
    transport = httpx.MockTransport(server)
    x = torch.from_numpy(x_of(5))
    keyed = remote_teacher(
        "http://sdb.test",
        API_KEY,
        "m",
        "keyed",
        client=SdbClient("http://sdb.test", API_KEY, transport=transport),
    )
    np.testing.assert_allclose(keyed(x).numpy(), server.logits(x.numpy()), rtol=1e-6)
    plain = remote_teacher(
        "http://sdb.test",
        None,
        "m",
        "plain",
        batch_size=2,
        client=SdbClient("http://sdb.test", transport=transport),
    )
    log_p = plain(x)
    z = torch.from_numpy(server.logits(x.numpy()))
    for t in (1.0, 4.0, 20.0):  # log-probabilities give the teacher's softmax at any temperature
        torch.testing.assert_close(torch.softmax(log_p / t, 1), torch.softmax(z / t, 1), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError):
        remote_teacher("http://sdb.test", None, path="other")  # type: ignore[arg-type]


def test_an_unreachable_server_is_reported_at_once_with_the_retry(caplog: pytest.LogCaptureFixture) -> None:
    from tests._support.net import free_port

    seen_before_first_wait: list[str] = []

    def sleep(seconds: float) -> None:
        if not seen_before_first_wait:
            seen_before_first_wait.extend(r.getMessage() for r in caplog.records)

    url = f"http://127.0.0.1:{free_port()}"
    client = SdbClient(url, max_retries=2, sleep=sleep)
    with caplog.at_level("WARNING", logger="sdb.client"), client, pytest.raises(httpx.ConnectError):
        client.predict(np.zeros((1, 1, 8, 8), np.float32))
    assert seen_before_first_wait, "nothing said before the first wait"
    first = seen_before_first_wait[0]
    assert url in first and "retrying" in first and "1 of 2" in first, first
