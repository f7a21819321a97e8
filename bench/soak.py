"""Bounded soak test of the sdb service: mixed anonymous /predict and authorized /distill-batch traffic.

The script sets everything up itself (a test box, a fresh database, migrations, a real server process
started with `sdb serve` on a loopback port, an admin, a user and an API key), then runs a closed-loop load
from THIS process (`--concurrency` clients, each sending its next request as soon as the previous one
is answered, so the rate is the highest the machine sustains), samples the server's RSS, stops the server
with SIGTERM and checks:

- zero 5xx answers and zero transport errors,
- audit rows equal answered requests: one /predict row per /predict answer, one /distill-batch row with
  status 200 per 200 answer and no reserved-but-unconfirmed row,
- stable memory: the median RSS of the last quarter of the run is at most `--max-rss-growth` (fraction)
  and `--max-rss-growth-mib` above the median of the second quarter (the first quarter is warm-up).

It prints a JSON summary and exits 1 when a check fails.

    .venv/bin/python bench/soak.py --seconds 300                       # SQLite (default)
    .venv/bin/python bench/soak.py --seconds 300 --postgres             # a fresh PostgreSQL database
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import signal
import statistics
import sys
import tempfile
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from sdb.client import encode_npy
from tests._support.admin import create_user_and_key
from tests._support.postgres import create_pg_database, drop_pg_database, pg_url
from tests._support.server import Server, base_env

MODEL = "soak-box"


@dataclass
class SoakConfig:
    seconds: float = 300.0
    concurrency: int = 16
    distill_fraction: float = 0.25
    batch: int = 8
    postgres: bool = False
    database_url: str | None = None
    rss_interval_s: float = 2.0
    max_rss_growth: float = 0.10
    max_rss_growth_mib: float = 50.0
    server_log: Path | None = None


@dataclass
class Tally:
    statuses: Counter[tuple[str, int]] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    latencies: dict[str, list[float]] = field(default_factory=lambda: {"predict": [], "distill": []})


class Soak:
    def __init__(self, cfg: SoakConfig, workdir: Path) -> None:
        self.cfg = cfg
        self.workdir = workdir
        self.pg_db: str | None = None
        self.server: Server | None = None
        self.tally = Tally()
        self.rss: list[tuple[float, int]] = []
        self.api_key = ""

    # ---------------------------------------------------------------- setup / teardown

    def database_url(self) -> str:
        if self.cfg.database_url:
            return self.cfg.database_url
        if self.cfg.postgres:
            self.pg_db = create_pg_database(prefix="sdb_soak")
            return pg_url(self.pg_db)
        return f"sqlite:///{self.workdir / 'soak.db'}"

    def drop_database(self) -> None:
        if self.pg_db is None:
            return
        drop_pg_database(self.pg_db)

    @property
    def base(self) -> str:
        assert self.server is not None
        return self.server.url

    def start_server(self, db_url: str) -> None:
        """A test box, migrations, then `sdb serve` (rate limits off), waited for on /readyz."""
        from sdb_core.artifact import make_test_box
        from service.db.migrate import upgrade

        model_dir = self.workdir / "models"
        make_test_box(model_dir, name=MODEL, seed=7)
        upgrade(db_url)
        env = base_env(
            model_dir, db_url, default_model=MODEL, torch_threads=0, log_level="WARNING",
            expose_metrics="false", predict_rate_per_minute=0, distill_rate_per_minute=0,
        )  # fmt: skip
        log = self.cfg.server_log or self.workdir / "server.log"
        self.server = Server(env=env, log_path=log, graceful_s=30, ready_path="/readyz").start(120)

    def stop_server(self) -> int | None:
        return None if self.server is None else self.server.stop()

    def create_key(self) -> str:
        return create_user_and_key(self.base, scopes=[MODEL], name=f"soak-{uuid.uuid4().hex[:6]}").api_key

    # ---------------------------------------------------------------- load

    async def _token(self, client: httpx.AsyncClient, api_key: str) -> str:
        r = await client.post(
            "/auth/token", data={"grant_type": "client_credentials", "client_secret": api_key}
        )
        r.raise_for_status()
        return str(r.json()["access_token"])

    async def _worker(
        self, client: httpx.AsyncClient, deadline: float, rng: random.Random, auth: dict[str, str]
    ) -> None:
        cfg = self.cfg
        nrng = np.random.default_rng(rng.randrange(2**32))
        while time.monotonic() < deadline:
            x = nrng.standard_normal((cfg.batch, 1, 8, 8), dtype=np.float32)
            distill = rng.random() < cfg.distill_fraction
            kind = "distill" if distill else "predict"
            t0 = time.perf_counter()
            try:
                if distill:
                    r = await client.post(
                        "/distill-batch", json={"model": MODEL, "inputs_b64": encode_npy(x)}, headers=auth
                    )
                    if r.status_code == 401:  # token expired during a long soak: refresh once
                        auth["Authorization"] = "Bearer " + await self._token(client, self.api_key)
                elif rng.random() < 0.5:
                    r = await client.post("/predict", json={"model": MODEL, "inputs": x.tolist()})
                else:
                    r = await client.post("/predict", json={"model": MODEL, "inputs_b64": encode_npy(x)})
            except httpx.HTTPError as exc:
                self.tally.errors[f"{kind}:{type(exc).__name__}"] += 1
                continue
            self.tally.statuses[(kind, r.status_code)] += 1
            self.tally.latencies[kind].append(time.perf_counter() - t0)

    async def _sample_rss(self, deadline: float, start: float) -> None:
        assert self.server is not None
        while time.monotonic() < deadline:
            self.rss.append((time.monotonic() - start, self.server.rss_kib()))
            await asyncio.sleep(self.cfg.rss_interval_s)

    async def run_load(self) -> float:
        limits = httpx.Limits(
            max_connections=self.cfg.concurrency, max_keepalive_connections=self.cfg.concurrency
        )
        async with httpx.AsyncClient(base_url=self.base, timeout=60, limits=limits) as client:
            auth = {"Authorization": "Bearer " + await self._token(client, self.api_key)}
            start = time.monotonic()
            deadline = start + self.cfg.seconds
            tasks = [
                self._worker(client, deadline, random.Random(1000 + i), auth)
                for i in range(self.cfg.concurrency)
            ]
            await asyncio.gather(self._sample_rss(deadline, start), *tasks)
            return time.monotonic() - start

    # ---------------------------------------------------------------- checks

    def audit_counts(self, db_url: str) -> dict[str, int]:
        from sqlalchemy import create_engine, text

        eng = create_engine(db_url)
        try:
            with eng.connect() as c:
                q = "SELECT endpoint, status, count(*) FROM query_audits GROUP BY endpoint, status"
                return {f"{e} {s}": int(n) for e, s, n in c.execute(text(q))}
        finally:
            eng.dispose()

    def run(self) -> dict[str, Any]:
        db_url = self.database_url()
        try:
            self.start_server(db_url)
            self.api_key = self.create_key()
            elapsed = asyncio.run(self.run_load())
            rc = self.stop_server()
            audits = self.audit_counts(db_url)
        finally:
            self.stop_server()
            self.drop_database()
        return self.summary(elapsed, rc, audits, db_url)

    def summary(self, elapsed: float, rc: int | None, audits: dict[str, int], db_url: str) -> dict[str, Any]:
        st = self.tally.statuses
        answered = {k: sum(n for (kind, _), n in st.items() if kind == k) for k in ("predict", "distill")}
        five_xx = sum(n for (_, code), n in st.items() if code >= 500)
        predict_rows = sum(n for k, n in audits.items() if k.startswith("/predict "))
        distill_ok_rows = audits.get("/distill-batch 200", 0)
        reserved_rows = sum(n for k, n in audits.items() if k.endswith(" 102"))
        rss = [kib for _, kib in self.rss]
        q = max(1, len(rss) // 4)
        warm = statistics.median(rss[q : 2 * q]) if len(rss) >= 4 else float(rss[0] if rss else 0)
        last = statistics.median(rss[-q:]) if rss else 0.0
        growth_mib = (last - warm) / 1024
        growth_frac = (last - warm) / warm if warm else 0.0

        def pct(xs: list[float], p: float) -> float | None:
            return round(float(np.percentile(xs, p)) * 1000, 2) if xs else None

        checks = {
            "zero_5xx": five_xx == 0,
            "zero_transport_errors": not self.tally.errors,
            "predict_audit_rows_equal_answers": predict_rows == answered["predict"],
            "distill_audit_rows_equal_200_answers": distill_ok_rows == st.get(("distill", 200), 0),
            "no_unconfirmed_distill_rows": reserved_rows == 0,
            "server_clean_exit": rc in (0, -signal.SIGTERM),  # uvicorn re-raises SIGTERM after a clean stop
            "rss_stable": growth_frac <= self.cfg.max_rss_growth
            and growth_mib <= self.cfg.max_rss_growth_mib,
        }
        total = sum(answered.values())
        return {
            "command": " ".join([Path(sys.executable).name, *sys.argv]),
            "database": db_url.split(":", 1)[0],
            "seconds": round(elapsed, 1),
            "concurrency": self.cfg.concurrency,
            "batch": self.cfg.batch,
            "requests": total,
            "requests_per_s": round(total / elapsed, 1) if elapsed else 0.0,
            "samples_per_s": round(total * self.cfg.batch / elapsed, 1) if elapsed else 0.0,
            "answers": {f"{k} {c}": n for (k, c), n in sorted(st.items())},
            "transport_errors": dict(self.tally.errors),
            "latency_ms": {
                k: {"p50": pct(v, 50), "p95": pct(v, 95), "p99": pct(v, 99)}
                for k, v in self.tally.latencies.items()
            },
            "audit_rows": audits,
            "rss_mib": {
                "start": round(rss[0] / 1024, 1) if rss else None,
                "warm_median": round(warm / 1024, 1),
                "last_quarter_median": round(last / 1024, 1),
                "max": round(max(rss) / 1024, 1) if rss else None,
                "growth_mib": round(growth_mib, 1),
            },
            "server_exit_code": rc,
            "checks": checks,
            "ok": all(checks.values()),
        }


def parse_args(argv: list[str] | None = None) -> SoakConfig:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    d = SoakConfig()
    p.add_argument("--seconds", type=float, default=d.seconds, help="length of the load phase")
    p.add_argument("--concurrency", type=int, default=d.concurrency, help="concurrent closed-loop clients")
    p.add_argument("--distill-fraction", type=float, default=d.distill_fraction)
    p.add_argument("--batch", type=int, default=d.batch, help="samples per request")
    p.add_argument("--postgres", action="store_true", help="use a fresh database on SDB_TEST_POSTGRES_URL")
    p.add_argument("--database-url", default=None, help="an existing, empty database instead")
    p.add_argument("--max-rss-growth", type=float, default=d.max_rss_growth)
    p.add_argument("--max-rss-growth-mib", type=float, default=d.max_rss_growth_mib)
    p.add_argument("--server-log", type=Path, default=None)
    a = p.parse_args(argv)
    return SoakConfig(
        seconds=a.seconds,
        concurrency=a.concurrency,
        distill_fraction=a.distill_fraction,
        batch=a.batch,
        postgres=a.postgres,
        database_url=a.database_url,
        max_rss_growth=a.max_rss_growth,
        max_rss_growth_mib=a.max_rss_growth_mib,
        server_log=a.server_log,
    )


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="sdb-soak-") as tmp:
        result = Soak(cfg, Path(tmp)).run()
    print(json.dumps(result, indent=2))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
