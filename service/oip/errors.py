"""The protocol's error shape, `{"error": "<message>"}`, for every HTTP error under /v2.

The routes raise HTTPException like every other route (the shared flows do too); this handler renders
them for /v2 paths, keeping the status and its headers (Retry-After, WWW-Authenticate, X-Quota-*).
A structured detail (401/403/429 of the keyed path) keeps its fields beside `error`, its code as `code`.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exception_handlers import http_exception_handler
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.schemas import FastJSONResponse

PREFIX = "/v2"


def is_protocol_path(path: str) -> bool:
    return path == PREFIX or path.startswith(PREFIX + "/")


def error_body(detail: Any) -> dict[str, Any]:
    if isinstance(detail, dict) and "message" in detail:
        body = {k: v for k, v in detail.items() if k not in ("message", "error")}
        body["error"] = str(detail["message"])
        if "error" in detail:
            body["code"] = detail["error"]
        return body
    if isinstance(detail, list):  # a validation error list
        return {"error": "; ".join(f"{'.'.join(map(str, e.get('loc', [])))}: {e.get('msg')}" for e in detail)}
    return {"error": str(detail)}


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, StarletteHTTPException)
    if not is_protocol_path(request.url.path):
        return await http_exception_handler(request, exc)
    return FastJSONResponse(error_body(exc.detail), status_code=exc.status_code, headers=exc.headers)


def install_error_shape(app: FastAPI) -> None:
    app.add_exception_handler(StarletteHTTPException, _http_error)
