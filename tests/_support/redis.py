"""Redis for tests: the server's availability and a key prefix of one test, whose keys are deleted after."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

REDIS_URL = os.environ.get("SDB_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
SKIP_REASON = f"no Redis server answers at {REDIS_URL} (SDB_TEST_REDIS_URL; .ci/run starts the local one)"

_available: bool | None = None


def redis_available() -> bool:
    """Whether a server answers at REDIS_URL (asked once per process)."""
    global _available
    if _available is None:
        import redis

        try:
            with redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2, socket_timeout=2) as r:
                _available = bool(r.ping())
        except (redis.RedisError, OSError):
            _available = False
    return _available


def redis_keys(prefix: str) -> dict[str, int]:
    """The keys under `prefix` and their remaining time to live in seconds."""
    import redis

    with redis.Redis.from_url(REDIS_URL, decode_responses=True) as r:
        return {key: int(r.ttl(key)) for key in r.scan_iter(match=prefix + "*")}


@contextmanager
def redis_prefix(prefix: str | None = None) -> Iterator[str]:
    """A key prefix no other test uses (or `prefix`); its keys are deleted afterwards."""
    import redis

    prefix = prefix or f"sdbtest:{uuid.uuid4().hex[:12]}:"
    try:
        yield prefix
    finally:
        with redis.Redis.from_url(REDIS_URL) as r:
            keys = list(r.scan_iter(match=prefix + "*"))
            if keys:
                r.delete(*keys)
