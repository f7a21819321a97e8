"""The token exchange: an API key (the OAuth2 client secret) for the claims of an access token.

One write transaction checks the key and its user, narrows the scopes to those requested, marks the key
used and records the security event of the outcome (issued, or denied and why).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from service.crud import accounts, events
from service.crud.principals import granted_scopes
from service.db.models import utcnow
from service.db.session import Database

ACTION = "token.issue"


@dataclass(frozen=True)
class TokenGrant:
    """What an access token may carry for a usable key."""

    user_id: int
    key_id: int
    scopes: list[str]
    expires_at: datetime | None  # the key's expiry: no token outlives its key


class ExchangeRefused(Exception):
    """`reason`: "invalid_key" (unknown, revoked or expired key, or disabled user; which one is recorded in
    the security event, never told to the caller) or "invalid_scope" (a requested scope the key lacks)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def exchange_api_key(db: Database, secret: str, requested: str | None, client_id: str | None) -> TokenGrant:
    """The grant of a usable key; raises ExchangeRefused otherwise. `requested`: space-separated scopes to
    narrow the token to (RFC 6749 5.2: a scope the key lacks refuses the exchange rather than silently
    issuing a narrower token)."""
    with db.write() as s:
        key = accounts.find_key_by_secret(s, secret)
        if key is None:
            events.record_event(s, ACTION, "denied", client_id=client_id, detail={"reason": "unknown_key"})
            refused = ExchangeRefused("invalid_key")
        else:
            reason = accounts.key_usable(key, key.user, utcnow())
            scopes = sorted(key.scopes)
            if reason is None and requested is not None:
                asked = frozenset(requested.split())
                scopes = sorted(granted_scopes(key.scopes, asked))
                if set(scopes) != asked:
                    reason = "invalid_scope"
            if reason is None:
                key.last_used_at = utcnow()
            outcome, detail = ("ok", {"scopes": scopes}) if reason is None else ("denied", {"reason": reason})
            events.record_event(
                s,
                ACTION,
                outcome,
                actor_user_id=key.user_id,
                actor_key_id=key.id,
                client_id=client_id,
                detail=detail,
            )
            if reason is None:
                return TokenGrant(key.user_id, key.id, scopes, key.expires_at)
            refused = ExchangeRefused("invalid_scope" if reason == "invalid_scope" else "invalid_key")
    raise refused  # after the commit: the denial's event is kept
