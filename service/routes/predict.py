"""POST /predict: anyone, no token; the plain path's class probabilities.

Every call that reaches the route is audited and rate limited by the plain path's shared flow
(service.flows.plain, which the Open Inference Protocol's anonymous `infer` uses too).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from fastapi import APIRouter, Request
from fastapi.responses import Response

from service.decode import decode_inputs, query_openapi
from service.flows.plain import ENDPOINT, plain_call
from service.inference.registry import ServedModel
from service.outputs import top_k_indices
from service.schemas import (
    ERROR_RESPONSES,
    FastJSONResponse,
    PredictRequest,
    PredictResponse,
    request_body_openapi,
)

QUERY_FIELDS = ("model", "top_k")


def prediction_payload(model: ServedModel, probs: np.ndarray, top_k: int | None) -> dict[str, Any]:
    labels = probs.argmax(axis=1)
    names = model.class_names
    preds: list[dict[str, Any]] = [
        {"label": int(label), "class_name": names[label], "probabilities": row}
        for label, row in zip(labels.tolist(), probs, strict=True)
    ]
    if top_k is not None:
        for pred, idx, row in zip(preds, top_k_indices(probs, top_k).tolist(), probs, strict=True):
            pred["top_k"] = [{"label": i, "class_name": names[i], "probability": row[i]} for i in idx]
    return {"model": model.name, "version": model.version, "predictions": preds}


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
    async with plain_call(request) as call:
        inputs = await decode_inputs(request, PredictRequest, call.state.models, QUERY_FIELDS)
        probs = await call.infer(inputs.model, inputs.x)
        return FastJSONResponse(prediction_payload(inputs.model, probs, inputs.params.top_k))
