"""The audit lifecycle of one keyed call: a refusal, or a reservation that then settles with its status.

Any route that answers the box's keyed outputs under the /distill-batch rules opens one `KeyedCall` per
request and tells it what happened; the call owns status -> audit row -> quota, the route maps outcomes to
HTTP. The rules:

- a call refused before its reservation (bad token, bad input, client gone) is audited with its status;
- `reserve` is ONE write transaction: the key and user re-checked, the request counted against the per-key
  rate, the samples taken from the quota and the audit row written (status 102); a refusal inside it is
  audited there too and raised as `DistillDenied`;
- `settle(200)` confirms the row before the answer may leave (`ReservationReleased` when the sweep of stale
  reservations closed it first: nothing charged, nothing may be answered); any other status records the
  failure and gives the samples back;
- a call that leaves its `async with call.reserved(...)` block unsettled is settled as abandoned (499,
  cancelled) or failed (500); one cancelled while its reservation commits is released as soon as it has.

Every transaction runs in a worker thread, which completes even if the request is cancelled meanwhile.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import numpy as np
from fastapi.concurrency import run_in_threadpool

from service.core.security import TokenClaims
from service.crud import audits, quota
from service.crud.quota import DistillGrant
from service.db.session import Database


class KeyedCall:
    """One keyed call's audit lifecycle (see the module doc): `reject`, or `async with reserved(...)` and
    `settle` inside it."""

    def __init__(
        self,
        db: Database,
        client_id: str | None,
        *,
        endpoint: str = audits.DISTILL_ENDPOINT,
        started: float | None = None,
    ) -> None:
        self.db = db
        self.client_id = client_id
        self.endpoint = endpoint
        self.started = time.perf_counter() if started is None else started
        self.grant: DistillGrant | None = None
        self._settled = False

    def _latency_ms(self) -> float:
        return (time.perf_counter() - self.started) * 1000

    async def reject(self, status: int, claims: TokenClaims | None = None, model: str | None = None) -> None:
        """Audit a call refused before its reservation, attributed to the token's user and key if any."""
        latency_ms = self._latency_ms()
        await run_in_threadpool(
            lambda: audits.audit_distill_rejection(
                self.db,
                endpoint=self.endpoint,
                status=status,
                model=model,
                client_id=self.client_id,
                user_id=claims.user_id if claims else None,
                key_id=claims.key_id if claims else None,
                latency_ms=latency_ms,
            )
        )

    @asynccontextmanager
    async def reserved(
        self, claims: TokenClaims, *, model: str, x: np.ndarray, rate_per_minute: int, watermark: bool = True
    ) -> AsyncIterator[DistillGrant]:
        """Authorize, rate-limit, take `len(x)` samples from the quota and write the audit row (one
        transaction; DistillDenied, audited, on a refusal; the key's watermark id on the row when its mark is
        on and `watermark`: the model allows marks), then run the block, which must `settle` the
        call; a block left unsettled settles it as abandoned (499, cancelled) or failed (500)."""

        def transaction() -> DistillGrant:
            return quota.reserve_distill(
                self.db,
                claims,
                model=model,
                n_samples=int(x.shape[0]),
                client_id=self.client_id,
                digest=audits.input_digest(x),
                rate_per_minute=rate_per_minute,
                started=self.started,
                endpoint=self.endpoint,
                watermark=watermark,
            )

        task = asyncio.ensure_future(run_in_threadpool(transaction))
        try:
            self.grant = await asyncio.shield(task)
        except asyncio.CancelledError:
            task.add_done_callback(self._release_abandoned)
            raise
        try:
            yield self.grant
        except BaseException as exc:
            if not self._settled:
                cancelled = isinstance(exc, asyncio.CancelledError)
                await self.settle(audits.STATUS_CANCELLED if cancelled else 500)
            raise
        if not self._settled:
            await self.settle(500)

    def _release_abandoned(self, task: asyncio.Future[DistillGrant]) -> None:
        """The call was cancelled while its reservation committed: give the samples back once it has."""
        if task.cancelled() or task.exception() is not None:
            return
        grant = task.result()
        latency_ms = self._latency_ms()
        asyncio.get_running_loop().run_in_executor(
            None,
            lambda: quota.finalize_distill(
                self.db, grant, status=audits.STATUS_CANCELLED, latency_ms=latency_ms
            ),
        )

    async def settle(self, status: int) -> None:
        """Close the reserved call with its status: 200 confirms it (raises ReservationReleased when it was
        released first); any other status records the failure and gives the samples back."""
        grant = self.grant
        if grant is None or self._settled:
            raise RuntimeError("settle() needs an open reservation")
        self._settled = True  # before the await: a cancellation now must not settle it twice
        latency_ms = self._latency_ms()
        await run_in_threadpool(
            lambda: quota.finalize_distill(self.db, grant, status=status, latency_ms=latency_ms)
        )
