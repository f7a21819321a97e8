"""The audit trail at a month of traffic: fill PostgreSQL, time every admin read, measure the storage.

    .venv/bin/python -m bench.audit_bench --requests 5000000
    nice -n 5 .venv/bin/python -m bench.audit_bench --requests 20000000 --json docs/bench-audit-20m.json

Creates its own database (--database, default sdb_audit_bench; dropped at the end unless --keep) next to
--pg-url's, migrates it, and fills it with --requests recorded calls over --days days in the mix of issue
#27: 90 % anonymous /predict from --clients clients (2 % of them from 10 heavy clients pulling 256 samples
a call: the extraction watch's subjects), 10 % /distill-batch from --users users. Statuses: /predict 97 %
200, 2 % 429, 1 % 422; /distill-batch 95 % 200, 3 % 429, 1 % 401, 1 % 500.

/predict calls are generated one UTC day at a time into a scratch table, then stored exactly as the audit
writer (service.db.aggregates) stores them: the same GROUP BY keys and sums into usage_minutes,
client_usage (per client, SDB_EXTRACTION_WINDOW_S window and status) and client_days (with the largest
window), and per-request rows for a random share --sample-rate (policy --policy: on, sampled, off).
/distill-batch calls are per-call rows, summed by the service's own rollup (service.crud.rollup).

Then `sdb db prune`'s default policy runs (what a daily cron job keeps: sampled /predict rows 7 days,
per-client windows 8 days, the rest 400 days; --no-prune to skip) and VACUUM FULL compacts the tables
before their sizes are read. Then the service (create_app, in process, no model) answers each admin
read --runs times after one warm-up (median reported): /admin/usage (all time), /admin/usage/timeline
and /admin/usage/clients (the last 24 hours of the data, hourly: whole UTC days; and clients_0600, the
24 hours from 06:00 to 06:00 UTC before: the ranking's worst case), /admin/extraction (its last 7 days),
/admin/audits?limit=50 (first page).
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import statistics
import sys
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
from sqlalchemy.engine import make_url

from service.crud import retention, rollup
from service.db import migrate
from service.db.session import Database

PREDICT_SHARE = 0.9
HEAVY_CLIENTS = 10
HEAVY_SHARE = 0.02


def _conninfo(url: str, database: str) -> str:
    u = make_url(url).set(drivername="postgresql", database=database)
    return u.render_as_string(hide_password=False)


def create_database(admin_url: str, name: str) -> None:
    with psycopg.connect(_conninfo(admin_url, "postgres"), autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}"')
        conn.execute(f'CREATE DATABASE "{name}"')


def drop_database(admin_url: str, name: str) -> None:
    with psycopg.connect(_conninfo(admin_url, "postgres"), autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def fill(url: str, args: argparse.Namespace, end: datetime) -> dict[str, Any]:
    """Generate the calls; returns counts and timings."""
    n_predict = round(args.requests * PREDICT_SHARE)
    n_distill = args.requests - n_predict
    per_day_p = n_predict // args.days
    per_day_d = n_distill // args.days
    keep = {"on": 1.0, "sampled": args.sample_rate, "off": 0.0}[args.policy]
    window_min = args.window_s // 60
    t0 = time.perf_counter()
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("SELECT setseed(%s)", (args.seed,))
        users = [
            conn.execute(
                "INSERT INTO users (name, role, disabled, created_at) VALUES (%s, 'user', false, now()) "
                "RETURNING id",
                (f"bench-user-{i}",),
            ).fetchone()[0]  # type: ignore[index]
            for i in range(args.users)
        ]
        keys = [
            conn.execute(
                "INSERT INTO api_keys (user_id, prefix, key_hash, scopes, samples_used, rate_window, "
                "rate_count, created_at) VALUES (%s, %s, %s, '[\"*\"]', 0, 0, 0, now()) RETURNING id",
                (u, f"sdb_b{u}", secrets.token_hex(32)),
            ).fetchone()[0]  # type: ignore[index]
            for u in users
        ]
        conn.execute(
            "CREATE UNLOGGED TABLE bench_calls (t timestamptz, client text, model text, status int, n int)"
        )
        first = end - timedelta(days=args.days)
        for d in range(args.days):
            day = first + timedelta(days=d)
            day_min = int(day.timestamp()) // 60
            # /predict calls of the day
            conn.execute(
                """
                INSERT INTO bench_calls
                SELECT %(day)s + r1 * interval '1 day',
                       'anon-' || lpad(to_hex(CASE WHEN heavy THEN floor(r2 * %(heavy)s)::int
                                                   ELSE floor(r2 * %(clients)s)::int END), 24, '0'),
                       CASE WHEN r3 >= 0.97 THEN NULL WHEN r4 < 0.8 THEN 'fashion-mnist' ELSE 'digits' END,
                       CASE WHEN r3 < 0.97 THEN 200 WHEN r3 < 0.99 THEN 429 ELSE 422 END,
                       CASE WHEN r3 >= 0.97 THEN 0 WHEN heavy THEN 256 ELSE 1 + floor(r4 * 16)::int END
                FROM (SELECT random() AS r1, random() AS r2, random() AS r3, random() AS r4,
                             random() < %(heavy_share)s AS heavy
                      FROM generate_series(1, %(n)s)) g
                """,
                {
                    "day": day,
                    "n": per_day_p,
                    "heavy": HEAVY_CLIENTS,
                    "clients": args.clients,
                    "heavy_share": HEAVY_SHARE,
                },
            )
            # what the audit writer stores for them (service.db.aggregates.AggregateWriter.apply)
            conn.execute(
                "INSERT INTO audit_clients (client_id) SELECT DISTINCT client FROM bench_calls "
                "ON CONFLICT DO NOTHING"
            )
            minute = "floor(extract(epoch from t) / 60)::int"
            conn.execute(
                f"INSERT INTO usage_minutes SELECT {minute}, '/predict', coalesce(model, ''), status, "
                f"count(*), sum(n) FROM bench_calls GROUP BY 1, 2, 3, 4"
            )
            conn.execute(
                f"INSERT INTO client_usage SELECT c.id, {minute} / {window_min} * {window_min}, status, "
                f"count(*), sum(n) FROM bench_calls b JOIN audit_clients c ON c.client_id = b.client "
                f"GROUP BY 1, 2, 3 ORDER BY 2"  # in time order, as the writer's upserts lay them out
            )
            conn.execute(
                "INSERT INTO client_days (client_ref, day, requests, samples, peak_window_samples, "
                "first_half_requests, first_half_samples) SELECT client_ref, minute / 1440 * 1440, "
                "sum(requests), sum(samples), max(samples), "
                "coalesce(sum(requests) FILTER (WHERE minute %% 1440 < 720), 0), "
                "coalesce(sum(samples) FILTER (WHERE minute %% 1440 < 720), 0) "
                "FROM client_usage WHERE status = 200 AND minute >= %s AND minute < %s GROUP BY 1, 2",
                (day_min, day_min + 1440),
            )
            if keep > 0:
                conn.execute(
                    "INSERT INTO query_audits (created_at, endpoint, model, client_id, n_samples, status, "
                    "latency_ms, input_digest) SELECT t, '/predict', model, client, n, status, "
                    "1 + random() * 5, md5(random()::text) || md5(random()::text) FROM bench_calls "
                    "WHERE random() < %s ORDER BY t",
                    (keep,),
                )
            conn.execute("TRUNCATE bench_calls")
            # /distill-batch calls of the day: per-call rows, in time order (ids follow time, as served)
            conn.execute(
                """
                INSERT INTO query_audits (created_at, endpoint, model, user_id, api_key_id, client_id,
                                          n_samples, status, latency_ms, input_digest)
                SELECT t, '/distill-batch', 'fashion-mnist',
                       CASE WHEN s = 401 THEN NULL ELSE u END, CASE WHEN s = 401 THEN NULL ELSE k END,
                       'anon-user' || u, CASE WHEN s IN (401, 429) THEN 0 ELSE n END, s,
                       5 + random() * 50, md5(random()::text) || md5(random()::text)
                FROM (SELECT %(day)s + random() * interval '1 day' AS t, i,
                             (%(users)s::bigint[])[i] AS u, (%(keys)s::bigint[])[i] AS k,
                             64 + floor(random() * 448)::int AS n,
                             CASE WHEN r < 0.95 THEN 200 WHEN r < 0.98 THEN 429 WHEN r < 0.99 THEN 401
                                  ELSE 500 END AS s
                      FROM (SELECT 1 + floor(random() * %(nu)s)::int AS i, random() AS r
                            FROM generate_series(1, %(n)s)) g) c
                ORDER BY t
                """,
                {"day": day, "n": per_day_d, "users": users, "keys": keys, "nu": len(users)},
            )
            print(f"  day {d + 1}/{args.days} filled ({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
        conn.execute("DROP TABLE bench_calls")
    t_fill = time.perf_counter() - t0
    db = Database(url.replace("postgresql://", "postgresql+psycopg://", 1))
    t1 = time.perf_counter()
    rolled = 0
    while True:
        n = rollup.roll_distill(db, batch=500_000)
        rolled += n
        if n == 0:
            break
    t_roll = time.perf_counter() - t1
    db.dispose()
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("VACUUM ANALYZE")
    return {
        "predict_calls": per_day_p * args.days,
        "distill_calls": per_day_d * args.days,
        "distill_rolled": rolled,
        "fill_s": round(t_fill, 1),
        "rollup_s": round(t_roll, 1),
    }


def storage(url: str) -> dict[str, Any]:
    with psycopg.connect(url) as conn:

        def size(table: str) -> int:
            return int(conn.execute("SELECT pg_total_relation_size(%s)", (table,)).fetchone()[0])  # type: ignore[index]

        def count(sql: str) -> int:
            return int(conn.execute(sql).fetchone()[0])  # type: ignore[index]

        tables = {
            t: size(t)
            for t in (
                "query_audits",
                "usage_minutes",
                "client_usage",
                "client_days",
                "audit_clients",
                "user_usage",
                "security_events",
            )
        }
        rows = {
            "query_audits_predict": count("SELECT count(*) FROM query_audits WHERE endpoint = '/predict'"),
            "query_audits_distill": count(
                "SELECT count(*) FROM query_audits WHERE endpoint = '/distill-batch'"
            ),
            "usage_minutes_predict": count("SELECT count(*) FROM usage_minutes WHERE endpoint = '/predict'"),
            "usage_minutes": count("SELECT count(*) FROM usage_minutes"),
            "client_usage": count("SELECT count(*) FROM client_usage"),
            "client_days": count("SELECT count(*) FROM client_days"),
            "user_usage": count("SELECT count(*) FROM user_usage"),
        }
    audits_rows = rows["query_audits_predict"] + rows["query_audits_distill"]
    predict_bytes = (
        tables["client_usage"]
        + tables["client_days"]
        + tables["audit_clients"]
        + tables["usage_minutes"] * rows["usage_minutes_predict"] / max(1, rows["usage_minutes"])
        + tables["query_audits"] * rows["query_audits_predict"] / max(1, audits_rows)
    )
    return {"bytes": tables, "rows": rows, "predict_bytes": int(predict_bytes)}


def time_reads(sa_url: str, end: datetime, runs: int) -> dict[str, Any]:
    from fastapi.testclient import TestClient

    from service.core.config import Settings
    from service.core.security import new_api_key
    from service.crud import accounts
    from service.inference.registry import ModelRegistry
    from service.main import create_app

    key = new_api_key()  # an administrator of its own for this run (a kept database has one already)
    db = Database(sa_url)
    with db.write() as s:
        admin = accounts.create_user(s, f"bench-admin-{secrets.token_hex(4)}", "admin")
        accounts.create_api_key(
            s, admin, prefix=key.prefix, digest=key.digest, scopes=["*"], sample_quota=None, expires_at=None
        )
    db.dispose()
    admin_token = key.secret
    settings = Settings(
        database_url=sa_url,
        jwt_secret=secrets.token_urlsafe(48),
        console=False,
        log_level="WARNING",
        gc_freeze=False,
    )
    registry = ModelRegistry([], ModelRegistry.new_executor())
    day = (end - timedelta(days=1)).isoformat()
    week = (end - timedelta(days=7)).isoformat()
    until = end.isoformat()
    # a past 24 hours from 06:00 to 06:00 UTC: the clients ranking's worst case (6 hours of windows at
    # each end, service.crud.client_ranking.ranked_sums)
    six = end - timedelta(hours=18)
    reads = {
        "usage": ("/admin/usage", {"limit": 100}),
        "timeline": ("/admin/usage/timeline", {"since": day, "until": until, "bucket_s": 3600}),
        "clients": (
            "/admin/usage/clients",
            {"kind": "anonymous", "since": day, "until": until, "bucket_s": 3600, "limit": 100},
        ),
        "clients_0600": (
            "/admin/usage/clients",
            {
                "kind": "anonymous",
                "since": (six - timedelta(days=1)).isoformat(),
                "until": six.isoformat(),
                "bucket_s": 3600,
                "limit": 100,
            },
        ),
        "extraction": ("/admin/extraction", {"since": week, "until": until}),
        "audits": ("/admin/audits", {"limit": 50}),
    }
    out: dict[str, Any] = {}
    with TestClient(create_app(settings, registry=registry)) as client:
        r = client.post(
            "/auth/token", data={"grant_type": "client_credentials", "client_secret": admin_token}
        )
        headers = {"Authorization": f"Bearer {r.json()['access_token']}"}
        for name, (path, params) in reads.items():
            times = []
            for i in range(runs + 1):
                t = time.perf_counter()
                resp = client.get(path, params=params, headers=headers)
                dt = (time.perf_counter() - t) * 1000
                assert resp.status_code == 200, resp.text
                if i:
                    times.append(dt)
            body = resp.json()
            out[name] = {
                "median_ms": round(statistics.median(times), 1),
                "runs_ms": [round(x, 1) for x in times],
            }
            if name == "extraction":
                out[name]["flagged"] = len(body["flagged"])
            if "total" in body:
                out[name]["total"] = body["total"]
                out[name]["total_capped"] = body.get("total_capped")
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=5_000_000)
    p.add_argument("--days", type=int, default=30)
    p.add_argument("--clients", type=int, default=10_000)
    p.add_argument("--users", type=int, default=50)
    p.add_argument("--policy", choices=("on", "sampled", "off"), default="sampled")
    p.add_argument("--sample-rate", type=float, default=0.01)
    p.add_argument("--window-s", type=int, default=3600, help="SDB_EXTRACTION_WINDOW_S")
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--seed", type=float, default=0.27)
    p.add_argument(
        "--pg-url",
        default=os.environ.get("SDB_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test"),
    )
    p.add_argument("--database", default="sdb_audit_bench")
    p.add_argument("--keep", action="store_true", help="Keep the database (to rerun --reads-only).")
    p.add_argument("--reads-only", action="store_true", help="Time the reads of a kept database.")
    p.add_argument("--json", help="Write the results to this file too.")
    p.add_argument("--no-prune", action="store_true", help="Measure before the default retention runs.")
    args = p.parse_args()

    url = _conninfo(args.pg_url, args.database)
    sa_url = url.replace("postgresql://", "postgresql+psycopg://", 1)
    # the data ends at the last UTC midnight: whole days, whole windows
    end = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    result: dict[str, Any] = {
        "requests": args.requests,
        "policy": args.policy,
        "sample_rate": args.sample_rate,
    }
    try:
        if not args.reads_only:
            create_database(args.pg_url, args.database)
            migrate.upgrade(sa_url)
            result["fill"] = fill(url, args, end)
        else:
            with psycopg.connect(url) as conn:
                last = conn.execute("SELECT max(created_at) FROM query_audits").fetchone()[0]  # type: ignore[index]
            end = (last + timedelta(days=1)).replace(hour=0, minute=0, second=0, microsecond=0)
        if not args.no_prune:
            # the default retention (`sdb db prune` with the settings' defaults), as a cron job would run it
            t = time.perf_counter()
            db = Database(sa_url)
            result["prune"] = {"deleted": retention.prune(db, retention.RetentionPolicy())}
            db.dispose()
            result["prune"]["s"] = round(time.perf_counter() - t, 1)
            with psycopg.connect(url, autocommit=True) as conn:
                conn.execute("VACUUM FULL ANALYZE")
        result["storage"] = storage(url)
        predict_calls = round(args.requests * PREDICT_SHARE)
        result["mb_per_million_predict"] = round(
            result["storage"]["predict_bytes"] / 1e6 / (predict_calls / 1e6), 2
        )
        result["reads"] = time_reads(sa_url, end, args.runs)
    finally:
        if not args.keep:
            drop_database(args.pg_url, args.database)
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
