"""POST /distill-batch: keyed soft labels for licensed users.

Order of a call: token signature/claims (no database) -> inputs decoded and validated -> ONE write
transaction that re-checks the key and user, counts the request against the per-key rate limit, consumes
the sample quota and writes the audit row -> the keyed forward pass (the box key is applied server-side
and never leaves the process) -> the audit row is confirmed. Any database failure answers 503 and no soft
labels are sent without a committed audit row. Refused calls are audited too.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable
from typing import Any

import numpy as np
from fastapi import APIRouter, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import Response

from service import crud, metrics
from service.crud import DistillDenied, DistillGrant
from service.db.session import Database
from service.deps import BearerCredentials, client_id_of, get_db, get_token_config, unauthorized
from service.inference.decode import decode_inputs
from service.inference.registry import InferenceOverloaded, InferenceTimeout
from service.schemas import (
    ERROR_RESPONSES,
    DistillRequest,
    DistillResponse,
    FastJSONResponse,
    request_body_openapi,
)
from service.security import TokenClaims, TokenError, verify_token

router = APIRouter(tags=["distill"])

ENDPOINT = crud.DISTILL_ENDPOINT
MAX_TEMPERATURE = 1000.0

_OPENAPI = request_body_openapi(DistillRequest)
_OPENAPI["parameters"] = [
    {
        "name": "model",
        "in": "query",
        "required": False,
        "schema": {"type": "string", "minLength": 1, "maxLength": 128},
        "description": "Model, for application/x-npy bodies.",
    },
    {
        "name": "temperature",
        "in": "query",
        "required": False,
        "schema": {"type": "number", "exclusiveMinimum": 0, "maximum": MAX_TEMPERATURE},
        "description": "Softmax temperature, for application/x-npy bodies.",
    },
]

RESPONSES: dict[int | str, dict[str, Any]] = {
    **ERROR_RESPONSES,
    401: {
        "description": "Missing, malformed, expired or otherwise invalid token; revoked key; disabled user."
    },
    403: {"description": "The token's scopes do not include this model."},
    429: {"description": "Per-key rate limit (Retry-After) or sample quota exhausted."},
    503: {"description": "Database unavailable (fails closed), overloaded, or no model loaded."},
}


def soft_labels(logits: np.ndarray, temperature: float) -> np.ndarray:
    z = logits.astype(np.float64) / temperature
    z -= z.max(axis=1, keepdims=True)
    e = np.exp(z)
    out: np.ndarray = (e / e.sum(axis=1, keepdims=True)).astype(np.float32)
    return out


def _query(request: Request) -> dict[str, Any]:
    q: dict[str, Any] = {}
    allowed = {"model", "temperature"}
    for k in request.query_params:
        if k not in allowed:
            raise HTTPException(status_code=422, detail=f"unknown query parameter {k[:40]!r}")
        if len(request.query_params.getlist(k)) != 1:
            raise HTTPException(status_code=422, detail=f"query parameter {k!r} given more than once")
    model = request.query_params.get("model")
    if model is not None:
        if not 1 <= len(model) <= 128:
            raise HTTPException(status_code=422, detail="query parameter `model` must be 1..128 characters")
        q["model"] = model
    temperature = request.query_params.get("temperature")
    if temperature is not None:
        q["temperature"] = _temperature(temperature)
    return q


def _temperature(value: Any) -> float:
    try:
        t = float(value)
    except (TypeError, ValueError):
        raise HTTPException(status_code=422, detail="temperature must be a number") from None
    if not math.isfinite(t) or not 0 < t <= MAX_TEMPERATURE:
        raise HTTPException(status_code=422, detail=f"temperature must be in (0, {MAX_TEMPERATURE:g}]")
    return t


def _quota_headers(quota: int | None, used: int | None) -> dict[str, str]:
    if quota is None:
        return {
            "X-Quota-Limit": "unlimited",
            "X-Quota-Remaining": "unlimited",
            "X-Quota-Used": str(used or 0),
        }
    used = used or 0
    return {
        "X-Quota-Limit": str(quota),
        "X-Quota-Used": str(used),
        "X-Quota-Remaining": str(max(0, quota - used)),
    }


def _denied(d: DistillDenied, model: str) -> HTTPException:
    if d.status == 401:
        metrics.record_auth_failure(d.reason)
        return unauthorized()
    if d.reason == "rate":
        metrics.record_rate_limited(ENDPOINT)
        return HTTPException(
            status_code=429,
            detail={"error": d.error, "message": d.message},
            headers={"Retry-After": str(d.retry_after or 60)},
        )
    if d.reason == "quota":
        metrics.record_quota_rejection(model)
        remaining = max(0, (d.quota or 0) - (d.used or 0))
        return HTTPException(
            status_code=429,
            detail={
                "error": d.error,
                "message": d.message,
                "quota": d.quota,
                "used": d.used,
                "remaining": remaining,
            },
            headers=_quota_headers(d.quota, d.used),
        )
    if d.status == 403:
        metrics.record_auth_failure("scope")
    return HTTPException(status_code=d.status, detail={"error": d.error, "message": d.message})


async def _audit_rejection(
    db: Database, status: int, client: str | None, claims: TokenClaims | None, model: str | None, t0: float
) -> None:
    await run_in_threadpool(
        lambda: crud.audit_distill_rejection(
            db,
            status=status,
            model=model,
            n_samples=0,
            client_id=client,
            user_id=claims.user_id if claims else None,
            key_id=claims.key_id if claims else None,
            latency_ms=(time.perf_counter() - t0) * 1000,
        )
    )


STATUS_CANCELLED = 499  # the call was abandoned (client gone, deadline, shutdown) after its reservation


async def _finalize(db: Database, grant: DistillGrant, status: int, t0: float) -> None:
    # The transaction runs in a worker thread, which completes even if this coroutine is cancelled.
    latency_ms = (time.perf_counter() - t0) * 1000
    await run_in_threadpool(lambda: crud.finalize_distill(db, grant, status=status, latency_ms=latency_ms))


def _release_abandoned(db: Database, t0: float) -> Callable[[asyncio.Future[DistillGrant]], None]:
    """When a call is cancelled while its reservation commits, give the samples back once it has."""

    def done(task: asyncio.Future[DistillGrant]) -> None:
        if task.cancelled() or task.exception() is not None:
            return
        grant = task.result()
        latency_ms = (time.perf_counter() - t0) * 1000
        asyncio.get_running_loop().run_in_executor(
            None, lambda: crud.finalize_distill(db, grant, status=STATUS_CANCELLED, latency_ms=latency_ms)
        )

    return done


async def _reserve(db: Database, t0: float, fn: Callable[[], DistillGrant]) -> DistillGrant:
    task = asyncio.ensure_future(run_in_threadpool(fn))
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        task.add_done_callback(_release_abandoned(db, t0))
        raise


@router.post(
    "/distill-batch",
    response_model=DistillResponse,
    response_class=FastJSONResponse,
    summary="Keyed soft labels for distillation (licensed users)",
    openapi_extra=_OPENAPI,
    responses=RESPONSES,
)
async def distill_batch(request: Request, credentials: BearerCredentials) -> Response:
    t0 = time.perf_counter()
    db = get_db(request)
    settings = request.app.state.settings
    client = client_id_of(request)

    token = credentials.credentials if credentials is not None else ""
    try:
        claims = verify_token(get_token_config(request), token)
    except TokenError as exc:
        metrics.record_auth_failure("missing" if not token else exc.reason)
        await _audit_rejection(db, 401, client, None, None, t0)
        raise unauthorized() from None

    try:
        decoded = await decode_inputs(request, DistillRequest, _query(request))
    except HTTPException as exc:
        model_name = request.query_params.get("model") or getattr(request.state, "model_name", None)
        await _audit_rejection(db, exc.status_code, client, claims, model_name, t0)
        raise
    model = decoded.model
    x = decoded.x
    temperature = decoded.params.temperature
    temperature = model.temperature if temperature is None else _temperature(temperature)
    digest = crud.input_digest(x)

    try:
        grant = await _reserve(
            db,
            t0,
            lambda: crud.reserve_distill(
                db,
                claims,
                model=model.name,
                n_samples=int(x.shape[0]),
                client_id=client,
                digest=digest,
                rate_per_minute=settings.distill_rate_per_minute,
                started=t0,
            ),
        )
    except DistillDenied as d:
        raise _denied(d, model.name) from None

    try:
        logits = await model.infer("keyed", x)
    except BaseException as exc:
        if isinstance(exc, InferenceTimeout):
            status = 504
        elif isinstance(exc, InferenceOverloaded):
            status = 503
        elif isinstance(exc, asyncio.CancelledError):
            status = STATUS_CANCELLED
        else:
            status = 500
        await _finalize(db, grant, status, t0)
        if isinstance(exc, InferenceTimeout):
            raise HTTPException(status_code=504, detail=str(exc)) from None
        if isinstance(exc, InferenceOverloaded):
            raise HTTPException(status_code=503, detail=str(exc), headers={"Retry-After": "1"}) from None
        raise
    labels = soft_labels(logits, temperature)
    # The answer leaves only once its audit row is confirmed; a database failure here raises (503).
    try:
        await _finalize(db, grant, 200, t0)
    except crud.ReservationReleased:
        raise HTTPException(
            status_code=503, detail="the call outlived its reservation; nothing was charged, retry"
        ) from None
    metrics.record_samples_distilled(model.name, grant.n_samples)

    headers = _quota_headers(grant.quota, grant.used)
    if grant.rate_limit > 0 and grant.rate_remaining is not None:
        headers["X-RateLimit-Limit"] = str(grant.rate_limit)
        headers["X-RateLimit-Remaining"] = str(grant.rate_remaining)
    body = {
        "model": model.name,
        "version": model.version,
        "temperature": temperature,
        "soft_labels": labels,
        "logits": np.ascontiguousarray(logits, dtype=np.float32),
    }
    return FastJSONResponse(body, headers=headers)
