"""Serving benchmark: the real server against the raw model, in one run.

    .venv/bin/python -m bench.serve_bench            # about 2-4 minutes on 2 CPU cores
    .venv/bin/python -m bench.serve_bench --quick    # fewer requests, a smoke run
    .venv/bin/python -m bench.serve_bench --peer litserve   # sdb against LitServe, alternating rounds

Sets everything up itself: a models directory with the demo box (models/ when shipped, else a small_cnn
test box of the same shape) and an untrained ResNet-20 box (3x32x32; speed does not depend on training), a
fresh SQLite database, then a real `uvicorn` server (one worker) with batching on and, later, one with
batching off. Load comes from `bench.loadgen` in a separate process on loopback (closed loop, bounded
request counts). The raw model is timed in this process (same torch threads as the server, no HTTP)
right before each scenario, at the same batch size: 1 for /predict c1, the mean batch the batcher formed
for /predict c32, 256 for /distill-batch. Server RSS is sampled every 50 ms.

Targets (issue 5): distill >= 0.85 x raw at batch 256; /predict c32 >= 0.6 x raw at the mean batch formed
and >= 3 x the req/s of batching off; no failed request; peak RSS < 1.5 x idle. Issue 15: /predict c32
p99 <= 3 x p50.

`--peer litserve` (issue 15) runs a different comparison, sdb against LitServe serving the same box:
`bench.peer_bench`. The servers are started, waited for and bootstrapped by the tests' harness
(`tests._support.server`, `tests._support.admin`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import torch

from bench.loadgen import drive, npy_bodies, write_bodies
from tests._support.admin import create_user_and_key, get_token
from tests._support.net import free_port
from tests._support.server import REPO, Server, base_env


@dataclass
class Scenario:
    model: str
    name: str  # "predict c1", "predict c32", "predict c32 no-batching", "distill 256"
    path: str
    concurrency: int
    samples_per_request: int
    requests: int
    key_path: str  # raw path compared against: "plain" or "keyed"


@dataclass
class Result:
    scenario: Scenario
    req_per_s: float
    samples_per_s: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    failures: int
    statuses: dict[str, int]
    mean_batch: float | None = None
    server_cpu_ms_per_req: float | None = None
    raw_cpu_ms_per_sample: float | None = None
    raw_batch: int | None = None
    raw_samples_per_s: float | None = None
    gc_pauses: tuple[float, float, float] | None = None  # collections, ms paused, collections over 100 ms
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def ratio(self) -> float | None:
        if self.raw_samples_per_s is None:
            return None
        return self.samples_per_s / self.raw_samples_per_s

    @property
    def cpu_ratio(self) -> float | None:
        """Raw CPU per sample / server CPU per sample: the server's efficiency, robust to other load."""
        if self.raw_cpu_ms_per_sample is None or not self.server_cpu_ms_per_req:
            return None
        return self.raw_cpu_ms_per_sample * self.scenario.samples_per_request / self.server_cpu_ms_per_req


# ------------------------------------------------------------------------------------------ setup


def prepare_models(work: Path) -> dict[str, Path]:
    from sdb_core.artifact import make_test_box, read_manifest

    models = work / "models"
    models.mkdir()
    shipped = sorted((REPO / "models").glob("*/manifest.json"))
    if shipped:
        demo_dir = models / shipped[0].parent.name
        demo_dir.symlink_to(shipped[0].parent.resolve(), target_is_directory=True)
    else:
        demo_dir = make_test_box(models, name="demo", arch="small_cnn", arch_extra={"width": 32})
    r20 = make_test_box(models, name="resnet20", arch="resnet20", input_shape=(3, 32, 32), arch_extra={})
    return {read_manifest(demo_dir)["name"]: demo_dir, "resnet20": r20}


def sdb_server(
    work: Path,
    model_dir: Path,
    db_url: str,
    batching: bool,
    threads: int,
    env: dict[str, str],
    workers: int = 0,
) -> Server:
    """The sdb server, launched: batching on or off, rate limits off, metrics on (the batch statistics come
    from /metrics); `workers` > 0: `sdb serve --workers N` (the production entry point with its worker
    processes), else one bare uvicorn process (the main run)."""
    settings = {"device": "auto", "torch_threads": threads, "batching": str(batching).lower(),
                "predict_rate_per_minute": 0, "distill_rate_per_minute": 0, "token_ttl_seconds": 3600,
                "log_level": "WARNING"}  # fmt: skip
    port = free_port()
    cmd = None if workers else [
        sys.executable, "-m", "uvicorn", "service.main:create_app", "--factory",
        "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning", "--no-access-log",
    ]  # fmt: skip
    log = work / f"server-{'batching' if batching else 'nobatching'}.log"
    return Server(
        env=base_env(model_dir, db_url, **settings, **env), log_path=log, port=port, cmd=cmd,
        workers=max(workers, 1), args=["--no-access-log"], ready_path="/readyz",
    ).launch()  # fmt: skip


@contextlib.contextmanager
def rss_sampled(server: Server, every_s: float = 0.05) -> Iterator[list[int]]:
    """The server's RSS (KiB), sampled every `every_s` while the block runs."""
    samples: list[int] = []
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(every_s):
            with contextlib.suppress(OSError, RuntimeError):
                samples.append(server.rss_kib())

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield samples
    finally:
        stop.set()
        thread.join()


def metric(server: Server, family: str) -> list[Any]:
    """The samples of one metric family of the server's /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(server.url + "/metrics", timeout=10).text
    return [s for f in text_string_to_metric_families(text) if f.name == family for s in f.samples]


def gc_stats(server: Server) -> tuple[float, float, float]:
    """(collections, seconds paused, collections over 0.1 s) so far, all generations."""
    count = total = short = 0.0
    for s in metric(server, "sdb_gc_pause_seconds"):
        if s.name.endswith("_count"):
            count += s.value
        elif s.name.endswith("_sum"):
            total += s.value
        elif s.name.endswith("_bucket") and float(s.labels.get("le", "inf")) == 0.1:
            short += s.value  # cumulative: the pauses of at most 0.1 s
    return count, total, count - short


def batch_stats(server: Server, model: str, path: str) -> tuple[float, float]:
    """(sum, count) of the forward batch sizes of one model and path so far."""
    values = {"sum": 0.0, "count": 0.0}
    for s in metric(server, "sdb_inference_batch_size"):
        if s.labels.get("model") == model and s.labels.get("path") == path:
            for suffix in values:
                if s.name.endswith("_" + suffix):
                    values[suffix] = s.value
    return values["sum"], values["count"]


def bench_token(server: Server, models: list[str]) -> str:
    """An access token of a fresh user's API key scoped to `models` (the bootstrap admin creates both)."""
    key = create_user_and_key(server.url, scopes=models, name=f"bench-{uuid.uuid4().hex[:6]}").api_key
    return get_token(server.url, key)


# ------------------------------------------------------------------------------------- measuring


class RawModels:
    """The same boxes, loaded in this process: forward passes with no HTTP, no batcher, no event loop."""

    def __init__(self, dirs: dict[str, Path], threads: int, scripted: bool = False) -> None:
        from sdb_core.artifact import load_box
        from service.inference.runtime import resolve_device

        torch.set_num_threads(threads)
        device = resolve_device("auto")
        self.boxes = {name: load_box(d, device=str(device)) for name, d in dirs.items()}
        if scripted:  # the form the server runs (SDB_TORCHSCRIPT): the service's overhead alone
            self.boxes = {name: box.script() for name, box in self.boxes.items()}

    def samples_per_s(self, model: str, path: str, batch: int, min_time: float = 1.0) -> tuple[float, float]:
        """(samples/s wall, CPU ms per sample) of the raw forward pass at `batch`."""
        box = self.boxes[model]
        forward = box.plain_logits if path == "plain" else box.keyed_logits
        x = torch.from_numpy(np.random.default_rng(0).random((batch, *box.input_shape), dtype=np.float32) * 4)
        with torch.inference_mode():
            for _ in range(2):
                forward(x).cpu()
            n, start, cpu0 = 0, time.perf_counter(), time.process_time()
            while n < 3 or time.perf_counter() - start < min_time:
                forward(x).cpu()  # same work as the server: inputs from CPU, logits back to CPU
                n += 1
        wall, cpu = time.perf_counter() - start, time.process_time() - cpu0
        return n * batch / wall, cpu * 1000.0 / (n * batch)


def run_load(
    server: Server, scenario: Scenario, work: Path, input_shape: tuple[int, ...], token: str | None
) -> Result:
    body_file = work / "bodies.bin"
    write_bodies(body_file, npy_bodies(scenario.model, (scenario.samples_per_request, *input_shape), 4.0))
    headers = {"Authorization": f"Bearer {token}"} if token is not None else None
    data = drive(server.port, scenario.path, body_file, scenario.concurrency, scenario.requests, headers)
    lat = np.array(data["latencies"]) * 1000.0
    wall = float(data["wall_s"])
    statuses = data["statuses"]
    ok = statuses.get("200", 0)
    return Result(
        scenario=scenario,
        req_per_s=len(lat) / wall,
        samples_per_s=ok * scenario.samples_per_request / wall,
        p50_ms=float(np.percentile(lat, 50)),
        p95_ms=float(np.percentile(lat, 95)),
        p99_ms=float(np.percentile(lat, 99)),
        failures=len(lat) - ok,
        statuses=statuses,
    )


def measure(
    server: Server, raw: RawModels, scenario: Scenario, work: Path, shape: tuple[int, ...], token: str | None
) -> Result:
    """One scenario against the server, with its CPU, GC pauses and mean forward batch, then the raw model
    at the batch it is compared against."""
    before, gc0, cpu0 = (
        batch_stats(server, scenario.model, scenario.key_path),
        gc_stats(server),
        server.cpu_s(),
    )
    result = run_load(server, scenario, work, shape, token if scenario.path == "/distill-batch" else None)
    result.server_cpu_ms_per_req = (server.cpu_s() - cpu0) * 1000.0 / scenario.requests
    gc1, after = gc_stats(server), batch_stats(server, scenario.model, scenario.key_path)
    result.gc_pauses = (gc1[0] - gc0[0], (gc1[1] - gc0[1]) * 1000.0, gc1[2] - gc0[2])
    if after[1] > before[1]:
        result.mean_batch = (after[0] - before[0]) / (after[1] - before[1])
    if scenario.name == "predict c32 no-batching":
        result.raw_batch = 1
    elif scenario.concurrency == 1 or scenario.path == "/distill-batch":
        result.raw_batch = scenario.samples_per_request
    else:
        result.raw_batch = max(1, round(result.mean_batch or 1))
    result.raw_samples_per_s, result.raw_cpu_ms_per_sample = raw.samples_per_s(
        scenario.model, scenario.key_path, result.raw_batch
    )
    return result


def scenarios(models: dict[str, tuple[int, ...]], quick: bool) -> Iterator[tuple[Scenario, bool]]:
    """(scenario, batching) in run order; request counts sized for about 2-4 minutes on 2 CPU cores."""
    scale = 0.25 if quick else 1.0
    for model, shape in models.items():
        big = int(np.prod(shape)) >= 1024  # ResNet-20 on 3x32x32 is ~100x the demo model's work

        def n(small: int, large: int, big: bool = big) -> int:
            return max(8, int((large if big else small) * scale))

        yield Scenario(model, "predict c1", "/predict", 1, 1, n(1000, 300), "plain"), True
        yield Scenario(model, "predict c32", "/predict", 32, 1, n(6000, 2000), "plain"), True
        yield Scenario(model, "distill 256", "/distill-batch", 2, 256, n(60, 16), "keyed"), True
        yield Scenario(model, "predict c32 no-batching", "/predict", 32, 1, n(3000, 500), "plain"), False


def fmt(v: float | None, digits: int = 0) -> str:
    return "-" if v is None else f"{v:,.{digits}f}"


def report(results: list[Result], rss: dict[str, tuple[int, int]], meta: dict[str, Any]) -> tuple[str, bool]:
    lines = [
        "| model | scenario | conc | samples/req | requests | req/s | samples/s | p50 ms | p95 ms | p99 ms | "
        "failed | server CPU ms/req | mean forward batch | raw samples/s (batch) | ratio | CPU ratio | "
        "GC pauses: n, ms, > 100 ms |",
        "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for r in results:
        s = r.scenario
        raw = f"{fmt(r.raw_samples_per_s)} ({r.raw_batch})" if r.raw_batch else "-"
        lines.append(
            f"| {s.model} | {s.name} | {s.concurrency} | {s.samples_per_request} | {s.requests} | "
            f"{fmt(r.req_per_s)} | {fmt(r.samples_per_s)} | {r.p50_ms:.1f} | {r.p95_ms:.1f} | "
            f"{r.p99_ms:.1f} | "
            f"{r.failures} | {fmt(r.server_cpu_ms_per_req, 2)} | {fmt(r.mean_batch, 1)} | {raw} | "
            f"{fmt(r.ratio, 2)} | {fmt(r.cpu_ratio, 2)} | "
            + ("-" if r.gc_pauses is None else "{:.0f}, {:.0f}, {:.0f}".format(*r.gc_pauses))
            + " |"
        )
    checks: list[tuple[str, bool]] = []
    by = {(r.scenario.model, r.scenario.name): r for r in results}
    for model in dict.fromkeys(r.scenario.model for r in results):
        d = by.get((model, "distill 256"))
        if d is not None and d.ratio is not None:
            checks.append((f"{model}: distill 256 >= 0.85 x raw (got {d.ratio:.2f})", d.ratio >= 0.85))
        p = by.get((model, "predict c32"))
        if p is not None and p.ratio is not None:
            checks.append(
                (f"{model}: predict c32 >= 0.6 x raw at mean batch (got {p.ratio:.2f})", p.ratio >= 0.6)
            )
        if p is not None:
            tail = p.p99_ms / p.p50_ms
            checks.append((f"{model}: predict c32 p99 <= 3 x p50 (got {p.p99_ms:.1f} / {p.p50_ms:.1f} ms = "
                           f"{tail:.1f}x)", tail <= 3))  # fmt: skip
        off = by.get((model, "predict c32 no-batching"))
        if p is not None and off is not None:
            speedup = p.req_per_s / off.req_per_s
            # The model's own batching gain bounds any server's: even with free HTTP, batching on/off cannot
            # beat raw samples/s at the mean batch over raw samples/s at batch 1 (both measured in this run).
            ceiling = (
                f"; the model's own ceiling raw b{p.raw_batch} / raw b1 = "
                f"{p.raw_samples_per_s / off.raw_samples_per_s:.2f}"
                if p.raw_samples_per_s and off.raw_samples_per_s
                else ""
            )
            name = f"{model}: predict c32 batching on/off req/s >= 3 (got {speedup:.2f}{ceiling})"
            checks.append((name, speedup >= 3))
    failures = sum(r.failures for r in results)
    checks.append((f"no failed request (got {failures})", failures == 0))
    for name, (idle, peak) in rss.items():
        checks.append((f"{name} server: peak RSS < 1.5 x idle ({idle / 1024:.0f} -> {peak / 1024:.0f} MiB, "
                       f"{peak / idle:.2f}x)", peak < 1.5 * idle))  # fmt: skip
    lines += ["", *(f"- [{'x' if ok else ' '}] {name}" for name, ok in checks)]
    lines += ["", "Run: " + ", ".join(f"{k}={v}" for k, v in meta.items())]
    return "\n".join(lines), all(ok for _, ok in checks)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Benchmark the sdb server against the raw model.")
    p.add_argument("--quick", action="store_true", help="a quarter of the requests")
    p.add_argument(
        "--threads", type=int, default=0, help="torch threads, server and raw (0 = server default)"
    )
    p.add_argument("--json", type=Path, help="also write the results as JSON here")
    p.add_argument(
        "--raw",
        choices=("eager", "script"),
        default="eager",
        help="the raw model: plain PyTorch (eager, default) or the TorchScript trace the server runs",
    )
    p.add_argument(
        "--peer",
        choices=("litserve",),
        help="instead of the scenarios above: /predict c32 against this peer serving the same box",
    )
    p.add_argument(
        "--oip",
        action="store_true",
        help="instead of the scenarios above: Open Inference Protocol infer (JSON, binary) beside /predict",
    )
    p.add_argument("--rounds", type=int, default=3, help="--peer, --oip: alternating rounds per model")
    p.add_argument("--model", action="append", help="--peer: only this model (repeatable)")
    p.add_argument("--requests", type=int, help="--peer, --oip: requests per round (default by model size)")
    p.add_argument(
        "--workers",
        type=int,
        default=0,
        help="--peer: serve sdb with `sdb serve --workers N` (0: one uvicorn process, as in the main run)",
    )
    p.add_argument("--peer-api-servers", type=int, default=1, help="--peer: LitServe's num_api_servers")
    p.add_argument("--peer-workers", type=int, default=1, help="--peer: LitServe's workers_per_device")
    p.add_argument(
        "--nice",
        type=int,
        default=0,
        help="change this process's niceness first (the servers and the load generator inherit it): on a "
        "shared machine -10 (root) keeps other jobs from deciding the numbers; every server gets the same",
    )
    p.add_argument(
        "--server-env",
        action="append",
        default=[],
        metavar="SDB_NAME=VALUE",
        help="a setting for the sdb server (repeatable), e.g. SDB_GC_FREEZE=false to measure without it",
    )
    args = p.parse_args(argv)
    args.server_env = dict(kv.split("=", 1) for kv in args.server_env)
    if args.nice:
        os.nice(args.nice)
    from service.inference.runtime import default_threads

    threads = args.threads or default_threads()
    if args.peer is not None:
        from bench.peer_bench import run_peer

        return run_peer(args, threads)
    if args.oip:
        from bench.oip_bench import run_oip

        return run_oip(args, threads)
    from service.db.migrate import upgrade

    results: list[Result] = []
    rss: dict[str, tuple[int, int]] = {}
    with tempfile.TemporaryDirectory(prefix="sdb-bench-") as tmp:
        work = Path(tmp)
        dirs = prepare_models(work)
        raw = RawModels(dirs, threads, scripted=args.raw == "script")
        shapes = {name: tuple(box.input_shape) for name, box in raw.boxes.items()}
        plan = list(scenarios(shapes, args.quick))
        for batching in (True, False):
            db_url = f"sqlite:///{work / ('on.db' if batching else 'off.db')}"
            upgrade(db_url)
            server = sdb_server(work, work / "models", db_url, batching, threads, args.server_env)
            try:
                server.wait_ready()
                time.sleep(1.0)
                idle = server.rss_kib()
                token = bench_token(server, list(dirs)) if batching else None
                with rss_sampled(server) as samples:
                    for scenario in (sc for sc, on in plan if on == batching):
                        print(f"... {scenario.model}: {scenario.name}", file=sys.stderr, flush=True)
                        results.append(measure(server, raw, scenario, work, shapes[scenario.model], token))
                rss["batching" if batching else "no-batching"] = (idle, max([idle, *samples]))
            finally:
                server.stop()
    meta = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "cpu": platform.processor() or platform.machine(),
        "cores": len(os.sched_getaffinity(0)),
        "torch threads": threads,
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "torch": torch.__version__,
        "quick": args.quick,
        "raw": args.raw,
        "server env": " ".join(f"{k}={v}" for k, v in args.server_env.items()) or "-",
        "load average (1 min)": f"{os.getloadavg()[0]:.1f}",
        "niceness": os.nice(0),
    }
    table, ok = report(results, rss, meta)
    print(table)
    if args.json is not None:
        rows = [
            {
                **r.scenario.__dict__,
                **{k: v for k, v in r.__dict__.items() if k != "scenario"},
                "ratio": r.ratio,
                "cpu_ratio": r.cpu_ratio,
            }
            for r in results
        ]
        args.json.write_text(json.dumps({"meta": meta, "rss_kib": rss, "results": rows}, indent=2))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
