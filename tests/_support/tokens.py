"""Hand-forged JWTs: a token whose header and claims can say anything, and the catalogue of hostile tokens."""

from __future__ import annotations

import base64
import hmac
import json
import time
from typing import Any

from jose import jwt

from service.core.security import TokenConfig, issue_token

SECRET = "s" * 48
CFG = TokenConfig(secret=SECRET, issuer="sdb", audience="sdb-distill", ttl_seconds=900)


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def forge(
    header: dict[str, Any], claims: dict[str, Any], secret: str | None = SECRET, alg: str = "sha256"
) -> str:
    """A compact JWS built by hand, so that the header can say anything."""
    signing_input = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(claims).encode())}"
    sig = b"" if secret is None else hmac.new(secret.encode(), signing_input.encode(), alg).digest()
    return f"{signing_input}.{b64(sig)}"


def good_claims(**over: Any) -> dict[str, Any]:
    now = int(time.time())
    claims: dict[str, Any] = {
        "iss": "sdb",
        "aud": "sdb-distill",
        "sub": "7",
        "jti": "11",
        "scope": "alpha beta",
        "iat": now,
        "nbf": now,
        "exp": now + 600,
    }
    claims.update(over)
    return {k: v for k, v in claims.items() if v is not None}


HS256 = {"alg": "HS256", "typ": "JWT"}


ATTACKS: dict[str, Any] = {
    "alg none": lambda: forge({"alg": "none", "typ": "JWT"}, good_claims(), secret=None),
    "alg None capitalized": lambda: forge({"alg": "None"}, good_claims(), secret=None),
    "wrong secret": lambda: forge(HS256, good_claims(), secret="w" * 48),
    "HS512 with the right secret": lambda: forge({"alg": "HS512"}, good_claims(), alg="sha512"),
    "RS256 header over an HMAC signature": lambda: forge({"alg": "RS256"}, good_claims()),
    "expired": lambda: forge(HS256, good_claims(iat=int(time.time()) - 1000, exp=int(time.time()) - 100)),
    "missing exp": lambda: forge(HS256, good_claims(exp=None)),
    "missing iat": lambda: forge(HS256, good_claims(iat=None)),
    "missing nbf": lambda: forge(HS256, good_claims(nbf=None)),
    "nbf in the future": lambda: forge(HS256, good_claims(nbf=int(time.time()) + 300)),
    "iat in the future": lambda: forge(HS256, good_claims(iat=int(time.time()) + 300)),
    "wrong iss": lambda: forge(HS256, good_claims(iss="evil")),
    "iss is a substring of the expected one": lambda: forge(HS256, good_claims(iss="sd")),
    "iss contains the expected one": lambda: forge(HS256, good_claims(iss="sdb-evil")),
    "iss as a list": lambda: forge(HS256, good_claims(iss=["sdb"])),
    "missing iss": lambda: forge(HS256, good_claims(iss=None)),
    "wrong aud": lambda: forge(HS256, good_claims(aud="other")),
    "missing aud": lambda: forge(HS256, good_claims(aud=None)),
    "missing sub": lambda: forge(HS256, good_claims(sub=None)),
    "missing jti": lambda: forge(HS256, good_claims(jti=None)),
    "non-numeric jti": lambda: forge(HS256, good_claims(jti="1 OR 1=1")),
    "scope not a string": lambda: forge(HS256, good_claims(scope=["alpha"])),
    "lifetime longer than the configured ttl": lambda: forge(
        HS256, good_claims(exp=int(time.time()) + 86400)
    ),
    "unknown crit header": lambda: forge({**HS256, "crit": ["x-extension"], "x-extension": 1}, good_claims()),
    "embedded jwk header": lambda: forge(
        {**HS256, "jwk": {"kty": "oct", "k": b64(b"k" * 32)}}, good_claims()
    ),
    "tampered payload": lambda: _tamper(),
    "garbage": lambda: "not.a.token",
    "two segments": lambda: "abc.def",
    "empty": lambda: "",
    "oversized": lambda: "a" * 5000 + ".b.c",
}


def _tamper() -> str:
    token, _ = issue_token(CFG, user_id=7, key_id=11, scopes=["alpha"])
    head, _, sig = token.split(".")
    claims = jwt.get_unverified_claims(token)
    claims["scope"] = "alpha beta gamma"
    return f"{head}.{b64(json.dumps(claims).encode())}.{sig}"
