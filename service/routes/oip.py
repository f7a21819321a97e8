"""The Open Inference Protocol (KServe v2 / Triton REST) beside /predict and /distill-batch.

`POST /v2/models/{name}[/versions/{v}]/infer` runs one of the two shared flows, chosen by the outputs the
request names: the plain outputs (label, class_name, probabilities; the default) are /predict's answer
for anyone, under its rate limit and audit; the keyed outputs (soft_labels, logits) are /distill-batch's,
for a bearer token with the model in scope, under its quota, rate limit and audited transaction. A request
for keyed outputs without a valid token is refused (401), never answered from the plain path.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import Response
from fastapi.security.utils import get_authorization_scheme_param
from starlette.requests import ClientDisconnect

from service.core.state import ServiceState, StateDep, get_state
from service.decode import DecodedRequest
from service.flows import keyed
from service.flows.plain import plain_call
from service.inference.registry import ServedModel
from service.oip.decode import InferRequest, decode_tensor, read_infer_request, resolve
from service.oip.encode import infer_response
from service.oip.protocol import EXTENSIONS, KEYED_OUTPUTS, model_metadata
from service.oip.schemas import (
    ERRORS,
    InferResponseBody,
    Live,
    ModelMetadata,
    ModelReady,
    Ready,
    ServerMetadata,
    infer_openapi,
)
from service.routes.health import readiness
from service.schemas import DistillRequest, FastJSONResponse

SERVER_NAME = "sdb"
KEYED_NEEDS_TOKEN = (
    f"the keyed outputs ({', '.join(KEYED_OUTPUTS)}) need `Authorization: Bearer <token>` from POST "
    "/auth/token, with this model in the token's scope"
)

router = APIRouter(prefix="/v2", tags=["open inference protocol"])


def bearer_token(request: Request) -> str:
    """The `Authorization: Bearer` token, or "" (the header only, as service.core.deps.bearer_scheme)."""
    scheme, token = get_authorization_scheme_param(request.headers.get("authorization"))
    return token if scheme.lower() == "bearer" else ""


@router.post(
    "/models/{name}/infer",
    summary="Inference: the plain outputs for anyone, the keyed outputs for a licensed token",
    response_model=InferResponseBody,
    responses=ERRORS,
    openapi_extra=infer_openapi(versioned=False),
)
@router.post(
    "/models/{name}/versions/{version}/infer",
    summary="Inference on one model version",
    response_model=InferResponseBody,
    responses=ERRORS,
    openapi_extra=infer_openapi(versioned=True),
    operation_id="model_version_infer",
)
async def infer(request: Request) -> Response:
    """JSON tensors or binary tensor data (`Inference-Header-Content-Length`); see the README's "Open
    Inference Protocol" section."""
    # Path and header read here rather than as FastAPI parameters: dependency solving would cost this hot
    # route about as much as its own work (the OpenAPI schema documents them through infer_openapi).
    t0 = time.perf_counter()
    name: str = request.path_params["name"]
    version: str | None = request.path_params.get("version")
    state = get_state(request)
    req: InferRequest | None = None
    failure: HTTPException | ClientDisconnect | None = None
    try:
        req = await read_infer_request(
            request, state.settings.max_body_bytes, state.models.max_request_samples
        )
    except (HTTPException, ClientDisconnect) as exc:
        failure = exc
    if req is not None and req.keyed:
        token = bearer_token(request)
        return await _keyed_infer(request, state, req, name, version, token, t0)
    async with plain_call(request) as call:  # rate limit and audit, as /predict
        if req is None:
            assert failure is not None
            raise failure
        model, x = await _decode(request, state, req, name, version)
        probs = await call.infer(model, x)
        return infer_response(model, req.request_id, req.outputs, {"probabilities": probs})


@router.get("", summary="Server metadata: name, version, protocol extensions", response_model=ServerMetadata)
async def server_metadata(request: Request) -> dict[str, Any]:
    return {"name": SERVER_NAME, "version": request.app.version, "extensions": EXTENSIONS}


@router.get("/health/live", summary="Liveness: the process answers", response_model=Live)
async def live() -> dict[str, bool]:
    return {"live": True}


@router.get(
    "/health/ready",
    summary="Readiness, as /readyz: models loaded, database reachable (503 otherwise)",
    response_model=Ready,
    responses={503: {"model": Ready, "description": "Not ready."}},
)
async def ready(state: StateDep) -> Response:
    ok, _ = await readiness(state)
    return FastJSONResponse({"ready": ok}, status_code=200 if ok else 503)


@router.get(
    "/models/{name}",
    summary="Model metadata: input and outputs (datatype, shape with -1 for the batch)",
    response_model=ModelMetadata,
    responses=ERRORS,
)
@router.get(
    "/models/{name}/versions/{version}",
    summary="Model metadata of one version",
    response_model=ModelMetadata,
    responses=ERRORS,
    operation_id="model_version_metadata",
)
async def metadata(request: Request, state: StateDep, name: str, version: str | None = None) -> Response:
    return FastJSONResponse(model_metadata(resolve(request, state.models, name, version)))


@router.get("/models/{name}/ready", summary="Model readiness", response_model=ModelReady, responses=ERRORS)
@router.get(
    "/models/{name}/versions/{version}/ready",
    summary="Readiness of one model version",
    response_model=ModelReady,
    responses=ERRORS,
    operation_id="model_version_ready",
)
async def model_ready(request: Request, state: StateDep, name: str, version: str | None = None) -> Response:
    model = resolve(request, state.models, name, version)
    return FastJSONResponse({"name": model.name, "ready": True})


async def _decode(
    request: Request, state: ServiceState, req: InferRequest, name: str, version: str | None
) -> tuple[ServedModel, np.ndarray]:
    model = resolve(request, state.models, name, version)
    return model, decode_tensor(req, model, state.models.max_request_samples)


async def _decode_keyed(
    request: Request, state: ServiceState, req: InferRequest, name: str, version: str | None
) -> DecodedRequest[DistillRequest]:
    model, x = await _decode(request, state, req, name, version)
    return DecodedRequest(
        params=DistillRequest.model_construct(temperature=req.temperature), model=model, x=x
    )


async def _keyed_infer(
    request: Request,
    state: ServiceState,
    req: InferRequest,
    name: str,
    version: str | None,
    token: str,
    t0: float,
) -> Response:
    decode = _decode_keyed(request, state, req, name, version)
    try:
        answer = await keyed.serve(request, state, token, t0, decode, model_name=name)
    except HTTPException as exc:
        if token or exc.status_code != 401:
            raise
        raise HTTPException(status_code=401, detail=KEYED_NEEDS_TOKEN, headers=exc.headers) from None
    return infer_response(
        answer.model,
        req.request_id,
        req.outputs,
        {"soft_labels": answer.soft_labels, "logits": answer.logits},
        parameters={"temperature": answer.temperature},
        headers=answer.headers,
    )
