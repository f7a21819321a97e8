"""Dynamic batcher: merging, limits, chunking, errors, cancellation, off-loop execution."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from service.inference.batcher import BatcherConfig, BatcherOverloaded, DynamicBatcher, fastest_forward_batch


class Recorder:
    """fn(x) = 2x summed per row, remembering each batch's size and thread."""

    def __init__(self, fail_once: bool = False, gate: threading.Event | None = None) -> None:
        self.sizes: list[int] = []
        self.threads: set[str] = set()
        self.fail_once = fail_once
        self.gate = gate

    def __call__(self, x: np.ndarray) -> np.ndarray:
        if self.gate is not None:
            self.gate.wait(5)
        self.sizes.append(len(x))
        self.threads.add(threading.current_thread().name)
        if self.fail_once:
            self.fail_once = False
            raise RuntimeError("forward failed")
        return (2 * x).reshape(len(x), -1).sum(axis=1, keepdims=True)


@pytest.fixture
def executor() -> ThreadPoolExecutor:
    ex = ThreadPoolExecutor(max_workers=1, thread_name_prefix="test-inference")
    yield ex
    ex.shutdown(wait=False)


def rows(start: int, n: int) -> np.ndarray:
    return np.arange(start, start + n, dtype=np.float32).reshape(n, 1)


def run(coro):
    return asyncio.run(coro)


def test_concurrent_requests_share_one_forward_pass(executor: ThreadPoolExecutor) -> None:
    fn = Recorder()
    b = DynamicBatcher(fn, executor, BatcherConfig(max_batch_size=64, max_delay_s=0.2))

    async def main() -> list[np.ndarray]:
        return await asyncio.gather(*(b.submit(rows(10 * i, 2)) for i in range(8)))

    outs = run(main())
    assert fn.sizes == [16]
    for i, out in enumerate(outs):  # each caller gets exactly its own rows back
        np.testing.assert_array_equal(out[:, 0], 2 * rows(10 * i, 2)[:, 0])


def test_batches_never_exceed_max_batch_size(executor: ThreadPoolExecutor) -> None:
    gate = threading.Event()
    fn = Recorder(gate=gate)
    b = DynamicBatcher(fn, executor, BatcherConfig(max_batch_size=8, max_delay_s=0.05))

    async def main() -> list[np.ndarray]:
        tasks = [asyncio.ensure_future(b.submit(rows(i, 3))) for i in range(10)]
        await asyncio.sleep(0.1)
        gate.set()
        return await asyncio.gather(*tasks)

    outs = run(main())
    assert sum(fn.sizes) == 30
    assert max(fn.sizes) <= 8
    for i, out in enumerate(outs):
        np.testing.assert_array_equal(out[:, 0], 2 * rows(i, 3)[:, 0])


def test_oversized_request_runs_in_chunks(executor: ThreadPoolExecutor) -> None:
    fn = Recorder()
    b = DynamicBatcher(fn, executor, BatcherConfig(max_batch_size=8, max_delay_s=0.0))
    out = run(b.submit(rows(0, 20)))
    assert fn.sizes == [7, 7, 6]  # equal chunks of at most max_batch_size
    np.testing.assert_array_equal(out[:, 0], 2 * rows(0, 20)[:, 0])


def test_batching_off_runs_each_request_alone(executor: ThreadPoolExecutor) -> None:
    fn = Recorder()
    b = DynamicBatcher(fn, executor, BatcherConfig(max_batch_size=64, max_delay_s=0.2, enabled=False))

    async def main() -> list[np.ndarray]:
        return await asyncio.gather(*(b.submit(rows(i, 1)) for i in range(5)))

    outs = run(main())
    assert fn.sizes == [1] * 5
    assert [float(o[0, 0]) for o in outs] == [2.0 * i for i in range(5)]


def test_forward_runs_off_the_event_loop_thread(executor: ThreadPoolExecutor) -> None:
    fn = Recorder()
    b = DynamicBatcher(fn, executor, BatcherConfig(max_delay_s=0.0))
    run(b.submit(rows(0, 1)))
    assert fn.threads and all(name.startswith("test-inference") for name in fn.threads)


def test_error_reaches_every_request_of_the_batch_and_batcher_recovers(executor: ThreadPoolExecutor) -> None:
    fn = Recorder(fail_once=True)
    b = DynamicBatcher(fn, executor, BatcherConfig(max_batch_size=64, max_delay_s=0.1))

    async def main() -> tuple[list[object], np.ndarray]:
        results = await asyncio.gather(*(b.submit(rows(i, 1)) for i in range(3)), return_exceptions=True)
        after = await b.submit(rows(7, 1))
        return results, after

    results, after = run(main())
    assert all(isinstance(r, RuntimeError) for r in results)
    assert float(after[0, 0]) == 14.0


def test_cancelled_request_is_skipped_others_served(executor: ThreadPoolExecutor) -> None:
    gate = threading.Event()
    fn = Recorder(gate=gate)
    b = DynamicBatcher(fn, executor, BatcherConfig(max_batch_size=4, max_delay_s=0.0))

    async def main() -> np.ndarray:
        first = asyncio.ensure_future(b.submit(rows(0, 4)))  # occupies the executor until the gate opens
        await asyncio.sleep(0.05)
        doomed = asyncio.ensure_future(b.submit(rows(100, 4)))
        kept = asyncio.ensure_future(b.submit(rows(200, 4)))
        await asyncio.sleep(0.01)
        doomed.cancel()
        gate.set()
        await first
        return await kept

    kept = run(main())
    np.testing.assert_array_equal(kept[:, 0], 2 * rows(200, 4)[:, 0])
    assert fn.sizes == [4, 4]  # the cancelled request never reached the model


def test_full_queue_is_refused(executor: ThreadPoolExecutor) -> None:
    gate = threading.Event()
    fn = Recorder(gate=gate)
    b = DynamicBatcher(fn, executor, BatcherConfig(max_batch_size=4, max_delay_s=0.0, max_pending_samples=8))

    async def main() -> None:
        first = asyncio.ensure_future(b.submit(rows(0, 4)))
        await asyncio.sleep(0.05)
        queued = [asyncio.ensure_future(b.submit(rows(0, 4))) for _ in range(2)]
        await asyncio.sleep(0)
        with pytest.raises(BatcherOverloaded):
            await b.submit(rows(0, 4))
        gate.set()
        await asyncio.gather(first, *queued)

    run(main())


def test_batcher_survives_a_new_event_loop(executor: ThreadPoolExecutor) -> None:
    fn = Recorder()
    b = DynamicBatcher(fn, executor, BatcherConfig(max_delay_s=0.0))
    assert float(run(b.submit(rows(1, 1)))[0, 0]) == 2.0
    assert float(run(b.submit(rows(2, 1)))[0, 0]) == 4.0


def test_big_inputs_run_in_memory_bounded_chunks(executor: ThreadPoolExecutor) -> None:
    fn = Recorder()
    config = BatcherConfig(max_batch_size=64, max_delay_s=0.0, max_forward_bytes=4 * 256 * 4)
    b = DynamicBatcher(fn, executor, config)
    x = np.ones((10, 256), dtype=np.float32)  # 1 KiB per sample: 4 samples per forward pass
    out = run(b.submit(x))
    assert fn.sizes == [4, 4, 2]
    np.testing.assert_array_equal(out[:, 0], np.full(10, 512.0))


def test_a_lone_client_pays_no_batching_delay(
    executor: ThreadPoolExecutor, monkeypatch: pytest.MonkeyPatch
) -> None:
    fn = Recorder()
    b = DynamicBatcher(fn, executor, BatcherConfig(max_batch_size=64, max_delay_s=0.05))
    waits: list[int] = []
    original = b._wait_for_more

    async def counting(loop: asyncio.AbstractEventLoop) -> None:
        waits.append(len(b._queue))
        await original(loop)

    monkeypatch.setattr(b, "_wait_for_more", counting)

    async def main() -> None:
        for i in range(4):  # one request at a time
            await b.submit(rows(i, 1))
        await asyncio.gather(*(b.submit(rows(i, 1)) for i in range(3)))  # then several at once

    run(main())
    assert waits[0] == 1  # the first batch waits (nothing known yet)
    assert waits[1:2] == [3]  # sequential single requests did not; the concurrent burst did
    assert fn.sizes == [1, 1, 1, 1, 3]


class FakeClock:
    """Seconds that pass only when a fake forward pass says so."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_fastest_forward_batch_finds_the_peak_and_forward_passes_are_capped_at_it(
    executor: ThreadPoolExecutor,
) -> None:
    clock = FakeClock()

    def fn(x: np.ndarray) -> np.ndarray:  # per-sample cost jumps above 32 samples (a cache that overflows)
        n = len(x)
        clock.now += 0.002 + 0.0001 * n if n <= 32 else 0.0004 * n
        return x[:, :2] * 2

    cap, rates = fastest_forward_batch(fn, np.ones((1, 4), dtype=np.float32), 64, clock=clock)
    assert sorted(rates) == [8, 16, 32, 64]
    assert cap == 32, rates
    recorder = Recorder()
    b = DynamicBatcher(recorder, executor, BatcherConfig(max_batch_size=256, max_delay_s=0.0))
    b.forward_cap = cap
    run(b.submit(np.ones((100, 4), dtype=np.float32)))
    assert recorder.sizes == [25, 25, 25, 25]  # equal chunks of at most 32


def test_fastest_forward_batch_stops_growing_past_a_slow_forward_pass() -> None:
    calls: list[int] = []
    clock = FakeClock()

    def fn(x: np.ndarray) -> np.ndarray:
        calls.append(len(x))
        clock.now += 0.004 * len(x)
        return x

    # 8 samples take 32 ms, 16 take 64 ms: the 50 ms line lies between
    cap, rates = fastest_forward_batch(
        fn, np.ones((1, 1), dtype=np.float32), 256, slow_forward_s=0.05, clock=clock
    )
    assert max(calls) == 16 and sorted(rates) == [8, 16]  # 16 samples took >= 50 ms: no 32, 64, ...
    assert cap in rates
