"""A suspect model behind an HTTP endpoint that answers like POST /predict, queried without SSRF.

The service fetches a suspect URL only when the operator allows its host (SDB_TRACE_ALLOWED_HOSTS: names,
IP addresses or CIDR networks; empty: never). Every address a name resolves to must be public, unless it
lies in an address or network listed itself (so `127.0.0.1` must be listed by address to reach loopback).
The check runs when the connection opens, on the address actually dialled (no DNS rebinding between check
and connect); redirects are never followed, proxies from the environment are ignored, every answer is
read to at most `max_response_bytes`, and each request and the whole trace have time limits.
"""

from __future__ import annotations

import base64
import io
import ipaddress
import socket
import ssl
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import httpcore
import httpx
import numpy as np
import orjson

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
MAX_RESPONSE_BYTES = 16 * 1024 * 1024
MAX_URL_LENGTH = 2048


class SuspectRefused(ValueError):
    """The suspect URL may not be fetched (malformed, not allowed, a private address): a 4xx."""

    def __init__(self, message: str, status: int = 403) -> None:
        super().__init__(message)
        self.status = status


class SuspectFailed(RuntimeError):
    """The suspect did not answer usable probabilities (down, too slow, too large, wrong shape): a 502."""


@dataclass(frozen=True)
class HostPolicy:
    names: frozenset[str]  # lower-case host names allowed
    networks: tuple[IPNetwork, ...]  # addresses and networks allowed (private ones included)

    @classmethod
    def parse(cls, entries: Iterable[str]) -> HostPolicy:
        names: set[str] = set()
        networks: list[IPNetwork] = []
        for raw in entries:
            entry = raw.strip().lower().strip("[]")
            if not entry:
                continue
            try:
                networks.append(ipaddress.ip_network(entry, strict=False))
            except ValueError:
                names.add(entry.rstrip("."))
        return cls(frozenset(names), tuple(networks))

    @property
    def empty(self) -> bool:
        return not self.names and not self.networks

    def listed(self, address: IPAddress) -> bool:
        return any(address.version == n.version and address in n for n in self.networks)

    def check_host(self, host: str) -> None:
        """Refuse a host that is neither a listed name nor an address inside a listed network."""
        if self.empty:
            raise SuspectRefused(
                "this service fetches no suspect URL: its operator allows none (SDB_TRACE_ALLOWED_HOSTS); "
                "trace the suspect with `sdb trace` instead"
            )
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            if host.rstrip(".").lower() not in self.names:
                raise SuspectRefused(f"host {host!r} is not in SDB_TRACE_ALLOWED_HOSTS") from None
            return
        if not self.listed(address):
            raise SuspectRefused(f"address {host} is not in SDB_TRACE_ALLOWED_HOSTS")

    def check_address(self, host: str, address: IPAddress) -> None:
        """Refuse a non-public address unless it is listed itself (names never unlock private ones)."""
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        if address.is_global and not address.is_multicast:
            return
        if self.listed(address):
            return
        raise SuspectRefused(
            f"{host!r} resolves to a private, loopback or reserved address ({address}); list that address "
            "or network in SDB_TRACE_ALLOWED_HOSTS to allow it"
        )


def check_url(url: str, policy: HostPolicy) -> tuple[str, int]:
    """(host, port) of an allowed http(s) URL, or SuspectRefused saying why not."""
    if len(url) > MAX_URL_LENGTH:
        raise SuspectRefused("the suspect URL is too long", 422)
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise SuspectRefused("the suspect URL is not a valid URL", 422) from None
    if parts.scheme not in ("http", "https"):
        raise SuspectRefused("the suspect URL must be http:// or https://", 422)
    if parts.username is not None or parts.password is not None:
        raise SuspectRefused("the suspect URL may not carry credentials", 422)
    host = parts.hostname
    if not host:
        raise SuspectRefused("the suspect URL has no host", 422)
    policy.check_host(host)
    return host, port or (443 if parts.scheme == "https" else 80)


class _GuardedBackend(httpcore.SyncBackend):
    """Resolves the host itself and dials only addresses the policy allows."""

    def __init__(self, policy: HostPolicy) -> None:
        self._policy = policy

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Any = None,
    ) -> httpcore.NetworkStream:
        self._policy.check_host(host)
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except OSError as exc:
            raise SuspectFailed(f"cannot resolve {host!r}: {exc.strerror or exc}") from None
        addresses = [ipaddress.ip_address(str(info[4][0]).split("%")[0]) for info in infos]
        for address in addresses:  # every address: a name must not hide a private one among public ones
            self._policy.check_address(host, address)
        return super().connect_tcp(str(addresses[0]), port, timeout, local_address, socket_options)


def guarded_client(policy: HostPolicy, timeout_s: float) -> httpx.Client:
    """An httpx client that dials only allowed public (or listed) addresses, follows no redirect and
    ignores proxy variables."""
    transport = httpx.HTTPTransport(trust_env=False)
    # httpx has no public hook for the network backend: the pool is rebuilt with the guarded one.
    transport._pool = httpcore.ConnectionPool(
        ssl_context=ssl.create_default_context(), network_backend=_GuardedBackend(policy), max_connections=2
    )
    return httpx.Client(transport=transport, timeout=timeout_s, follow_redirects=False, trust_env=False)


def encode_npy(x: np.ndarray) -> str:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(x, dtype=np.float32), allow_pickle=False)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def parse_probabilities(body: Any, n: int) -> np.ndarray:
    """[n, C] probabilities from a /predict-style answer: `predictions[i].probabilities`, or a bare
    `probabilities` list of rows."""
    rows: Any = None
    if isinstance(body, dict):
        preds = body.get("predictions")
        if isinstance(preds, list):
            rows = [p.get("probabilities") if isinstance(p, dict) else None for p in preds]
        elif isinstance(body.get("probabilities"), list):
            rows = body["probabilities"]
    if rows is None:
        raise SuspectFailed("the suspect's answer has no `predictions[].probabilities`")
    try:
        p = np.asarray(rows, dtype=np.float64)
    except (TypeError, ValueError):
        raise SuspectFailed("the suspect's probabilities are not a table of numbers") from None
    if p.ndim != 2 or p.shape[0] != n or p.shape[1] < 2:
        raise SuspectFailed(f"the suspect answered probabilities of shape {p.shape} for {n} inputs")
    if not np.isfinite(p).all() or (p < 0).any():
        raise SuspectFailed("the suspect's probabilities are not finite and non-negative")
    return p.astype(np.float32)


@dataclass
class HttpSuspect:
    """raw inputs [N, ...] -> the suspect endpoint's probabilities [N, C], within an overall deadline."""

    url: str
    client: httpx.Client
    model: str | None = None
    deadline: float | None = None  # time.monotonic() past which no further request starts
    max_response_bytes: int = MAX_RESPONSE_BYTES
    queries: int = 0

    def __call__(self, x: Any) -> np.ndarray:
        arr = x.detach().cpu().numpy() if hasattr(x, "detach") else np.asarray(x)
        if self.deadline is not None and time.monotonic() > self.deadline:
            raise SuspectFailed("the trace ran out of time querying the suspect (SDB_TRACE_TIMEOUT_S)")
        body: dict[str, Any] = {"inputs_b64": encode_npy(arr)}
        if self.model is not None:
            body["model"] = self.model
        try:
            with self.client.stream(
                "POST", self.url, content=orjson.dumps(body), headers={"content-type": "application/json"}
            ) as r:
                if r.is_redirect:
                    raise SuspectFailed(
                        f"the suspect answered a redirect ({r.status_code}); none is followed"
                    )
                if r.status_code != 200:
                    raise SuspectFailed(f"the suspect answered HTTP {r.status_code}")
                data = bytearray()
                for chunk in r.iter_bytes():
                    data += chunk
                    if len(data) > self.max_response_bytes:
                        raise SuspectFailed(f"the suspect's answer exceeds {self.max_response_bytes} bytes")
        except httpx.TimeoutException:
            raise SuspectFailed("the suspect did not answer in time") from None
        except httpx.HTTPError as exc:
            raise SuspectFailed(f"cannot reach the suspect ({type(exc).__name__})") from None
        self.queries += len(arr)
        try:
            parsed = orjson.loads(bytes(data))
        except orjson.JSONDecodeError:
            raise SuspectFailed("the suspect's answer is not JSON") from None
        return parse_probabilities(parsed, len(arr))
