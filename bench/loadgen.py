"""A lean closed-loop HTTP/1.1 load generator (keep-alive connections, pre-built requests).

Run as a separate process by the benchmarks (`drive`) so that the server is measured, not the client:

    python -m bench.loadgen --port 8000 --path /predict --bodies bodies.bin --concurrency 32 --requests 2000

`--bodies` is a file of length-prefixed request bodies (uint32 little-endian length, then the bytes); each
request takes the next body round-robin. Prints one JSON object: wall time, per-request latencies (s) and
the count of each status (transport failures count as status 0).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any


def read_bodies(path: Path) -> list[bytes]:
    data = path.read_bytes()
    bodies, offset = [], 0
    while offset < len(data):
        (n,) = struct.unpack_from("<I", data, offset)
        bodies.append(data[offset + 4 : offset + 4 + n])
        offset += 4 + n
    return bodies


def write_bodies(path: Path, bodies: list[bytes]) -> None:
    with path.open("wb") as f:
        for b in bodies:
            f.write(struct.pack("<I", len(b)))
            f.write(b)


def build_requests(path: str, bodies: list[bytes], content_type: str, headers: dict[str, str]) -> list[bytes]:
    extra = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    return [
        (
            f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(b)}\r\n{extra}\r\n"
        ).encode()
        + b
        for b in bodies
    ]


async def _one(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes
) -> tuple[int, bool]:
    writer.write(request)
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    length = 0
    close = False
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"content-length":
            length = int(value)
        elif name == b"connection" and value.strip().lower() == b"close":
            close = True
    if length:
        await reader.readexactly(length)
    return status, close


async def run(host: str, port: int, requests: list[bytes], concurrency: int, total: int) -> dict[str, object]:
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    counter = iter(range(total))

    async def worker() -> None:
        reader = writer = None
        for i in counter:
            request = requests[i % len(requests)]
            t0 = time.perf_counter()
            try:
                if writer is None:
                    reader, writer = await asyncio.open_connection(host, port)
                assert reader is not None
                status, close = await _one(reader, writer, request)
            except (OSError, asyncio.IncompleteReadError, ValueError):
                status, close = 0, True
            latencies.append(time.perf_counter() - t0)
            statuses[status] = statuses.get(status, 0) + 1
            if close and writer is not None:
                writer.close()
                reader = writer = None
        if writer is not None:
            writer.close()

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall = time.perf_counter() - start
    return {"wall_s": wall, "latencies": latencies, "statuses": {str(k): v for k, v in statuses.items()}}


def npy_bodies(model: str, shape: tuple[int, ...], scale: float, count: int = 16) -> list[bytes]:
    """`count` JSON bodies of base64 .npy inputs of `shape`, uniform in [0, scale), for /predict or
    /distill-batch."""
    import numpy as np

    from sdb.client import encode_npy

    rng = np.random.default_rng(1)
    return [
        json.dumps(
            {"model": model, "inputs_b64": encode_npy(rng.random(shape, dtype=np.float32) * scale)}
        ).encode()
        for _ in range(count)
    ]


def drive(
    port: int, path: str, bodies: Path, concurrency: int, requests: int, headers: dict[str, str] | None = None
) -> dict[str, Any]:
    """Run this load generator in its own process (so that the server is measured, not the client) against
    127.0.0.1:`port`; its JSON result."""
    cmd = [
        sys.executable, "-m", "bench.loadgen", "--port", str(port), "--path", path, "--bodies", str(bodies),
        "--concurrency", str(concurrency), "--requests", str(requests),
        *(arg for k, v in (headers or {}).items() for arg in ("--header", f"{k}: {v}")),
    ]  # fmt: skip
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run(cmd, cwd=root, capture_output=True, text=True, check=True, timeout=900)
    return dict(json.loads(out.stdout))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--path", required=True)
    p.add_argument("--bodies", type=Path, required=True)
    p.add_argument("--content-type", default="application/json")
    p.add_argument("--header", action="append", default=[], help="'Name: value', repeatable")
    p.add_argument("--concurrency", type=int, default=1)
    p.add_argument("--requests", type=int, required=True)
    args = p.parse_args(argv)
    headers = dict(h.split(": ", 1) for h in args.header)
    requests = build_requests(args.path, read_bodies(args.bodies), args.content_type, headers)
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    result = asyncio.run(run(args.host, args.port, requests, args.concurrency, args.requests))
    json.dump(result, sys.stdout)


if __name__ == "__main__":
    main()
