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

`--peer litserve` (issue 15) runs a different comparison: /predict at concurrency 32, one sample per
request, on each model, against the same box served by LitServe (`bench.litserve_peer`, the `bench` extra),
in alternating rounds (sdb first in odd rounds, LitServe first in even ones), and prints the medians over
the rounds and their ratios. Targets: sdb req/s >= 1.5 x LitServe's, sdb p99 <= LitServe's p99, sdb p99 <=
3 x its p50; no failed request.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import signal
import subprocess
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

from bench.loadgen import write_bodies
from sdb.client import encode_npy
from tests._support.net import free_port

REPO = Path(__file__).resolve().parents[1]
ADMIN_TOKEN = "bench-admin-" + uuid.uuid4().hex + uuid.uuid4().hex
JWT_SECRET = "bench-jwt-" + uuid.uuid4().hex + uuid.uuid4().hex


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


class Server:
    def __init__(
        self,
        work: Path,
        model_dir: Path,
        db_url: str,
        batching: bool,
        threads: int,
        extra_env: dict[str, str] | None = None,
        workers: int = 0,
    ) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {k: v for k, v in os.environ.items() if not k.startswith("SDB_")}
        env.pop("PROMETHEUS_MULTIPROC_DIR", None)
        env.update(
            SDB_DATABASE_URL=db_url,
            SDB_MODEL_DIR=str(model_dir),
            SDB_DEVICE="auto",
            SDB_TORCH_THREADS=str(threads),
            SDB_JWT_SECRET=JWT_SECRET,
            SDB_BOOTSTRAP_ADMIN_TOKEN=ADMIN_TOKEN,
            SDB_BATCHING="true" if batching else "false",
            SDB_PREDICT_RATE_PER_MINUTE="0",
            SDB_DISTILL_RATE_PER_MINUTE="0",
            SDB_TOKEN_TTL_SECONDS="3600",
            SDB_LOG_LEVEL="WARNING",
            SDB_EXPOSE_METRICS="true",  # the batch statistics come from /metrics
        )
        env.update(extra_env or {})
        self.log_path = work / f"server-{'batching' if batching else 'nobatching'}.log"
        if workers:  # the production entry point with its worker processes (and their shared metrics)
            cmd = [
                sys.executable, "-m", "sdb.cli", "serve", "--host", "127.0.0.1", "--port", str(self.port),
                "--workers", str(workers), "--no-access-log",
            ]  # fmt: skip
        else:
            cmd = [
                sys.executable, "-m", "uvicorn", "service.main:create_app", "--factory",
                "--host", "127.0.0.1", "--port", str(self.port), "--log-level", "warning", "--no-access-log",
            ]  # fmt: skip
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=self._log, stderr=subprocess.STDOUT)
        self.rss_samples: list[int] = []
        self._stop = threading.Event()
        self._sampler: threading.Thread | None = None

    def wait_ready(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited:\n{self.log_path.read_text()[-3000:]}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(self.url + "/readyz", timeout=2).status_code == 200:
                    return
            time.sleep(0.2)
        raise RuntimeError("server not ready in time")

    def cpu_s(self) -> float:
        """User + system CPU seconds of the server process (all its threads)."""
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def rss_kib(self) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        return 0

    def start_sampling(self) -> None:
        def sample() -> None:
            while not self._stop.wait(0.05):
                with contextlib.suppress(OSError):
                    self.rss_samples.append(self.rss_kib())

        self._sampler = threading.Thread(target=sample, daemon=True)
        self._sampler.start()

    def stop(self) -> None:
        self._stop.set()
        if self._sampler is not None:
            self._sampler.join()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self._log.close()

    def gc_stats(self) -> tuple[float, float, float]:
        """(collections, seconds paused, collections over 0.1 s) so far, all generations, from /metrics."""
        from prometheus_client.parser import text_string_to_metric_families

        text = httpx.get(self.url + "/metrics", timeout=10).text
        count = total = short = 0.0
        for family in text_string_to_metric_families(text):
            if family.name != "sdb_gc_pause_seconds":
                continue
            for s in family.samples:
                if s.name.endswith("_count"):
                    count += s.value
                elif s.name.endswith("_sum"):
                    total += s.value
                elif s.name.endswith("_bucket") and float(s.labels.get("le", "inf")) == 0.1:
                    short += s.value  # cumulative: the pauses of at most 0.1 s
        return count, total, count - short

    def batch_stats(self, model: str, path: str) -> tuple[float, float]:
        from prometheus_client.parser import text_string_to_metric_families

        text = httpx.get(self.url + "/metrics", timeout=10).text
        values = {"sum": 0.0, "count": 0.0}
        for family in text_string_to_metric_families(text):
            if family.name != "sdb_inference_batch_size":
                continue
            for s in family.samples:
                if s.labels.get("model") == model and s.labels.get("path") == path:
                    for suffix in values:
                        if s.name.endswith("_" + suffix):
                            values[suffix] = s.value
        return values["sum"], values["count"]


def tree_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process and its live descendants (LitServe runs three processes)."""
    parents: dict[int, int] = {}
    times: dict[int, float] = {}
    tick = os.sysconf("SC_CLK_TCK")
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            child = int(stat.parent.name)
            parents[child] = int(fields[1])
            times[child] = (int(fields[11]) + int(fields[12])) / tick
    tree, frontier = {pid}, [pid]
    while frontier:
        parent = frontier.pop()
        for child, ppid in parents.items():
            if ppid == parent and child not in tree:
                tree.add(child)
                frontier.append(child)
    return sum(times.get(p, 0.0) for p in tree)


class PeerServer:
    """The same box served by LitServe (`bench.litserve_peer`): one model, by default one API server and one
    inference worker."""

    def __init__(
        self, work: Path, model_dir: Path, threads: int, api_servers: int = 1, workers: int = 1
    ) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {k: v for k, v in os.environ.items() if not k.startswith("SDB_")}
        self.log_path = work / f"litserve-{model_dir.name}.log"
        cmd = [
            sys.executable, "-m", "bench.litserve_peer", "--model-dir", str(model_dir),
            "--port", str(self.port), "--threads", str(threads),
            "--api-servers", str(api_servers), "--workers", str(workers),
        ]  # fmt: skip
        self._log = self.log_path.open("wb")
        # Its own process group: LitServe starts an API server and an inference worker as child processes.
        self.proc = subprocess.Popen(
            cmd, cwd=REPO, env=env, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True
        )

    def wait_ready(self, timeout: float = 180.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"LitServe exited:\n{self.log_path.read_text()[-3000:]}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            time.sleep(0.2)
        raise RuntimeError("LitServe not ready in time")

    def stop(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        with contextlib.suppress(ProcessLookupError):  # its workers, if the parent left any behind
            os.killpg(self.proc.pid, signal.SIGKILL)
        self._log.close()


def bootstrap_key(url: str, models: list[str]) -> str:
    r = httpx.post(
        url + "/auth/token", json={"grant_type": "client_credentials", "client_secret": ADMIN_TOKEN}
    )
    r.raise_for_status()
    admin = {"Authorization": f"Bearer {r.json()['access_token']}"}
    r = httpx.post(url + "/admin/users", json={"name": f"bench-{uuid.uuid4().hex[:6]}"}, headers=admin)
    r.raise_for_status()
    r = httpx.post(url + f"/admin/users/{r.json()['id']}/keys", json={"scopes": models}, headers=admin)
    r.raise_for_status()
    api_key = str(r.json()["api_key"])
    r = httpx.post(url + "/auth/token", json={"grant_type": "client_credentials", "client_secret": api_key})
    r.raise_for_status()
    return str(r.json()["access_token"])


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
    server: Server | PeerServer,
    scenario: Scenario,
    work: Path,
    input_shape: tuple[int, ...],
    token: str | None,
) -> Result:
    rng = np.random.default_rng(1)
    bodies = []
    for _ in range(16):
        x = rng.random((scenario.samples_per_request, *input_shape), dtype=np.float32) * 4
        bodies.append(json.dumps({"model": scenario.model, "inputs_b64": encode_npy(x)}).encode())
    body_file = work / "bodies.bin"
    write_bodies(body_file, bodies)
    cmd = [
        sys.executable, "-m", "bench.loadgen", "--port", str(server.port), "--path", scenario.path,
        "--bodies", str(body_file), "--concurrency", str(scenario.concurrency),
        "--requests", str(scenario.requests),
    ]  # fmt: skip
    if token is not None:
        cmd += ["--header", f"Authorization: Bearer {token}"]
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=True, timeout=900)
    data = json.loads(out.stdout)
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


# ------------------------------------------------------------------------------------------- peer


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
        server = Server(work, work / "served", db_url, True, threads, args.server_env, args.workers)
        try:
            server.wait_ready()
            for model, model_dir in dirs.items():
                big = int(np.prod(shapes[model])) >= 1024
                n = args.requests or max(8, int((2000 if big else 6000) * (0.25 if args.quick else 1.0)))
                scenario = Scenario(model, "predict c32", "/predict", 32, 1, n, "plain")
                warm = Scenario(model, "warm-up", "/predict", 32, 1, max(8, n // 10), "plain")
                peer = PeerServer(work, model_dir, threads, args.peer_api_servers, args.peer_workers)
                try:
                    peer.wait_ready()
                    targets: dict[str, Server | PeerServer] = {"sdb": server, args.peer: peer}
                    for target in targets.values():
                        run_load(target, warm, work, shapes[model], None)
                    for rnd in range(1, args.rounds + 1):
                        order = list(targets) if rnd % 2 else list(reversed(targets))
                        for name in order:
                            print(f"... {model}: {name} round {rnd}", file=sys.stderr, flush=True)
                            cpu0 = tree_cpu_s(targets[name].proc.pid)
                            result = run_load(targets[name], scenario, work, shapes[model], None)
                            cpu = tree_cpu_s(targets[name].proc.pid) - cpu0
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
            server = Server(work, work / "models", db_url, batching, threads, args.server_env)
            try:
                server.wait_ready()
                time.sleep(1.0)
                idle = server.rss_kib()
                server.start_sampling()
                token = bootstrap_key(server.url, list(dirs)) if batching else None
                for scenario, on in plan:
                    if on != batching:
                        continue
                    print(f"... {scenario.model}: {scenario.name}", file=sys.stderr, flush=True)
                    before = server.batch_stats(scenario.model, scenario.key_path)
                    gc0 = server.gc_stats()
                    cpu0 = server.cpu_s()
                    result = run_load(server, scenario, work, shapes[scenario.model],
                                      token if scenario.path == "/distill-batch" else None)  # fmt: skip
                    result.server_cpu_ms_per_req = (server.cpu_s() - cpu0) * 1000.0 / scenario.requests
                    gc1 = server.gc_stats()
                    result.gc_pauses = (gc1[0] - gc0[0], (gc1[1] - gc0[1]) * 1000.0, gc1[2] - gc0[2])
                    after = server.batch_stats(scenario.model, scenario.key_path)
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
                    results.append(result)
                peak = max([idle, *server.rss_samples])
                rss["batching" if batching else "no-batching"] = (idle, peak)
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
