"""The in-process extraction monitor: flags anonymous clients that pull many /predict samples."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from typing import Any

from redis.asyncio import Redis

from service.limits.redis_backend import RedisBackend, RedisUnavailable
from service.observability import metrics

logger = logging.getLogger(__name__)


FLUSH_INTERVAL_S = 1.0


class ExtractionMonitor:
    """Flags anonymous clients whose /predict volume passes `threshold` samples in a fixed window.

    The flag is exported as a metric (no client id in labels) and logged with the client's anonymous id;
    the admin API computes the same rule from the audit table over any time range. With `redis`, the
    window's count is one Redis key per client shared by every process (the window starts at the client's
    first sample and the key expires with it), so one client is flagged once whichever process answers.
    The counts reach Redis in one pipeline per FLUSH_INTERVAL_S (`run`, started by the lifespan), not one
    round trip per request: a flag may come a second late, which a window of minutes or hours does not
    notice. While Redis fails, each process counts alone (the flag is a signal, never a refusal).
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
        self._pending: dict[str, list[int]] = {}  # with Redis: client -> [samples, calls] since the flush

    def add(self, client: str, n: int) -> bool:
        """Count `n` samples; True when this call newly flags the client (with Redis: at the next flush)."""
        if self.redis is None:
            return self.add_local(client, n)
        entry = self._pending.setdefault(client, [0, 0])  # the event loop's thread only, like `flush`
        entry[0] += n
        entry[1] += 1
        return False

    async def flush(self) -> list[str]:
        """Add the counts gathered since the last flush to Redis in one round trip; the clients it flagged."""
        redis, pending = self.redis, self._pending
        if redis is None or not pending:
            return []
        self._pending = {}
        window = max(1, int(self.window_s))

        async def call(r: Redis) -> list[Any]:
            async with r.pipeline(transaction=False) as pipe:
                for client, (n, _) in pending.items():
                    key = redis.key("extraction", client)
                    pipe.incrby(key, n)
                    pipe.expire(key, window, nx=True)
                return list(await pipe.execute())

        try:
            results = await redis.run("extraction", call)
        except RedisUnavailable:
            for client, (n, calls) in pending.items():
                metrics.record_redis_fallback("extraction", "local", calls)
                self.add_local(client, n)
            return []
        flagged = []
        for (client, (n, _)), total in zip(pending.items(), results[::2], strict=True):
            # INCRBY is atomic: exactly one flush, of one process, crosses the threshold in each window.
            if int(total) - n <= self.threshold < int(total):
                self._flagged(client)
                flagged.append(client)
        return flagged

    async def run(self, interval_s: float = FLUSH_INTERVAL_S) -> None:
        """Flush every `interval_s` until cancelled (the lifespan flushes once more at shutdown)."""
        while True:
            await asyncio.sleep(interval_s)
            try:
                await self.flush()
            except Exception:  # a bug here must not end the flushing for the life of the process
                logger.exception("extraction counts: flush failed")

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
