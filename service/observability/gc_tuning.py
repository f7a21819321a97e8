"""Garbage-collector settings for a serving process: the cause of /predict's tail latency (issue 15,
docs/benchmarks.md).

With CPython's defaults (thresholds 700, 10, 10) a server answering ~1,000 requests/s runs a full
(generation 2) collection every few seconds, and each one walks every object the process holds: ~340,000
after start-up (torch, the traced models, FastAPI's routes, pydantic's and SQLAlchemy's machinery), 100-550
ms on a busy 2-core machine with the event loop stopped. Every request in flight waits it out: /predict's
p99 was 10-15x its median.

`tune_gc` runs once, after start-up: one full collection, then `gc.freeze()` moves every survivor into
the permanent generation, which later collections never walk (those objects live as long as the process).
A larger generation-0 threshold then lets the objects of requests in flight die by reference count before
a collection sees them: with 700, the ~2,000 container objects of 32 concurrent requests alone trigger a
collection every ~10 requests and get promoted into older generations; with 10,000, collections become rare.
"""

from __future__ import annotations

import gc
import logging
import time
from typing import Any

from service.observability import metrics

logger = logging.getLogger(__name__)

Thresholds = tuple[int, int, int]


class _PauseTimer:
    """A `gc.callbacks` entry that times every collection into `sdb_gc_pause_seconds`."""

    def __init__(self) -> None:
        self._start = 0.0

    def __call__(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._start = time.perf_counter()
        else:
            metrics.record_gc_pause(int(info["generation"]), time.perf_counter() - self._start)


def observe_gc_pauses() -> None:
    """Time every collection of this process into the metrics (once per process; a few microseconds each)."""
    if not any(isinstance(cb, _PauseTimer) for cb in gc.callbacks):
        gc.callbacks.append(_PauseTimer())


def tune_gc(freeze: bool, gen0_threshold: int) -> Thresholds:
    """Collect and freeze what survived start-up (if `freeze`), and set the generation-0 threshold (0 =
    leave it). Returns the thresholds in force before, for `release_gc`."""
    before: Thresholds = gc.get_threshold()
    if freeze:
        gc.collect()
        gc.freeze()
    if gen0_threshold > 0:
        gc.set_threshold(gen0_threshold, before[1], before[2])
    gen0, gen1, gen2 = gc.get_threshold()
    logger.info(
        "garbage collector: %d start-up objects frozen, thresholds %d/%d/%d",
        gc.get_freeze_count(), gen0, gen1, gen2,
    )  # fmt: skip
    return before


def release_gc(before: Thresholds) -> None:
    """At shutdown: give the frozen objects back to the collector and restore the thresholds (several apps
    in one process, as in tests, would otherwise keep each one's cyclic garbage for good)."""
    gc.unfreeze()
    gc.set_threshold(*before)
