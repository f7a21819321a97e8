"""Admin routes of traceable licensees: turn a key's watermark on or off, and trace a suspect model.

POST /admin/trace queries a suspect over HTTP only where the operator allows its host
(SDB_TRACE_ALLOWED_HOSTS; none by default: 403), through service.watermarks.suspect (no redirects, private
addresses refused unless listed, size and time limits), and tests every watermark ever issued against the
served box's keyed answers to the owner's probe images (SDB_TRACE_PROBE_DATA). Local suspects (a student
directory, a box artifact) are traced with `sdb trace`, which runs the same code.
"""

from __future__ import annotations

import time
from typing import Any

import anyio.from_thread
import numpy as np
import torch
from fastapi import HTTPException, Request
from fastapi.concurrency import run_in_threadpool

from sdb_core.data import DataError, load_dataset
from sdb_core.trace import TraceConfig
from service.core.deps import AdminDep, DatabaseDep, client_id_of
from service.core.state import StateDep
from service.crud import accounts, events
from service.crud import watermarks as crud_watermarks
from service.crud.accounts import NotFoundError
from service.db.models import utcnow
from service.inference.registry import InferenceOverloaded, InferenceTimeout, ServedModel, UnknownModelError
from service.routes.admin.common import PathId, admin_router
from service.schemas import ErrorResponse
from service.schemas_admin import KeyOut, TraceOut, TraceRequest, WatermarkToggle
from service.watermarks.samples import images_of
from service.watermarks.suspect import (
    HostPolicy,
    HttpSuspect,
    SuspectFailed,
    SuspectRefused,
    check_url,
    guarded_client,
)
from service.watermarks.tracing import NothingToTrace, WatermarkMismatch, probe_images, run_trace

router = admin_router()

TRACE_RESPONSES: dict[int | str, dict[str, Any]] = {
    403: {"model": ErrorResponse, "description": "Not an administrator, or the suspect URL is not allowed."},
    404: {"model": ErrorResponse, "description": "Unknown model."},
    409: {"model": ErrorResponse, "description": "No probe data configured, or no watermark ever issued."},
    502: {"model": ErrorResponse, "description": "The suspect did not answer usable probabilities."},
}


@router.post(
    "/keys/{key_id}/watermark",
    response_model=KeyOut,
    summary="Turn an API key's watermark on or off (its id stays: the key stays traceable)",
    responses={409: {"model": ErrorResponse, "description": "Every watermark of the bank is issued."}},
)
def set_watermark(
    key_id: PathId, body: WatermarkToggle, admin: AdminDep, db: DatabaseDep, request: Request, state: StateDep
) -> KeyOut:
    try:
        with db.write() as s:
            key = crud_watermarks.set_key_watermark(
                s,
                accounts.get_key(s, key_id),
                body.enabled,
                watermark_id=state.watermarks.watermark_id,
                bank_size=state.watermarks.bank_size,
            )
            events.record_event(
                s,
                "key.watermark.on" if body.enabled else "key.watermark.off",
                "ok",
                actor=admin,
                client_id=client_id_of(request),
                target=f"key:{key_id}",
                detail={"watermark_id": key.watermark_id},
            )
            return KeyOut.model_validate(key)
    except NotFoundError as exc:
        raise HTTPException(status_code=404, detail=str(exc)) from None
    except crud_watermarks.WatermarkBankFull as exc:
        raise HTTPException(status_code=409, detail=str(exc)) from None


def _probes(spec: str, model: ServedModel, n: int, seed: int) -> np.ndarray:
    try:
        ds = load_dataset(spec)
    except (DataError, OSError, ValueError) as exc:
        raise HTTPException(
            status_code=409, detail=f"the probe data SDB_TRACE_PROBE_DATA cannot be loaded: {exc}"
        ) from None
    if tuple(ds.input_shape) != tuple(model.input_shape):
        raise HTTPException(
            status_code=409,
            detail=f"the probe data has inputs {list(ds.input_shape)}, model {model.name!r} takes "
            f"{list(model.input_shape)}",
        )
    pool = np.concatenate([ds.x_test, ds.x_train]) if n > len(ds.x_test) else ds.x_test
    return probe_images(pool, n, seed)


@router.post(
    "/trace",
    response_model=TraceOut,
    summary="Trace a suspect model (an allowed HTTP endpoint) to the licensee whose soft labels taught it",
    responses=TRACE_RESPONSES,
)
async def trace_suspect(body: TraceRequest, admin: AdminDep, state: StateDep, request: Request) -> Any:
    settings = state.settings
    policy = HostPolicy.parse(settings.trace_allowed_hosts)
    try:
        host, _ = check_url(body.suspect_url, policy)
    except SuspectRefused as exc:
        raise HTTPException(status_code=exc.status, detail=str(exc)) from None
    if settings.trace_probe_data is None:
        raise HTTPException(
            status_code=409,
            detail="no probe images: set SDB_TRACE_PROBE_DATA (a dataset spec, as `sdb trace --data`)",
        )
    if body.probes > settings.trace_max_probes:
        raise HTTPException(
            status_code=422, detail=f"probes above SDB_TRACE_MAX_PROBES ({settings.trace_max_probes})"
        )
    try:
        model = state.models.get(body.model)
    except UnknownModelError:
        raise HTTPException(status_code=404, detail="unknown model") from None
    with state.db.session() as s:
        issued = crud_watermarks.issued_watermarks(s)
    deadline = time.monotonic() + settings.trace_timeout_s

    def reference(x: torch.Tensor) -> torch.Tensor:
        logits = anyio.from_thread.run(model.infer, "keyed", x.numpy())
        return torch.softmax(torch.from_numpy(logits), dim=1)

    def work() -> dict[str, Any]:
        probes = _probes(str(settings.trace_probe_data), model, body.probes, body.probe_draw)
        keys = [w.key_id for w in issued]
        own = images_of(state.db, keys, model.name, tuple(model.input_shape), settings.licensee_images)
        with guarded_client(policy, timeout_s=min(30.0, settings.trace_timeout_s)) as client:
            suspect = HttpSuspect(body.suspect_url, client, model=body.suspect_model, deadline=deadline)
            return run_trace(
                suspect=suspect,
                reference=reference,
                probes=probes,
                issued=issued,
                marks=state.watermarks,
                model=model,
                cfg=TraceConfig(probes=body.probes, decoys=body.decoys, batch_size=256),
                now=utcnow(),
                decoy_secret=f"sdb-trace-decoys:{body.probe_draw}".encode(),  # same request, same report
                suspect_name=body.suspect_url,
                own_images=own,
            )

    try:
        report = await run_in_threadpool(work)
    except SuspectRefused as exc:
        raise HTTPException(status_code=exc.status, detail=str(exc)) from None
    except SuspectFailed as exc:
        raise HTTPException(status_code=502, detail=str(exc)) from None
    except (NothingToTrace, WatermarkMismatch) as exc:
        raise HTTPException(status_code=409, detail=str(exc)) from None
    except (InferenceTimeout, InferenceOverloaded):
        raise HTTPException(
            status_code=503, detail="the model is busy; retry the trace", headers={"Retry-After": "5"}
        ) from None
    await run_in_threadpool(
        events.record_event_safely,
        state.db,
        "trace.run",
        "ok",
        actor=admin,
        client_id=client_id_of(request),
        target=f"model:{model.name}",
        detail={
            "suspect_host": host,
            "probes": report["probes"],
            "matches": [m["watermark_id"] for m in report["matches"]],
        },
    )
    return report
