"""The /predict audit writer: calls are queued in memory and recorded by a background thread (aggregates and,
per SDB_PREDICT_AUDIT_ROWS, per-request rows: service.db.aggregates), so that a slow or stopped database
never blocks or fails /predict.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import select

from service.db.aggregates import AggregateWriter, new_token
from service.db.models import AuditFlush
from service.db.session import Database
from service.observability import metrics

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class AuditRecord:
    endpoint: str
    model: str | None
    client_id: str | None
    n_samples: int
    status: int
    latency_ms: float | None
    input_digest: str | None
    created_at: datetime


@dataclass(frozen=True)
class AuditQueueConfig:
    max_pending: int = 100_000  # beyond this, rows are dropped and counted (sdb_predict_audit_dropped_total)
    batch_size: int = 500
    interval_s: float = 0.25
    retry_s: float = 1.0
    flush_timeout_s: float = 10.0
    maintenance_s: float = 5.0  # how often `maintenance` (the /distill-batch rollup) runs in the writer


class AuditQueue:
    """Writes /predict audit rows from a background thread, so that a slow or stopped database never blocks
    or fails /predict. Rows wait in memory (bounded) while the database is down and are written when it
    returns; `close()` flushes what is left (called at shutdown, after uvicorn finished in-flight requests).
    """

    def __init__(
        self,
        db: Database,
        config: AuditQueueConfig | None = None,
        writer: AggregateWriter | None = None,
        maintenance: Callable[[], object] | None = None,
    ) -> None:
        self.db = db
        self.cfg = config or AuditQueueConfig()
        self.writer = writer or AggregateWriter()
        self.maintenance = maintenance
        self._last_maintenance = 0.0
        self._pending: deque[AuditRecord] = deque()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._idle = threading.Event()
        self._idle.set()
        self._thread: threading.Thread | None = None
        # A batch whose write failed may still have committed (the answer to COMMIT lost): (marker, size).
        self._unsure: tuple[str, int] | None = None

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="sdb-audit-writer", daemon=True)
            self._thread.start()

    def submit(self, record: AuditRecord) -> None:
        with self._lock:
            if len(self._pending) >= self.cfg.max_pending:
                metrics.record_audit_dropped()
                return
            self._pending.append(record)
            self._idle.clear()
            if len(self._pending) >= self.cfg.batch_size:
                self._wake.set()

    @property
    def pending(self) -> int:
        with self._lock:
            return len(self._pending)

    def _take(self) -> list[AuditRecord]:
        with self._lock:
            n = min(len(self._pending), self.cfg.batch_size)
            return [self._pending.popleft() for _ in range(n)]

    def _put_back(self, batch: list[AuditRecord]) -> None:
        with self._lock:
            self._pending.extendleft(reversed(batch))

    def _write(self, batch: list[AuditRecord], token: str) -> None:
        with self.db.write_connection() as conn:
            self.writer.write(conn, batch, token)

    def _drain(self) -> bool:
        """Write everything pending; False if the database refused (the rows stay queued)."""
        while True:
            if self._unsure is not None and not self._resolve_unsure():
                return False
            batch = self._take()
            if not batch:
                with self._lock:
                    if not self._pending:
                        self._idle.set()
                return True
            token = new_token()
            try:
                self._write(batch, token)
            except Exception as exc:
                self._put_back(batch)
                self._unsure = (token, len(batch))
                logger.debug("audit writer: batch failed", exc_info=True)
                logger.warning(
                    "audit writer: database unavailable (%s), %d rows kept", type(exc).__name__, self.pending
                )
                return False

    def _resolve_unsure(self) -> bool:
        """Before retrying a failed batch, look whether it committed after all, so that no row is written
        twice. False while the database cannot be asked."""
        assert self._unsure is not None
        token, n = self._unsure
        try:
            with self.db.session() as s:
                found = s.scalar(select(AuditFlush.token).where(AuditFlush.token == token))
        except Exception:
            return False
        if found:  # the batch is a prefix of the queue (put back in front): drop it, it is written
            with self._lock:
                for _ in range(min(n, len(self._pending))):
                    self._pending.popleft()
        self._unsure = None
        return True

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.cfg.interval_s)
            self._wake.clear()
            if not self._drain():
                self._stop.wait(self.cfg.retry_s)
                continue
            self._maintain()

    def _maintain(self) -> None:
        if self.maintenance is None or time.monotonic() - self._last_maintenance < self.cfg.maintenance_s:
            return
        self._last_maintenance = time.monotonic()
        try:
            self.maintenance()
        except Exception as exc:  # the database may be down: the next round retries
            logger.info("audit maintenance skipped: %s", type(exc).__name__)

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until everything submitted so far is written (True) or the timeout passes (False)."""
        self._wake.set()
        return self._idle.wait(self.cfg.flush_timeout_s if timeout is None else timeout)

    def close(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=self.cfg.flush_timeout_s)
            self._thread = None
        deadline = time.monotonic() + self.cfg.flush_timeout_s
        while self.pending and time.monotonic() < deadline:
            if not self._drain():
                time.sleep(min(self.cfg.retry_s, max(0.0, deadline - time.monotonic())))
        if self.pending:
            lost = self.pending
            metrics.record_audit_dropped(lost)
            logger.error("audit writer: %d /predict audit rows could not be written before exit", lost)


__all__ = ["AuditQueue", "AuditQueueConfig", "AuditRecord"]
