"""The loaded boxed models: name -> ServedModel, each (model, path) with its own dynamic batcher.

All forward passes of a worker run on one dedicated inference thread: on CPU, torch's intra-op threads
already use every core, and one thread keeps batches whole instead of splitting cores between them.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import logging
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

import numpy as np
import torch

from service import metrics
from service.inference.batcher import (
    BatcherConfig,
    BatcherOverloaded,
    BatchObserver,
    DynamicBatcher,
    InferFn,
    fastest_forward_batch,
)

if TYPE_CHECKING:
    from service.config import Settings

logger = logging.getLogger(__name__)

InferencePath = Literal["plain", "keyed"]
PATHS: tuple[InferencePath, ...] = ("plain", "keyed")


class Box(Protocol):
    """What the service needs of `sdb_core.artifact.BoxedModel`."""

    name: str
    version: str
    input_shape: tuple[int, ...]
    num_classes: int
    class_names: list[str]
    temperature: float
    device: torch.device

    def plain_logits(self, x: torch.Tensor) -> torch.Tensor: ...
    def keyed_logits(self, x: torch.Tensor) -> torch.Tensor: ...


EVALUATION_FILE = "evaluation.json"


def read_evaluation(path: Path) -> dict[str, Any] | None:
    """The figures of an `sdb evaluate` report (its results.json, copied into the artifact directory as
    evaluation.json): seeds, summary (mean and std of each top-1) and checks. None if absent or unreadable."""
    if not path.is_file():
        return None
    try:
        report = json.loads(path.read_text())
        out = {
            "seeds": list(report.get("config", {}).get("seeds", [])),
            "summary": dict(report["summary"]),
            "checks": dict(report.get("checks", {})),
        }
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as exc:
        logger.warning("ignoring %s: not an `sdb evaluate` report (%s)", path, type(exc).__name__)
        return None
    return out


class UnknownModelError(LookupError):
    def __init__(self, name: str | None) -> None:
        super().__init__(name)
        self.name = name


class InferenceTimeout(TimeoutError):
    """The inference missed its deadline (queue too long or forward pass too slow)."""


class InferenceOverloaded(RuntimeError):
    """The model's queue is full; retry shortly."""


class ServedModel:
    """One boxed model behind two batchers (plain and keyed)."""

    def __init__(
        self,
        box: Box,
        executor: ThreadPoolExecutor,
        batching: BatcherConfig,
        timeout_s: float,
        trimmer: MemoryTrimmer | None = None,
    ) -> None:
        self.box = box
        self.name = box.name
        self.version = box.version
        self.input_shape = tuple(int(d) for d in box.input_shape)
        self.num_classes = int(box.num_classes)
        self.class_names = list(box.class_names)
        self.temperature = float(box.temperature)
        self.device = box.device
        manifest: dict[str, Any] = getattr(box, "manifest", None) or {}
        self.metrics = {
            k: float(v) for k, v in (manifest.get("metrics") or {}).items() if isinstance(v, int | float)
        }
        self.evaluation: dict[str, Any] | None = None  # from the artifact's evaluation.json, if any
        self.timeout_s = timeout_s
        self._trimmer = trimmer or MemoryTrimmer()
        self._batchers: dict[str, DynamicBatcher] = {
            path: DynamicBatcher(
                self._forward_fn(path),
                executor,
                batching,
                on_batch=self._observer(path),
            )
            for path in PATHS
        }

    def _observer(self, path: str) -> BatchObserver:
        def observe(size: int, seconds: float) -> None:
            metrics.record_batch(self.name, path, size, seconds)

        return observe

    def _forward_fn(self, path: str) -> InferFn:
        forward = self.box.plain_logits if path == "plain" else self.box.keyed_logits
        device = self.device
        trimmer = self._trimmer

        def run(x: np.ndarray) -> np.ndarray:
            with torch.inference_mode():
                t = torch.from_numpy(x)
                if t.device != device:
                    t = t.to(device, non_blocking=True)
                out: np.ndarray = forward(t).float().cpu().numpy()
            trimmer.after_forward(x.nbytes)
            return out

        return run

    def info(self) -> dict[str, Any]:
        """Public metadata (never the box key)."""
        return {
            "name": self.name,
            "version": self.version,
            "input_shape": list(self.input_shape),
            "num_classes": self.num_classes,
            "class_names": self.class_names,
            "temperature": self.temperature,
            "device": str(self.device),
            "metrics": self.metrics,
            "evaluation": self.evaluation,
        }

    def warm_up(self) -> None:
        x = np.zeros((1, *self.input_shape), dtype=np.float32)
        for batcher in self._batchers.values():
            batcher.run_now(x)

    def calibrate_forward_batch(self) -> int:
        """Measure the fastest forward batch (plain path; both paths run the same network) and cap every
        forward pass of this model at it. Returns the cap."""
        plain = self._batchers["plain"]
        sample = np.random.default_rng(0).random((1, *self.input_shape), dtype=np.float32)
        cap, rates = fastest_forward_batch(plain.fn, sample, plain.config.max_batch_size)
        for batcher in self._batchers.values():
            batcher.forward_cap = cap
        logger.info(
            "%s: forward passes capped at %d samples (samples/s by batch: %s)",
            self.name,
            cap,
            ", ".join(f"{k}: {v:,.0f}" for k, v in rates.items()),
        )
        return cap

    async def infer(self, path: InferencePath, x: np.ndarray | torch.Tensor) -> np.ndarray:
        """Logits [N, num_classes] (float32 numpy) of the plain or keyed path for raw inputs x [N, *shape]."""
        batcher = self._batchers.get(path)
        if batcher is None:
            raise ValueError(f"unknown inference path {path!r}")
        if isinstance(x, torch.Tensor):
            x = x.detach().cpu().numpy()
        x = np.ascontiguousarray(x, dtype=np.float32)
        if not x.flags.writeable:
            x = x.copy()
        if x.ndim != 1 + len(self.input_shape) or tuple(x.shape[1:]) != self.input_shape:
            raise ValueError(f"expected inputs of shape [N, {', '.join(map(str, self.input_shape))}]")
        try:
            async with asyncio.timeout(self.timeout_s):
                out = await batcher.submit(x)
        except TimeoutError as exc:
            metrics.record_inference_timeout(self.name, path)
            raise InferenceTimeout(
                f"inference on {self.name!r} missed its {self.timeout_s:g} s deadline"
            ) from exc
        except BatcherOverloaded as exc:
            raise InferenceOverloaded(f"model {self.name!r} is overloaded, retry shortly") from exc
        metrics.record_samples(self.name, path, len(x))
        return out

    async def aclose(self) -> None:
        for batcher in self._batchers.values():
            await batcher.aclose()


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("SDB_DEVICE=cuda but no CUDA device is available")
    return torch.device(device)


def default_threads() -> int:
    """CPU cores available minus one (at least 1): the event loop keeps a core for HTTP work.

    On a busy CPU, intra-op threads that wait for each other at every operator are much slower than one
    thread when any of them is preempted, and the event loop of the same process preempts them constantly.
    """
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - non-Linux
        cores = os.cpu_count() or 1
    return max(1, cores - 1)


class MemoryTrimmer:
    """glibc only: give the freed activations of big batches back to the OS after the forward pass.

    glibc keeps freed heap memory for reuse (and raises its mmap threshold after large frees), so one big
    batch would pin its peak activation memory in the resident set for good. Trimming after large batches
    (rate-limited) costs a few page faults on the next big batch and keeps RSS close to live memory.
    Smaller batches reuse what is cached, untouched.
    """

    def __init__(self, min_input_bytes: int = 512 << 10, min_interval_s: float = 0.25) -> None:
        self.min_input_bytes = min_input_bytes
        self.min_interval_s = min_interval_s
        self._last = 0.0
        self._trim: Any = None
        if sys.platform.startswith("linux"):
            try:
                libc = ctypes.CDLL("libc.so.6")
                self._trim = libc.malloc_trim
                libc.mallopt(-8, 4)  # M_ARENA_MAX: no arena per short-lived helper thread
            except (OSError, AttributeError):  # pragma: no cover - musl and others
                self._trim = None

    def after_forward(self, input_bytes: int) -> None:
        if self._trim is None or input_bytes < self.min_input_bytes:
            return
        now = time.monotonic()
        if now - self._last >= self.min_interval_s:
            self._last = now
            self._trim(0)


def configure_torch(threads: int) -> int:
    """Set torch's intra-op threads once per process (0 = default_threads())."""
    if threads <= 0:
        threads = default_threads()
    torch.set_num_threads(threads)
    # Raises when already set, or once inter-op work has started in this process.
    with contextlib.suppress(RuntimeError):
        torch.set_num_interop_threads(1)
    return threads


def batcher_config(settings: Settings) -> BatcherConfig:
    return BatcherConfig(
        max_batch_size=settings.max_batch_size,
        max_delay_s=settings.max_batch_delay_ms / 1000.0,
        enabled=settings.batching,
        max_pending_samples=max(settings.max_batch_size, settings.max_request_samples) * 64,
    )


class ModelRegistry:
    """Name -> ServedModel, plus the default model used when a request names none."""

    def __init__(
        self,
        models: list[ServedModel],
        executor: ThreadPoolExecutor,
        default: str | None = None,
        max_request_samples: int = 1024,
    ) -> None:
        self._models = {m.name: m for m in models}
        self.max_request_samples = max_request_samples
        if default is not None and default not in self._models:
            raise RuntimeError(
                f"SDB_DEFAULT_MODEL={default!r} is not among the loaded models: {sorted(self._models)}"
            )
        self.default_name = default if default is not None else (min(self._models) if self._models else None)
        self._executor = executor
        metrics.register_models(set(self._models))

    @staticmethod
    def new_executor() -> ThreadPoolExecutor:
        return ThreadPoolExecutor(max_workers=1, thread_name_prefix="sdb-inference")

    @classmethod
    def from_boxes(
        cls,
        boxes: list[Box],
        *,
        batching: BatcherConfig | None = None,
        timeout_s: float = 30.0,
        default: str | None = None,
        max_request_samples: int = 1024,
    ) -> ModelRegistry:
        executor = cls.new_executor()
        config = batching or BatcherConfig()
        trimmer = MemoryTrimmer()
        models = [ServedModel(b, executor, config, timeout_s, trimmer) for b in boxes]
        return cls(models, executor, default, max_request_samples)

    @classmethod
    def from_settings(cls, settings: Settings, *, warm_up: bool = True) -> ModelRegistry:
        """Load every artifact directory (one holding a manifest.json) under SDB_MODEL_DIR."""
        from sdb_core.artifact import load_box

        threads = configure_torch(settings.torch_threads)
        device = resolve_device(settings.device)
        model_dir = Path(settings.model_dir)
        boxes: list[Box] = []
        evaluations: dict[str, dict[str, Any] | None] = {}
        if model_dir.is_dir():
            for entry in sorted(model_dir.iterdir()):
                if not (entry / "manifest.json").is_file():
                    continue
                key_path = (
                    None
                    if settings.box_key_dir is None
                    else Path(settings.box_key_dir) / f"{entry.name}.json"
                )
                try:
                    box = load_box(entry, key_path=key_path, device=str(device))
                except Exception as exc:
                    raise RuntimeError(f"cannot load the boxed model in {entry}: {exc}") from exc
                if hasattr(box, "eval"):
                    box.eval()
                if settings.torchscript:
                    try:
                        box.script()
                    except Exception as exc:  # an architecture that does not trace still serves, eagerly
                        logger.warning("serving %s eagerly, TorchScript trace failed: %s", entry.name, exc)
                boxes.append(box)
                evaluations[box.name] = read_evaluation(entry / EVALUATION_FILE)
        else:
            logger.warning("model directory %s does not exist: no model loaded", model_dir)
        names = [b.name for b in boxes]
        if len(set(names)) != len(names):
            raise RuntimeError(f"two artifacts under {model_dir} have the same model name: {names}")
        registry = cls.from_boxes(
            boxes,
            batching=batcher_config(settings),
            timeout_s=settings.inference_timeout_s,
            default=settings.default_model,
            max_request_samples=settings.max_request_samples,
        )
        for model in registry:
            model.evaluation = evaluations.get(model.name)
        if warm_up:
            for model in registry:
                model.warm_up()
                if settings.calibrate_forward_batch:
                    model.calibrate_forward_batch()
        logger.info(
            "loaded %d model(s) %s on %s (torch threads %d, batching %s)",
            len(names),
            names,
            device,
            threads,
            "on" if settings.batching else "off",
        )
        return registry

    def get(self, name: str | None = None) -> ServedModel:
        key = name if name is not None else self.default_name
        if key is None or key not in self._models:
            raise UnknownModelError(name)
        return self._models[key]

    def names(self) -> list[str]:
        return sorted(self._models)

    def __contains__(self, name: object) -> bool:
        return name in self._models

    def __iter__(self) -> Any:
        return iter(self._models.values())

    def __len__(self) -> int:
        return len(self._models)

    @property
    def ready(self) -> bool:
        return bool(self._models)

    async def aclose(self) -> None:
        for model in self._models.values():
            await model.aclose()
        self._executor.shutdown(wait=False, cancel_futures=True)

    def close(self) -> None:
        """Synchronous shutdown of the inference thread (batcher tasks die with their event loop)."""
        self._executor.shutdown(wait=False, cancel_futures=True)
