"""API key generation/hashing and JWT issue/verify, without a server: every hostile token is refused."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from typing import Any

import pytest
from jose import jwt

from service.security import (
    API_KEY_PREFIX,
    GENERIC_TOKEN_ERROR,
    PREFIX_LEN,
    TokenConfig,
    TokenError,
    api_key_from_secret,
    api_key_matches,
    hash_api_key,
    issue_token,
    new_api_key,
    verify_token,
)

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


def test_new_api_keys_are_prefixed_random_and_stored_as_prefix_plus_sha256() -> None:
    keys = [new_api_key() for _ in range(200)]
    assert len({k.secret for k in keys}) == 200
    for k in keys:
        assert k.secret.startswith(API_KEY_PREFIX)
        # 32 random bytes -> 43 URL-safe characters: >= 128 bits of randomness with a wide margin
        assert len(k.secret) - len(API_KEY_PREFIX) >= 43
        assert k.prefix == k.secret[:PREFIX_LEN] and k.secret not in k.prefix
        assert k.digest == hashlib.sha256(k.secret.encode()).hexdigest()
        assert api_key_matches(k.secret, k.digest)
        assert not api_key_matches(k.secret + "x", k.digest)


def test_operator_chosen_bootstrap_secret_must_be_long_and_printable() -> None:
    assert api_key_from_secret("x" * 40).digest == hash_api_key("x" * 40)
    for bad in ("short", "x" * 300, "x" * 39 + "\n"):
        with pytest.raises(ValueError):
            api_key_from_secret(bad)


def test_issued_token_round_trips_with_pinned_hs256_and_all_claims() -> None:
    token, lifetime = issue_token(CFG, user_id=7, key_id=11, scopes=["beta", "alpha"])
    assert 0 < lifetime <= CFG.ttl_seconds
    header = jwt.get_unverified_header(token)
    assert header["alg"] == "HS256"
    claims = jwt.get_unverified_claims(token)
    assert {"iss", "aud", "sub", "jti", "scope", "iat", "nbf", "exp"} <= set(claims)
    verified = verify_token(CFG, token)
    assert (verified.user_id, verified.key_id, verified.scopes) == (7, 11, frozenset({"alpha", "beta"}))


def test_token_never_outlives_its_key() -> None:
    soon = time.time() + 30
    _, lifetime = issue_token(CFG, user_id=1, key_id=1, scopes=[], expires_at=soon)
    assert lifetime <= 31


def test_hand_forged_good_token_is_accepted() -> None:
    # guards the attack tests below: the forging helper itself produces tokens the verifier accepts
    assert verify_token(CFG, forge(HS256, good_claims())).key_id == 11


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


@pytest.mark.parametrize("attack", sorted(ATTACKS))
def test_hostile_tokens_are_refused_with_a_generic_error(attack: str) -> None:
    token = ATTACKS[attack]()
    with pytest.raises(TokenError) as info:
        verify_token(CFG, token)
    assert str(info.value) == GENERIC_TOKEN_ERROR


def test_verify_pins_the_algorithm_even_if_the_library_default_allows_others() -> None:
    # python-jose's decode accepts any HMAC algorithm when `algorithms` is omitted; our verify never does.
    token = jwt.encode(good_claims(), SECRET, algorithm="HS384")
    assert jwt.decode(token, SECRET, audience="sdb-distill")["sub"] == "7"
    with pytest.raises(TokenError):
        verify_token(CFG, token)
