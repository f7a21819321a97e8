"""Admin API, accounts: users, their API keys, and the model catalog.

An API key's secret appears exactly once, in the answer that creates it; only its prefix and SHA-256 are
stored. Every change is recorded in `security_events` with the acting admin.
"""

from __future__ import annotations

from datetime import UTC, timedelta
from typing import Annotated, Any

from fastapi import HTTPException, Query, Request

from service.core.deps import AdminDep, DatabaseDep, SessionDep, client_id_of
from service.core.security import new_api_key
from service.core.state import StateDep
from service.crud import accounts, admin_actions, catalog
from service.crud.accounts import ConflictError, NotFoundError
from service.crud.principals import Principal, unknown_scopes, unknown_scopes_message
from service.crud.watermarks import WatermarkBankFull
from service.db.models import ApiKey, User, utcnow
from service.db.session import Database
from service.routes.admin.common import MAX_ID, Limit, Offset, PathId, admin_router, not_found
from service.schemas_admin import KeyCreate, KeyCreated, KeyOut, ModelOut, Page, UserCreate, UserOut

router = admin_router()


def _user(u: User) -> UserOut:
    return UserOut.model_validate(u)


def _key(k: ApiKey) -> KeyOut:
    return KeyOut.model_validate(k)


# ------------------------------------------------------------------------------------------------ users


@router.post("/users", response_model=UserOut, status_code=201, summary="Create a user")
def create_user(body: UserCreate, admin: AdminDep, db: DatabaseDep, request: Request) -> UserOut:
    try:
        user = admin_actions.create_user(
            db, body.name, body.role, actor=admin, client_id=client_id_of(request)
        )
    except ConflictError as exc:
        raise HTTPException(status_code=409, detail=str(exc)) from None
    return _user(user)


@router.get("/users", response_model=Page[UserOut], summary="List users")
def list_users(admin: AdminDep, s: SessionDep, limit: Limit = 100, offset: Offset = 0) -> Page[UserOut]:
    rows, total = accounts.list_users(s, limit=limit, offset=offset)
    return Page[UserOut](items=[_user(u) for u in rows], total=total, limit=limit, offset=offset)


@router.get("/users/{user_id}", response_model=UserOut, summary="One user")
def get_user(user_id: PathId, admin: AdminDep, s: SessionDep) -> UserOut:
    try:
        return _user(accounts.get_user(s, user_id))
    except NotFoundError as exc:
        raise not_found(exc) from None


def _set_disabled(user_id: int, disabled: bool, admin: Principal, db: Database, request: Request) -> UserOut:
    if disabled and user_id == admin.user_id:
        raise HTTPException(status_code=409, detail="an administrator cannot disable their own account")
    try:
        user = admin_actions.set_user_disabled(
            db, user_id, disabled, actor=admin, client_id=client_id_of(request)
        )
    except NotFoundError as exc:
        raise not_found(exc) from None
    return _user(user)


@router.post(
    "/users/{user_id}/disable", response_model=UserOut, summary="Disable a user (tokens stop at once)"
)
def disable_user(user_id: PathId, admin: AdminDep, db: DatabaseDep, request: Request) -> UserOut:
    return _set_disabled(user_id, True, admin, db, request)


@router.post("/users/{user_id}/enable", response_model=UserOut, summary="Enable a disabled user")
def enable_user(user_id: PathId, admin: AdminDep, db: DatabaseDep, request: Request) -> UserOut:
    return _set_disabled(user_id, False, admin, db, request)


# ------------------------------------------------------------------------------------------------ keys


@router.post(
    "/users/{user_id}/keys",
    response_model=KeyCreated,
    status_code=201,
    summary="Issue an API key (the secret is shown once)",
)
def issue_key(
    user_id: PathId, body: KeyCreate, admin: AdminDep, db: DatabaseDep, request: Request, state: StateDep
) -> KeyCreated:
    # A key for a model that is not served is refused rather than kept for a later deployment: a typo would
    # otherwise give a key that only fails when its holder first uses it.
    unknown = unknown_scopes(body.scopes, state.models.names())
    if unknown:
        raise HTTPException(status_code=422, detail=unknown_scopes_message(unknown, state.models.names()))
    expires_at = body.expires_at
    if expires_at is not None:
        if expires_at.tzinfo is None:
            expires_at = expires_at.replace(tzinfo=UTC)
        if expires_at <= utcnow():
            raise HTTPException(status_code=422, detail="expires_at is in the past")
    if body.expires_in_s is not None:
        if expires_at is not None:
            raise HTTPException(status_code=422, detail="give expires_at or expires_in_s, not both")
        expires_at = utcnow() + timedelta(seconds=body.expires_in_s)
    new = new_api_key()
    try:
        key = admin_actions.issue_key(
            db,
            user_id,
            new,
            scopes=body.scopes,
            sample_quota=body.sample_quota,
            expires_at=expires_at,
            name=body.name,
            actor=admin,
            client_id=client_id_of(request),
            watermark_id=state.watermarks.watermark_id if body.watermark else None,
            bank_size=state.watermarks.bank_size,
        )
    except NotFoundError as exc:
        raise not_found(exc) from None
    except (ConflictError, WatermarkBankFull) as exc:
        raise HTTPException(status_code=409, detail=str(exc)) from None
    return KeyCreated(**_key(key).model_dump(), api_key=new.secret)


@router.get("/keys", response_model=Page[KeyOut], summary="List API keys (never their secrets)")
def list_keys(
    admin: AdminDep,
    s: SessionDep,
    user_id: Annotated[int | None, Query(ge=1, le=MAX_ID, description="Only this user's keys.")] = None,
    limit: Limit = 100,
    offset: Offset = 0,
) -> Page[KeyOut]:
    rows, total = accounts.list_keys(s, user_id=user_id, limit=limit, offset=offset)
    return Page[KeyOut](items=[_key(k) for k in rows], total=total, limit=limit, offset=offset)


@router.get("/users/{user_id}/keys", response_model=Page[KeyOut], summary="List one user's API keys")
def list_user_keys(
    user_id: PathId, admin: AdminDep, s: SessionDep, limit: Limit = 100, offset: Offset = 0
) -> Page[KeyOut]:
    try:
        accounts.get_user(s, user_id)
    except NotFoundError as exc:
        raise not_found(exc) from None
    rows, total = accounts.list_keys(s, user_id=user_id, limit=limit, offset=offset)
    return Page[KeyOut](items=[_key(k) for k in rows], total=total, limit=limit, offset=offset)


@router.post(
    "/keys/{key_id}/revoke", response_model=KeyOut, summary="Revoke an API key (tokens stop at once)"
)
def revoke_key(key_id: PathId, admin: AdminDep, db: DatabaseDep, request: Request) -> KeyOut:
    # Like disabling one's own account: the signed-in admin always keeps a working credential, so the last
    # admin credential can never be revoked (`sdb admin bootstrap` refuses once an admin exists).
    if key_id == admin.key_id:
        raise HTTPException(
            status_code=409,
            detail="this is the API key you are signed in with: sign in with another admin key to revoke it",
        )
    try:
        key = admin_actions.revoke_key(db, key_id, actor=admin, client_id=client_id_of(request))
    except NotFoundError as exc:
        raise not_found(exc) from None
    return _key(key)


# ------------------------------------------------------------------------------------------------ models


@router.get(
    "/models", response_model=list[ModelOut], summary="Models with their metadata (never the box key)"
)
def list_models(state: StateDep, admin: AdminDep, s: SessionDep) -> list[ModelOut]:
    live: dict[str, dict[str, Any]] = {m.name: m.info() for m in state.models}
    out: dict[str, ModelOut] = {}
    for rec in catalog.list_model_records(s):
        out[rec.name] = ModelOut(
            name=rec.name,
            version=rec.version,
            loaded=rec.name in live,
            info=live.get(rec.name, rec.info),
            first_seen_at=rec.first_seen_at,
            last_loaded_at=rec.last_loaded_at,
        )
    for name, info in live.items():
        if name not in out:
            out[name] = ModelOut(
                name=name,
                version=str(info.get("version", "")),
                loaded=True,
                info=info,
                first_seen_at=None,
                last_loaded_at=None,
            )
    return [out[k] for k in sorted(out)]
