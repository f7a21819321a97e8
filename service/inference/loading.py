"""Model loading: every boxed artifact under SDB_MODEL_DIR, traced, warmed up and calibrated.

Sealed artifacts (sdb_core.seal) are decrypted in memory with the master keys of SDB_SEAL_KEY_FILE /
SDB_SEAL_KEY_DIR. Anything that stops a model from loading is a `ModelLoadError` of one line that names the
artifact and the setting to fix, never key material; `preflight` finds the same errors before the server
starts (`sdb serve` prints that line and exits instead of a traceback).
"""

from __future__ import annotations

import json
import logging
import stat
from pathlib import Path
from typing import Any

from sdb_core.artifact import KEY_FILE, ArtifactError, load_box, read_artifact, read_manifest
from sdb_core.seal import Keyring, SealError, is_sealed
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


class ModelLoadError(RuntimeError):
    """A model cannot be loaded: one line naming the artifact and the setting, never key material."""


def keyring_of(settings: Settings) -> Keyring:
    try:
        return Keyring.from_paths(settings.seal_key_file, settings.seal_key_dir)
    except SealError as exc:
        raise ModelLoadError(str(exc)) from None


def artifact_dirs(settings: Settings) -> list[Path]:
    model_dir = Path(settings.model_dir)
    if not model_dir.is_dir():
        return []
    return [entry for entry in sorted(model_dir.iterdir()) if (entry / "manifest.json").is_file()]


def _key_path(settings: Settings, entry: Path) -> Path | None:
    return None if settings.box_key_dir is None else Path(settings.box_key_dir) / f"{entry.name}.json"


def check_policy(settings: Settings, entry: Path, *, warn: bool) -> None:
    """SDB_REQUIRE_SEALED, and (with `warn`) one warning line each for an unsealed artifact outside demo mode
    and for a plaintext box key file that group or others may read (git does not keep file modes)."""
    try:
        sealed = is_sealed(read_manifest(entry))
    except ArtifactError as exc:
        raise ModelLoadError(str(exc)) from None
    if not sealed and settings.require_sealed:
        raise ModelLoadError(
            f"{entry}: not sealed, and SDB_REQUIRE_SEALED=true refuses unsealed artifacts "
            f"(seal it with `sdb seal {entry}`, the master key in SDB_SEAL_KEY_FILE)"
        )
    if not warn:
        return
    if not sealed and not settings.demo:
        logger.warning(
            "%s is not sealed: its weights are plaintext at rest (`sdb seal`; SDB_REQUIRE_SEALED=true "
            "refuses this)",
            entry,
        )
    key_path = _key_path(settings, entry) or entry / KEY_FILE
    try:
        mode = key_path.stat().st_mode
    except OSError:
        return
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        logger.warning(
            "box key file %s is readable by group or others (mode %o): chmod 600 it", key_path, mode & 0o777
        )


def preflight(settings: Settings) -> None:
    """Open every artifact's seal (decrypt in memory, check the tags and digests) and apply
    SDB_REQUIRE_SEALED, without building a model. ModelLoadError on the first that fails."""
    keyring = keyring_of(settings)
    for entry in artifact_dirs(settings):
        check_policy(settings, entry, warn=False)
        try:
            read_artifact(entry, keyring)
        except ArtifactError as exc:
            raise ModelLoadError(str(exc)) from None


def load_registry(settings: Settings, *, warm_up: bool = True) -> ModelRegistry:
    """Load every artifact directory (one holding a manifest.json) under SDB_MODEL_DIR."""
    threads = configure_torch(settings.torch_threads)
    device = resolve_device(settings.device)
    model_dir = Path(settings.model_dir)
    boxes: list[Box] = []
    evaluations: dict[str, dict[str, Any] | None] = {}
    keyring = keyring_of(settings)
    if model_dir.is_dir():
        for entry in artifact_dirs(settings):
            check_policy(settings, entry, warn=True)
            try:
                key_path = _key_path(settings, entry)
                box = load_box(entry, key_path=key_path, device=str(device), keyring=keyring)
            except ArtifactError as exc:
                raise ModelLoadError(str(exc)) from None
            except Exception as exc:
                raise ModelLoadError(f"cannot load the boxed model in {entry}: {exc}") from exc
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
