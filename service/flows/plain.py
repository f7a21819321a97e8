"""The plain path as one flow shared by /predict and the Open Inference Protocol's anonymous `infer`.

`plain_call` wraps a call: it enforces the per-client /predict rate limit, and audits the call whatever
happens (the row is queued, so a slow or stopped database never blocks or fails the plain path).
`PlainCall.infer` runs the plain forward pass through the model's batcher and returns the probabilities.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import numpy as np
from fastapi import HTTPException, Request
from starlette.requests import ClientDisconnect

from service.core.errors import disconnect_status, inference_error, non_finite_error
from service.core.state import ServiceState, get_state
from service.crud import audits
from service.inference.registry import InferenceOverloaded, InferenceTimeout, ServedModel
from service.limits.ratelimit import LimitUnavailable, PredictRateLimit, RateLimiter
from service.observability import metrics
from service.outputs import NonFiniteOutputs, softmax

ENDPOINT = audits.PREDICT_ENDPOINT


async def enforce_predict_rate(limiter: PredictRateLimit, client: str) -> None:
    """Per-client rate limit of the plain path: 429 with Retry-After; 503 when its Redis fails and
    SDB_REDIS_FAILURE_MODE=closed."""
    try:
        wait = await limiter.acquire(client)
    except LimitUnavailable:
        retry = RateLimiter.retry_after(limiter.redis.retry_s if limiter.redis is not None else 1.0)
        raise HTTPException(
            status_code=503,
            detail="the /predict rate limit cannot be checked (its Redis does not answer); "
            f"retry in {retry} s",
            headers={"Retry-After": retry},
        ) from None
    if wait > 0:
        metrics.record_rate_limited(ENDPOINT)
        retry = RateLimiter.retry_after(wait)
        raise HTTPException(
            status_code=429,
            detail=f"rate limit of {limiter.per_minute} /predict requests a minute exceeded; "
            f"retry in {retry} s",
            headers={"Retry-After": retry},
        )


@dataclass
class PlainCall:
    state: ServiceState
    client: str
    start: float
    model_name: str | None = None
    n: int = 0
    digest: str | None = None

    async def infer(self, model: ServedModel, x: np.ndarray) -> np.ndarray:
        """The plain path's probabilities [N, num_classes] (float32) for a validated batch."""
        self.model_name, self.n = model.name, len(x)
        self.digest = audits.input_digest(x)
        try:
            logits = await model.infer("plain", x)
        except (InferenceTimeout, InferenceOverloaded) as exc:
            raise inference_error(exc) from None
        try:
            probs = softmax(logits)
        except NonFiniteOutputs as exc:
            raise non_finite_error(exc) from None
        self.state.extraction_monitor.add(self.client, self.n)
        return probs


@asynccontextmanager
async def plain_call(request: Request) -> AsyncIterator[PlainCall]:
    """One plain-path call: rate limit first, then the body of the `async with`; audited on every exit."""
    state = get_state(request)
    call = PlainCall(state, state.client_ids.anonymous_id(request), time.perf_counter())
    status = 500
    try:
        await enforce_predict_rate(state.predict_limiter, call.client)
        yield call
        status = 200
        if call.model_name is not None:  # counted with the request's metrics (metrics.ANSWERED_KEY)
            request.scope.setdefault("state", {})[metrics.ANSWERED_KEY] = (call.model_name, "plain", call.n)
    except HTTPException as exc:
        status = exc.status_code
        raise
    except ClientDisconnect:
        status = disconnect_status(request.scope)
        raise
    finally:
        state.audit_queue.submit(
            audits.predict_audit(
                model=call.model_name,
                client_id=call.client,
                n_samples=call.n,
                status=status,
                latency_ms=(time.perf_counter() - call.start) * 1000.0,
                input_digest=call.digest,
            )
        )
