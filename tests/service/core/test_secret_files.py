"""SDB_JWT_SECRET_FILE: the JWT secret read from a file (a compose or Docker secret), never both forms."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from service.core.config import Settings
from tests._support.api import TEST_JWT_SECRET


def test_the_jwt_secret_can_come_from_a_file(tmp_path: Path) -> None:
    f = tmp_path / "sdb_jwt_secret"
    f.write_text(TEST_JWT_SECRET + "\n")
    settings = Settings(jwt_secret_file=f)
    assert settings.jwt_secret is not None and settings.jwt_secret.get_secret_value() == TEST_JWT_SECRET
    with pytest.raises(ValidationError, match="not both"):
        Settings(jwt_secret_file=f, jwt_secret=TEST_JWT_SECRET)
    with pytest.raises(ValidationError, match=r"SDB_JWT_SECRET_FILE=.*cannot read") as info:
        Settings(jwt_secret_file=tmp_path / "missing")
    assert TEST_JWT_SECRET not in str(info.value)
    f.write_text("change-me-to-64-hex-characters-from-secrets-token-hex-32\n")
    with pytest.raises(ValidationError, match="placeholder"):
        Settings(jwt_secret_file=f)


def test_a_missing_secret_names_both_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("SDB_JWT_SECRET", "SDB_JWT_SECRET_FILE", "SDB_DEMO"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(ValidationError, match="SDB_JWT_SECRET_FILE"):
        Settings()
