"""Client identification: the calling address (trusted proxies only) and its salted anonymous id."""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import secrets

from fastapi import Request

from service.core.config import Settings


def client_id_salt(settings: Settings) -> str | None:
    """SDB_CLIENT_IP_SALT, else one derived from the JWT secret: every worker and every restart must give a
    client the same anonymous id, or its volume (and the extraction flag) splits across processes."""
    if settings.client_ip_salt is not None:
        return settings.client_ip_salt.get_secret_value()
    if settings.jwt_secret is not None:
        key = settings.jwt_secret.get_secret_value().encode()
        return hmac.new(key, b"sdb anonymous client id salt", hashlib.sha256).hexdigest()
    return None


class ClientIdentifier:
    """The address of the calling client and its anonymous id (a salted hash; addresses are never stored).

    X-Forwarded-For is used only when the direct peer is a trusted proxy; then the right-most address that
    is not itself a trusted proxy is the client.
    """

    def __init__(self, trusted_proxies: list[str], salt: str | None = None) -> None:
        self._trusted = [ipaddress.ip_network(p, strict=False) for p in trusted_proxies]
        self._salt = (salt or secrets.token_hex(32)).encode()

    @classmethod
    def from_settings(cls, settings: Settings) -> ClientIdentifier:
        return cls(settings.trusted_proxies, client_id_salt(settings))

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
