"""Settings: secrets from the repository (placeholders) and obviously low-entropy secrets are refused."""

from __future__ import annotations

import secrets

import pytest
from pydantic import ValidationError

from service.core.config import Settings
from tests._support.ops import REPO


def _env_example() -> dict[str, str]:
    lines = (REPO / ".env.example").read_text().splitlines()
    return dict(line.split("=", 1) for line in lines if "=" in line and not line.startswith("#"))


def test_every_placeholder_of_env_example_is_refused() -> None:
    # The JWT secret is a compose secret (a file) now, not in .env.example: a placeholder of the same kind.
    example = {**_env_example(), "SDB_JWT_SECRET": "change-me-to-64-hex-characters-from-secrets-token-hex-32"}
    good = secrets.token_hex(32)
    with pytest.raises(ValidationError, match="placeholder") as jwt:
        Settings(jwt_secret=example["SDB_JWT_SECRET"])
    with pytest.raises(ValidationError, match="placeholder") as salt:
        Settings(jwt_secret=good, client_ip_salt=example["SDB_CLIENT_IP_SALT"])
    url = f"postgresql+psycopg://sdb:{example['POSTGRES_PASSWORD']}@db:5432/sdb"
    with pytest.raises(ValidationError, match="placeholder") as db:
        Settings(jwt_secret=good, database_url=url)
    for exc, secret in ((jwt, "SDB_JWT_SECRET"), (salt, "SDB_CLIENT_IP_SALT"), (db, "POSTGRES_PASSWORD")):
        assert example[secret] not in str(exc.value)  # the refusal never repeats the secret


@pytest.mark.parametrize("weak", ["a" * 64, "ab" * 32, "password" * 5, "0123456789" * 4])
def test_obviously_low_entropy_secrets_are_refused(weak: str) -> None:
    with pytest.raises(ValidationError, match="entropy"):
        Settings(jwt_secret=weak)
    with pytest.raises(ValidationError, match="entropy"):
        Settings(jwt_secret=secrets.token_hex(32), client_ip_salt=weak)


def test_generated_secrets_are_accepted() -> None:
    for _ in range(50):
        s = Settings(jwt_secret=secrets.token_hex(16 * 2), client_ip_salt=secrets.token_hex(16))
        assert s.jwt_secret is not None
    Settings(
        jwt_secret=secrets.token_urlsafe(32),
        database_url="postgresql://sdb:" + secrets.token_hex(16) + "@db/sdb",
    )


# Secrets that were committed to this repository (the test suite's own, before it drew them at random).
PUBLISHED = ["test-jwt-secret-" + "x" * 40, "route-test-secret-" + "x" * 40]


@pytest.mark.parametrize("published", PUBLISHED)
def test_the_repositorys_own_test_secrets_are_refused(published: str) -> None:
    with pytest.raises(ValidationError, match="published") as exc:
        Settings(jwt_secret=published)
    assert published not in str(exc.value)
    with pytest.raises(ValidationError, match="published"):
        Settings(jwt_secret=secrets.token_hex(32), client_ip_salt=published)


def test_the_test_suites_secret_is_drawn_at_random() -> None:
    from tests._support.api import TEST_JWT_SECRET

    assert TEST_JWT_SECRET not in PUBLISHED
    Settings(jwt_secret=TEST_JWT_SECRET)
