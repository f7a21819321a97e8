"""Sealed against unsealed load time of a box artifact (the issue's goal: sealed <= 1.2x unsealed).

    .venv/bin/python -m bench.seal_bench                              # models/fashion-mnist, ~1 minute
    .venv/bin/python -m bench.seal_bench --box models/digits-demo --rounds 30 --json out.json

Copies the artifact twice into a temporary directory, seals one copy under a fresh master key
(sdb_core.seal: AES-256-GCM, the data key wrapped by the master key), then times `load_box` (manifest,
weights and box key read, checksums, network built, state loaded; for the sealed copy also the seal.json
unwrap and the in-memory decryption) on CPU, in rounds that alternate between the two copies so that other
load on a shared machine spreads over both. Reports the median of each, their ratio, and the median time of
the decryption alone (reading and opening the sealed files, `sdb_core.artifact.read_artifact`).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from sdb_core.artifact import load_box, read_artifact, seal_artifact
from sdb_core.seal import Keyring, new_master_key


def _timed(fn: Any) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def run(box: Path, rounds: int) -> dict[str, Any]:
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="sdb-seal-bench-") as tmp:
        plain, sealed = Path(tmp) / "plain", Path(tmp) / "sealed"
        shutil.copytree(box, plain)
        shutil.copytree(box, sealed)
        master = new_master_key(Path(tmp) / "master.key")
        seal_artifact(sealed, master)
        ring = Keyring.from_paths(master.source)
        load_box(plain), load_box(sealed, keyring=ring)  # warm: imports, file cache
        times: dict[str, list[float]] = {"unsealed": [], "sealed": [], "decrypt": []}
        for _ in range(rounds):
            times["unsealed"].append(_timed(lambda: load_box(plain)))
            times["sealed"].append(_timed(lambda: load_box(sealed, keyring=ring)))
            times["decrypt"].append(_timed(lambda: read_artifact(sealed, ring)))
        weights = sum(p.stat().st_size for p in sealed.glob("*.sealed"))
    med = {k: statistics.median(v) for k, v in times.items()}
    return {
        "box": str(box),
        "rounds": rounds,
        "sealed_bytes": weights,
        "median_ms": {k: round(1000 * v, 2) for k, v in med.items()},
        "ratio_sealed_over_unsealed": round(med["sealed"] / med["unsealed"], 3),
        "torch": torch.__version__,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--box", type=Path, default=Path("models/fashion-mnist"))
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    result = run(args.box, args.rounds)
    text = json.dumps(result, indent=2)
    print(text)
    if args.json is not None:
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
