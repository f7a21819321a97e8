"""ASGI middleware and error handlers: body-size limit, request deadline, security headers, generic 500,
request metrics; plus the per-client rate limiter and client identification used by routes.

Order, outermost first: metrics -> security headers -> generic 500 -> deadline -> body limit -> the app.
All are pure ASGI (no BaseHTTPMiddleware) so that they cost little and never buffer bodies.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import ipaddress
import logging
import math
import secrets
import threading
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import TYPE_CHECKING, Any

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from service import metrics

if TYPE_CHECKING:
    from service.config import Settings

logger = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

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
                    await send_json(send, 400, {"detail": "invalid Content-Length header"})
                    return
                if declared > self.limit:
                    await self._reject(send)
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
                    if not started:
                        await self._reject(send)
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

    async def _reject(self, send: Send) -> None:
        await send_json(
            send,
            413,
            {"detail": f"request body is larger than the limit of {self.limit} bytes"},
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

    def __init__(self, app: ASGIApp, seconds: float) -> None:
        self.app = app
        self.seconds = seconds

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        tracked = _StartTracker(send)
        try:
            async with asyncio.timeout(self.seconds) as deadline:
                await self.app(scope, receive, tracked)
        except TimeoutError:
            if not deadline.expired():
                raise
            logger.warning(
                "request %s %s passed its %.1f s deadline", scope["method"], scope["path"], self.seconds
            )
            if not tracked.started:
                await send_json(send, 504, {"detail": f"request did not complete within {self.seconds:g} s"})


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
        except Exception:
            logger.exception("unhandled error on %s %s", scope["method"], _clean(scope["path"]))
            if tracked.started:
                raise
            await send_json(send, 500, {"detail": "internal server error"})


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
        status = 500

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
            metrics.record_request(template, state.get("model_name"), status, time.perf_counter() - start)


def _clean(value: str) -> str:
    """Strip CR/LF so that client-controlled text cannot forge log lines."""
    return value.replace("\r", "\\r").replace("\n", "\\n")


async def _validation_error_handler(request: Request, exc: Exception) -> JSONResponse:
    # FastAPI's default echoes the offending input, which may be a secret (an API key in /auth/token).
    assert isinstance(exc, RequestValidationError)
    detail = [
        {"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")}
        for e in exc.errors()
    ]
    return JSONResponse(status_code=422, content={"detail": detail})


def install_middleware(app: FastAPI, settings: Settings) -> None:
    """Install the middleware stack and error handlers on `app` (call once, from create_app)."""
    app.add_exception_handler(RequestValidationError, _validation_error_handler)
    # add_middleware prepends: the last added is the outermost.
    app.add_middleware(BodyLimitMiddleware, limit=settings.max_body_bytes)
    app.add_middleware(DeadlineMiddleware, seconds=settings.inference_timeout_s + 5.0)
    app.add_middleware(ServerErrorMiddleware)
    app.add_middleware(SecurityHeadersMiddleware)
    app.add_middleware(MetricsMiddleware)
    if not hasattr(app.state, "predict_limiter"):
        app.state.predict_limiter = RateLimiter(settings.predict_rate_per_minute)
    if not hasattr(app.state, "client_ids"):
        app.state.client_ids = ClientIdentifier(settings.trusted_proxies, client_id_salt(settings))


def client_id_salt(settings: Settings) -> str | None:
    """SDB_CLIENT_IP_SALT, else one derived from the JWT secret: every worker and every restart must give a
    client the same anonymous id, or its volume (and the extraction flag) splits across processes."""
    if settings.client_ip_salt is not None:
        return settings.client_ip_salt.get_secret_value()
    if settings.jwt_secret is not None:
        key = settings.jwt_secret.get_secret_value().encode()
        return hmac.new(key, b"sdb anonymous client id salt", hashlib.sha256).hexdigest()
    return None


class RateLimiter:
    """Token buckets per client: `per_minute` requests a minute, bursts up to `per_minute` (0 = off).

    Counts per worker process: with W workers a client can reach W times the rate (documented).
    """

    def __init__(self, per_minute: int, max_clients: int = 100_000) -> None:
        self.per_minute = per_minute
        self.capacity = float(max(per_minute, 1))
        self.rate = per_minute / 60.0
        self.max_clients = max_clients
        self._buckets: dict[str, tuple[float, float]] = {}
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return self.per_minute > 0

    def acquire(self, client: str, cost: float = 1.0) -> float:
        """0.0 when allowed, else the seconds to wait before a retry can succeed."""
        if not self.enabled:
            return 0.0
        now = time.monotonic()
        with self._lock:
            tokens, last = self._buckets.get(client, (self.capacity, now))
            tokens = min(self.capacity, tokens + (now - last) * self.rate)
            if tokens >= cost:
                self._buckets[client] = (tokens - cost, now)
                return 0.0
            self._buckets[client] = (tokens, now)
            if len(self._buckets) > self.max_clients:
                self._prune(now)
            return (cost - tokens) / self.rate

    def _prune(self, now: float) -> None:
        full_after = self.capacity / self.rate
        stale = [k for k, (_, last) in self._buckets.items() if now - last >= full_after]
        for k in stale:
            del self._buckets[k]

    @staticmethod
    def retry_after(seconds: float) -> str:
        return str(max(1, math.ceil(seconds)))


class ClientIdentifier:
    """The address of the calling client and its anonymous id (a salted hash; addresses are never stored).

    X-Forwarded-For is used only when the direct peer is a trusted proxy; then the right-most address that
    is not itself a trusted proxy is the client.
    """

    def __init__(self, trusted_proxies: list[str], salt: str | None = None) -> None:
        self._trusted = [ipaddress.ip_network(p, strict=False) for p in trusted_proxies]
        self._salt = (salt or secrets.token_hex(32)).encode()

    def _is_trusted(self, address: str) -> bool:
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        return any(ip in net for net in self._trusted)

    def address(self, request: Request) -> str:
        peer = request.client.host if request.client else "unknown"
        if not self._trusted or not self._is_trusted(peer):
            return peer
        forwarded = ",".join(request.headers.getlist("x-forwarded-for"))
        hops = [h.strip() for h in forwarded.split(",") if h.strip()]
        for hop in reversed(hops):
            if not self._is_trusted(hop):
                try:
                    return str(ipaddress.ip_address(hop))
                except ValueError:
                    return peer  # garbage in the header: fall back to the proxy itself
        return peer

    def anonymous_id(self, request: Request) -> str:
        digest = hmac.new(self._salt, self.address(request).encode(), hashlib.sha256).hexdigest()
        return "anon-" + digest[:24]
