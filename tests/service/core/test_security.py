"""API key generation/hashing and JWT issue/verify, without a server: every hostile token is refused."""

from __future__ import annotations

import hashlib
import time

import pytest
from jose import jwt

from service.core.security import (
    API_KEY_PREFIX,
    GENERIC_TOKEN_ERROR,
    PREFIX_LEN,
    TokenError,
    api_key_from_secret,
    api_key_matches,
    hash_api_key,
    issue_token,
    new_api_key,
    verify_token,
)
from tests._support.tokens import ATTACKS, CFG, HS256, SECRET, forge, good_claims


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
