"""Admin API (administrator tokens only): users, API keys, audits, usage, extraction watch, models.

An API key's secret appears exactly once, in the answer that creates it; only its prefix and SHA-256 are
stored. Every change is recorded in `security_events` with the acting admin.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, HTTPException, Path, Query, Request

from service.core.deps import AdminDep, DatabaseDep, SessionDep, client_id_of
from service.core.security import new_api_key
from service.core.state import StateDep
from service.crud import accounts, catalog, events, reports
from service.crud.accounts import ConflictError, NotFoundError
from service.crud.principals import Principal, unknown_scopes, unknown_scopes_message
from service.crud.reports import AuditFilter
from service.db.models import ApiKey, User, utcnow
from service.schemas import (
    TEXT,
    AuditOut,
    ClientVolumeOut,
    ErrorResponse,
    EventOut,
    ExtractionOut,
    KeyCreate,
    KeyCreated,
    KeyOut,
    ModelOut,
    Page,
    UsageOut,
    UserCreate,
    UserOut,
)

# Errors raised by the routes themselves carry a string `detail`: document 422 with the generic error model.
router = APIRouter(
    prefix="/admin",
    tags=["admin"],
    responses={422: {"model": ErrorResponse, "description": "Invalid parameters or body."}},
)

MAX_BUCKETS = 10_000

Since = Annotated[datetime | None, Query(description="From this time (inclusive, ISO 8601).")]
Until = Annotated[datetime | None, Query(description="Until this time (exclusive, ISO 8601).")]
Limit = Annotated[int, Query(ge=1, le=1000, description="Page size.")]
Offset = Annotated[int, Query(ge=0, le=10_000_000, description="Rows to skip.")]
# Ids are bounded to the BIGINT range: a larger number is a 422, not a database driver overflow (500).
MAX_ID = 2**63 - 1
PathId = Annotated[int, Path(ge=1, le=MAX_ID)]
QueryId = Annotated[int | None, Query(ge=1, le=MAX_ID)]


def _not_found(exc: NotFoundError) -> HTTPException:
    return HTTPException(status_code=404, detail=str(exc))


def _user(u: User) -> UserOut:
    return UserOut.model_validate(u)


def _key(k: ApiKey) -> KeyOut:
    return KeyOut.model_validate(k)


# ------------------------------------------------------------------------------------------------ users


@router.post("/users", response_model=UserOut, status_code=201, summary="Create a user")
def create_user(body: UserCreate, admin: AdminDep, db: DatabaseDep, request: Request) -> UserOut:
    try:
        with db.write() as s:
            user = accounts.create_user(s, body.name, body.role)
            events.record_event(
                s,
                "user.create",
                "ok",
                actor=admin,
                client_id=client_id_of(request),
                target=f"user:{user.id}",
                detail={"role": body.role},
            )
            out = _user(user)
    except ConflictError as exc:
        raise HTTPException(status_code=409, detail=str(exc)) from None
    return out


@router.get("/users", response_model=Page[UserOut], summary="List users")
def list_users(admin: AdminDep, s: SessionDep, limit: Limit = 100, offset: Offset = 0) -> Page[UserOut]:
    rows, total = accounts.list_users(s, limit=limit, offset=offset)
    return Page[UserOut](items=[_user(u) for u in rows], total=total, limit=limit, offset=offset)


@router.get("/users/{user_id}", response_model=UserOut, summary="One user")
def get_user(user_id: PathId, admin: AdminDep, s: SessionDep) -> UserOut:
    try:
        return _user(accounts.get_user(s, user_id))
    except NotFoundError as exc:
        raise _not_found(exc) from None


def _set_disabled(user_id: int, disabled: bool, admin: Principal, db: Any, request: Request) -> UserOut:
    if disabled and user_id == admin.user_id:
        raise HTTPException(status_code=409, detail="an administrator cannot disable their own account")
    try:
        with db.write() as s:
            user = accounts.set_user_disabled(s, accounts.get_user(s, user_id), disabled)
            events.record_event(
                s,
                "user.disable" if disabled else "user.enable",
                "ok",
                actor=admin,
                client_id=client_id_of(request),
                target=f"user:{user_id}",
            )
            return _user(user)
    except NotFoundError as exc:
        raise _not_found(exc) from None


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
        with db.write() as s:
            user = accounts.get_user(s, user_id)
            if user.disabled:
                raise HTTPException(status_code=409, detail="the user is disabled")
            key = accounts.create_api_key(
                s,
                user,
                prefix=new.prefix,
                digest=new.digest,
                scopes=body.scopes,
                sample_quota=body.sample_quota,
                expires_at=expires_at,
                name=body.name,
            )
            events.record_event(
                s,
                "key.issue",
                "ok",
                actor=admin,
                client_id=client_id_of(request),
                target=f"key:{key.id}",
                detail={"user_id": user_id, "scopes": body.scopes, "sample_quota": body.sample_quota},
            )
            out = KeyCreated(**_key(key).model_dump(), api_key=new.secret)
    except NotFoundError as exc:
        raise _not_found(exc) from None
    return out


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
        raise _not_found(exc) from None
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
        with db.write() as s:
            key = accounts.revoke_key(s, accounts.get_key(s, key_id))
            events.record_event(
                s, "key.revoke", "ok", actor=admin, client_id=client_id_of(request), target=f"key:{key_id}"
            )
            return _key(key)
    except NotFoundError as exc:
        raise _not_found(exc) from None


# ------------------------------------------------------------------------------------------------ audits


def audit_filter(
    user_id: QueryId = None,
    key_id: QueryId = None,
    model: Annotated[str | None, Query(max_length=128, pattern=TEXT)] = None,
    endpoint: Annotated[str | None, Query(max_length=32, pattern=TEXT, examples=["/distill-batch"])] = None,
    client_id: Annotated[str | None, Query(max_length=64, pattern=TEXT)] = None,
    status: Annotated[int | None, Query(ge=100, le=599)] = None,
    since: Since = None,
    until: Until = None,
) -> AuditFilter:
    """The audit filters shared by GET /admin/audits and GET /admin/audits/export."""
    return AuditFilter(
        user_id=user_id,
        key_id=key_id,
        model=model,
        endpoint=endpoint,
        client_id=client_id,
        status=status,
        since=_utc(since),
        until=_utc(until),
    )


AuditFilterDep = Annotated[AuditFilter, Depends(audit_filter)]


@router.get("/audits", response_model=Page[AuditOut], summary="Query audits, newest first")
def list_audits(
    admin: AdminDep, s: SessionDep, f: AuditFilterDep, limit: Limit = 100, offset: Offset = 0
) -> Page[AuditOut]:
    rows, total = reports.list_audits(s, f, limit=limit, offset=offset)
    return Page[AuditOut](
        items=[AuditOut.model_validate(r) for r in rows], total=total, limit=limit, offset=offset
    )


@router.get(
    "/events", response_model=Page[EventOut], summary="Security events (admin actions, auth failures)"
)
def list_events(
    admin: AdminDep,
    s: SessionDep,
    action: Annotated[str | None, Query(max_length=48, pattern=TEXT)] = None,
    user_id: QueryId = None,
    limit: Limit = 100,
    offset: Offset = 0,
) -> Page[EventOut]:
    rows, total = events.list_events(s, action=action, user_id=user_id, limit=limit, offset=offset)
    return Page[EventOut](
        items=[EventOut.model_validate(r) for r in rows], total=total, limit=limit, offset=offset
    )


def _utc(value: datetime | None) -> datetime | None:
    if value is None:
        return None
    try:
        out = value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
        out.timestamp()
    except (OverflowError, ValueError, OSError):
        raise HTTPException(status_code=422, detail="time out of range") from None
    return out


@router.get("/usage", response_model=Page[UsageOut], summary="Per-user usage summary")
def usage(
    admin: AdminDep,
    s: SessionDep,
    since: Since = None,
    until: Until = None,
    limit: Limit = 100,
    offset: Offset = 0,
) -> Page[UsageOut]:
    rows = reports.usage_summary(s, since=_utc(since), until=_utc(until))
    items = [UsageOut(**vars(u)) for u in rows[offset : offset + limit]]
    return Page[UsageOut](items=items, total=len(rows), limit=limit, offset=offset)


def _range(since: datetime | None, until: datetime | None, default_s: int) -> tuple[datetime, datetime]:
    end = _utc(until) or utcnow()
    try:
        start = _utc(since) or end - timedelta(seconds=default_s)
    except OverflowError:
        raise HTTPException(status_code=422, detail="time out of range") from None
    if start >= end:
        raise HTTPException(status_code=422, detail="since must be before until")
    return start, end


@router.get(
    "/usage/clients",
    response_model=Page[ClientVolumeOut],
    summary="Samples pulled over time, per user or per anonymous client, with the extraction flag",
)
def client_usage(
    state: StateDep,
    admin: AdminDep,
    s: SessionDep,
    kind: Literal["user", "anonymous"] = "anonymous",
    since: Since = None,
    until: Until = None,
    bucket_s: Annotated[int, Query(ge=60, le=31 * 86400, description="Width of one time bucket.")] = 3600,
    limit: Limit = 100,
    offset: Offset = 0,
) -> Page[ClientVolumeOut]:
    settings = state.settings
    start, end = _range(since, until, 86400)
    if (end - start).total_seconds() / bucket_s > MAX_BUCKETS:
        raise HTTPException(status_code=422, detail=f"more than {MAX_BUCKETS} buckets: widen bucket_s")
    rows, total = reports.client_volumes(
        s,
        kind=kind,
        since=start,
        until=end,
        bucket_s=bucket_s,
        window_s=settings.extraction_window_s,
        threshold=settings.extraction_sample_threshold,
        limit=limit,
        offset=offset,
    )
    items = [ClientVolumeOut.model_validate(vars(r)) for r in rows]
    return Page[ClientVolumeOut](items=items, total=total, limit=limit, offset=offset)


@router.get(
    "/extraction", response_model=ExtractionOut, summary="Anonymous clients flagged as possible extraction"
)
def extraction(
    state: StateDep,
    admin: AdminDep,
    s: SessionDep,
    since: Since = None,
    until: Until = None,
    limit: Limit = 100,
) -> ExtractionOut:
    settings = state.settings
    window = settings.extraction_window_s
    threshold = settings.extraction_sample_threshold
    start, end = _range(since, until, 7 * 86400)
    rows, _ = reports.client_volumes(
        s,
        kind="anonymous",
        since=start,
        until=end,
        bucket_s=window,
        window_s=window,
        threshold=threshold,
        limit=1_000_000,
        offset=0,
    )
    flagged = [ClientVolumeOut.model_validate(vars(r)) for r in rows if r.flagged][:limit]
    return ExtractionOut(
        rule=(
            f"an anonymous client is flagged when the /predict samples answered to it within one "
            f"{window} s window (aligned on the Unix epoch) exceed {threshold}"
        ),
        window_s=window,
        threshold_samples=threshold,
        since=start,
        until=end,
        flagged=flagged,
    )


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
