"""API keys and access tokens.

API keys: `sdb_` + 43 URL-safe characters (256 random bits). Only the first `PREFIX_LEN` characters (for
lookup and display) and the SHA-256 digest are stored; a slow hash adds nothing for keys of this entropy.
Digests are compared with `hmac.compare_digest`.

Access tokens: JWT signed with HS256 (python-jose). The algorithm is pinned on issue AND on verify (the
header's `alg` is never trusted); `exp`, `iat`, `nbf`, `iss`, `aud`, `sub`, `jti` and `scope` are all
required; any `crit` header is refused (no extension is understood); `iss` must equal the configured
issuer exactly. Every failure raises `TokenError` with one generic message, so that callers cannot leak
which check failed; the reason code is only for metrics.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass
from typing import Any

from jose import jwt
from jose.exceptions import ExpiredSignatureError, JOSEError

API_KEY_PREFIX = "sdb_"
API_KEY_RANDOM_BYTES = 32
PREFIX_LEN = 12  # "sdb_" + 8 random characters
MIN_API_KEY_LEN = 32
MAX_API_KEY_LEN = 256
JWT_ALGORITHM = "HS256"
MAX_TOKEN_LEN = 4096
CLOCK_LEEWAY_S = 5
GENERIC_TOKEN_ERROR = "invalid or expired access token"


@dataclass(frozen=True)
class NewApiKey:
    secret: str  # shown to its owner once, never stored
    prefix: str
    digest: str


def hash_api_key(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


def api_key_prefix(secret: str) -> str:
    return secret[:PREFIX_LEN]


def looks_like_api_key(secret: str) -> bool:
    return MIN_API_KEY_LEN <= len(secret) <= MAX_API_KEY_LEN and secret.isascii() and secret.isprintable()


def new_api_key() -> NewApiKey:
    secret = API_KEY_PREFIX + secrets.token_urlsafe(API_KEY_RANDOM_BYTES)
    return NewApiKey(secret=secret, prefix=api_key_prefix(secret), digest=hash_api_key(secret))


def api_key_from_secret(secret: str) -> NewApiKey:
    """Wrap a secret chosen by the operator (the bootstrap admin token) like a generated key."""
    if not looks_like_api_key(secret):
        raise ValueError(
            f"an API key must be {MIN_API_KEY_LEN}..{MAX_API_KEY_LEN} printable ASCII characters"
        )
    return NewApiKey(secret=secret, prefix=api_key_prefix(secret), digest=hash_api_key(secret))


def api_key_matches(secret: str, digest: str) -> bool:
    return hmac.compare_digest(hash_api_key(secret).encode(), digest.encode())


class TokenError(Exception):
    """The token is not acceptable. `reason` is a fixed code for metrics; str() is always generic."""

    def __init__(self, reason: str) -> None:
        super().__init__(GENERIC_TOKEN_ERROR)
        self.reason = reason


@dataclass(frozen=True)
class TokenClaims:
    user_id: int
    key_id: int
    scopes: frozenset[str]
    issued_at: int
    expires_at: int


@dataclass(frozen=True)
class TokenConfig:
    secret: str
    issuer: str
    audience: str
    ttl_seconds: int


def issue_token(
    cfg: TokenConfig, *, user_id: int, key_id: int, scopes: list[str], expires_at: float | None = None
) -> tuple[str, int]:
    """Return (token, lifetime in seconds). The lifetime never outlives the key's own expiry."""
    now = int(time.time())
    exp = now + cfg.ttl_seconds
    if expires_at is not None:
        exp = min(exp, int(expires_at))
    claims = {
        "iss": cfg.issuer,
        "aud": cfg.audience,
        "sub": str(user_id),
        "jti": str(key_id),
        "scope": " ".join(sorted(set(scopes))),
        "iat": now,
        "nbf": now,
        "exp": exp,
    }
    token = jwt.encode(claims, cfg.secret, algorithm=JWT_ALGORITHM, headers={"typ": "JWT"})
    return token, max(0, exp - now)


_DECODE_OPTIONS = {
    "verify_signature": True,
    "verify_aud": True,
    "verify_iat": True,
    "verify_exp": True,
    "verify_nbf": True,
    "verify_iss": True,
    "verify_sub": True,
    "verify_jti": True,
    "require_aud": True,
    "require_iat": True,
    "require_exp": True,
    "require_nbf": True,
    "require_iss": True,
    "require_sub": True,
    "require_jti": True,
    "leeway": CLOCK_LEEWAY_S,
}


def _positive_int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, str) or not value.isdigit() or len(value) > 18:
        raise TokenError("claims")
    return int(value)


def verify_token(cfg: TokenConfig, token: str) -> TokenClaims:
    if not token or len(token) > MAX_TOKEN_LEN or token.count(".") != 2:
        raise TokenError("malformed")
    try:
        header = jwt.get_unverified_header(token)
    except JOSEError as exc:
        raise TokenError("malformed") from exc
    if not isinstance(header, dict) or header.get("alg") != JWT_ALGORITHM:
        raise TokenError("algorithm")
    if "crit" in header or any(k in header for k in ("jku", "jwk", "x5u", "x5c")):
        raise TokenError("header")
    try:
        claims = jwt.decode(
            token,
            cfg.secret,
            algorithms=[JWT_ALGORITHM],
            audience=cfg.audience,
            issuer=cfg.issuer,
            options=_DECODE_OPTIONS,
        )
    except ExpiredSignatureError as exc:
        raise TokenError("expired") from exc
    except JOSEError as exc:
        raise TokenError("invalid") from exc
    # Belt and braces on top of the library: exact issuer/audience, integer times, a sane lifetime.
    if claims.get("iss") != cfg.issuer or claims.get("aud") != cfg.audience:
        raise TokenError("claims")
    iat, exp = claims.get("iat"), claims.get("exp")
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in (iat, exp, claims.get("nbf"))):
        raise TokenError("claims")
    assert isinstance(iat, int) and isinstance(exp, int)
    now = time.time()
    if iat > now + CLOCK_LEEWAY_S or exp - iat > cfg.ttl_seconds + CLOCK_LEEWAY_S:
        raise TokenError("claims")
    scope = claims.get("scope")
    if not isinstance(scope, str):
        raise TokenError("claims")
    return TokenClaims(
        user_id=_positive_int(claims.get("sub")),
        key_id=_positive_int(claims.get("jti")),
        scopes=frozenset(scope.split()),
        issued_at=iat,
        expires_at=exp,
    )
