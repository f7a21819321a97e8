"""`bench.serve_bench --oip`: the Open Inference Protocol's `infer` (JSON and binary tensors) beside /predict.

One server (batching on, rate limits off) serves both shipped boxes; each round drives, per model, /predict
(one sample per request, base64 `.npy` JSON, as the main bench), `infer` with JSON tensors and `infer`
with binary tensor data (binary outputs too, as tritonclient asks by default) at concurrency 32, in an
order that alternates between rounds. Reported: medians over the rounds of req/s, p50/p99 and server CPU
per request (all its threads, from /proc: the measure other jobs on a shared machine barely disturb).
Target (issue 28): binary `infer` req/s >= 0.9 x /predict's, on both boxes.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from argparse import Namespace
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from bench.loadgen import write_bodies
from bench.serve_bench import sdb_server
from sdb.client import encode_npy
from tests._support.server import REPO, Server

CONCURRENCY = 32
TARGET = 0.9
HEADER_LENGTH = "Inference-Header-Content-Length"


@dataclass(frozen=True)
class Kind:
    name: str  # "predict", "infer json", "infer binary"
    path: str
    content_type: str
    headers: tuple[str, ...]
    bodies: tuple[bytes, ...]


def kinds(model: str, shape: tuple[int, ...]) -> list[Kind]:
    rng = np.random.default_rng(1)
    xs = [rng.random((1, *shape), dtype=np.float32) * 4 for _ in range(16)]
    infer = f"/v2/models/{model}/infer"
    predict = tuple(json.dumps({"model": model, "inputs_b64": encode_npy(x)}).encode() for x in xs)
    as_json = tuple(
        orjson.dumps(
            {"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel()}]},
            option=orjson.OPT_SERIALIZE_NUMPY,
        )
        for x in xs
    )
    tensor = {
        "name": "input",
        "shape": [1, *shape],
        "datatype": "FP32",
        "parameters": {"binary_data_size": xs[0].nbytes},
    }
    header = orjson.dumps({"inputs": [tensor], "parameters": {"binary_data_output": True}})
    return [
        Kind("predict", "/predict", "application/json", (), predict),
        Kind("infer json", infer, "application/json", (), as_json),
        Kind("infer binary", infer, "application/octet-stream", (f"{HEADER_LENGTH}: {len(header)}",),
             tuple(header + x.tobytes() for x in xs)),
    ]  # fmt: skip


def drive(server: Server, kind: Kind, requests: int, work: Path) -> dict[str, float]:
    body_file = work / "oip-bodies.bin"
    write_bodies(body_file, list(kind.bodies))
    cmd = [
        sys.executable, "-m", "bench.loadgen", "--port", str(server.port), "--path", kind.path,
        "--bodies", str(body_file), "--concurrency", str(CONCURRENCY), "--requests", str(requests),
        "--content-type", kind.content_type, *(a for h in kind.headers for a in ("--header", h)),
    ]  # fmt: skip
    cpu0 = server.cpu_s()
    out = json.loads(
        subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=True, timeout=900).stdout
    )
    cpu = server.cpu_s() - cpu0
    lat = np.array(out["latencies"]) * 1000.0
    return {
        "req_per_s": len(lat) / float(out["wall_s"]),
        "p50_ms": float(np.percentile(lat, 50)),
        "p99_ms": float(np.percentile(lat, 99)),
        "cpu_ms_per_req": cpu * 1000.0 / requests,
        "failed": float(len(lat) - out["statuses"].get("200", 0)),
    }


def run_oip(args: Namespace, threads: int) -> int:
    from sdb_core.artifact import read_manifest
    from service.db.migrate import upgrade

    boxes = sorted(p.parent for p in (REPO / "models").glob("*/manifest.json"))
    shapes = {read_manifest(d)["name"]: tuple(int(v) for v in read_manifest(d)["input_shape"]) for d in boxes}
    requests = args.requests or (750 if args.quick else 3000)
    rows: list[dict[str, Any]] = []
    load0 = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="sdb-bench-oip-") as tmp:
        work = Path(tmp)
        (work / "models").mkdir()
        for d in boxes:
            (work / "models" / d.name).symlink_to(d, target_is_directory=True)
        db_url = f"sqlite:///{work / 'oip.db'}"
        upgrade(db_url)
        server = sdb_server(work, work / "models", db_url, True, threads, args.server_env)
        try:
            server.wait_ready()
            for model, shape in shapes.items():
                plan = kinds(model, shape)
                for kind in plan:  # warm-up: connections, allocator, batcher
                    drive(server, kind, max(64, requests // 10), work)
                for rnd in range(1, args.rounds + 1):
                    for kind in plan if rnd % 2 else list(reversed(plan)):
                        print(f"... {model}: {kind.name} round {rnd}", file=sys.stderr, flush=True)
                        rows.append(
                            {
                                "model": model,
                                "kind": kind.name,
                                "round": rnd,
                                **drive(server, kind, requests, work),
                            }
                        )
        finally:
            server.stop()
    load1 = os.getloadavg()
    table, ok, summary = oip_report(rows, list(shapes))
    meta = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "cpu": platform.processor() or platform.machine(),
        "cores": len(os.sched_getaffinity(0)),
        "torch threads": threads,
        "rounds": args.rounds,
        "requests per run": requests,
        "load average (1 min) before / after": f"{load0[0]:.1f} / {load1[0]:.1f}",
    }
    print(table + "\n\nMedians over the rounds. Run: " + ", ".join(f"{k}={v}" for k, v in meta.items()))
    if args.json is not None:
        args.json.write_text(json.dumps({"meta": meta, "rounds": rows, "summary": summary}, indent=2))
    return 0 if ok else 1


def oip_report(rows: list[dict[str, Any]], models: list[str]) -> tuple[str, bool, dict[str, Any]]:
    """(markdown table with the checks, all targets met, medians by model and request kind)."""
    lines = [
        "| model | request | req/s | p50 ms | p99 ms | server CPU ms/req | failed | req/s vs /predict | "
        "CPU/req vs /predict |",
        "|---|---|--:|--:|--:|--:|--:|--:|--:|",
    ]
    checks: list[tuple[str, bool]] = []
    summary: dict[str, dict[str, dict[str, float]]] = {}
    for model in models:
        med: dict[str, dict[str, float]] = {}
        for kind in ("predict", "infer json", "infer binary"):
            rs = [r for r in rows if r["model"] == model and r["kind"] == kind]
            med[kind] = {
                k: float(np.median([r[k] for r in rs]))
                for k in ("req_per_s", "p50_ms", "p99_ms", "cpu_ms_per_req")
            }
            med[kind]["failed"] = sum(r["failed"] for r in rs)
        summary[model] = med
        for kind, m in med.items():
            ratio = m["req_per_s"] / med["predict"]["req_per_s"]
            cpu = m["cpu_ms_per_req"] / med["predict"]["cpu_ms_per_req"]
            lines.append(
                f"| {model} | {kind} | {m['req_per_s']:,.0f} | {m['p50_ms']:.1f} | {m['p99_ms']:.1f} | "
                f"{m['cpu_ms_per_req']:.2f} | {m['failed']:.0f} | {ratio:.2f} | {cpu:.2f} |"
            )
        ratio = med["infer binary"]["req_per_s"] / med["predict"]["req_per_s"]
        checks.append(
            (f"{model}: binary infer c32 >= {TARGET} x /predict req/s (got {ratio:.2f})", ratio >= TARGET)
        )
    failed = sum(r["failed"] for r in rows)
    checks.append((f"no failed request (got {failed:.0f})", failed == 0))
    lines += ["", *(f"- [{'x' if ok else ' '}] {name}" for name, ok in checks)]
    return "\n".join(lines), all(ok for _, ok in checks), summary
