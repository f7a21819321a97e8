"""bench/gpu.sh: the CPU smoke run (--device cpu --reduced) writes one complete JSON file; the batch search
stops at the first out-of-memory error (simulated here: no GPU in CI)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor

from bench import gpu_bench
from sdb_core.artifact import load_box, make_test_box

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_reduced_cpu_run_writes_the_json(tmp_path: Path) -> None:
    out = tmp_path / "gpu.json"
    r = subprocess.run(
        ["bash", str(REPO / "bench" / "gpu.sh"), "--device", "cpu", "--reduced", "--json", str(out)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=480,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["meta"]["device"] == "cpu" and data["meta"]["reduced"] is True
    rows = {(row["model"], row["path"], row["dtype"]): row for row in data["raw"] if "path" in row}
    for path in ("plain", "keyed"):
        fp32 = rows[("digits-demo", path, "float32")]
        assert fp32["allowed"] and fp32["top1_agreement"] == 1.0
        assert set(fp32["samples_per_s"]) == {"1", "32", "256"}
        assert all(v > 0 for v in fp32["samples_per_s"].values())
        for half in ("float16", "bfloat16"):  # measured, or the reason it could not run
            row = rows[("digits-demo", path, half)]
            assert ("samples_per_s" in row and 0.0 <= row["top1_agreement"] <= 1.0) or "error" in row
    searches = data["max_batch"]["digits-demo"]
    assert searches[0]["dtype"] == "float32"
    assert all(s["largest_batch"] == s["cap"] == 2048 and s["limit"] == "cap" for s in searches)
    (train,) = data["train_box"]
    assert train["train_samples"] == 1300 and train["samples_per_s"] > 0
    assert data["serve"] == {"skipped": "--reduced"}


def test_batch_search_stops_at_out_of_memory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    boxed = load_box(make_test_box(tmp_path))
    real = gpu_bench.forward_fn

    def limited(b: Any, keyed: bool) -> Any:
        fn = real(b, keyed)

        def run(x: Tensor) -> Tensor:
            if len(x) > 1024:
                raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate ...")
            return fn(x)

        return run

    monkeypatch.setattr(gpu_bench, "forward_fn", limited)
    found = gpu_bench.max_batch(boxed, torch.device("cpu"), "float32", cap=1 << 14)
    assert found["largest_batch"] == 1024 and found["limit"] == "oom"


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present")
def test_cuda_without_a_gpu_is_refused() -> None:
    assert gpu_bench.main(["--device", "cuda"]) == 2
