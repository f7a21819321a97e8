"""sdb against a peer model server, `python -m bench.serve_bench --peer litserve` (issue 15).

/predict at concurrency 32, one sample per request, on each model of the serving benchmark, against the same
box served by LitServe (`bench.litserve_peer`, the `bench` extra), in alternating rounds (sdb first in odd
rounds, LitServe first in even ones); prints the medians over the rounds and their ratios. Targets: sdb
req/s >= 1.5 x LitServe's, sdb p99 <= LitServe's p99, sdb p99 <= 3 x its p50; no failed request.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.serve_bench import Result, Scenario, fmt, prepare_models, run_load, sdb_server
from tests._support.net import free_port
from tests._support.server import Server


def peer_server(work: Path, model_dir: Path, threads: int, api_servers: int = 1, workers: int = 1) -> Server:
    """The same box served by LitServe (`bench.litserve_peer`), launched in its own process group: LitServe
    starts an API server and an inference worker as child processes."""
    port = free_port()
    cmd = [
        sys.executable, "-m", "bench.litserve_peer", "--model-dir", str(model_dir), "--port", str(port),
        "--threads", str(threads), "--api-servers", str(api_servers), "--workers", str(workers),
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith("SDB_")}
    log = work / f"litserve-{model_dir.name}.log"
    return Server(env, log, port=port, cmd=cmd, process_group=True, ready_path="/health").launch()


@dataclass
class PeerRow:
    model: str
    server: str  # "sdb" or the peer's name
    round: int
    result: Result


def median(values: list[float]) -> float:
    return float(np.median(values))


def peer_report(rows: list[PeerRow], peer: str, meta: dict[str, Any]) -> tuple[str, bool, dict[str, Any]]:
    lines = [
        "| model | server | round | requests | req/s | p50 ms | p95 ms | p99 ms | p99/p50 | failed | "
        "server CPU ms/req |",
        "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for row in rows:
        r = row.result
        lines.append(
            f"| {row.model} | {row.server} | {row.round} | {r.scenario.requests} | {fmt(r.req_per_s)} | "
            f"{r.p50_ms:.1f} | {r.p95_ms:.1f} | {r.p99_ms:.1f} | {r.p99_ms / r.p50_ms:.1f} | {r.failures} | "
            f"{fmt(r.server_cpu_ms_per_req, 2)} |"
        )
    lines += [
        "",
        f"Medians over the rounds, sdb / {peer}:",
        "",
        f"| model | sdb req/s | {peer} req/s | req/s ratio | sdb p50 | {peer} p50 | sdb p99 | {peer} p99 | "
        f"p99 ratio | sdb p99/p50 | sdb CPU ms/req | {peer} CPU ms/req | CPU ratio |",
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    checks: list[tuple[str, bool]] = []
    summary: dict[str, Any] = {}
    for model in dict.fromkeys(row.model for row in rows):
        med: dict[str, dict[str, float]] = {}
        for server in ("sdb", peer):
            rs = [row.result for row in rows if row.model == model and row.server == server]
            med[server] = {
                "req_per_s": median([r.req_per_s for r in rs]),
                "p50_ms": median([r.p50_ms for r in rs]),
                "p99_ms": median([r.p99_ms for r in rs]),
                "cpu_ms_per_req": median([r.server_cpu_ms_per_req or 0.0 for r in rs]),
            }
        a, b = med["sdb"], med[peer]
        speed, tail_ratio, tail = (
            a["req_per_s"] / b["req_per_s"],
            a["p99_ms"] / b["p99_ms"],
            a["p99_ms"] / a["p50_ms"],
        )
        # CPU ratio: the peer's CPU per request over sdb's (> 1: sdb needs less), robust to other load.
        cpu_ratio = b["cpu_ms_per_req"] / a["cpu_ms_per_req"] if a["cpu_ms_per_req"] else None
        summary[model] = {
            **med,
            "req_per_s_ratio": speed,
            "p99_ratio": tail_ratio,
            "sdb_p99_over_p50": tail,
            "cpu_ratio": cpu_ratio,
        }
        lines.append(
            f"| {model} | {fmt(a['req_per_s'])} | {fmt(b['req_per_s'])} | {speed:.2f} | {a['p50_ms']:.1f} | "
            f"{b['p50_ms']:.1f} | {a['p99_ms']:.1f} | {b['p99_ms']:.1f} | {tail_ratio:.2f} | {tail:.1f} | "
            f"{a['cpu_ms_per_req']:.2f} | {b['cpu_ms_per_req']:.2f} | {fmt(cpu_ratio, 2)} |"
        )
        checks.append((f"{model}: sdb req/s >= 1.5 x {peer} (got {speed:.2f}x)", speed >= 1.5))
        checks.append((f"{model}: sdb p99 <= {peer} p99 (got {a['p99_ms']:.1f} vs {b['p99_ms']:.1f} ms)",
                       a["p99_ms"] <= b["p99_ms"]))  # fmt: skip
        checks.append((f"{model}: sdb p99 <= 3 x p50 (got {tail:.1f}x)", tail <= 3))
    failures = sum(row.result.failures for row in rows)
    checks.append((f"no failed request (got {failures})", failures == 0))
    lines += ["", *(f"- [{'x' if ok else ' '}] {name}" for name, ok in checks)]
    lines += ["", "Run: " + ", ".join(f"{k}={v}" for k, v in meta.items())]
    return "\n".join(lines), all(ok for _, ok in checks), summary


def run_peer(args: argparse.Namespace, threads: int) -> int:
    """sdb (batching on, as in the main run) and the peer, /predict c32, alternating rounds per model."""
    from service.db.migrate import upgrade

    if args.peer == "litserve":
        try:
            import litserve  # noqa: F401
        except ImportError:
            print(
                "--peer litserve needs the bench extra: .venv/bin/pip install -e '.[bench]'", file=sys.stderr
            )
            return 2
    load0 = os.getloadavg()
    rows: list[PeerRow] = []
    with tempfile.TemporaryDirectory(prefix="sdb-bench-peer-") as tmp:
        work = Path(tmp)
        dirs = prepare_models(work)
        if args.model:
            unknown = set(args.model) - set(dirs)
            if unknown:
                print(f"unknown model(s) {sorted(unknown)}; the bench has {sorted(dirs)}", file=sys.stderr)
                return 2
            dirs = {name: d for name, d in dirs.items() if name in args.model}
        from sdb_core.artifact import read_manifest

        shapes = {name: tuple(int(v) for v in read_manifest(d)["input_shape"]) for name, d in dirs.items()}
        db_url = f"sqlite:///{work / 'peer.db'}"
        upgrade(db_url)
        (work / "served").mkdir()
        for d in dirs.values():
            (work / "served" / d.name).symlink_to(d.resolve(), target_is_directory=True)
        server = sdb_server(work, work / "served", db_url, True, threads, args.server_env, args.workers)
        try:
            server.wait_ready()
            for model, model_dir in dirs.items():
                big = int(np.prod(shapes[model])) >= 1024
                n = args.requests or max(8, int((2000 if big else 6000) * (0.25 if args.quick else 1.0)))
                scenario = Scenario(model, "predict c32", "/predict", 32, 1, n, "plain")
                warm = Scenario(model, "warm-up", "/predict", 32, 1, max(8, n // 10), "plain")
                peer = peer_server(work, model_dir, threads, args.peer_api_servers, args.peer_workers)
                try:
                    peer.wait_ready(180)
                    targets = {"sdb": server, args.peer: peer}
                    for target in targets.values():
                        run_load(target, warm, work, shapes[model], None)
                    for rnd in range(1, args.rounds + 1):
                        order = list(targets) if rnd % 2 else list(reversed(targets))
                        for name in order:
                            print(f"... {model}: {name} round {rnd}", file=sys.stderr, flush=True)
                            cpu0 = targets[name].cpu_s()
                            result = run_load(targets[name], scenario, work, shapes[model], None)
                            cpu = targets[name].cpu_s() - cpu0
                            result.server_cpu_ms_per_req = cpu * 1000.0 / scenario.requests
                            rows.append(PeerRow(model, name, rnd, result))
                finally:
                    peer.stop()
        finally:
            server.stop()
    load1 = os.getloadavg()
    meta = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "cpu": platform.processor() or platform.machine(),
        "cores": len(os.sched_getaffinity(0)),
        "torch threads": threads,
        "torch": torch.__version__,
        "peer": f"{args.peer} {_version(args.peer)}",
        "rounds": args.rounds,
        "server env": " ".join(f"{k}={v}" for k, v in args.server_env.items()) or "-",
        "sdb workers": args.workers or 1,
        f"{args.peer} api servers / workers": f"{args.peer_api_servers} / {args.peer_workers}",
        "load average (1 min) before / after": f"{load0[0]:.1f} / {load1[0]:.1f}",
        "niceness": os.nice(0),
    }
    table, ok, summary = peer_report(rows, args.peer, meta)
    print(table)
    if args.json is not None:
        out = [
            {"model": row.model, "server": row.server, "round": row.round,
             **{k: v for k, v in row.result.__dict__.items() if k != "scenario"},
             "requests": row.result.scenario.requests}
            for row in rows
        ]  # fmt: skip
        args.json.write_text(json.dumps({"meta": meta, "rounds": out, "summary": summary}, indent=2))
    return 0 if ok else 1


def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "?"
