"""A request's walk through the project's modules, module by module, from a profile hook.

Every call of a function of `service.*` or `sdb_core.*` is recorded with its thread; a coroutine resumed
after an await is the same call going on, not a new one. The walk of a request is the sequence of those
calls on the thread that ran its route (the event loop: the middleware, the route, what it calls and awaits
there; the work it hands to worker threads, a database transaction or a forward pass, counts as the one
call that handed it over). A *stay* is a maximal run of consecutive calls in one module; a *return* is a
stay in a module the walk had already left.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from types import FrameType
from typing import Any

PROJECT = ("service.", "sdb_core.")


@dataclass(frozen=True)
class Walk:
    stays: list[tuple[str, list[str]]]  # (module, the functions called there, in order)

    @property
    def returns(self) -> int:
        seen: set[str] = set()
        n = 0
        for module, _ in self.stays:
            n += module in seen
            seen.add(module)
        return n

    def __str__(self) -> str:
        lines = [f"{len(self.stays)} stays, {self.returns} returns:"]
        lines += [f"  {module}: {', '.join(functions)}" for module, functions in self.stays]
        return "\n".join(lines)


class WalkRecorder:
    """A profile hook (`sys.setprofile` / `threading.setprofile`) that records project calls while on."""

    def __init__(self) -> None:
        self.on = False
        self.calls: list[tuple[int, str, str]] = []  # (thread id, module, function)
        self._frames: dict[int, FrameType] = {}  # frames seen (kept alive: their ids stay unique)

    def __call__(self, frame: FrameType, event: str, arg: Any) -> None:
        if event != "call" or not self.on:
            return
        module = frame.f_globals.get("__name__", "")
        if not module.startswith(PROJECT) or id(frame) in self._frames:
            return
        self._frames[id(frame)] = frame
        self.calls.append((threading.get_ident(), module, frame.f_code.co_name))

    @contextmanager
    def recording(self) -> Iterator[None]:
        self.on = True
        try:
            yield
        finally:
            self.on = False

    def walk(self, module: str, function: str) -> Walk:
        """The walk of the thread that called `module.function` (the route) first."""
        thread = next(t for t, m, f in self.calls if (m, f) == (module, function))
        stays: list[tuple[str, list[str]]] = []
        for t, m, f in self.calls:
            if t != thread:
                continue
            if stays and stays[-1][0] == m:
                stays[-1][1].append(f)
            else:
                stays.append((m, [f]))
        return Walk(stays)


@contextmanager
def profiled(recorder: WalkRecorder) -> Iterator[WalkRecorder]:
    """Install the hook on this thread and on every thread started inside the block."""
    threading.setprofile(recorder)
    sys.setprofile(recorder)
    try:
        yield recorder
    finally:
        sys.setprofile(None)
        threading.setprofile(None)
