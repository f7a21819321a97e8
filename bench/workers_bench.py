"""Several workers: `sdb serve --workers 1` against `--workers 2` on /predict, with and without Redis.

    .venv/bin/python -m bench.workers_bench                     # ~2 minutes on 2 CPU cores
    .venv/bin/python -m bench.workers_bench --rounds 5 --requests 6000 --json out.json

Starts one `sdb serve` per configuration (1 and 2 workers; each again with SDB_REDIS_URL when a Redis
server answers at --redis-url, the /predict limit on but far above the load, so that every call runs the
Redis script and counter), all at once, on a fresh SQLite database each, with the shipped demo box,
SDB_TORCH_THREADS=1 (processes x threads <= cores) and no access log. Then `bench.loadgen` (its own
process, closed loop, keep-alive connections, one-sample base64-.npy JSON bodies) drives /predict in
rounds that alternate between the configurations, so that other load on a shared machine spreads over
all of them. Reports the median req/s of the rounds per configuration and the 2-worker / 1-worker ratio,
and the CPU time per request of the server's processes (the supervisor and its workers, from /proc; with
Redis, plus the local redis-server's): the cost side, which other load on the machine barely disturbs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bench.loadgen import drive, npy_bodies, write_bodies
from tests._support.server import REPO, Server, base_env, process_cpu_s

MODEL_DIR = REPO / "models"
MODEL = "digits-demo"


@dataclass
class Config:
    workers: int
    redis: bool
    server: Server | None = None
    rounds: list[dict[str, float]] = field(default_factory=list)

    @property
    def name(self) -> str:
        return f"{self.workers} worker{'s' if self.workers > 1 else ''}{' + Redis' if self.redis else ''}"


def redis_server_pid(url: str) -> int | None:
    """The local redis-server's pid (its CPU counts for the Redis configurations), if it is on this host."""
    import redis

    with redis.Redis.from_url(url) as r:
        pid = int(r.info("server")["process_id"])
    return pid if Path(f"/proc/{pid}/stat").exists() else None


def redis_answers(url: str) -> bool:
    import redis

    try:
        with redis.Redis.from_url(url, socket_connect_timeout=1, socket_timeout=1) as r:
            return bool(r.ping())
    except (redis.RedisError, OSError):
        return False


def start(config: Config, work: Path, redis_url: str, prefix: str) -> Server:
    from service.db.migrate import upgrade

    db = work / f"w{config.workers}{'r' if config.redis else ''}.db"
    upgrade(f"sqlite:///{db}")
    settings: dict[str, Any] = {"log_level": "INFO", "batching": "true", "distill_rate_per_minute": 0}
    if config.redis:
        settings |= {"redis_url": redis_url, "redis_key_prefix": prefix, "predict_rate_per_minute": 10**9}
    else:
        settings["predict_rate_per_minute"] = 0
    env = base_env(MODEL_DIR, f"sqlite:///{db}", **settings)
    log = work / f"{config.name.replace(' ', '_')}.log"
    return Server(env=env, log_path=log, workers=config.workers, args=["--no-access-log"]).launch()


def wait_all_workers(srv: Server, workers: int, timeout: float = 300) -> None:
    """Every worker has finished its start-up (uvicorn logs it once per worker)."""
    srv.wait_ready(timeout).wait_for_log("Application startup complete", workers, timeout)


def load(
    srv: Server, bodies: Path, concurrency: int, requests: int, redis_pid: int | None = None
) -> dict[str, float]:

    def cpu() -> float:  # the supervisor and its workers, and the local redis-server
        return srv.cpu_s() + (process_cpu_s(redis_pid) if redis_pid else 0.0)

    cpu0 = cpu()
    data = drive(srv.port, "/predict", bodies, concurrency, requests)
    cpu_s = cpu() - cpu0
    lat = np.array(data["latencies"]) * 1000.0
    ok = data["statuses"].get("200", 0)
    return {
        "req_per_s": len(lat) / float(data["wall_s"]),
        "p50_ms": float(np.percentile(lat, 50)),
        "p99_ms": float(np.percentile(lat, 99)),
        "failed": float(len(lat) - ok),
        "cpu_ms_per_req": cpu_s * 1000.0 / len(lat),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--requests", type=int, default=4000, help="requests per round and configuration")
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    p.add_argument("--no-redis", action="store_true", help="only the configurations without Redis")
    p.add_argument("--json", type=Path, help="write the rounds here")
    args = p.parse_args(argv)

    load_before = f"{os.getloadavg()[0]:.1f}"
    with_redis = not args.no_redis and redis_answers(args.redis_url)
    if not args.no_redis and not with_redis:
        print(f"no Redis answers at {args.redis_url}: measuring without it", file=sys.stderr)
    configs = [Config(w, r) for r in ([False, True] if with_redis else [False]) for w in (1, 2)]
    prefix = f"bench:{uuid.uuid4().hex[:8]}:"
    redis_pid = redis_server_pid(args.redis_url) if with_redis else None
    with tempfile.TemporaryDirectory(prefix="sdb-workers-bench-") as tmp:
        work = Path(tmp)
        write_bodies(work / "bodies.bin", npy_bodies(MODEL, (1, 1, 8, 8), 16.0))
        try:
            for c in configs:
                c.server = start(c, work, args.redis_url, prefix)
            for c in configs:
                assert c.server is not None
                wait_all_workers(c.server, c.workers)
                load(c.server, work / "bodies.bin", args.concurrency, 500)  # warm-up, not recorded
            for i in range(args.rounds):
                order = configs if i % 2 == 0 else configs[::-1]
                for c in order:
                    assert c.server is not None
                    pid = redis_pid if c.redis else None
                    c.rounds.append(load(c.server, work / "bodies.bin", args.concurrency, args.requests, pid))
                    print(f"round {i + 1} {c.name}: {c.rounds[-1]['req_per_s']:,.0f} req/s", file=sys.stderr)
        finally:
            for c in configs:
                if c.server is not None:
                    c.server.stop()
            if with_redis:
                import redis

                with redis.Redis.from_url(args.redis_url) as r:
                    keys = list(r.scan_iter(match=prefix + "*"))
                    if keys:
                        r.delete(*keys)

    def median(c: Config, key: str) -> float:
        return statistics.median(r[key] for r in c.rounds)

    print(
        f"\n/predict, 1 sample a request, concurrency {args.concurrency}, {args.requests} requests a round, "
        f"{args.rounds} alternating rounds; medians over the rounds\n"
    )
    print(f"load average before: {load_before}; after: {os.getloadavg()[0]:.1f}\n")
    print(
        "| configuration | req/s (median) | req/s (rounds) | p50 ms | p99 ms | server CPU ms/req | failed |"
    )
    print("|---|--:|---|--:|--:|--:|--:|")
    for c in configs:
        rounds = ", ".join(f"{r['req_per_s']:,.0f}" for r in c.rounds)
        failed = int(sum(r["failed"] for r in c.rounds))
        print(
            f"| {c.name} | {median(c, 'req_per_s'):,.0f} | {rounds} | {median(c, 'p50_ms'):.1f} | "
            f"{median(c, 'p99_ms'):.1f} | {median(c, 'cpu_ms_per_req'):.2f} | {failed} |"
        )
    print()
    for redis_on in [False, True] if with_redis else [False]:
        one, two = (next(c for c in configs if c.workers == w and c.redis == redis_on) for w in (1, 2))
        print(
            f"- 2 workers / 1 worker{' (Redis)' if redis_on else ''}: "
            f"{median(two, 'req_per_s') / median(one, 'req_per_s'):.2f}x"
        )
    if with_redis:
        for w in (1, 2):
            plain, shared = (
                next(c for c in configs if c.workers == w and c.redis == r) for r in (False, True)
            )
            ratio = median(shared, "req_per_s") / median(plain, "req_per_s")
            print(f"- Redis / no Redis, {w} worker(s): {ratio:.2f}x")
    if args.json is not None:
        args.json.write_text(json.dumps({c.name: c.rounds for c in configs}, indent=2))
    return 1 if any(r["failed"] for c in configs for r in c.rounds) else 0


if __name__ == "__main__":
    raise SystemExit(main())
