"""The request and response models of the admin API: accounts (users, API keys, the model catalog), reports
(audits, security events, usage, the extraction watch, the timeline) and tracing suspects to licensees."""

from __future__ import annotations

import re
from datetime import datetime
from typing import Any, Generic, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, StrictInt, field_validator

T = TypeVar("T")
# SCOPE_RE is used with fullmatch (Python's `$` also matches before a trailing newline). The two `pattern=`
# strings run on pydantic's Rust regex engine, where `$` is the end of the text only (tested).
SCOPE_RE = re.compile(r"\*|[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
NAME_RE = r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,99}$"
TEXT = r"^[^\x00-\x1f\x7f]*$"  # no control characters (NUL is refused by PostgreSQL)


class Page(BaseModel, Generic[T]):
    items: list[T]
    total: int
    limit: int
    offset: int
    total_capped: bool = Field(
        False,
        description="True when more rows match than were counted: `total` is then a lower bound (audit "
        "listings count at most 10,000 rows past the page, so a page costs the same on any table size).",
    )


class UserCreate(BaseModel):
    model_config = ConfigDict(
        extra="forbid", json_schema_extra={"examples": [{"name": "alice", "role": "user"}]}
    )

    name: str = Field(pattern=NAME_RE, description="Unique user name.")
    role: Literal["user", "admin"] = "user"


class UserOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    name: str
    role: str
    disabled: bool
    created_at: datetime
    disabled_at: datetime | None


class KeyCreate(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {"scopes": ["demo"], "sample_quota": 100000, "expires_in_s": 2592000, "name": "laptop"}
            ]
        },
    )

    scopes: list[str] = Field(
        default_factory=list,
        max_length=100,
        description="Model names this key may distill (`*`: all models).",
    )
    sample_quota: StrictInt | None = Field(
        None, ge=0, le=10**15, description="Samples the key may pull in total; none = unlimited."
    )
    expires_at: datetime | None = Field(None, description="Expiry (UTC); or use expires_in_s.")
    expires_in_s: StrictInt | None = Field(
        None, gt=0, le=10 * 365 * 86400, description="Expiry, seconds from now."
    )
    name: str | None = Field(None, max_length=100, pattern=TEXT, description="A label for the key.")
    watermark: bool = Field(
        True,
        description="Mark this key's /distill-batch soft labels with its own watermark (traceable with "
        "`sdb trace`); top-1 unchanged.",
    )

    @field_validator("scopes")
    @classmethod
    def _scopes(cls, v: list[str]) -> list[str]:
        for s in v:
            if not SCOPE_RE.fullmatch(s):
                raise ValueError("a scope is a model name (letters, digits, . _ -) or `*`")
        return sorted(set(v))


class KeyOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    user_id: int
    name: str | None
    prefix: str = Field(description="The key's first characters, to recognize it (not a secret).")
    scopes: list[str]
    sample_quota: int | None
    samples_used: int
    created_at: datetime
    expires_at: datetime | None
    revoked_at: datetime | None
    last_used_at: datetime | None
    watermarked: bool = Field(
        description="Whether this key's /distill-batch soft labels carry its watermark."
    )
    watermark_id: str | None = Field(
        description="Public id of the key's watermark (never its parameters); set once it was first on."
    )


class KeyCreated(KeyOut):
    api_key: str = Field(
        description="The secret API key. Shown once: store it now; it cannot be shown again."
    )


class AuditOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    created_at: datetime
    endpoint: str
    model: str | None
    user_id: int | None
    api_key_id: int | None
    client_id: str | None
    n_samples: int
    status: int
    latency_ms: float | None
    input_digest: str | None
    watermark_id: str | None = Field(None, description="The watermark that served this call, if any.")
    user_name: str | None = Field(None, description="Current name of `user_id` (authenticated calls).")
    key_name: str | None = Field(None, description="Current name of `api_key_id`, if the key has one.")


class EventOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    created_at: datetime
    action: str
    outcome: str
    actor_user_id: int | None
    actor_key_id: int | None
    client_id: str | None
    target: str | None
    detail: dict[str, Any]


class UsageOut(BaseModel):
    user_id: int
    name: str
    role: str
    disabled: bool
    requests: int = Field(description="Audited calls (any status).")
    answered: int = Field(description="Calls answered with status 200.")
    samples: int = Field(description="Samples answered (status 200).")
    rejected: int = Field(description="Calls refused (status >= 400).")
    last_seen: datetime | None
    by_model: dict[str, int]


class BucketOut(BaseModel):
    start: datetime
    requests: int
    samples: int


class ClientVolumeOut(BaseModel):
    kind: Literal["user", "anonymous"]
    client: str = Field(description="User id, or the anonymous client id (salted hash of its address).")
    name: str | None
    requests: int
    samples: int
    max_window_samples: int = Field(description="Most samples pulled within one extraction window.")
    flagged: bool
    series: list[BucketOut]


class ExtractionOut(BaseModel):
    rule: str
    window_s: int
    threshold_samples: int
    since: datetime
    until: datetime
    flagged: list[ClientVolumeOut]


class ModelOut(BaseModel):
    name: str
    version: str
    loaded: bool
    info: dict[str, Any] = Field(
        description="Public metadata: shapes, classes, temperature (no key material)."
    )
    first_seen_at: datetime | None
    last_loaded_at: datetime | None


class TimelineBucketOut(BaseModel):
    start: datetime = Field(description="Start of the bucket (aligned on the Unix epoch).")
    requests: int = Field(description="Audited calls (any status).")
    answered: int = Field(description="Calls answered with status 200.")
    refused: int = Field(description="Calls refused (status >= 400).")
    samples: int = Field(description="Samples answered (status 200).")


class TimelineSeriesOut(BaseModel):
    endpoint: str
    buckets: list[TimelineBucketOut] = Field(description="Buckets with at least one call, oldest first.")


class TimelineOut(BaseModel):
    since: datetime
    until: datetime
    bucket_s: int
    series: list[TimelineSeriesOut]


# ------------------------------------------------------------------------------------------------ trace


class WatermarkToggle(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"enabled": True}]})

    enabled: bool = Field(description="Mark this key's /distill-batch soft labels from now on, or stop.")


class TraceRequest(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [{"model": "fashion-mnist", "suspect_url": "https://models.example/predict"}]
        },
    )

    model: str | None = Field(
        None, min_length=1, max_length=128, description="The served box the suspect may come from."
    )
    suspect_url: str = Field(
        min_length=1,
        max_length=2048,
        description="An endpoint answering like POST /predict (probabilities); its host must be in "
        "SDB_TRACE_ALLOWED_HOSTS.",
    )
    suspect_model: str | None = Field(
        None, min_length=1, max_length=128, pattern=TEXT, description="`model` field sent to the suspect."
    )
    probes: StrictInt = Field(10_000, ge=100, le=100_000, description="Probe images sent to the suspect.")
    decoys: StrictInt = Field(  # sdb_core.trace.MIN_DECOYS: the null is calibrated on them
        1000, ge=100, le=3000, description="Never-issued watermarks the null is calibrated on."
    )
    probe_draw: StrictInt = Field(0, ge=0, le=2**31 - 1, description="Which probe images are drawn.")


class TraceKeyOut(BaseModel):
    watermark_id: str
    key_id: int
    key_prefix: str
    key_name: str | None
    user_id: int
    user_name: str
    key_state: str = Field(description="active, revoked, expired or `watermark off`.")
    statistic: float | None = Field(
        description="z (standard normal without the mark): the larger of the two channels' z below."
    )
    log10_p: float | None
    p_value: float
    log10_corrected_p: float | None
    corrected_p: float = Field(description="Holm-corrected over the watermarks tested.")
    verdict: str = Field(description="`match` (corrected p < alpha) or `no evidence`.")
    rank: int
    decoys_above: int = Field(description="Decoys whose statistic is at least this one's.")
    own_images: int = Field(
        description="Images this key sent (kept by the service) that it was tested on; 0: the owner's probes."
    )
    top1_statistic: float | None = Field(None, description="The top-1 cosine channel's calibrated z.")
    pattern_statistic: float | None = Field(
        None, description="The class pattern channel's calibrated z (null: the box's marks have no pattern)."
    )


class TraceDecoysOut(BaseModel):
    count: int
    null: str = Field(description="`decoys`: z centred and scaled by the decoys' median and spread.")
    null_location: float
    null_scale: float
    false_positive_rate: float
    false_positive_rate_corrected: float
    ks: float = Field(description="Kolmogorov-Smirnov distance of the decoys' p-values from uniform.")
    z_mean: float
    z_std: float


class TraceOut(BaseModel):
    model: str
    suspect: str
    probes: int
    alpha: float
    correction: str
    watermarks_tested: int
    matches: list[TraceKeyOut]
    keys: list[TraceKeyOut] = Field(description="Every watermark ever issued, best first.")
    decoys: TraceDecoysOut
