"""A TCP proxy in front of PostgreSQL that a test can cut, slow down and restore.

It lets the fault tests simulate "database down" and "slow database" without touching the shared
PostgreSQL server. The proxy runs its own asyncio loop in a daemon thread of the test process.

Modes:
- up:   bytes pass through (optionally each chunk delayed by `delay_s`, both directions).
- down: every open connection is aborted (RST-like close) and new ones are accepted and closed at once,
        so clients see "server closed the connection unexpectedly" immediately, like a stopped server.
- partitioned: connections stay open but no byte moves (a network partition, or a hung server); bytes
        held back flow again on `restore()`.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from dataclasses import dataclass


@dataclass
class ProxyConfig:
    upstream_host: str = "127.0.0.1"
    upstream_port: int = 5432
    listen_host: str = "127.0.0.1"
    chunk_bytes: int = 65536


class PgProxy:
    def __init__(self, config: ProxyConfig | None = None) -> None:
        self.config = config or ProxyConfig()
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="pgproxy", daemon=True)
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._upstream: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._down = False
        self._flowing: asyncio.Event | None = None
        self.delay_s = 0.0
        self.connections_total = 0
        self._cut_after_commit = 0

    # --- control (called from the test thread) ---

    def start(self) -> PgProxy:
        self._thread.start()
        fut = asyncio.run_coroutine_threadsafe(self._start(), self._loop)
        fut.result(timeout=10)
        return self

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(self._stop(), self._loop).result(timeout=10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)

    def cut(self) -> None:
        """Database "down": abort all connections and refuse new ones until `restore()`."""
        asyncio.run_coroutine_threadsafe(self._cut(), self._loop).result(timeout=10)

    def restore(self) -> None:
        self._down = False
        self.delay_s = 0.0
        self._loop.call_soon_threadsafe(self._set_flowing, True)

    def partition(self) -> None:
        """No byte moves until `restore()`; connections stay open."""
        self._loop.call_soon_threadsafe(self._set_flowing, False)

    def cut_after_next_commit(self, count: int = 1) -> None:
        """Forward the next `count` COMMITs to the server, then cut before its answer comes back: the
        client cannot know whether the transaction committed (it did). The proxy stays down until
        `restore()`."""
        self._cut_after_commit = count

    def slow(self, delay_s: float) -> None:
        """Delay every forwarded chunk by `delay_s` seconds (0 = no delay)."""
        self.delay_s = delay_s

    @property
    def is_down(self) -> bool:
        return self._down

    # --- loop side ---

    def _set_flowing(self, flowing: bool) -> None:
        assert self._flowing is not None
        if flowing:
            self._flowing.set()
        else:
            self._flowing.clear()

    async def _start(self) -> None:
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._server = await asyncio.start_server(self._handle, self.config.listen_host, 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _stop(self) -> None:
        if self._server is not None:
            self._server.close()
        await self._cut()
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _cut(self) -> None:
        self._down = True
        for w in list(self._writers):
            w.transport.abort()
        self._writers.clear()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._down:
            writer.transport.abort()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(
                self.config.upstream_host, self.config.upstream_port
            )
        except OSError:
            writer.transport.abort()
            return
        self.connections_total += 1
        self._writers.update((writer, up_writer))
        self._upstream.add(up_writer)
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))
        except asyncio.CancelledError:
            pass
        finally:
            self._tasks.discard(task)
            self._upstream.discard(up_writer)
            for w in (writer, up_writer):
                self._writers.discard(w)
                w.transport.abort()

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while not self._down:
                data = await reader.read(self.config.chunk_bytes)
                if not data:
                    break
                if self.delay_s > 0:
                    await asyncio.sleep(self.delay_s)
                assert self._flowing is not None
                await self._flowing.wait()
                if self._down:
                    break
                commit = bool(self._cut_after_commit) and writer in self._upstream and b"COMMIT\x00" in data
                if commit:
                    self._cut_after_commit -= 1
                    self._flowing.clear()  # hold the server's answer back (restore() lets bytes flow again)
                writer.write(data)
                await writer.drain()
                if commit:
                    await asyncio.sleep(0.2)  # the server commits; its answer never reaches the client
                    await self._cut()
        except (OSError, asyncio.CancelledError):
            pass
        finally:
            writer.transport.abort()
