"""The optional Redis backend of the counters that must hold across workers and replicas (SDB_REDIS_URL).

What lives in Redis: the /predict token buckets and the extraction-volume counters, keyed by the salted
anonymous client id under SDB_REDIS_KEY_PREFIX, each with a TTL. Nothing else: no box key, no API key,
no client address. Every call has short socket timeouts and no retries; after a failure this process
skips Redis for SDB_REDIS_RETRY_S seconds (the callers count in the process meanwhile, or refuse, per
SDB_REDIS_FAILURE_MODE), so an outage costs at most one timeout per process and retry period.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import TypeVar

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from service.observability import metrics

logger = logging.getLogger(__name__)

T = TypeVar("T")


class RedisUnavailable(Exception):
    """Redis failed this call, or failed recently and is not retried yet."""


class RedisBackend:
    """One asyncio Redis client per process (each uvicorn worker builds its own in its lifespan)."""

    def __init__(self, url: str, *, prefix: str, timeout_s: float, retry_s: float) -> None:
        self.prefix = prefix
        self.timeout_s = timeout_s
        self.retry_s = retry_s
        self.client: Redis = Redis.from_url(
            url,
            socket_connect_timeout=timeout_s,
            socket_timeout=timeout_s,
            retry=Retry(
                NoBackoff(), 0
            ),  # redis-py retries 3 times by default: one failure must cost one timeout
            health_check_interval=0,
            decode_responses=True,
        )
        self._retry_at = 0.0  # monotonic time before which Redis is not tried
        self._up = True

    def key(self, kind: str, client: str) -> str:
        return f"{self.prefix}{kind}:{client}"

    @property
    def up(self) -> bool:
        """Whether the last call (or ping) succeeded."""
        return self._up

    async def run(self, operation: str, call: Callable[[Redis], Awaitable[T]]) -> T:
        """`call(client)` bounded by the timeout; RedisUnavailable on any failure or while backing off."""
        if time.monotonic() < self._retry_at:
            raise RedisUnavailable("Redis failed recently")
        try:
            # Socket timeouts bound each read and connect; this bounds the whole call (e.g. a slow script).
            result = await asyncio.wait_for(call(self.client), 2 * self.timeout_s)
        except (RedisError, OSError, TimeoutError) as exc:
            self._failed(operation, exc)
            raise RedisUnavailable(type(exc).__name__) from exc
        self._succeeded()
        return result

    async def ping(self) -> bool:
        """Readiness and /metrics: a real round trip even while backing off (a success ends the backoff)."""
        self._retry_at = 0.0
        try:
            await self.run("ping", lambda r: r.ping())
        except RedisUnavailable:
            return False
        return True

    def _failed(self, operation: str, exc: BaseException) -> None:
        metrics.record_redis_error(operation)
        self._retry_at = time.monotonic() + self.retry_s
        if self._up:
            # The exception's type only: its message may carry the URL (and a password in it).
            logger.warning(
                "Redis unavailable (%s during %s); counting in this process for %.0f s before retrying",
                type(exc).__name__,
                operation,
                self.retry_s,
            )
        self._up = False

    def _succeeded(self) -> None:
        if not self._up:
            logger.warning("Redis answers again; the shared counters are back")
        self._up = True

    async def aclose(self) -> None:
        try:
            await self.client.aclose()
        except (RedisError, OSError) as exc:
            logger.info("closing the Redis client: %s", type(exc).__name__)


class _RedisUp:
    def __init__(self, up: bool) -> None:
        self.up = up

    def collect(self) -> Iterator[Metric]:
        yield GaugeMetricFamily(
            "sdb_redis_up",
            "1 if Redis (SDB_REDIS_URL) answered the /metrics scrape's ping, else 0 (the shared limits then "
            "count in each process, or refuse /predict, per SDB_REDIS_FAILURE_MODE).",
            value=1.0 if self.up else 0.0,
        )


async def render_redis_metrics(backend: RedisBackend | None) -> bytes:
    """`sdb_redis_up` from a ping at scrape time (every worker asks the same Redis); nothing without Redis."""
    if backend is None:
        return b""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_RedisUp(await backend.ping()))
    return generate_latest(registry)
