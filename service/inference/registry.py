"""The registry of served boxes: name -> ServedModel, each (model, path) with its own dynamic batcher.

All forward passes of a worker run on one dedicated inference thread: on CPU, torch's intra-op threads
already use every core, and one thread keeps batches whole instead of splitting cores between them.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from types import MappingProxyType
from typing import Any, Literal, Protocol

import numpy as np
import torch

from service.inference.batcher import (
    BatcherConfig,
    BatcherOverloaded,
    BatchObserver,
    DynamicBatcher,
    InferFn,
    fastest_forward_batch,
)
from service.inference.runtime import MemoryTrimmer
from service.observability import metrics

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
        return out  # the routes count the samples they answer (metrics.ANSWERED_KEY)

    async def aclose(self) -> None:
        for batcher in self._batchers.values():
            await batcher.aclose()


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
        self.by_name: Mapping[str, ServedModel] = MappingProxyType(self._models)  # read-only view
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

    def get(self, name: str | None = None) -> ServedModel:
        key = name if name is not None else self.default_name
        if key is None or key not in self._models:
            raise UnknownModelError(name)
        return self._models[key]

    def names(self) -> list[str]:
        return sorted(self._models)

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
