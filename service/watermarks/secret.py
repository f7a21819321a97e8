"""The watermark secret: SDB_WATERMARK_SECRET or _FILE, else derived from the JWT secret (HKDF-SHA256).

Every API key's watermark is derived from this secret and the key's id; it is read once at start, never
logged, returned or shown. Losing it (or changing it) makes every leaked student untraceable: the start-up
check in `service.watermarks.issuer` refuses to run on a secret that does not match the stored watermark ids.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from dataclasses import dataclass, field
from typing import Literal

from service.core.config import MIN_JWT_SECRET_BYTES, Settings, secret_problem

logger = logging.getLogger(__name__)

HKDF_SALT = b"sdb watermark secret"
HKDF_INFO = b"sdb/watermark/v1"

Source = Literal["setting", "file", "jwt"]


class WatermarkSecretError(ValueError):
    """The watermark secret is missing, unreadable, too short or does not match the issued watermarks."""


@dataclass(frozen=True)
class WatermarkSecret:
    value: bytes = field(repr=False)
    source: Source

    def __repr__(self) -> str:  # never shows the secret
        return f"WatermarkSecret(source={self.source!r})"


def hkdf_sha256(key: bytes, *, salt: bytes, info: bytes, length: int = 32) -> bytes:
    """RFC 5869 HKDF with SHA-256 (extract, then expand)."""
    prk = hmac.new(salt, key, hashlib.sha256).digest()
    out, block = b"", b""
    for i in range(1, -(-length // 32) + 1):
        block = hmac.new(prk, block + info + bytes([i]), hashlib.sha256).digest()
        out += block
    return out[:length]


def _read_file(settings: Settings) -> str:
    path = settings.watermark_secret_file
    assert path is not None
    try:
        text = path.read_text().strip()
    except OSError as exc:
        raise WatermarkSecretError(
            f"SDB_WATERMARK_SECRET_FILE cannot be read ({type(exc).__name__}): {path}"
        ) from None
    if len(text.encode()) < MIN_JWT_SECRET_BYTES:
        raise WatermarkSecretError(
            f"the watermark secret in {path} must be at least {MIN_JWT_SECRET_BYTES} bytes"
        )
    problem = secret_problem(text)
    if problem is not None:
        raise WatermarkSecretError(f"the watermark secret in {path} {problem}")
    return text


def resolve_watermark_secret(settings: Settings, jwt_secret: str, *, warn: bool = True) -> WatermarkSecret:
    """The secret in force: the setting, the file, or HKDF of the JWT secret in use (`jwt_secret`: in demo
    mode without SDB_JWT_SECRET, the process's random one, so the marks then change at every restart)."""
    if settings.watermark_secret is not None:
        return WatermarkSecret(settings.watermark_secret.get_secret_value().encode(), "setting")
    if settings.watermark_secret_file is not None:
        return WatermarkSecret(_read_file(settings).encode(), "file")
    if warn:
        if settings.jwt_secret is None:
            logger.warning(
                "demo mode: the watermark secret is derived from this process's random JWT secret; "
                "soft labels served now cannot be traced after a restart (set SDB_WATERMARK_SECRET)"
            )
        else:
            logger.warning(
                "SDB_WATERMARK_SECRET is not set: watermarks are derived from SDB_JWT_SECRET, so rotating "
                "that secret would make every issued watermark untraceable (set SDB_WATERMARK_SECRET, "
                "docs/operations.md)"
            )
    return WatermarkSecret(hkdf_sha256(jwt_secret.encode(), salt=HKDF_SALT, info=HKDF_INFO), "jwt")


def secret_from_environment(settings: Settings) -> WatermarkSecret:
    """For `sdb trace` and other commands run beside the service: the same secret the service derives."""
    if (
        settings.watermark_secret is None
        and settings.watermark_secret_file is None
        and settings.jwt_secret is None
    ):
        raise WatermarkSecretError(
            "no watermark secret: set SDB_WATERMARK_SECRET (or _FILE, or the SDB_JWT_SECRET it was derived "
            "from) as the service has it"
        )
    jwt = settings.jwt_secret.get_secret_value() if settings.jwt_secret is not None else ""
    return resolve_watermark_secret(settings, jwt, warn=False)
