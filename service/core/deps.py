"""FastAPI dependencies: the database, the calling principal (JWT + database checks) and the admin role.

Tokens are read from the `Authorization: Bearer` header only (never from the query string). The key and
the user behind a token are re-checked in the database on every request, so a revoked key or a disabled
user is refused at once by every worker.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, HTTPException, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session

from service.core.security import GENERIC_TOKEN_ERROR, TokenError, verify_token
from service.core.state import StateDep, get_state
from service.crud import events
from service.crud.principals import AuthFailure, Principal, load_principal
from service.db.session import Database
from service.observability import metrics

bearer_scheme = HTTPBearer(
    auto_error=False,
    scheme_name="BearerJWT",
    description="An access token from POST /auth/token (exchange an API key for it).",
)
BearerCredentials = Annotated[HTTPAuthorizationCredentials | None, Depends(bearer_scheme)]

MISSING_TOKEN = "missing access token: send `Authorization: Bearer <token>` from POST /auth/token"


def unauthorized() -> HTTPException:
    """401 for a token that is invalid, expired, revoked or of a disabled user (one answer for all)."""
    return HTTPException(
        status_code=401,
        detail={"error": "invalid_token", "message": GENERIC_TOKEN_ERROR},
        headers={"WWW-Authenticate": 'Bearer realm="sdb", error="invalid_token"'},
    )


def missing_token() -> HTTPException:
    """401 for a request without a bearer token (RFC 6750 3.1: no error code in the challenge)."""
    return HTTPException(
        status_code=401,
        detail={"error": "invalid_request", "message": MISSING_TOKEN},
        headers={"WWW-Authenticate": 'Bearer realm="sdb"'},
    )


def get_db(request: Request) -> Database:
    return get_state(request).db


def client_id_of(request: Request) -> str:
    return get_state(request).client_ids.anonymous_id(request)


DatabaseDep = Annotated[Database, Depends(get_db)]


def get_session(db: DatabaseDep) -> Iterator[Session]:
    """A read session for the request; routes that write use `db.write()` and commit before answering."""
    with db.session() as session:
        yield session


SessionDep = Annotated[Session, Depends(get_session)]


def get_principal(request: Request, credentials: BearerCredentials, state: StateDep) -> Principal:
    if credentials is None or not credentials.credentials:
        metrics.record_auth_failure("missing")
        raise missing_token()
    try:
        claims = verify_token(state.tokens, credentials.credentials)
    except TokenError as exc:
        metrics.record_auth_failure(exc.reason)
        events.record_event_safely(
            state.db,
            "auth.failure",
            "denied",
            client_id=client_id_of(request),
            target=request.url.path,
            detail={"reason": exc.reason},
        )
        raise unauthorized() from None
    try:
        with state.db.session() as s:
            return load_principal(s, claims)
    except AuthFailure as exc:
        metrics.record_auth_failure(exc.reason)
        user_id, key_id = exc.attributed_to(claims)
        events.record_event_safely(
            state.db,
            "auth.failure",
            "denied",
            actor_user_id=user_id,
            actor_key_id=key_id,
            client_id=client_id_of(request),
            target=request.url.path,
            detail={"reason": exc.reason},
        )
        raise unauthorized() from None


CurrentPrincipal = Annotated[Principal, Depends(get_principal)]


def require_admin(request: Request, principal: CurrentPrincipal, db: DatabaseDep) -> Principal:
    if not principal.is_admin:
        metrics.record_auth_failure("not_admin")
        events.record_event_safely(
            db,
            "auth.forbidden",
            "denied",
            actor=principal,
            client_id=client_id_of(request),
            target=request.url.path,
        )
        raise HTTPException(
            status_code=403,
            detail={"error": "insufficient_scope", "message": "this route needs an administrator's token"},
        )
    return principal


AdminDep = Annotated[Principal, Depends(require_admin)]
