"""Per-client token-bucket rate limiting (the /predict limit; /distill-batch counts in the database).

`RateLimiter` counts in the process; `PredictRateLimit` is the /predict limit itself: the same token bucket
in Redis when SDB_REDIS_URL is set (one bucket per client for all workers and replicas), else, and while
Redis fails with SDB_REDIS_FAILURE_MODE=open, the process's own `RateLimiter`.
"""

from __future__ import annotations

import math
import threading
import time

from redis.asyncio import Redis

from service.limits.redis_backend import RedisBackend, RedisUnavailable
from service.observability import metrics


class RateLimiter:
    """Token buckets per client: `per_minute` requests a minute, bursts up to `per_minute` (0 = off).

    Counts per worker process: with W workers a client can reach W times the rate (documented).
    """

    def __init__(self, per_minute: int, max_clients: int = 100_000) -> None:
        self.per_minute = per_minute
        self.capacity = float(max(per_minute, 1))
        self.rate = per_minute / 60.0
        self.max_clients = max_clients
        self._buckets: dict[str, tuple[float, float]] = {}
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return self.per_minute > 0

    def acquire(self, client: str, cost: float = 1.0) -> float:
        """0.0 when allowed, else the seconds to wait before a retry can succeed."""
        if not self.enabled:
            return 0.0
        now = time.monotonic()
        with self._lock:
            tokens, last = self._buckets.get(client, (self.capacity, now))
            tokens = min(self.capacity, tokens + (now - last) * self.rate)
            if tokens >= cost:
                self._buckets[client] = (tokens - cost, now)
                return 0.0
            self._buckets[client] = (tokens, now)
            if len(self._buckets) > self.max_clients:
                self._prune(now)
            return (cost - tokens) / self.rate

    def _prune(self, now: float) -> None:
        full_after = self.capacity / self.rate
        stale = [k for k, (_, last) in self._buckets.items() if now - last >= full_after]
        for k in stale:
            del self._buckets[k]

    @staticmethod
    def retry_after(seconds: float) -> str:
        return str(max(1, math.ceil(seconds)))


# The token bucket of `RateLimiter`, run atomically in Redis on the server's clock (replicas' clocks may
# differ). KEYS[1]: the client's bucket; ARGV: capacity, tokens per second, cost. Returns the wait in
# seconds as a string (a Lua number would come back truncated to an integer).
TOKEN_BUCKET = """
local capacity = tonumber(ARGV[1])
local rate = tonumber(ARGV[2])
local cost = tonumber(ARGV[3])
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local bucket = redis.call('HMGET', KEYS[1], 'tokens', 'ts')
local tokens = tonumber(bucket[1]) or capacity
local last = tonumber(bucket[2]) or now
tokens = math.min(capacity, tokens + math.max(0, now - last) * rate)
local wait = 0
if tokens >= cost then
  tokens = tokens - cost
else
  wait = (cost - tokens) / rate
end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'ts', tostring(now))
redis.call('PEXPIRE', KEYS[1], math.ceil(capacity / rate * 1000) + 1000)
return tostring(wait)
"""


class LimitUnavailable(Exception):
    """Redis fails and SDB_REDIS_FAILURE_MODE=closed: the call cannot be counted, so it is refused."""


class PredictRateLimit:
    """The per-client /predict limit: in Redis when configured, else (or while Redis fails) in the process."""

    def __init__(self, per_minute: int, redis: RedisBackend | None = None, fail_closed: bool = False) -> None:
        self.local = RateLimiter(per_minute)
        self.redis = redis
        self.fail_closed = fail_closed
        self._script = redis.client.register_script(TOKEN_BUCKET) if redis is not None else None

    @property
    def per_minute(self) -> int:
        return self.local.per_minute

    async def acquire(self, client: str, cost: float = 1.0) -> float:
        """0.0 when allowed, else the seconds to wait; LimitUnavailable when Redis fails and fail_closed."""
        if not self.local.enabled:
            return 0.0
        if self.redis is None or self._script is None:
            return self.local.acquire(client, cost)
        script, key = self._script, self.redis.key("rate", client)
        args = [self.local.capacity, self.local.rate, cost]

        async def call(r: Redis) -> float:
            return float(await script(keys=[key], args=args, client=r))

        try:
            return await self.redis.run("rate_limit", call)
        except RedisUnavailable:
            if self.fail_closed:
                metrics.record_redis_fallback("rate_limit", "refused")
                raise LimitUnavailable from None
            metrics.record_redis_fallback("rate_limit", "local")
            return self.local.acquire(client, cost)
