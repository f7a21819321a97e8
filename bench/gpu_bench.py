"""GPU readiness benchmark: raw model throughput, largest batch, box-training speed and the serving benchmark,
written to one JSON file. Run through `bench/gpu.sh` (which bounds the wall time):

    bench/gpu.sh                                # on a CUDA machine: --device cuda, full run, < 8 minutes
    bench/gpu.sh --device cpu --reduced         # the CPU smoke run the test suite makes (tests/bench)

Measures, on --device:
- raw: samples/s of each benchmark box (the demo box and an untrained ResNet-20 box on 3x32x32, as in
  bench.serve_bench) on its plain and keyed paths at batch 1, 32 and 256, in float32 and in float16 / bfloat16
  where the model runs in them (errors are recorded, not raised). Timed as the server runs a model: raw
  inputs from CPU memory, logits back to CPU memory. Half-precision rows carry their top-1 agreement with
  float32 and the largest logit difference (the model "allows" a dtype when it runs and stays finite).
- max_batch: the largest batch of the keyed path (float32 and the best half dtype) that fits, doubling from
  256 until the device runs out of memory or --max-batch is reached ("limit": "oom" or "cap").
- train_box: seconds and samples/s of `sdb_core.box.train_box` (the default box objective) for a small_cnn
  teacher on the digits and a ResNet-20 teacher on synthetic 3x32x32 data.
- serve: `bench.serve_bench --quick` (the real server against the raw model, on the same device), unless
  --reduced or --no-serve; with --device cpu the server is hidden from any GPU (CUDA_VISIBLE_DEVICES="").

--reduced (the test suite's run): the demo model only, each point timed once, batch search capped at 2048,
one digits epoch of box training, no serving benchmark.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

REPO = Path(__file__).resolve().parents[1]
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Cast(nn.Module):
    """`model` (already converted to `dtype`) fed `dtype` inputs; float32 logits out."""

    def __init__(self, model: nn.Module, dtype: torch.dtype) -> None:
        super().__init__()
        self.model = model
        self.dtype = dtype

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x.to(self.dtype)).float()


def in_dtype(boxed: Any, device: torch.device, dtype: torch.dtype) -> Any:
    """A shallow copy of the BoxedModel whose network runs in `dtype` (normalization and key in float32)."""
    other = copy.copy(boxed)
    other.model = Cast(copy.deepcopy(boxed.model).to(device=device, dtype=dtype), dtype).eval()
    return other


def forward_fn(boxed: Any, keyed: bool) -> Callable[[Tensor], Tensor]:
    """Raw CPU inputs -> the served logits, back on CPU (as the server runs a model)."""
    f = boxed.keyed_logits if keyed else boxed.plain_logits
    return lambda x: f(x).cpu()


def samples_per_s(fn: Callable[[Tensor], Tensor], x: Tensor, min_time: float, min_runs: int = 3) -> float:
    for _ in range(2 if min_runs > 1 else 1):
        fn(x)
    n, start = 0, time.perf_counter()
    while n < min_runs or time.perf_counter() - start < min_time:
        fn(x)  # ends with .cpu(): synchronous on CUDA
        n += 1
    return n * len(x) / (time.perf_counter() - start)


def inputs(shape: tuple[int, ...], batch: int) -> Tensor:
    return torch.from_numpy(np.random.default_rng(0).random((batch, *shape), dtype=np.float32) * 4)


def raw_rows(
    name: str, boxed: Any, device: torch.device, batches: list[int], min_time: float, min_runs: int
) -> list[dict]:
    rows: list[dict[str, Any]] = []
    probe = inputs(boxed.input_shape, 256)
    for dtype_name, dtype in DTYPES.items():
        try:
            variant = in_dtype(boxed, device, dtype)
        except (RuntimeError, TypeError) as e:
            rows.append({"model": name, "dtype": dtype_name, "error": str(e)[:300]})
            continue
        for path in ("plain", "keyed"):
            fn = forward_fn(variant, keyed=path == "keyed")
            row: dict[str, Any] = {"model": name, "path": path, "dtype": dtype_name}
            try:
                out = fn(probe)
                ref = forward_fn(boxed, keyed=path == "keyed")(probe)
                row["finite"] = bool(torch.isfinite(out).all())
                row["top1_agreement"] = float((out.argmax(1) == ref.argmax(1)).float().mean())
                row["max_abs_logit_diff"] = float((out - ref).abs().max())
                rates = {
                    b: samples_per_s(fn, inputs(boxed.input_shape, b), min_time, min_runs) for b in batches
                }
                row["samples_per_s"] = {str(b): round(v, 1) for b, v in rates.items()}
                row["allowed"] = row["finite"]
            except (RuntimeError, NotImplementedError) as e:  # e.g. a half-precision kernel missing on CPU
                row.update(allowed=False, error=str(e)[:300])
            rows.append(row)
            print(f"... raw {name} {path} {dtype_name}: {row.get('samples_per_s', row.get('error'))}",
                  file=sys.stderr, flush=True)  # fmt: skip
        del variant
    return rows


def max_batch(boxed: Any, device: torch.device, dtype_name: str, cap: int) -> dict[str, Any]:
    """Double the keyed-path batch from 256 until out of memory or `cap`."""
    dtype = DTYPES[dtype_name]
    fn = forward_fn(in_dtype(boxed, device, dtype), keyed=True)
    best, limit, batch, rate = 0, "cap", 256, None
    while batch <= cap:
        try:
            x = inputs(boxed.input_shape, batch)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            start = time.perf_counter()
            fn(x)
            rate = batch / (time.perf_counter() - start)
            best = batch
        except RuntimeError as e:  # torch.cuda.OutOfMemoryError, or a cuDNN "out of memory"
            if "out of memory" not in str(e).lower():
                raise
            limit = "oom"
            break
        finally:
            if device.type == "cuda":
                torch.cuda.empty_cache()
        batch *= 2
    out: dict[str, Any] = {"dtype": dtype_name, "largest_batch": best, "limit": limit, "cap": cap}
    out["samples_per_s_at_largest"] = round(rate, 1) if rate else None
    if device.type == "cuda":
        out["device_memory_gib"] = round(torch.cuda.get_device_properties(device).total_memory / 2**30, 1)
    return out


def train_box_timing(name: str, arch: str, ds: Any, device: torch.device, epochs: int, batch: int) -> dict:
    from sdb_core.box import BoxConfig, train_box
    from sdb_core.keys import BoxKey
    from sdb_core.training import TrainConfig
    from sdb_core.zoo import arch_kwargs_for, build_model

    kwargs = arch_kwargs_for(ds.input_shape, ds.num_classes)
    teacher = build_model(arch, **kwargs)  # untrained: the speed does not depend on the weights
    cfg = BoxConfig(train=TrainConfig(epochs=epochs, batch_size=batch, device=str(device), progress=False))
    key = BoxKey.from_int_seed(0, ds.input_shape, cfg.lam)
    sync(device)
    start = time.perf_counter()
    train_box(teacher, ds, arch=arch, arch_kwargs=kwargs, key=key, cfg=cfg)
    sync(device)
    secs = time.perf_counter() - start
    n = len(ds.x_train) * epochs
    print(f"... train_box {name}: {secs:.1f} s", file=sys.stderr, flush=True)
    return {"name": name, "arch": arch, "train_samples": len(ds.x_train), "epochs": epochs,
            "batch_size": batch, "seconds": round(secs, 2), "samples_per_s": round(n / secs, 1)}  # fmt: skip


def synthetic(n: int, seed: int = 0) -> Any:
    from sdb_core.data import Dataset

    rng = np.random.default_rng(seed)
    x = rng.random((n + 64, 3, 32, 32), dtype=np.float32)
    y = rng.integers(0, 10, n + 64)
    return Dataset("synthetic-3x32x32", x[:n], y[:n], x[n:], y[n:], [str(i) for i in range(10)])


def serve(device: torch.device, timeout: float) -> dict[str, Any]:
    env = dict(os.environ)
    if device.type == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""  # the server and its raw reference both on the CPU
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "serve.json"
        cmd = [sys.executable, "-m", "bench.serve_bench", "--quick", "--json", str(out)]
        try:
            r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return {"error": f"serve_bench --quick took over {timeout:.0f} s"}
        result: dict[str, Any] = json.loads(out.read_text()) if out.exists() else {}
        result["exit_code"] = r.returncode  # 1: a serving target missed (the table says which)
        result["table"] = r.stdout
        if not out.exists():
            result["error"] = r.stderr[-2000:]
        return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="GPU readiness benchmark (one JSON file).")
    p.add_argument("--device", default="cuda", help="cuda (default), cuda:N or cpu")
    p.add_argument(
        "--reduced",
        action="store_true",
        help="a smoke run: the demo model only, one timed run per point, no serving benchmark",
    )
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: cores - 1, as the server)")
    p.add_argument("--no-serve", action="store_true", help="skip bench.serve_bench")
    p.add_argument(
        "--max-batch", type=int, default=0, help="cap of the batch search (default 2**20; 2048 reduced)"
    )
    p.add_argument("--json", type=Path, default=REPO / "runs" / "gpu-bench.json", help="where to write")
    p.add_argument("--serve-timeout", type=float, default=300.0, help="seconds for the serving benchmark")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("gpu_bench: no CUDA device here; use --device cpu for the CPU smoke run", file=sys.stderr)
        return 2
    started = time.perf_counter()
    torch.manual_seed(0)
    torch.set_num_threads(args.threads or max(1, len(os.sched_getaffinity(0)) - 1))
    from bench.serve_bench import prepare_models
    from sdb_core.artifact import load_box
    from sdb_core.data import load_digits

    meta: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "command": " ".join(["bench/gpu.sh", *(argv if argv is not None else sys.argv[1:])]),
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.machine(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cpu_threads": torch.get_num_threads(),
        "reduced": args.reduced,
    }
    result: dict[str, Any] = {"meta": meta}
    min_time, min_runs = (0.0, 1) if args.reduced else (1.0, 3)
    cap = args.max_batch or (2048 if args.reduced else 1 << 20)
    with tempfile.TemporaryDirectory(prefix="sdb-gpu-bench-") as tmp:
        dirs = prepare_models(Path(tmp))
        if args.reduced:  # ResNet-20 on a busy CPU takes minutes; the demo model exercises every code path
            dirs = {k: v for k, v in dirs.items() if k != "resnet20"}
        boxes = {name: load_box(d, device=device) for name, d in dirs.items()}
        result["raw"] = [
            row
            for name, b in boxes.items()
            for row in raw_rows(name, b, device, [1, 32, 256], min_time, min_runs)
        ]
        # the batch search in float32 and in the first half dtype the last model (ResNet-20) runs in
        last = list(boxes)[-1]
        half = [
            r["dtype"]
            for r in result["raw"]
            if r["model"] == last and r.get("allowed") and r["dtype"] != "float32"
        ]
        result["max_batch"] = {
            name: [max_batch(b, device, dt, cap) for dt in ["float32", *half[:1]]]
            for name, b in boxes.items()
        }
    epochs, batch = (1, 64) if args.reduced else (2, 256)
    result["train_box"] = [
        train_box_timing("digits small_cnn", "small_cnn", load_digits(), device, epochs, batch)
    ]
    if not args.reduced:
        resnet = train_box_timing("synthetic resnet20", "resnet20", synthetic(8192), device, epochs, batch)
        result["train_box"].append(resnet)
    if args.reduced or args.no_serve:
        result["serve"] = {"skipped": "--reduced" if args.reduced else "--no-serve"}
    else:
        result["serve"] = serve(device, args.serve_timeout)
    result["seconds"] = round(time.perf_counter() - started, 1)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(f"gpu_bench: wrote {args.json} in {result['seconds']} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
