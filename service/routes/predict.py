"""POST /predict: anyone, no token; the plain path's class probabilities.

Every call that reaches the route is audited: the row is queued (a writer thread stores it), so a slow or
stopped database never blocks or fails /predict.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import Response
from starlette.requests import ClientDisconnect

from service.core.errors import disconnect_status, inference_error, non_finite_error
from service.core.state import ServiceState, get_state
from service.crud import audits
from service.decode import decode_inputs, query_openapi
from service.inference.registry import InferenceOverloaded, InferenceTimeout, ServedModel
from service.limits.ratelimit import LimitUnavailable, PredictRateLimit, RateLimiter
from service.observability import metrics
from service.outputs import NonFiniteOutputs, softmax
from service.schemas import (
    ERROR_RESPONSES,
    FastJSONResponse,
    PredictRequest,
    PredictResponse,
    request_body_openapi,
)

ENDPOINT = audits.PREDICT_ENDPOINT
QUERY_FIELDS = ("model", "top_k")


async def enforce_predict_rate(limiter: PredictRateLimit, client: str) -> None:
    """Per-client rate limit of /predict: 429 with Retry-After; 503 when its Redis fails and
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


def prediction_payload(model: ServedModel, probs: np.ndarray, top_k: int | None) -> dict[str, Any]:
    labels = probs.argmax(axis=1)
    names = model.class_names
    preds: list[dict[str, Any]] = [
        {"label": int(label), "class_name": names[label], "probabilities": row}
        for label, row in zip(labels.tolist(), probs, strict=True)
    ]
    if top_k is not None:
        k = min(top_k, model.num_classes)
        order = np.argsort(-probs, axis=1, kind="stable")[:, :k]
        for pred, idx, row in zip(preds, order.tolist(), probs, strict=True):
            pred["top_k"] = [{"label": i, "class_name": names[i], "probability": row[i]} for i in idx]
    return {"model": model.name, "version": model.version, "predictions": preds}


def _audit(
    state: ServiceState, client: str, model: str | None, n: int, status: int, start: float, digest: str | None
) -> None:
    state.audit_queue.submit(
        audits.predict_audit(
            model=model,
            client_id=client,
            n_samples=n,
            status=status,
            latency_ms=(time.perf_counter() - start) * 1000.0,
            input_digest=digest,
        )
    )


router = APIRouter(tags=["inference"])


@router.post(
    ENDPOINT,
    summary="Classify inputs with the plain path (no token needed)",
    response_model=PredictResponse,
    responses=ERROR_RESPONSES,
    openapi_extra={
        **request_body_openapi(PredictRequest),
        "parameters": query_openapi(
            {
                "model": {"type": "string", "minLength": 1, "maxLength": 128},
                "top_k": {"type": "integer", "minimum": 1, "maximum": 1000},
            }
        ),
    },
)
async def predict(request: Request) -> Response:
    """Top-1 label, class name and full probability vector for each input (JSON list, base64 `.npy` or a
    raw `application/x-npy` body with `?model=`)."""
    start = time.perf_counter()
    state = get_state(request)
    client = state.client_ids.anonymous_id(request)
    status = 500
    model_name: str | None = None
    n = 0
    digest: str | None = None
    try:
        await enforce_predict_rate(state.predict_limiter, client)
        inputs = await decode_inputs(request, PredictRequest, state.models, QUERY_FIELDS)
        served, x = inputs.model, inputs.x
        model_name, n = served.name, len(x)
        digest = audits.input_digest(x)
        try:
            logits = await served.infer("plain", x)
        except (InferenceTimeout, InferenceOverloaded) as exc:
            raise inference_error(exc) from None
        try:
            probs = softmax(logits)
        except NonFiniteOutputs as exc:
            raise non_finite_error(exc) from None
        payload = prediction_payload(served, probs, inputs.params.top_k)
        state.extraction_monitor.add(client, n)
        status = 200
        return FastJSONResponse(payload)
    except HTTPException as exc:
        status = exc.status_code
        raise
    except ClientDisconnect:
        status = disconnect_status(request.scope)
        raise
    finally:
        _audit(state, client, model_name, n, status, start, digest)
