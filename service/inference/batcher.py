"""Dynamic batching: concurrent requests for one (model, path) share one forward pass.

Requests wait in a queue owned by the event loop. A collector task takes the oldest request, waits at most
`max_delay_s` from that request's arrival for others (or until `max_batch_size` samples are queued; no
wait while requests come one at a time, i.e. the last batch held a single request and no other waits),
concatenates them and runs the forward pass on the inference executor (a dedicated thread, never the event
loop). Requests that arrive during a forward pass form the next batch, so under load batches grow by
themselves. A request larger than `max_batch_size` runs alone, in chunks of `max_batch_size`; big inputs
run in chunks of at most `max_forward_bytes` of input (memory bound), and of at most `forward_cap` samples
when the model's fastest forward batch was measured at start (`fastest_forward_batch`).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import time
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class BatcherConfig:
    max_batch_size: int = 256
    max_delay_s: float = 0.002
    enabled: bool = True
    # Samples allowed to wait in one queue; beyond it a request is refused at once (503), bounding memory.
    max_pending_samples: int = 256 * 64
    # Input bytes per forward pass: a formed batch runs in chunks of at most this much input, which bounds
    # the activation (and im2col) memory of big-input models: a ResNet-20 at batch 256 peaks ~200 MB above
    # its idle RSS, in chunks of ~85 samples ~50 MB, at the same or better samples/s on CPU.
    max_forward_bytes: int = 1 << 20


class BatcherOverloaded(RuntimeError):
    """The queue of this (model, path) is full."""


InferFn = Callable[[np.ndarray], np.ndarray]
BatchObserver = Callable[[int, float], None]


class _Pending:
    __slots__ = ("arrived", "future", "x")

    def __init__(self, x: np.ndarray, future: asyncio.Future[np.ndarray], arrived: float) -> None:
        self.x = x
        self.future = future
        self.arrived = arrived


class DynamicBatcher:
    """Merges concurrent `submit` calls into forward passes of `fn` ([N, ...] -> [N, C])."""

    def __init__(
        self,
        fn: InferFn,
        executor: Executor,
        config: BatcherConfig,
        on_batch: BatchObserver | None = None,
    ) -> None:
        self._fn = fn
        self._executor = executor
        self.config = config
        self._on_batch = on_batch
        self._queue: collections.deque[_Pending] = collections.deque()
        self._queued_samples = 0
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._last_merged = True
        self.forward_cap: int | None = None  # samples per forward pass, from fastest_forward_batch

    async def submit(self, x: np.ndarray) -> np.ndarray:
        """Run `fn` on `x` (possibly together with other requests) and return this request's rows."""
        loop = asyncio.get_running_loop()
        if not self.config.enabled:
            return await loop.run_in_executor(self._executor, self.run_now, x)
        if self._queued_samples + len(x) > self.config.max_pending_samples and self._queue:
            raise BatcherOverloaded("inference queue is full")
        self._ensure_collector(loop)
        assert self._wakeup is not None
        future: asyncio.Future[np.ndarray] = loop.create_future()
        self._queue.append(_Pending(x, future, loop.time()))
        self._queued_samples += len(x)
        self._wakeup.set()
        return await future

    @property
    def fn(self) -> InferFn:
        """The forward function itself (no batching, no batch metrics)."""
        return self._fn

    def chunk_size(self, x: np.ndarray) -> int:
        per_sample = max(1, x[:1].nbytes)
        cap = min(self.config.max_batch_size, self.config.max_forward_bytes // per_sample)
        if self.forward_cap is not None:
            cap = min(cap, self.forward_cap)
        return max(1, cap)

    def run_now(self, x: np.ndarray) -> np.ndarray:
        """Forward `x` synchronously in equal chunks of at most `chunk_size(x)` (called on the executor)."""
        cap = self.chunk_size(x)
        if len(x) <= cap:
            return self._forward(x)
        chunks = -(-len(x) // cap)
        size = -(-len(x) // chunks)  # 256 at a cap of 85 -> 4 x 64, not 85 + 85 + 85 + 1
        return np.concatenate([self._forward(x[i : i + size]) for i in range(0, len(x), size)])

    def _forward(self, x: np.ndarray) -> np.ndarray:
        start = time.perf_counter()
        out = self._fn(x)
        if self._on_batch is not None:
            self._on_batch(len(x), time.perf_counter() - start)
        return out

    def _ensure_collector(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._task is not None and self._loop is loop and not self._task.done():
            return
        if self._loop is not loop:
            # First use, or a new event loop (tests run several): the old queue's futures are dead with it.
            self._loop = loop
            self._wakeup = asyncio.Event()
            self._queue.clear()
            self._queued_samples = 0
        self._task = loop.create_task(self._collect(), name="sdb-batcher")

    def _take_batch(self) -> list[_Pending]:
        batch: list[_Pending] = []
        total = 0
        while self._queue:
            item = self._queue[0]
            if item.future.done():  # cancelled by its deadline while waiting
                self._queue.popleft()
                self._queued_samples -= len(item.x)
                continue
            if batch and total + len(item.x) > self.config.max_batch_size:
                break
            self._queue.popleft()
            self._queued_samples -= len(item.x)
            batch.append(item)
            total += len(item.x)
        return batch

    async def _wait_for_more(self, loop: asyncio.AbstractEventLoop) -> None:
        assert self._wakeup is not None
        deadline = self._queue[0].arrived + self.config.max_delay_s
        while self._queued_samples < self.config.max_batch_size:
            remaining = deadline - loop.time()
            if remaining <= 0:
                return
            self._wakeup.clear()
            try:
                await asyncio.wait_for(self._wakeup.wait(), remaining)
            except TimeoutError:
                return

    async def _collect(self) -> None:
        loop = asyncio.get_running_loop()
        assert self._wakeup is not None
        while True:
            if not self._queue:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            # Wait for company only when it is likely: the last batch merged requests, or several queue now.
            # A lone client (each batch of one request) then pays no delay at all.
            if self.config.max_delay_s > 0 and (self._last_merged or len(self._queue) > 1):
                await self._wait_for_more(loop)
            batch = self._take_batch()
            self._last_merged = len(batch) > 1
            if not batch:
                continue
            try:
                x = batch[0].x if len(batch) == 1 else np.concatenate([p.x for p in batch])
                out = await loop.run_in_executor(self._executor, self.run_now, x)
            except asyncio.CancelledError:
                for p in batch:
                    p.future.cancel()
                raise
            except Exception as exc:  # the forward pass failed: every request of the batch gets the error
                for p in batch:
                    if not p.future.done():
                        p.future.set_exception(exc)
                continue
            offset = 0
            for p in batch:
                n = len(p.x)
                if not p.future.done():
                    p.future.set_result(out[offset : offset + n])
                offset += n

    async def aclose(self) -> None:
        if self._task is not None and not self._task.done():
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, RuntimeError):
                await self._task
        self._task = None


def fastest_forward_batch(
    fn: InferFn,
    sample: np.ndarray,
    max_size: int,
    *,
    tolerance: float = 0.1,
    rounds: int = 3,
    budget_s: float = 0.03,
    slow_forward_s: float = 0.5,
    clock: Callable[[], float] = time.perf_counter,
) -> tuple[int, dict[int, float]]:
    """Time `fn` at batch 8, 16, 32, ... up to `max_size` and return the largest batch whose samples/s is
    within `tolerance` of the best, with the samples/s measured at each size.

    On CPU, throughput peaks where a batch's activations still fit the caches and then falls (the demo
    CNN: ~70k samples/s at 64, ~30k at 256), so a big request runs faster in chunks of the peak size. The
    sizes are timed in `rounds` interleaved rounds of about `budget_s` each (best run per size), so that a
    slow spell of a shared machine does not single one size out; sizes above the first whose single
    forward pass takes `slow_forward_s` are not tried. `clock`: seconds (a seam for tests)."""
    sizes, size = [], min(8, max_size)
    while True:
        sizes.append(size)
        if size >= max_size:
            break
        size = min(2 * size, max_size)
    rates: dict[int, float] = {}
    for _ in range(rounds):
        for s in sizes:
            x = np.repeat(sample[:1], s, axis=0)
            if s not in rates:
                fn(x)  # warm-up: allocator and kernels for this shape
            spent, runs = 0.0, 0
            while runs == 0 or spent < budget_s:
                start = clock()
                fn(x)
                elapsed = clock() - start
                spent, runs = spent + elapsed, runs + 1
                rates[s] = max(rates.get(s, 0.0), s / max(elapsed, 1e-9))
            if elapsed >= slow_forward_s:
                sizes = [t for t in sizes if t <= s]
                break
    peak = max(rates.values())
    return max(s for s, r in rates.items() if r >= (1.0 - tolerance) * peak), rates
