"""POST /distill-batch: keyed soft labels for licensed users.

Order of a call: token signature/claims (no database) -> inputs decoded and validated -> ONE write
transaction that re-checks the key and user, counts the request against the per-key rate limit, consumes
the sample quota and writes the audit row -> the keyed forward pass (the box key is applied server-side
and never leaves the process) -> the audit row is confirmed. Any database failure answers 503 and no soft
labels are sent without a committed audit row. Refused calls are audited too. The audit lifecycle is
`service.crud.keyed_calls.KeyedCall`'s; this route maps its outcomes to HTTP. A watermarked key's soft
labels carry its mark (service/watermarks), applied after the softmax; the audit row names the mark.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
from fastapi import APIRouter, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import Response
from starlette.requests import ClientDisconnect

from service.core.deps import BearerCredentials, missing_token, unauthorized
from service.core.errors import disconnect_status, inference_error, non_finite_error
from service.core.security import TokenError, verify_token
from service.core.state import get_state
from service.crud import audits
from service.crud.keyed_calls import KeyedCall
from service.crud.quota import DistillDenied, ReservationReleased
from service.decode import decode_inputs, query_openapi, request_model
from service.inference.registry import InferenceOverloaded, InferenceTimeout
from service.observability import metrics
from service.outputs import MAX_TEMPERATURE, MIN_TEMPERATURE, NonFiniteOutputs, softmax
from service.schemas import (
    ERROR_RESPONSES,
    DistillRequest,
    DistillResponse,
    FastJSONResponse,
    request_body_openapi,
)
from service.watermarks.issuer import mark_answer

router = APIRouter(tags=["distill"])

ENDPOINT = audits.DISTILL_ENDPOINT
QUERY_FIELDS = ("model", "temperature")

_OPENAPI = {
    **request_body_openapi(DistillRequest),
    "parameters": query_openapi(
        {
            "model": {"type": "string", "minLength": 1, "maxLength": 128},
            "temperature": {"type": "number", "minimum": MIN_TEMPERATURE, "maximum": MAX_TEMPERATURE},
        }
    ),
}

RESPONSES: dict[int | str, dict[str, Any]] = {
    **ERROR_RESPONSES,
    401: {
        "description": "Missing, malformed, expired or otherwise invalid token; revoked key; disabled user."
    },
    403: {"description": "The token's scopes do not include this model."},
    429: {"description": "Per-key rate limit (Retry-After) or sample quota exhausted."},
    503: {"description": "Database unavailable (fails closed), overloaded, or no model loaded."},
}


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
    """The answer to a refusal of the quota transaction (the audit row holds the same status)."""
    if d.reason == "token":
        metrics.record_auth_failure(d.auth_reason or "invalid_token")
        return unauthorized()
    if d.reason == "scope":
        metrics.record_auth_failure("scope")
        return HTTPException(status_code=403, detail={"error": "insufficient_scope", "message": d.message})
    if d.reason == "rate":
        metrics.record_rate_limited(ENDPOINT)
        return HTTPException(
            status_code=429,
            detail={"error": "rate_limited", "message": d.message},
            headers={"Retry-After": str(d.retry_after or 60)},
        )
    metrics.record_quota_rejection(model)
    remaining = max(0, (d.quota or 0) - (d.used or 0))
    return HTTPException(
        status_code=429,
        detail={
            "error": "quota_exceeded",
            "message": d.message,
            "quota": d.quota,
            "used": d.used,
            "remaining": remaining,
            "resets": "never",
        },
        headers=_quota_headers(d.quota, d.used),
    )


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
    state = get_state(request)
    client = state.client_ids.anonymous_id(request)
    token = credentials.credentials if credentials is not None else ""
    try:
        claims = verify_token(state.tokens, token)
    except TokenError as exc:
        metrics.record_auth_failure("missing" if not token else exc.reason)
        await KeyedCall(state.db, client, started=t0).reject(401)
        raise (unauthorized() if token else missing_token()) from None
    try:
        decoded = await decode_inputs(request, DistillRequest, state.models, QUERY_FIELDS)
    except (HTTPException, ClientDisconnect) as exc:
        status = exc.status_code if isinstance(exc, HTTPException) else disconnect_status(request.scope)
        model_name = request.query_params.get("model") or request_model(request.scope)
        await KeyedCall(state.db, client, started=t0).reject(status, claims, model_name)
        raise
    model, x = decoded.model, decoded.x
    temperature = decoded.params.temperature
    if temperature is None:
        temperature = model.temperature
    call = KeyedCall(state.db, client, started=t0)
    rate = state.settings.distill_rate_per_minute
    try:
        marked = state.watermarks.enabled_for(model.name)
        async with call.reserved(
            claims, model=model.name, x=x, rate_per_minute=rate, watermark=marked
        ) as grant:
            try:
                logits = await model.infer("keyed", x)
                labels = softmax(logits, temperature)
                if grant.watermark_id is not None and grant.watermark_slot is not None:  # after the softmax
                    labels, logits = await run_in_threadpool(
                        mark_answer,
                        state.watermarks,
                        grant.key_id,
                        grant.key_prefix,
                        grant.watermark_slot,
                        model,
                        x,
                        labels,
                        logits,
                        temperature,
                    )
            except (InferenceTimeout, InferenceOverloaded) as exc:
                http = inference_error(exc)
                await call.settle(http.status_code)
                raise http from None
            except NonFiniteOutputs as exc:
                await call.settle(422)  # refused: the samples go back
                raise non_finite_error(exc) from None
            # The answer leaves only once its audit row is confirmed; a database failure raises (503).
            await call.settle(200)
    except DistillDenied as d:
        raise _denied(d, model.name) from None
    except ReservationReleased:
        raise HTTPException(
            status_code=503, detail="the call outlived its reservation; nothing was charged, retry"
        ) from None
    headers = _quota_headers(grant.quota, grant.used)
    if grant.rate_limit > 0 and grant.rate_remaining is not None:
        headers["X-RateLimit-Limit"] = str(grant.rate_limit)
        headers["X-RateLimit-Remaining"] = str(grant.rate_remaining)
    metrics.record_samples_distilled(model.name, grant.n_samples)
    body = {
        "model": model.name,
        "version": model.version,
        "temperature": temperature,
        "soft_labels": labels,
        "logits": np.ascontiguousarray(logits, dtype=np.float32),
    }
    return FastJSONResponse(body, headers=headers)
