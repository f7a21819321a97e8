"""The in-process extraction monitor: flags anonymous clients that pull many /predict samples."""

from __future__ import annotations

import logging
import threading
import time

from service import metrics

logger = logging.getLogger(__name__)


class ExtractionMonitor:
    """Flags anonymous clients whose /predict volume passes `threshold` samples in a fixed window.

    The flag is exported as a metric (no client id in labels) and logged with the client's anonymous id;
    the admin API computes the same rule from the audit table over any time range.
    """

    def __init__(self, window_s: float, threshold: int, max_clients: int = 100_000) -> None:
        self.window_s = window_s
        self.threshold = threshold
        self.max_clients = max_clients
        self._counts: dict[str, tuple[float, int, bool]] = {}
        self._lock = threading.Lock()

    def add(self, client: str, n: int) -> bool:
        """Count `n` samples; True when this call newly flags the client."""
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
            metrics.record_extraction_flag("anonymous")
            logger.warning(
                "client %s passed %d /predict samples in %.0f s", client, self.threshold, self.window_s
            )
        return newly
