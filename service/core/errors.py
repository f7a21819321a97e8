"""Exception handlers, the one mapping from inference errors to HTTP answers, and the status of a request
whose body ended in a disconnect."""

from __future__ import annotations

import logging
from collections.abc import MutableMapping
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError

from service.inference.registry import InferenceOverloaded, InferenceTimeout
from service.outputs import NonFiniteOutputs
from service.sanitize import clean

logger = logging.getLogger(__name__)

INFERENCE_RETRY_AFTER_S = 1
STATUS_CLIENT_GONE = 499  # the client went away before an answer (nginx's code); never counted as a 500
BODY_STATUS_KEY = "sdb_body_status"  # scope["state"] key: 413 once the body-limit middleware refused the body


def disconnect_status(scope: MutableMapping[str, Any]) -> int:
    """The status of a request whose body ended in a disconnect: 413 if the body limit cut it, else 499."""
    return int((scope.get("state") or {}).get(BODY_STATUS_KEY, STATUS_CLIENT_GONE))


def inference_error(exc: InferenceTimeout | InferenceOverloaded) -> HTTPException:
    """Both inference routes answer a missed deadline and a full queue alike: 503 with Retry-After."""
    return HTTPException(
        status_code=503, detail=str(exc), headers={"Retry-After": str(INFERENCE_RETRY_AFTER_S)}
    )


def non_finite_error(exc: NonFiniteOutputs) -> HTTPException:
    return HTTPException(status_code=422, detail=f"{exc}; nothing was charged")


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    # FastAPI's default echoes the offending input, which may be a secret (an API key in /auth/token).
    assert isinstance(exc, RequestValidationError)
    detail = [
        {"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")}
        for e in exc.errors()
    ]
    return JSONResponse(status_code=422, content={"detail": detail})


async def _database_error(request: Request, exc: Exception) -> JSONResponse:
    logger.warning("database unavailable on %s: %s", clean(request.url.path), type(exc).__name__)
    return JSONResponse(
        status_code=503,
        content={"detail": "database unavailable, retry later", "error": "database_unavailable"},
        headers={"Retry-After": "5"},
    )


def install_error_handlers(app: FastAPI) -> None:
    """422 without echoed input for validation errors; 503 (fail closed) when the database is unavailable."""
    app.add_exception_handler(RequestValidationError, _validation_error)
    for error in (OperationalError, InterfaceError, PoolTimeoutError):
        app.add_exception_handler(error, _database_error)
