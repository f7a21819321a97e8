"""Model loading: every boxed artifact under SDB_MODEL_DIR, traced, warmed up and calibrated."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from sdb_core.artifact import load_box
from service.core.config import Settings
from service.inference.batcher import BatcherConfig
from service.inference.registry import Box, ModelRegistry
from service.inference.runtime import configure_torch, resolve_device

logger = logging.getLogger(__name__)


def batcher_config(settings: Settings) -> BatcherConfig:
    return BatcherConfig(
        max_batch_size=settings.max_batch_size,
        max_delay_s=settings.max_batch_delay_ms / 1000.0,
        enabled=settings.batching,
        max_pending_samples=max(settings.max_batch_size, settings.max_request_samples) * 64,
    )


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


def load_registry(settings: Settings, *, warm_up: bool = True) -> ModelRegistry:
    """Load every artifact directory (one holding a manifest.json) under SDB_MODEL_DIR."""
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
                None if settings.box_key_dir is None else Path(settings.box_key_dir) / f"{entry.name}.json"
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
    registry = ModelRegistry.from_boxes(
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
