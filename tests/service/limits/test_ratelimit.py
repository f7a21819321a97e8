"""The per-client token-bucket rate limiter: in the process, and in Redis shared by several processes."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import pytest
from prometheus_client import REGISTRY

from service.limits.ratelimit import LimitUnavailable, PredictRateLimit, RateLimiter
from service.limits.redis_backend import RedisBackend
from tests._support.net import free_port
from tests._support.redis import REDIS_URL, redis_keys

T = TypeVar("T")


def test_rate_limiter_buckets() -> None:
    limiter = RateLimiter(per_minute=3)
    assert [limiter.acquire("a") for _ in range(3)] == [0.0, 0.0, 0.0]
    wait = limiter.acquire("a")
    assert 0 < wait <= 20.0  # one token comes back every 20 s
    assert RateLimiter.retry_after(wait) == str(int(-(-wait // 1)))
    assert limiter.acquire("b") == 0.0  # buckets are per client
    assert RateLimiter(per_minute=0).acquire("a") == 0.0  # 0 turns the limit off


def backend(prefix: str, url: str = REDIS_URL, retry_s: float = 2.0) -> RedisBackend:
    # A generous timeout: these tests are about the counting, on a machine that other tests keep busy.
    return RedisBackend(url, prefix=prefix, timeout_s=5.0, retry_s=retry_s)


def run(make: Callable[[], Awaitable[T]]) -> T:
    """One event loop per test: each RedisBackend belongs to the loop it was first used in."""
    return asyncio.run(make())  # type: ignore[arg-type]


def metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


@pytest.mark.redis
def test_redis_bucket_is_shared_by_processes(redis_keys_prefix: str) -> None:
    """Two limiters with their own clients (two processes) share one bucket per client in Redis."""

    async def scenario() -> tuple[list[float], float, float]:
        a, b = backend(redis_keys_prefix), backend(redis_keys_prefix)
        la, lb = PredictRateLimit(3, a), PredictRateLimit(3, b)
        try:
            waits = [await (la, lb)[i % 2].acquire("client-1") for i in range(4)]
            other = await lb.acquire("client-2")
            local_after = la.local.acquire("client-1")  # the in-process buckets were never used
        finally:
            await a.aclose()
            await b.aclose()
        return waits, other, local_after

    waits, other, local_after = run(scenario)
    assert waits[:3] == [0.0, 0.0, 0.0]
    assert 19.0 < waits[3] <= 20.0  # 3 a minute: the next token in (almost) 20 s
    assert other == 0.0 and local_after == 0.0
    keys = redis_keys(redis_keys_prefix)
    assert set(keys) == {f"{redis_keys_prefix}rate:client-1", f"{redis_keys_prefix}rate:client-2"}
    # A bucket expires once it would be full again (20 s a token x 3, plus 1 s): no key lives forever.
    assert all(0 < ttl <= 61 for ttl in keys.values()), keys


@pytest.mark.redis
def test_redis_bucket_retry_after_the_wait_succeeds(redis_keys_prefix: str) -> None:
    """The wait returned with a refusal is the real one: after sleeping it, the next call passes."""

    async def scenario() -> tuple[int, float, float]:
        r = backend(redis_keys_prefix)
        limiter = PredictRateLimit(120, r)  # 2 tokens a second
        try:
            spent, wait = 0, 0.0
            while wait == 0.0 and spent < 1000:
                wait = await limiter.acquire("c")
                spent += 1
            await asyncio.sleep(wait + 0.05)
            return spent, wait, await limiter.acquire("c")
        finally:
            await r.aclose()

    spent, wait, after = run(scenario)
    assert 120 < spent < 1000  # the burst (plus what came back meanwhile), then a refusal
    assert 0.0 < wait <= 0.5  # less than one token's time
    assert after == 0.0


def test_redis_outage_fails_open_to_the_process_bucket() -> None:
    """Nothing listens at the URL: the limit counts in the process, one failed connection per retry period."""
    errors = metric("sdb_redis_errors_total", operation="rate_limit")
    local = metric("sdb_redis_fallbacks_total", operation="rate_limit", action="local")

    async def scenario() -> tuple[list[float], float]:
        r = backend("sdbtest-down:", url=f"redis://127.0.0.1:{free_port()}/0", retry_s=60)
        limiter = PredictRateLimit(3, r)
        t0 = time.perf_counter()
        waits = [await limiter.acquire("c") for _ in range(4)]
        elapsed = time.perf_counter() - t0
        await r.aclose()
        return waits, elapsed

    waits, elapsed = run(scenario)
    assert waits[:3] == [0.0, 0.0, 0.0] and waits[3] > 0  # the process's own bucket
    assert metric("sdb_redis_fallbacks_total", operation="rate_limit", action="local") - local == 4
    # Only the first call tried Redis; the others skipped it during the retry period.
    assert metric("sdb_redis_errors_total", operation="rate_limit") - errors == 1
    assert elapsed < 5.0  # one refused connection, not one per call


def test_redis_outage_fails_closed_when_configured() -> None:
    refused = metric("sdb_redis_fallbacks_total", operation="rate_limit", action="refused")

    async def scenario() -> int:
        r = backend("sdbtest-down:", url=f"redis://127.0.0.1:{free_port()}/0")
        limiter = PredictRateLimit(3, r, fail_closed=True)
        raised = 0
        for _ in range(2):
            try:
                await limiter.acquire("c")
            except LimitUnavailable:
                raised += 1
        assert await PredictRateLimit(0, r, fail_closed=True).acquire("c") == 0.0  # off: Redis not asked
        await r.aclose()
        return raised

    assert run(scenario) == 2
    assert metric("sdb_redis_fallbacks_total", operation="rate_limit", action="refused") - refused == 2


@pytest.mark.redis
def test_redis_bucket_is_atomic_under_concurrent_calls(redis_keys_prefix: str) -> None:
    """2N calls at once, spread over two processes' clients and several connections each: exactly N pass."""
    n = 20

    async def scenario() -> list[float]:
        a, b = backend(redis_keys_prefix), backend(redis_keys_prefix)
        la, lb = PredictRateLimit(n, a), PredictRateLimit(n, b)
        try:
            return list(await asyncio.gather(*((la, lb)[i % 2].acquire("c") for i in range(2 * n))))
        finally:
            await a.aclose()
            await b.aclose()

    waits = run(scenario)
    assert sum(w == 0.0 for w in waits) == n
