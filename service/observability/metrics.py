"""Prometheus metrics of the service.

Label values are restricted to fixed vocabularies (route templates, loaded model names, status codes, fixed
reasons): never a user id, an API key, a client address or any secret. With several workers, set
PROMETHEUS_MULTIPROC_DIR (an empty directory shared by the workers) and /metrics aggregates all of them.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from prometheus_client import multiprocess as _multiprocess
from prometheus_client import values as _values

# prometheus_client chooses file-backed (multiprocess) values when it is first imported, so the mode is
# fixed here too: a variable set later in the process (as `sdb serve --workers N` does before uvicorn
# starts its workers) must not make this process read files that its own metrics never wrote.
MULTIPROCESS = _values.ValueClass is not _values.MutexValue

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048)
# scope["state"] key: (model, path, samples) a call answered, set by the flows on a 200 and counted with the
# request's own metrics, so that a refused or failed call counts none (`ServedModel.infer` does not count)
ANSWERED_KEY = "sdb_answered"
UNKNOWN = "unknown"
NONE = "none"

REQUESTS = Counter(
    "sdb_http_requests_total",
    "HTTP requests answered, by route template, model and status code.",
    ["route", "model", "status"],
)
REQUEST_LATENCY = Histogram(
    "sdb_http_request_duration_seconds",
    "Time from the request's arrival to the end of its response.",
    ["route", "model"],
    buckets=LATENCY_BUCKETS,
)
INFERENCE_LATENCY = Histogram(
    "sdb_inference_duration_seconds",
    "Duration of one forward pass (one formed batch).",
    ["model", "path"],
    buckets=LATENCY_BUCKETS,
)
BATCH_SIZE = Histogram(
    "sdb_inference_batch_size",
    "Samples per forward pass formed by the dynamic batcher.",
    ["model", "path"],
    buckets=BATCH_BUCKETS,
)
SAMPLES = Counter("sdb_samples_total", "Samples answered, by model and path.", ["model", "path"])
SAMPLES_DISTILLED = Counter(
    "sdb_samples_distilled_total", "Samples answered by /distill-batch (keyed soft labels).", ["model"]
)
INFERENCE_TIMEOUTS = Counter(
    "sdb_inference_timeouts_total", "Inferences that missed their deadline.", ["model", "path"]
)
AUTH_FAILURES = Counter(
    "sdb_auth_failures_total", "Rejected credentials, by a fixed reason code.", ["reason"]
)
QUOTA_REJECTIONS = Counter(
    "sdb_quota_rejections_total", "Calls refused because the quota was spent.", ["model"]
)
RATE_LIMITED = Counter("sdb_rate_limited_total", "Calls refused by a rate limit (429).", ["route"])
EXTRACTION_FLAGS = Counter(
    "sdb_extraction_flags_total", "Clients newly flagged as possible model extraction.", ["kind"]
)
AUDIT_DROPPED = Counter(
    "sdb_predict_audit_dropped_total",
    "/predict audit rows that could not be written (database down or slow).",
)
REDIS_ERRORS = Counter(
    "sdb_redis_errors_total",
    "Redis calls that failed or timed out (SDB_REDIS_URL), by operation.",
    ["operation"],
)
REDIS_FALLBACKS = Counter(
    "sdb_redis_fallbacks_total",
    "Counts Redis should have kept but could not (failing, or backing off after a failure): counted in "
    "the process (action=local) or the /predict call refused with 503 (action=refused).",
    ["operation", "action"],
)

GC_PAUSES = Histogram(
    "sdb_gc_pause_seconds",
    "Garbage-collector pauses (every thread of the process stops), by generation.",
    ["generation"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0),
)

_known_models: set[str] = set()


# The label values of the event counters, created at 0 when the models are registered (start-up): a series
# first exported at 1 gives increase() nothing to see, so the first event would raise no alert and the
# dashboard panels would say "No data" rather than 0 (deploy/monitoring/).
EXTRACTION_KINDS = ("anonymous", "user")
PATHS = ("plain", "keyed")
LIMITED_ROUTES = ("/predict", "/distill-batch")
REDIS_FALLBACK_LABELS = (("rate_limit", "local"), ("rate_limit", "refused"), ("extraction", "local"))


def register_models(names: list[str] | set[str]) -> None:
    """Declare the loaded model names: any other name is exported as `unknown` (bounded label cardinality).
    Also creates the event counters' series for them (and the fixed vocabularies) at 0."""
    _known_models.update(names)
    for kind in EXTRACTION_KINDS:
        _child(EXTRACTION_FLAGS, kind)
    for route in LIMITED_ROUTES:
        _child(RATE_LIMITED, route)
    for operation, action in REDIS_FALLBACK_LABELS:
        _child(REDIS_FALLBACKS, operation, action)
    for name in names:
        _child(QUOTA_REJECTIONS, name)
        for path in PATHS:
            _child(INFERENCE_TIMEOUTS, name, path)


def model_label(name: str | None) -> str:
    if name is None:
        return NONE
    return name if name in _known_models else UNKNOWN


# Labelled children of the per-request metrics, looked up once per label set: `.labels()` validates and
# joins the values on every call, a measurable share of a /predict request. Label values come from the
# fixed vocabularies above (route templates, folded model names, status codes, "plain"/"keyed"), so the
# cache stays as small as the metrics themselves.
_children: dict[tuple[object, tuple[str, ...]], Any] = {}


def _child(metric: Any, *labels: str) -> Any:
    key = (metric, labels)
    child = _children.get(key)
    if child is None:
        child = _children[key] = metric.labels(*labels)
    return child


def record_request(
    route: str,
    model: str | None,
    status: int,
    seconds: float,
    answered: tuple[str, str, int] | None = None,
) -> None:
    """One request's metrics, recorded once at its end (MetricsMiddleware); `answered`: (model, path,
    samples) of a call that answered samples (`ANSWERED_KEY` on the scope, set by the flows on a 200)."""
    label = model_label(model)
    _child(REQUESTS, route, label, str(status)).inc()
    _child(REQUEST_LATENCY, route, label).observe(seconds)
    if answered is not None:
        served, path, n = answered
        _child(SAMPLES, model_label(served), path).inc(n)
        if path == "keyed":
            _child(SAMPLES_DISTILLED, model_label(served)).inc(n)


def record_batch(model: str, path: str, size: int, seconds: float) -> None:
    _child(BATCH_SIZE, model, path).observe(size)
    _child(INFERENCE_LATENCY, model, path).observe(seconds)


def record_inference_timeout(model: str, path: str) -> None:
    INFERENCE_TIMEOUTS.labels(model_label(model), path).inc()


def record_auth_failure(reason: str) -> None:
    """`reason` must be a fixed code such as "missing", "invalid", "expired", "revoked" — never a token."""
    AUTH_FAILURES.labels(reason).inc()


def record_quota_rejection(model: str | None) -> None:
    QUOTA_REJECTIONS.labels(model_label(model)).inc()


def record_rate_limited(route: str) -> None:
    RATE_LIMITED.labels(route).inc()


def record_extraction_flag(kind: str) -> None:
    """`kind` is "anonymous" or "user"; the flagged client itself is visible only in the admin API."""
    EXTRACTION_FLAGS.labels(kind).inc()


def record_gc_pause(generation: int, seconds: float) -> None:
    _child(GC_PAUSES, str(generation)).observe(seconds)


def record_audit_dropped(n: int = 1) -> None:
    AUDIT_DROPPED.inc(n)


def record_redis_error(operation: str) -> None:
    """`operation` is "rate_limit", "extraction" or "ping"."""
    _child(REDIS_ERRORS, operation).inc()


def record_redis_fallback(operation: str, action: str, calls: int = 1) -> None:
    """`action` is "local" (counted in this process) or "refused" (503, SDB_REDIS_FAILURE_MODE=closed)."""
    _child(REDIS_FALLBACKS, operation, action).inc(calls)


def render_metrics() -> tuple[bytes, str]:
    """The exposition text; in multiprocess mode the sum over all workers' files."""
    if MULTIPROCESS:
        registry = CollectorRegistry()
        _multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry), CONTENT_TYPE_LATEST
    from prometheus_client import REGISTRY

    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST
