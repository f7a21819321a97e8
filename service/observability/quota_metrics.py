"""Gauges read from the database when /metrics is scraped: quota consumption and database reachability.

Every worker answers from the same database, so these need no multiprocess aggregation: they are rendered
into a registry of their own for each scrape and appended to the process metrics. Only counts and ratios
are exported, never a user, a key or a key prefix (which key is near its quota is in the admin API).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from sqlalchemy import func, or_, select

from service.db.models import ApiKey, User, utcnow
from service.db.session import Database

logger = logging.getLogger(__name__)

NEAR_QUOTA = 0.9  # a usable key that has used this fraction of its sample quota is "near" it
SCRAPE_TIMEOUT_S = 2.0


def quota_figures(db: Database) -> tuple[float, int]:
    """(highest used/quota ratio, number of keys at or above NEAR_QUOTA) over usable keys with a quota."""
    ratio = ApiKey.samples_used * 1.0 / ApiKey.sample_quota
    q = (
        select(func.max(ratio), func.count().filter(ratio >= NEAR_QUOTA))
        .join(User, User.id == ApiKey.user_id)
        .where(
            ApiKey.sample_quota > 0,
            ApiKey.revoked_at.is_(None),
            or_(ApiKey.expires_at.is_(None), ApiKey.expires_at > utcnow()),
            User.disabled.is_(False),
        )
    )
    with db.session() as s:
        top, near = s.execute(q).one()
    return float(top or 0.0), int(near or 0)


class _Snapshot:
    """A collector over figures already read (collect() must not touch the database)."""

    def __init__(self, figures: tuple[float, int] | None) -> None:
        self.figures = figures

    def collect(self) -> Iterator[Metric]:
        yield GaugeMetricFamily(
            "sdb_database_up",
            "1 if the database answered the /metrics scrape's query, else 0.",
            value=0.0 if self.figures is None else 1.0,
        )
        if self.figures is None:
            return
        top, near = self.figures
        yield GaugeMetricFamily(
            "sdb_api_key_quota_used_ratio_max",
            "Highest samples_used / sample_quota over usable API keys that have a quota (0 if none).",
            value=top,
        )
        yield GaugeMetricFamily(
            "sdb_api_keys_near_quota",
            f"Usable API keys that have used at least {NEAR_QUOTA:.0%} of their sample quota.",
            value=float(near),
        )


async def render_database_metrics(db: Database | None) -> bytes:
    """The exposition text of the database gauges; the query runs in a thread, bounded by a timeout."""
    figures: tuple[float, int] | None = None
    if db is not None:
        try:
            figures = await asyncio.wait_for(asyncio.to_thread(quota_figures, db), SCRAPE_TIMEOUT_S)
        except Exception as exc:  # any failure means "database down" for this scrape, never a 500
            logger.info("database gauges unavailable: %s", type(exc).__name__)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Snapshot(figures))
    return generate_latest(registry)
