"""POST /predict: anyone, no token; the plain path's class probabilities.

Every call that reaches the route is audited through `crud.record_predict_audit`, which only queues the row
(a writer thread stores it), so a slow or stopped database never blocks or fails /predict.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np
from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import Response

from service import crud, metrics
from service.inference.decode import decode_inputs, query_fields, query_openapi
from service.inference.registry import InferenceOverloaded, InferenceTimeout, ServedModel
from service.middleware import ClientIdentifier, RateLimiter, client_id_salt
from service.schemas import (
    ERROR_RESPONSES,
    FastJSONResponse,
    PredictRequest,
    PredictResponse,
    request_body_openapi,
)

logger = logging.getLogger(__name__)

ENDPOINT = "/predict"
QUERY_FIELDS = ("model", "top_k")


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


def _state(request: Request, name: str, factory: Callable[[], Any]) -> Any:
    value = getattr(request.app.state, name, None)
    if value is None:
        value = factory()
        setattr(request.app.state, name, value)
    return value


def _settings(request: Request) -> Any:
    settings = getattr(request.app.state, "settings", None)
    if settings is None:
        from service.config import get_settings

        settings = get_settings()
    return settings


def client_id(request: Request) -> str:
    ids: ClientIdentifier = _state(
        request,
        "client_ids",
        lambda: ClientIdentifier(_settings(request).trusted_proxies, client_id_salt(_settings(request))),
    )
    return ids.anonymous_id(request)


def enforce_predict_rate(request: Request, client: str) -> None:
    """Per-client rate limit of /predict: 429 with Retry-After."""
    limiter: RateLimiter = _state(
        request, "predict_limiter", lambda: RateLimiter(_settings(request).predict_rate_per_minute)
    )
    wait = limiter.acquire(client)
    if wait > 0:
        metrics.record_rate_limited(ENDPOINT)
        retry = RateLimiter.retry_after(wait)
        raise HTTPException(
            status_code=429,
            detail=f"rate limit of {limiter.per_minute} /predict requests a minute exceeded; "
            f"retry in {retry} s",
            headers={"Retry-After": retry},
        )


def _monitor(request: Request) -> ExtractionMonitor:
    monitor: ExtractionMonitor = _state(
        request,
        "extraction_monitor",
        lambda: ExtractionMonitor(
            _settings(request).extraction_window_s, _settings(request).extraction_sample_threshold
        ),
    )
    return monitor


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    out: np.ndarray = e / e.sum(axis=1, keepdims=True)
    return out


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
    request: Request, client: str, model: str | None, n: int, status: int, start: float, digest: str | None
) -> None:
    crud.record_predict_audit(
        request.app.state,
        model=model,
        client_id=client,
        n_samples=n,
        status=status,
        latency_ms=(time.perf_counter() - start) * 1000.0,
        input_digest=digest,
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
    client = client_id(request)
    status = 500
    model_name: str | None = None
    n = 0
    digest: str | None = None
    try:
        enforce_predict_rate(request, client)
        inputs = await decode_inputs(request, PredictRequest, query_fields(request, QUERY_FIELDS))
        served, x = inputs.model, inputs.x
        model_name, n = served.name, len(x)
        digest = crud.input_digest(x)
        try:
            logits = await served.infer("plain", x)
        except (InferenceTimeout, InferenceOverloaded) as exc:
            raise HTTPException(status_code=503, detail=str(exc), headers={"Retry-After": "1"}) from None
        payload = prediction_payload(served, softmax(logits), inputs.params.top_k)
        _monitor(request).add(client, n)
        status = 200
        return FastJSONResponse(payload)
    except HTTPException as exc:
        status = exc.status_code
        raise
    finally:
        _audit(request, client, model_name, n, status, start, digest)
