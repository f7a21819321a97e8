"""The keyed path as one flow shared by /distill-batch and the Open Inference Protocol's keyed `infer`.

Order of a call (`serve`): token signature and claims (no database; a refusal is audited) -> the route's
decoding of its inputs (a refusal is audited) -> the call's audit lifecycle is
`service.crud.keyed_calls.KeyedCall`'s (ONE write transaction that re-checks the key and user, counts the
request against the per-key rate limit, consumes the sample quota and writes the audit row; the keyed
forward pass, the box key applied server-side; the row confirmed before the answer may leave). This module
maps its outcomes to HTTP. A watermarked key's soft labels get its mark here, after the softmax
(service/watermarks), so that every protocol answers them marked; the audit row names the mark. Both
protocols audit under /distill-batch, so that reports, the console and the extraction watch count them as
one.
"""

from __future__ import annotations

from collections.abc import Coroutine
from typing import Any, NamedTuple

import numpy as np
from fastapi import HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect

from service.core.deps import missing_token, unauthorized
from service.core.errors import disconnect_status, inference_error, non_finite_error
from service.core.security import TokenError, verify_token
from service.core.state import ServiceState
from service.crud import audits
from service.crud.keyed_calls import KeyedCall
from service.crud.quota import DistillDenied, DistillGrant, ReservationReleased
from service.decode import DecodedRequest, request_model
from service.inference.registry import InferenceOverloaded, InferenceTimeout, ServedModel
from service.observability import metrics
from service.outputs import NonFiniteOutputs, softmax
from service.schemas import DistillRequest, quota_headers
from service.watermarks.issuer import Watermarker, mark_answer

ENDPOINT = audits.DISTILL_ENDPOINT


class KeyedAnswer(NamedTuple):  # a tuple, not a dataclass: its constructor is no call back into this module
    model: ServedModel
    temperature: float
    soft_labels: np.ndarray  # float32 [N, C]: softmax(keyed logits / temperature)
    logits: np.ndarray  # float32 [N, C]: the keyed path's logits
    headers: dict[str, str]  # X-Quota-* and X-RateLimit-*


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
        headers=quota_headers(d.quota, d.used),
    )


def _soft_labels(
    marks: Watermarker,
    grant: DistillGrant,
    model: ServedModel,
    x: np.ndarray,
    logits: np.ndarray,
    temperature: float,
) -> tuple[np.ndarray, np.ndarray]:
    """(soft labels, logits) of a granted call: a watermarked key's soft labels carry its mark (after the
    softmax, with logits consistent with them)."""
    labels = softmax(logits, temperature)
    if grant.watermark_id is None or grant.watermark_slot is None:
        return labels, logits
    return mark_answer(
        marks,
        grant.key_id,
        grant.key_prefix,
        grant.watermark_slot,
        model,
        x,
        labels,
        logits,
        temperature,
        served=grant.used - grant.n_samples,  # the key's samples before this call
    )


async def serve(
    request: Request,
    state: ServiceState,
    token: str,
    t0: float,
    decode: Coroutine[Any, Any, DecodedRequest[DistillRequest]],
    model_name: str | None = None,
) -> KeyedAnswer:
    """A whole keyed call: the token's claims (signature, expiry, audience; no database: 401 otherwise),
    then the route's `decode` of its inputs (awaited only after the token passed), then `distill`. Every
    refusal is audited (`model_name`: the model a refused decode is attributed to, else the resolved one)."""
    client = state.client_ids.anonymous_id(request)
    try:
        claims = verify_token(state.tokens, token)
    except TokenError as exc:
        decode.close()
        metrics.record_auth_failure("missing" if not token else exc.reason)
        await KeyedCall(state.db, client, started=t0).reject(401)
        raise (unauthorized() if token else missing_token()) from None
    try:
        decoded = await decode
    except (HTTPException, ClientDisconnect) as exc:
        status = exc.status_code if isinstance(exc, HTTPException) else disconnect_status(request.scope)
        model_name = model_name or request_model(request.scope)
        await KeyedCall(state.db, client, started=t0).reject(status, claims, model_name)
        raise
    # The rest runs in this frame, not in a helper: one module stay for the whole keyed call.
    model, x, temperature = decoded.model, decoded.x, decoded.params.temperature
    if temperature is None:
        temperature = model.temperature
    marked = model.name not in state.watermarks.disabled_models  # the per-model setting
    call = KeyedCall(state.db, client, started=t0)
    rate = state.settings.distill_rate_per_minute
    try:
        async with call.reserved(
            claims, model=model.name, x=x, rate_per_minute=rate, watermark=marked
        ) as grant:
            try:
                logits = await model.infer("keyed", x)
                # the softmax and the licensee's mark off the event loop, in one hand-over
                labels, logits = await run_in_threadpool(
                    _soft_labels, state.watermarks, grant, model, x, logits, temperature
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
        if grant.watermark_id is not None and state.licensee_images.keep > 0:  # what a trace probes with
            await run_in_threadpool(state.licensee_images.offer_safely, grant.key_id, model.name, x)
    except DistillDenied as d:
        raise _denied(d, model.name) from None
    except ReservationReleased:
        raise HTTPException(
            status_code=503, detail="the call outlived its reservation; nothing was charged, retry"
        ) from None
    # Counted once, on a 200, with the request's own metrics (the middleware): `ServedModel.infer` does not
    # count (a refused call answers none).
    request.scope.setdefault("state", {})[metrics.ANSWERED_KEY] = (model.name, "keyed", grant.n_samples)
    headers = quota_headers(grant.quota, grant.used)  # last before the answer's render, also in schemas
    if grant.rate_limit > 0 and grant.rate_remaining is not None:
        headers["X-RateLimit-Limit"] = str(grant.rate_limit)
        headers["X-RateLimit-Remaining"] = str(grant.rate_remaining)
    answer = KeyedAnswer(
        model=model,
        temperature=float(temperature),
        soft_labels=labels,
        logits=np.ascontiguousarray(logits, dtype=np.float32),
        headers=headers,
    )
    return answer
