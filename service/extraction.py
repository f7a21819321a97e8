"""The in-process extraction monitor: flags anonymous clients that pull many /predict samples."""

from __future__ import annotations

import logging
import threading
import time

from redis.asyncio import Redis

from service import metrics
from service.redis_backend import RedisBackend, RedisUnavailable

logger = logging.getLogger(__name__)


class ExtractionMonitor:
    """Flags anonymous clients whose /predict volume passes `threshold` samples in a fixed window.

    The flag is exported as a metric (no client id in labels) and logged with the client's anonymous id;
    the admin API computes the same rule from the audit table over any time range. With `redis`, the
    window's count is one Redis key per client shared by every process (the window starts at the client's
    first sample and the key expires with it), so one client is flagged once whichever process answers;
    while Redis fails, each process counts alone (the flag is a signal, never a refusal).
    """

    def __init__(
        self, window_s: float, threshold: int, max_clients: int = 100_000, redis: RedisBackend | None = None
    ) -> None:
        self.window_s = window_s
        self.threshold = threshold
        self.max_clients = max_clients
        self.redis = redis
        self._counts: dict[str, tuple[float, int, bool]] = {}
        self._lock = threading.Lock()

    async def add(self, client: str, n: int) -> bool:
        """Count `n` samples; True when this call newly flags the client."""
        if self.redis is not None:
            key, window = self.redis.key("extraction", client), max(1, int(self.window_s))

            async def call(r: Redis) -> int:
                async with r.pipeline(transaction=True) as pipe:
                    pipe.incrby(key, n)
                    pipe.expire(key, window, nx=True)
                    total, _ = await pipe.execute()
                return int(total)

            try:
                total = await self.redis.run("extraction", call)
            except RedisUnavailable:
                metrics.record_redis_fallback("extraction", "local")
            else:
                # INCRBY is atomic: exactly one call crosses the threshold in each window.
                newly = total - n <= self.threshold < total
                if newly:
                    self._flagged(client)
                return newly
        return self.add_local(client, n)

    def add_local(self, client: str, n: int) -> bool:
        """Count `n` samples in this process; True when this call newly flags the client."""
        now = time.monotonic()
        with self._lock:
            start, total, flagged = self._counts.get(client, (now, 0, False))
            if now - start >= self.window_s:
                start, total, flagged = now, 0, False
            total += n
            newly = total > self.threshold and not flagged
            self._counts[client] = (start, total, flagged or newly)
            if len(self._counts) > self.max_clients:
                self._counts = {k: v for k, v in self._counts.items() if now - v[0] < self.window_s}
        if newly:
            self._flagged(client)
        return newly

    def _flagged(self, client: str) -> None:
        metrics.record_extraction_flag("anonymous")
        logger.warning(
            "client %s passed %d /predict samples in %.0f s", client, self.threshold, self.window_s
        )
