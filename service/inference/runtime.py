"""Process-wide runtime tuning for inference: device, torch threads, and returning freed memory to the OS."""

from __future__ import annotations

import contextlib
import ctypes
import os
import sys
import time
from typing import Any

import torch

from sdb_core import training


def resolve_device(device: str) -> torch.device:
    """sdb_core's device resolution, refusing SDB_DEVICE=cuda where there is no CUDA device."""
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("SDB_DEVICE=cuda but no CUDA device is available")
    return training.resolve_device(device)


def default_threads() -> int:
    """CPU cores available minus one (at least 1): the event loop keeps a core for HTTP work.

    On a busy CPU, intra-op threads that wait for each other at every operator are much slower than one
    thread when any of them is preempted, and the event loop of the same process preempts them constantly.
    """
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - non-Linux
        cores = os.cpu_count() or 1
    return max(1, cores - 1)


class MemoryTrimmer:
    """glibc only: give the freed activations of big batches back to the OS after the forward pass.

    glibc keeps freed heap memory for reuse (and raises its mmap threshold after large frees), so one big
    batch would pin its peak activation memory in the resident set for good. Trimming after large batches
    (rate-limited) costs a few page faults on the next big batch and keeps RSS close to live memory.
    Smaller batches reuse what is cached, untouched.
    """

    def __init__(self, min_input_bytes: int = 512 << 10, min_interval_s: float = 0.25) -> None:
        self.min_input_bytes = min_input_bytes
        self.min_interval_s = min_interval_s
        self._last = 0.0
        self._trim: Any = None
        if sys.platform.startswith("linux"):
            try:
                libc = ctypes.CDLL("libc.so.6")
                self._trim = libc.malloc_trim
                libc.mallopt(-8, 4)  # M_ARENA_MAX: no arena per short-lived helper thread
            except (OSError, AttributeError):  # pragma: no cover - musl and others
                self._trim = None

    def after_forward(self, input_bytes: int) -> None:
        if self._trim is None or input_bytes < self.min_input_bytes:
            return
        now = time.monotonic()
        if now - self._last >= self.min_interval_s:
            self._last = now
            self._trim(0)


def configure_torch(threads: int) -> int:
    """Set torch's intra-op threads once per process (0 = default_threads())."""
    if threads <= 0:
        threads = default_threads()
    torch.set_num_threads(threads)
    # Raises when already set, or once inter-op work has started in this process.
    with contextlib.suppress(RuntimeError):
        torch.set_num_interop_threads(1)
    return threads
