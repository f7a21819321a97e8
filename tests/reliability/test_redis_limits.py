"""The /predict rate limit with SDB_REDIS_URL on real servers: one limit for the workers of `sdb serve
--workers 2` (and, without Redis, one per worker); a Redis that is cut, hangs and comes back."""

from __future__ import annotations

import shutil
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.multiprocess import MultiProcessCollector
from redis.connection import parse_url

from tests._support.admin import admin_headers
from tests._support.boxes import MODEL
from tests._support.pgproxy import PgProxy, ProxyConfig
from tests._support.redis import REDIS_URL, redis_keys
from tests._support.server import ServerFactory

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

ONE_SAMPLE = {"model": MODEL, "inputs": [[[[0.5] * 8] * 8]]}
RATE = 5  # per minute: one token every 12 s, so none comes back during a test's few seconds


def _sqlite(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'redis.db'}"


def _predict_fresh_connections(url: str, n: int) -> list[int]:
    """A new connection per request, so that the kernel spreads the calls over the workers."""
    return [httpx.post(url + "/predict", json=ONE_SAMPLE, timeout=30).status_code for _ in range(n)]


def _predict_until_both_workers_answered(url: str, metrics_dir: Path, scratch: Path) -> list[int]:
    """`_predict_fresh_connections` in rounds of 4 x RATE until both workers have answered (the kernel
    usually spreads 20 calls over two workers, but on a busy machine one may accept them all); at most 10
    rounds."""
    statuses: list[int] = []
    for i in range(10):
        statuses += _predict_fresh_connections(url, 4 * RATE)
        if len(_per_worker(metrics_dir, scratch / f"round{i}")) == 2:
            break
    return statuses


def _per_worker(metrics_dir: Path, scratch: Path) -> dict[int, Counter[str]]:
    """/predict status codes answered by each worker, from its own metric file (counter_<pid>.db)."""
    out: dict[int, Counter[str]] = {}
    for f in sorted(metrics_dir.glob("counter_*.db")):
        pid = int(f.stem.split("_")[1])
        alone = scratch / str(pid)
        alone.mkdir(parents=True)
        shutil.copy(f, alone)
        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=str(alone))
        statuses: Counter[str] = Counter()
        for family in registry.collect():
            for s in family.samples:
                if s.name == "sdb_http_requests_total" and s.labels["route"] == "/predict":
                    statuses[s.labels["status"]] += int(s.value)
        if statuses:
            out[pid] = statuses
    return out


@pytest.fixture
def metrics_dir(tmp_path: Path) -> Path:
    d = tmp_path / "metrics"
    d.mkdir()
    return d


@pytest.mark.redis
def test_two_workers_share_one_limit_in_redis(
    start_server: ServerFactory, tmp_path: Path, metrics_dir: Path, redis_keys_prefix: str
) -> None:
    srv = start_server(
        _sqlite(tmp_path),
        workers=2,
        predict_rate_per_minute=RATE,
        redis_url=REDIS_URL,
        redis_key_prefix=redis_keys_prefix,
        redis_timeout_s=5,  # this test is about sharing: no spurious timeout on a busy machine
        PROMETHEUS_MULTIPROC_DIR=str(metrics_dir),
    )
    statuses = _predict_until_both_workers_answered(srv.url, metrics_dir, tmp_path / "live")
    assert Counter(statuses) == {200: RATE, 429: len(statuses) - RATE}, statuses
    assert httpx.get(srv.url + "/readyz", timeout=30).json()["redis"] == "ok"
    # One bucket: the client's anonymous id is the same whichever worker answered.
    client = _only_client(srv.url)
    assert _keys_soon(redis_keys_prefix, 2) == [
        f"{redis_keys_prefix}extraction:{client}",
        f"{redis_keys_prefix}rate:{client}",
    ]
    srv.stop()
    workers = _per_worker(metrics_dir, tmp_path)
    assert len(workers) == 2, f"one worker answered every call; the test shows nothing: {workers}"
    assert sum(w["200"] for w in workers.values()) == RATE


def test_two_workers_without_redis_count_alone(
    start_server: ServerFactory, tmp_path: Path, metrics_dir: Path
) -> None:
    """Without SDB_REDIS_URL each worker has its own bucket (documented): N workers allow N times the rate."""
    srv = start_server(
        _sqlite(tmp_path),
        workers=2,
        predict_rate_per_minute=RATE,
        PROMETHEUS_MULTIPROC_DIR=str(metrics_dir),
    )
    statuses = _predict_until_both_workers_answered(srv.url, metrics_dir, tmp_path / "live")
    srv.stop()
    workers = _per_worker(metrics_dir, tmp_path)
    assert len(workers) == 2, f"one worker answered every call; the test shows nothing: {workers}"
    for answered in workers.values():
        assert answered["200"] == min(RATE, answered.total())
    assert statuses.count(200) == sum(w["200"] for w in workers.values()) > RATE


def _keys_soon(prefix: str, n: int) -> list[str]:
    """The keys under `prefix` once there are `n` (the extraction counts are flushed each second)."""
    deadline = time.monotonic() + 10
    while len(keys := sorted(redis_keys(prefix))) < n and time.monotonic() < deadline:
        time.sleep(0.2)
    return keys


def _only_client(url: str) -> str:
    """The anonymous id of this test's client (127.0.0.1), as the admin API reports it."""
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        r = httpx.get(
            url + "/admin/usage/clients",
            params={"kind": "anonymous"},
            headers=admin_headers(url),
            timeout=30,
        )
        items = r.json()["items"]
        if items:
            assert len(items) == 1, items
            return str(items[0]["client"])
        time.sleep(0.3)
    raise AssertionError("no anonymous client in /admin/usage/clients")


@pytest.fixture
def redis_proxy() -> Iterator[PgProxy]:
    """A TCP proxy in front of the test Redis that the test can cut, hang and restore."""
    upstream = parse_url(REDIS_URL)
    proxy = PgProxy(
        ProxyConfig(upstream_host=upstream.get("host", "127.0.0.1"), upstream_port=upstream.get("port", 6379))
    ).start()
    try:
        yield proxy
    finally:
        proxy.stop()


def _metric(text: str, line_start: str) -> float:
    values = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(line_start)]
    return sum(values)


@pytest.mark.redis
def test_redis_cut_hung_and_back_predict_keeps_answering(
    start_server: ServerFactory, tmp_path: Path, redis_keys_prefix: str, redis_proxy: PgProxy
) -> None:
    """SDB_REDIS_FAILURE_MODE=open (the default): while Redis is down /predict answers and counts in the
    process (sdb_redis_fallbacks_total says so, /readyz says degraded); once back, Redis counts again."""
    db = parse_url(REDIS_URL).get("db", 0)
    srv = start_server(
        _sqlite(tmp_path),
        predict_rate_per_minute=3,
        redis_url=f"redis://127.0.0.1:{redis_proxy.port}/{db}",
        redis_key_prefix=redis_keys_prefix,
        redis_retry_s=0.5,
        redis_timeout_s=2,  # the hung Redis costs one such timeout; a busy machine none by mistake
    )
    with httpx.Client(base_url=srv.url, timeout=30) as c:

        def predict() -> int:
            return c.post("/predict", json=ONE_SAMPLE).status_code

        assert [predict(), predict()] == [200, 200]  # 1 token left in Redis
        assert [key.split(":")[-2] for key in _keys_soon(redis_keys_prefix, 2)] == ["extraction", "rate"]

        redis_proxy.cut()
        # The process's own bucket (full: it was never used) takes over: 3 answers, then 429.
        assert [predict() for _ in range(4)] == [200, 200, 200, 429]
        r = c.get("/readyz")
        assert (
            r.status_code == 200 and r.json()["status"] == "degraded" and r.json()["redis"] == "unreachable"
        )
        text = c.get("/metrics").text
        assert "sdb_redis_up 0.0" in text
        assert _metric(text, 'sdb_redis_fallbacks_total{action="local",operation="rate_limit"}') >= 4
        assert _metric(text, 'sdb_redis_errors_total{operation="rate_limit"}') >= 1

        # A hung Redis (no byte moves): the socket timeout bounds each try, /predict still answers.
        redis_proxy.restore()
        redis_proxy.partition()
        time.sleep(0.6)  # past SDB_REDIS_RETRY_S: the next call tries Redis again
        assert predict() == 429  # the local bucket, after one timed-out try (2 s)
        assert c.get("/readyz").json()["redis"] == "unreachable"

        redis_proxy.restore()
        deadline = time.monotonic() + 10
        while c.get("/readyz").json()["status"] != "ready":
            assert time.monotonic() < deadline, "Redis did not come back"
            time.sleep(0.2)
        # Redis counts again: the bucket there still has its 1 token.
        assert [predict(), predict()] == [200, 429]
        assert "sdb_redis_up 1.0" in c.get("/metrics").text
    assert "Redis answers again" in srv.logs()
