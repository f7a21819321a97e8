"""POST /distill-batch: keyed soft labels for licensed users.

The call runs the keyed path's shared flow (service.flows.keyed, which the Open Inference Protocol's keyed
`infer` uses too): token -> inputs -> one transaction (key and user re-checked, rate, quota, audit row)
-> keyed forward pass (a watermarked key's soft labels get its mark, service/watermarks) -> audit row
confirmed. No soft labels leave without a committed audit row; refused calls are audited too.
"""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response

from service.core.deps import BearerCredentials
from service.core.state import ServiceState
from service.decode import decode_inputs, query_openapi
from service.flows import keyed
from service.outputs import MAX_TEMPERATURE, MIN_TEMPERATURE
from service.schemas import (
    ERROR_RESPONSES,
    DistillRequest,
    DistillResponse,
    FastJSONResponse,
    request_body_openapi,
)

router = APIRouter(tags=["distill"])

ENDPOINT = keyed.ENDPOINT
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
    state: ServiceState = request.app.state.sdb  # get_state's read, inline: the keyed walk stays short
    token = credentials.credentials if credentials is not None else ""
    decode = decode_inputs(request, DistillRequest, state.models, QUERY_FIELDS)
    answer = await keyed.serve(request, state, token, t0, decode, request.query_params.get("model"))
    body = {
        "model": answer.model.name,
        "version": answer.model.version,
        "temperature": answer.temperature,
        "soft_labels": answer.soft_labels,
        "logits": answer.logits,
    }
    return FastJSONResponse(body, headers=answer.headers)
