"""The ASGI middleware stack: body-size limit, request deadline, generic 500, security headers, metrics.

Order, outermost first: metrics -> security headers -> generic 500 -> deadline -> body limit -> the app.
All are pure ASGI (no BaseHTTPMiddleware) so that they cost little and never buffer bodies.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import TYPE_CHECKING, Any

import orjson
from fastapi import FastAPI
from starlette.requests import ClientDisconnect

from service.core.errors import BODY_STATUS_KEY, disconnect_status
from service.decode import MODEL_KEY
from service.observability import metrics
from service.sanitize import clean

if TYPE_CHECKING:
    from service.core.config import Settings

logger = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


def error_body(scope: Scope, message: str) -> dict[str, Any]:
    """An error body in the route's shape: `detail`, or the Open Inference Protocol's `error` under /v2."""
    path = str(scope.get("path", ""))
    return {"error": message} if path == "/v2" or path.startswith("/v2/") else {"detail": message}


SECURITY_HEADERS: list[tuple[bytes, bytes]] = [
    (b"cache-control", b"no-store"),
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
]


async def send_json(
    send: Send, status: int, body: dict[str, Any], headers: list[tuple[bytes, bytes]] | None = None
) -> None:
    payload = orjson.dumps(body)
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(payload)).encode()),
                *(headers or []),
            ],
        }
    )
    await send({"type": "http.response.body", "body": payload})


class BodyLimitMiddleware:
    """413 for bodies over `limit` bytes: at once from Content-Length, else while the body streams in.

    Chunked bodies and lying lengths are counted as they arrive; past the limit the app sees a disconnect
    and its own response (if any) is dropped, so nothing beyond the limit is ever buffered.
    """

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    await send_json(send, 400, error_body(scope, "invalid Content-Length header"))
                    return
                if declared > self.limit:
                    await self._reject(scope, send)
                    return
        received = 0
        rejected = False
        started = False

        async def limited_receive() -> Message:
            nonlocal received, rejected
            if rejected:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    rejected = True
                    scope.setdefault("state", {})[BODY_STATUS_KEY] = 413
                    if not started:
                        await self._reject(scope, send)
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if rejected:
                return
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        await self.app(scope, limited_receive, guarded_send)

    async def _reject(self, scope: Scope, send: Send) -> None:
        await send_json(
            send,
            413,
            error_body(scope, f"request body is larger than the limit of {self.limit} bytes"),
            [(b"connection", b"close")],
        )


class _StartTracker:
    """Wraps `send` and remembers whether the response has started (after that, no error body can be sent)."""

    def __init__(self, send: Send) -> None:
        self._send = send
        self.started = False

    async def __call__(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.started = True
        await self._send(message)


class DeadlineMiddleware:
    """Every request gets a deadline: past it, 504 with a JSON body (the worker goes on serving)."""

    def __init__(self, app: ASGIApp, seconds: float, longer: dict[str, float] | None = None) -> None:
        self.app = app
        self.seconds = seconds
        self.longer = longer or {}  # path -> its own deadline (POST /admin/trace queries a suspect)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        tracked = _StartTracker(send)
        seconds = self.longer.get(scope["path"], self.seconds)
        try:
            async with asyncio.timeout(seconds) as deadline:
                await self.app(scope, receive, tracked)
        except TimeoutError:
            if not deadline.expired():
                raise
            logger.warning(
                "request %s %s passed its %.1f s deadline", scope["method"], scope["path"], seconds
            )
            if not tracked.started:
                await send_json(
                    send, 504, error_body(scope, f"request did not complete within {seconds:g} s")
                )


class ServerErrorMiddleware:
    """Any unhandled exception -> a generic 500 JSON body; the traceback goes to the log only."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        tracked = _StartTracker(send)
        try:
            await self.app(scope, receive, tracked)
        except ClientDisconnect:
            # Not a server error: the body limit cut the body (413 already sent) or the client went away.
            status = disconnect_status(scope)
            scope.setdefault("state", {}).setdefault(BODY_STATUS_KEY, status)
            reason = "body over the size limit" if status == 413 else "client disconnected"
            logger.warning("%s on %s %s (status %d)", reason, scope["method"], clean(scope["path"]), status)
        except Exception:
            logger.exception("unhandled error on %s %s", scope["method"], clean(scope["path"]))
            if tracked.started:
                raise
            await send_json(send, 500, error_body(scope, "internal server error"))


class SecurityHeadersMiddleware:
    """Adds no-store, nosniff and framing headers to every response."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                present = {name.lower() for name, _ in message.get("headers", ())}
                extra = [(k, v) for k, v in SECURITY_HEADERS if k not in present]
                message["headers"] = [*message.get("headers", ()), *extra]
            await send(message)

        await self.app(scope, receive, send_with_headers)


class MetricsMiddleware:
    """Counts requests by route template, model and status, and observes their latency."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status: int | None = None

        async def status_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, status_send)
        finally:
            route = scope.get("route")
            template = getattr(route, "path", None) or "unmatched"
            state = scope.get("state") or {}
            if status is None:  # no answer was sent: the client went away, or the app failed
                status = int(state.get(BODY_STATUS_KEY, 500))
            metrics.record_request(
                template,
                state.get(MODEL_KEY),
                status,
                time.perf_counter() - start,
                state.get(metrics.ANSWERED_KEY),
            )


def install_middleware(app: FastAPI, settings: Settings) -> None:
    """Install the middleware stack on `app` (call once, from create_app)."""
    # add_middleware prepends: the last added is the outermost.
    app.add_middleware(BodyLimitMiddleware, limit=settings.max_body_bytes)
    app.add_middleware(
        DeadlineMiddleware,
        seconds=settings.inference_timeout_s + 5.0,
        longer={"/admin/trace": settings.trace_timeout_s + 10.0},
    )
    app.add_middleware(ServerErrorMiddleware)
    app.add_middleware(SecurityHeadersMiddleware)
    app.add_middleware(MetricsMiddleware)
