"""The extraction-volume monitor: in the process, and in Redis shared by several processes."""

from __future__ import annotations

import asyncio

import pytest
from prometheus_client import REGISTRY

from service.limits.extraction import ExtractionMonitor
from service.limits.redis_backend import RedisBackend
from tests._support.net import free_port
from tests._support.redis import REDIS_URL, redis_keys


def flags() -> float:
    return REGISTRY.get_sample_value("sdb_extraction_flags_total", {"kind": "anonymous"}) or 0.0


def test_local_monitor_flags_once_per_window() -> None:
    before = flags()
    m = ExtractionMonitor(window_s=3600, threshold=10)
    assert [m.add_local("c", 6), m.add_local("c", 6), m.add_local("c", 6)] == [False, True, False]
    assert m.add_local("other", 6) is False
    assert flags() - before == 1


@pytest.mark.redis
def test_redis_counts_one_window_for_all_processes(redis_keys_prefix: str) -> None:
    before = flags()

    async def scenario() -> list[list[str]]:
        a, b = (RedisBackend(REDIS_URL, prefix=redis_keys_prefix, timeout_s=5.0, retry_s=2) for _ in "ab")
        ma, mb = (ExtractionMonitor(window_s=3600, threshold=10, redis=r) for r in (a, b))
        try:
            # 3 + 3 and 6 > 10 only together: neither process alone would flag the client.
            assert not any([ma.add("c", 3), ma.add("c", 3), mb.add("c", 6), mb.add("d", 6)])
            flushes = [await ma.flush(), await mb.flush()]
            ma.add("c", 6)
            return [*flushes, await ma.flush(), await ma.flush()]
        finally:
            await a.aclose()
            await b.aclose()

    assert asyncio.run(scenario()) == [[], ["c"], [], []]
    assert flags() - before == 1
    keys = redis_keys(redis_keys_prefix)
    assert set(keys) == {f"{redis_keys_prefix}extraction:c", f"{redis_keys_prefix}extraction:d"}
    assert all(3590 < ttl <= 3600 for ttl in keys.values()), keys  # the window ends; the key goes


def test_redis_outage_counts_in_the_process() -> None:
    fallbacks = REGISTRY.get_sample_value(
        "sdb_redis_fallbacks_total", {"operation": "extraction", "action": "local"}
    )

    async def scenario() -> tuple[list[str], bool]:
        r = RedisBackend(f"redis://127.0.0.1:{free_port()}/0", prefix="x:", timeout_s=0.25, retry_s=60)
        m = ExtractionMonitor(window_s=3600, threshold=10, redis=r)
        try:
            m.add("c", 6)
            m.add("c", 6)
            flagged = await m.flush()  # fails: the 12 samples are counted in the process, which flags
            return flagged, m.add_local("c", 1)
        finally:
            await r.aclose()

    before = flags()
    assert asyncio.run(scenario()) == ([], False)  # flagged once, by the fallback, not again
    assert flags() - before == 1
    after = REGISTRY.get_sample_value(
        "sdb_redis_fallbacks_total", {"operation": "extraction", "action": "local"}
    )
    assert (after or 0.0) - (fallbacks or 0.0) == 2
