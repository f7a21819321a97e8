"""GET /auth/key: the caller's own API key (scopes, sample quota and what is left of it, expiry), so that a
licensed user can see what a distillation will cost before starting it. Never the secret."""

from __future__ import annotations

from fastapi import APIRouter

from service.core.deps import CurrentPrincipal, SessionDep
from service.crud import accounts
from service.schemas import OwnKeyOut

router = APIRouter(tags=["auth"])


@router.get(
    "/auth/key",
    response_model=OwnKeyOut,
    summary="The calling token's API key: scopes, sample quota left, expiry",
    responses={401: {"description": "Missing, invalid or expired token; revoked key or disabled user."}},
)
def own_key(principal: CurrentPrincipal, s: SessionDep) -> OwnKeyOut:
    key = accounts.get_key(s, principal.key_id)  # exists: the principal check just read it
    remaining = None if key.sample_quota is None else max(0, key.sample_quota - key.samples_used)
    return OwnKeyOut(
        id=key.id,
        name=key.name,
        prefix=key.prefix,
        scopes=sorted(principal.scopes),
        sample_quota=key.sample_quota,
        samples_used=key.samples_used,
        samples_remaining=remaining,
        expires_at=key.expires_at,
    )
