"""The service's one settings object. Every field is read from an `SDB_`-prefixed environment variable."""

from __future__ import annotations

import hashlib
import math
from collections import Counter
from functools import lru_cache
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

MIN_JWT_SECRET_BYTES = 32
# Values shipped in the repository (.env.example, docs): anyone can read them, so none may sign tokens.
PLACEHOLDER_MARKERS = ("change-me", "changeme", "replace-me", "your-secret")
GENERATE = "python3 -c 'import secrets; print(secrets.token_hex(32))'"
MIN_SECRET_BITS = 80  # a rough Shannon estimate; generated secrets (secrets.token_hex) have far more
# SHA-256 of secrets committed to this repository (its test suite's, before the tests drew them at random):
# public, so none may sign tokens, in demo mode or not.
PUBLISHED_SECRET_SHA256 = frozenset(
    {
        "b1ae7294d65a2a0c2913cda8aae170541f9837c6eb5a924214f55d5dbb16b342",
        "b7df58a43b29d434dd4e5446f696acc8ff2690b3c62d261943bb1fcfe6049160",
    }
)


def secret_problem(value: str) -> str | None:
    """Why `value` cannot be a secret (a repository placeholder, obviously low entropy), or None."""
    lowered = value.lower()
    if hashlib.sha256(value.encode()).hexdigest() in PUBLISHED_SECRET_SHA256:
        return f"is published in the sdb repository (a test value): generate one ({GENERATE})"
    if any(marker in lowered for marker in PLACEHOLDER_MARKERS):
        return f"is a placeholder from the repository: generate one ({GENERATE})"
    counts = Counter(value)
    bits = -sum(n * math.log2(n / len(value)) for n in counts.values())
    periodic = any(
        value == value[:p] * (len(value) // p) for p in range(1, len(value) // 2 + 1) if len(value) % p == 0
    )
    if len(counts) < 8 or bits < MIN_SECRET_BITS or periodic:
        return f"has obviously low entropy (few distinct characters or a repeated pattern): use {GENERATE}"
    return None


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SDB_", env_file=None, extra="ignore")

    # Deployment
    host: str = Field("127.0.0.1", description="Address `sdb serve` binds (0.0.0.0 inside a container).")
    port: int = Field(8000, gt=0, le=65535, description="TCP port `sdb serve` listens on.")
    demo: bool = Field(False, description="Demo mode: allows a generated JWT secret (printed nowhere).")
    database_url: str = Field("sqlite:///./var/sdb.db", description="SQLAlchemy URL (SQLite or PostgreSQL).")
    model_dir: Path = Field(Path("models"), description="Directory of boxed-model artifact directories.")
    box_key_dir: Path | None = Field(
        None,
        description="Directory of box key files `<artifact dir name>.json` (a secret store mount); "
        "unset: each artifact's own box_key.json.",
    )
    seal_key_file: Path | None = Field(
        None,
        description="Master key file (64 hex characters, a secret-store mount or a compose secret) that "
        "opens sealed artifacts and seals new ones (`sdb box`, `sdb seal`); unset: sealed artifacts refuse "
        "to load.",
    )
    seal_key_dir: Path | None = Field(
        None,
        description="Directory of further master key files `*.key` that may open sealed artifacts (older "
        "keys during a rotation).",
    )
    require_sealed: bool = Field(
        False,
        description="Refuse to start with an unsealed artifact (the compose default); false: it loads with "
        "a warning outside demo mode.",
    )
    default_model: str | None = Field(None, description="Model used when a request names none.")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="Where models run.")
    torchscript: bool = Field(
        True, description="Serve models as frozen TorchScript traces (no GIL between operators under load)."
    )
    torch_threads: int = Field(0, description="torch intra-op threads; 0 = CPU cores - 1 (min 1).")
    gc_freeze: bool = Field(
        True,
        description="After start-up, freeze the objects that survive it out of the garbage collector's "
        "full collections (the /predict tail latency, docs/benchmarks.md).",
    )
    gc_gen0_threshold: int = Field(
        10_000,
        ge=0,
        description="Generation-0 threshold of the garbage collector, set after start-up (0 = leave "
        "Python's default, 700).",
    )

    # Auth
    jwt_secret: SecretStr | None = Field(
        None,
        description="HS256 secret, >= 32 bytes, not a placeholder, not low-entropy; required outside demo.",
    )
    jwt_secret_file: Path | None = Field(
        None,
        description="File holding SDB_JWT_SECRET (a compose or Docker secret, not visible in "
        "`docker inspect`); set one of the two.",
    )
    jwt_issuer: str = Field("sdb", description="`iss` claim issued and required.")
    jwt_audience: str = Field("sdb-distill", description="`aud` claim issued and required.")
    token_ttl_seconds: int = Field(900, gt=0, le=86400, description="Lifetime of access tokens.")
    bootstrap_admin_token: SecretStr | None = Field(
        None,
        description="If set and no admin exists at start, create the first admin API key with this secret.",
    )
    client_ip_salt: SecretStr | None = Field(
        None, description="Salt for anonymous client ids (if unset: derived from the JWT secret)."
    )
    trusted_proxies: list[str] = Field(
        default_factory=list, description="Peers whose X-Forwarded-For is used."
    )

    # Traceable licensees (docs/operations.md#watermark-secret)
    watermark_secret: SecretStr | None = Field(
        None,
        description="Secret (>= 32 bytes) the per-API-key watermarks of /distill-batch are derived from; "
        "back it up: without it no leaked student can be traced. Unset: SDB_WATERMARK_SECRET_FILE, else "
        "derived from SDB_JWT_SECRET (HKDF; a warning at start).",
    )
    watermark_secret_file: Path | None = Field(
        None, description="File holding the watermark secret (a secret store mount), instead of the variable."
    )
    watermark_disabled_models: list[str] = Field(
        default_factory=list,
        description="Models whose /distill-batch soft labels carry no watermark (JSON list of names).",
    )
    licensee_images: int = Field(
        500,
        ge=0,
        le=100_000,
        description="Images of its own kept per watermarked API key and model (a keyed sample of what it "
        "sent to /distill-batch), that a trace probes a suspect with for that key; 0 keeps none "
        "(docs/operations.md#licensee-images).",
    )
    trace_allowed_hosts: list[str] = Field(
        default_factory=list,
        description="Hosts (names, IP addresses or CIDR networks) that POST /admin/trace may query as a "
        "suspect; empty: none. A private or loopback address needs its own address or network listed.",
    )
    trace_probe_data: str | None = Field(
        None,
        description="Dataset spec of the owner's probe images for POST /admin/trace (as `sdb trace "
        "--data`); unset: the route answers 409.",
    )
    trace_max_probes: int = Field(
        10_000, gt=0, le=100_000, description="Most probe images one POST /admin/trace may send a suspect."
    )
    trace_timeout_s: float = Field(
        120.0, gt=0, le=3600, description="Time limit of one POST /admin/trace, suspect queries included."
    )

    # Limits
    max_body_bytes: int = Field(8 * 1024 * 1024, gt=0, description="Largest request body (413 above).")
    max_request_samples: int = Field(1024, gt=0, description="Largest batch in one request (422 above).")
    max_batch_size: int = Field(256, gt=0, description="Largest batch the dynamic batcher forms.")
    max_batch_delay_ms: float = Field(2.0, ge=0, description="How long the batcher waits to fill a batch.")
    batching: bool = Field(True, description="Merge concurrent requests into one forward pass.")
    calibrate_forward_batch: bool = Field(
        True,
        description="At start, time each model at batch 8..SDB_MAX_BATCH_SIZE and run bigger batches in "
        "chunks of the fastest size.",
    )
    inference_timeout_s: float = Field(30.0, gt=0, description="Deadline of one inference (503 past it).")
    predict_rate_per_minute: int = Field(
        600, ge=0, description="Per-client /predict requests a minute (0=off)."
    )
    distill_rate_per_minute: int = Field(
        600, ge=0, description="Per-API-key /distill-batch requests a minute."
    )
    extraction_window_s: int = Field(3600, gt=0, description="Window for the extraction-volume flag.")
    extraction_sample_threshold: int = Field(
        50_000, gt=0, description="Samples per window above which an anonymous client is flagged."
    )
    # Audit trail (docs/architecture.md, "The audit trail at scale"; docs/operations.md, retention)
    predict_audit_rows: Literal["on", "sampled", "off"] = Field(
        "sampled",
        description="Per-request /predict audit rows besides the aggregates: `on` (every call, ~380 bytes "
        "each), `sampled` (a random share SDB_PREDICT_AUDIT_SAMPLE_RATE of the calls) or `off`.",
    )
    predict_audit_sample_rate: float = Field(
        0.01, ge=0, le=1, description="With SDB_PREDICT_AUDIT_ROWS=sampled: the share of calls kept."
    )
    retain_predict_rows_days: float = Field(
        7, gt=0, description="`sdb db prune`: age past which per-request /predict audit rows are deleted."
    )
    retain_distill_rows_days: float = Field(
        400, gt=0, description="`sdb db prune`: age past which per-call /distill-batch rows are deleted."
    )
    retain_aggregates_days: float = Field(
        400, gt=0, description="`sdb db prune`: age past which usage aggregates are deleted."
    )
    retain_client_windows_days: float = Field(
        8,
        gt=0,
        description="`sdb db prune`: age past which per-client, per-window /predict aggregates are deleted "
        "(per-client daily totals and largest windows stay for SDB_RETAIN_AGGREGATES_DAYS).",
    )
    retain_events_days: float = Field(
        400, gt=0, description="`sdb db prune`: age past which security events are deleted."
    )
    redis_url: SecretStr | None = Field(
        None,
        description="Redis URL (`redis://[:password@]host:6379/0`) where the /predict rate limit and the "
        "extraction counters live, shared by every worker and replica; unset: each process counts alone.",
    )
    redis_key_prefix: str = Field(
        "sdb:",
        min_length=1,
        max_length=64,
        description="Prefix of every Redis key sdb writes (one per deployment sharing a Redis server).",
    )
    redis_timeout_s: float = Field(
        0.5, gt=0, le=10, description="Connect and reply timeout of one Redis call (a failure past it)."
    )
    redis_failure_mode: Literal["open", "closed"] = Field(
        "open",
        description="When Redis fails: `open` counts the /predict limit in each process (as without "
        "Redis: N processes allow N times the rate); `closed` answers /predict 503.",
    )
    redis_retry_s: float = Field(
        2.0,
        ge=0,
        le=300,
        description="After a Redis failure, seconds each process waits before trying it again.",
    )
    expose_metrics: bool = Field(
        False,
        description="Serve /metrics on the service's port (off by default: turn it on only where that "
        "port is private, e.g. for a Prometheus scraper on an internal network).",
    )
    log_level: str = Field("INFO", description="Python logging level.")
    console: bool = Field(
        True, description="Serve the admin console at /console (a static page over the admin API)."
    )

    @model_validator(mode="after")
    def _check_secret(self) -> Settings:
        if self.extraction_window_s % 60 or 86400 % self.extraction_window_s:
            raise ValueError(
                "SDB_EXTRACTION_WINDOW_S must be a whole number of minutes that divides a day (60, 300, "
                "3600, 86400...): the per-client audit aggregates are kept per window"
            )
        if self.jwt_secret_file is not None:
            if self.jwt_secret is not None:
                raise ValueError("set SDB_JWT_SECRET or SDB_JWT_SECRET_FILE, not both")
            try:
                self.jwt_secret = SecretStr(self.jwt_secret_file.read_text().strip())
            except (OSError, UnicodeDecodeError) as exc:
                reason = getattr(exc, "strerror", None) or type(exc).__name__
                where = f"SDB_JWT_SECRET_FILE={self.jwt_secret_file}"
                raise ValueError(f"{where}: cannot read ({reason})") from None
        if self.jwt_secret is None:
            if not self.demo:
                raise ValueError(
                    "SDB_JWT_SECRET (or SDB_JWT_SECRET_FILE) must be set (>= 32 bytes) unless SDB_DEMO=1"
                )
        elif len(self.jwt_secret.get_secret_value().encode()) < MIN_JWT_SECRET_BYTES:
            raise ValueError(f"SDB_JWT_SECRET must be at least {MIN_JWT_SECRET_BYTES} bytes long")
        try:
            password = make_url(self.database_url).password
        except ArgumentError:
            password = None  # not a URL: the engine refuses it with its own message
        if self.watermark_secret is not None and self.watermark_secret_file is not None:
            raise ValueError("give SDB_WATERMARK_SECRET or SDB_WATERMARK_SECRET_FILE, not both")
        wm_secret = self.watermark_secret.get_secret_value() if self.watermark_secret else None
        if wm_secret is not None and len(wm_secret.encode()) < MIN_JWT_SECRET_BYTES:
            raise ValueError(f"SDB_WATERMARK_SECRET must be at least {MIN_JWT_SECRET_BYTES} bytes long")
        for name, secret in (
            ("SDB_JWT_SECRET", self.jwt_secret.get_secret_value() if self.jwt_secret else None),
            ("SDB_CLIENT_IP_SALT", self.client_ip_salt.get_secret_value() if self.client_ip_salt else None),
            ("SDB_WATERMARK_SECRET", wm_secret),
        ):
            problem = None if secret is None else secret_problem(secret)
            if problem is not None:
                raise ValueError(f"{name} {problem}")
        if self.redis_url is not None:
            redis_password = urlsplit(self.redis_url.get_secret_value()).password
            if redis_password and any(m in redis_password.lower() for m in PLACEHOLDER_MARKERS):
                raise ValueError(
                    "the password in SDB_REDIS_URL (REDIS_PASSWORD) is a placeholder from the repository: "
                    "generate one"
                )
        if password and any(m in str(password).lower() for m in PLACEHOLDER_MARKERS):
            raise ValueError(
                "the password in SDB_DATABASE_URL (POSTGRES_PASSWORD) is a placeholder from the "
                "repository: generate one"
            )
        return self


@lru_cache
def get_settings() -> Settings:
    return Settings()
