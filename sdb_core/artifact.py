"""Boxed-model artifacts: a directory with `manifest.json`, `weights.safetensors` and `box_key.json`.

Weights are safetensors (loading never executes code). The manifest records the architecture (a zoo
name, never code), input shape, normalization, class names, lambda, temperatures, the data digest, the
evaluation metrics and sha256 checksums of the weights, of the box key and of the manifest itself.
The key file may be moved to a secret store and given to `load_box(key_path=...)`.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from sdb_core.keys import BoxKey, BoxKeyError, load_key, save_key
from sdb_core.zoo import arch_kwargs_for, build_model, top1_logits

MANIFEST = "manifest.json"
WEIGHTS = "weights.safetensors"
KEY_FILE = "box_key.json"
FORMAT = "sdb-box"
FORMAT_VERSION = 1


class ArtifactError(Exception):
    """A box artifact is missing, malformed or tampered with. Never contains key material."""


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _manifest_digest(manifest: dict[str, Any]) -> str:
    body = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


class BoxedModel:
    """A loaded box in eval mode. Both paths take RAW (un-normalized) float32 inputs [N, *input_shape]."""

    def __init__(
        self, model: nn.Module, key: BoxKey, manifest: dict[str, Any], device: str | torch.device
    ) -> None:
        self.manifest = manifest
        self.name: str = manifest["name"]
        self.version: str = str(manifest["version"])
        self.input_shape: tuple[int, ...] = tuple(int(d) for d in manifest["input_shape"])
        self.num_classes: int = int(manifest["num_classes"])
        self.class_names: list[str] = list(manifest["class_names"])
        self.temperature: float = float(manifest["temperature"])
        self.arch: str = manifest["arch"]
        # Artifacts written before plain_output existed served the box's own logits.
        self.plain_output: str = manifest.get("plain_output", "soft")
        self._key = key
        self.model = model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.device = torch.device("cpu")
        self.to(device)

    def to(self, device: str | torch.device) -> BoxedModel:
        self.device = torch.device(device)
        self.model.to(self.device)
        c = self.input_shape[0]
        norm = self.manifest["normalization"]
        self._mean = torch.tensor(norm["mean"], dtype=torch.float32, device=self.device).view(c, 1, 1)
        self._std = torch.tensor(norm["std"], dtype=torch.float32, device=self.device).view(c, 1, 1)
        # Precomputed so the keyed path costs one fused multiply-add: lam*xn + (1-lam)*pattern.
        self._key_offset = (1.0 - self._key.lam) * self._key.pattern(self.device)
        return self

    def _normalize(self, x: Tensor) -> Tensor:
        if tuple(x.shape[1:]) != self.input_shape or x.dim() != len(self.input_shape) + 1:
            raise ValueError(
                f"expected inputs [N, {', '.join(map(str, self.input_shape))}], got {tuple(x.shape)}"
            )
        x = x.to(device=self.device, dtype=torch.float32)
        return (x - self._mean) / self._std

    def plain_logits(self, x: Tensor) -> Tensor:
        """What the plain path serves (`/predict`): the top-1 only for a "top1" box."""
        z = self.raw_plain_logits(x)
        return top1_logits(z) if self.plain_output == "top1" else z

    def raw_plain_logits(self, x: Tensor) -> Tensor:
        """The network's own outputs on plain inputs: what stolen weights give without the key."""
        with torch.inference_mode():
            return self.model(self._normalize(x))

    def keyed_logits(self, x: Tensor) -> Tensor:
        with torch.inference_mode():
            return self.model(self._key.lam * self._normalize(x) + self._key_offset)

    def normalize(self, x: Tensor) -> Tensor:
        """Raw -> normalized inputs (what the network sees on the plain path)."""
        return self._normalize(x)

    def script(self, example_batch: int = 4) -> BoxedModel:
        """Replace the network by a frozen TorchScript trace of itself (same outputs up to float rounding).

        An eager forward pass takes Python's GIL back between operators, so a serving thread slows to a
        crawl while other threads run Python (HTTP handling); a scripted one runs the whole graph in C++.
        """
        example = torch.zeros((example_batch, *self.input_shape), device=self.device)
        with torch.no_grad():
            traced = torch.jit.trace(self.model, example)
        self.model = torch.jit.freeze(traced.eval())
        return self

    def __repr__(self) -> str:
        return f"BoxedModel(name={self.name!r}, version={self.version!r}, arch={self.arch!r})"


def save_box(
    out_dir: str | os.PathLike[str],
    *,
    model: nn.Module,
    arch: str,
    arch_kwargs: dict[str, Any],
    key: BoxKey,
    name: str,
    version: str,
    input_shape: tuple[int, ...],
    class_names: list[str],
    normalization: dict[str, list[float]],
    temperature: float,
    temperature_dis: float,
    data_digest: str,
    metrics: dict[str, Any],
    extra: dict[str, Any] | None = None,
    plain_output: str = "top1",
) -> Path:
    """Write a box artifact atomically (a sibling temp dir renamed into place). Returns the directory."""
    out = Path(out_dir)
    if tuple(key.shape) != tuple(input_shape):
        raise ArtifactError(f"box key shape {key.shape} differs from the input shape {tuple(input_shape)}")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        state = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
        save_file(state, str(tmp / WEIGHTS), metadata={"format": FORMAT})
        save_key(key, tmp / KEY_FILE)
        manifest: dict[str, Any] = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "name": name,
            "version": str(version),
            "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "arch": arch,
            "arch_kwargs": arch_kwargs,
            "input_shape": list(input_shape),
            "num_classes": len(class_names),
            "class_names": list(class_names),
            "normalization": {"mean": list(normalization["mean"]), "std": list(normalization["std"])},
            "lam": float(key.lam),
            "temperature": float(temperature),
            "temperature_dis": float(temperature_dis),
            "plain_output": plain_output,
            "data_digest": data_digest,
            "metrics": metrics,
            "torch_version": torch.__version__,
            "checksums": {WEIGHTS: _sha256_file(tmp / WEIGHTS), "box_key": key.digest()},
            "extra": extra or {},
        }
        manifest["manifest_sha256"] = _manifest_digest(manifest)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        # mkdtemp makes 0700: the directory, weights and manifest are readable; the key stays 0600.
        os.chmod(tmp, 0o755)
        os.chmod(tmp / WEIGHTS, 0o644)
        os.chmod(tmp / MANIFEST, 0o644)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def read_manifest(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read and verify a manifest (its own checksum and required fields) without loading weights."""
    p = Path(path)
    mpath = p / MANIFEST if p.is_dir() else p
    try:
        manifest = json.loads(mpath.read_text())
    except FileNotFoundError:
        raise ArtifactError(f"{mpath}: manifest not found (is this a box directory?)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ArtifactError(
            f"{mpath}: manifest is unreadable or not valid JSON ({type(e).__name__})"
        ) from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ArtifactError(f"{mpath}: not an sdb box manifest")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(f"{mpath}: unsupported format_version {manifest.get('format_version')!r}")
    if manifest.get("manifest_sha256") != _manifest_digest(manifest):
        raise ArtifactError(f"{mpath}: manifest checksum mismatch (the manifest was modified)")
    required = (
        "name",
        "version",
        "arch",
        "arch_kwargs",
        "input_shape",
        "class_names",
        "normalization",
        "temperature",
        "checksums",
        "num_classes",
    )
    missing = [k for k in required if k not in manifest]
    if missing:
        raise ArtifactError(f"{mpath}: manifest lacks {', '.join(missing)}")
    return manifest


def load_box(
    path: str | os.PathLike[str],
    *,
    key_path: str | os.PathLike[str] | None = None,
    device: str | torch.device = "cpu",
) -> BoxedModel:
    """Load a box, verifying manifest, weights and key checksums; ArtifactError on anything wrong."""
    root = Path(path)
    if not root.is_dir():
        raise ArtifactError(f"{root}: box directory not found")
    manifest = read_manifest(root)
    checksums = manifest["checksums"]

    wpath = root / WEIGHTS
    if not wpath.is_file():
        raise ArtifactError(f"{root}: {WEIGHTS} not found")
    if _sha256_file(wpath) != checksums.get(WEIGHTS):
        raise ArtifactError(f"{wpath}: weights checksum mismatch (the weights were modified or corrupted)")

    kpath = Path(key_path) if key_path is not None else root / KEY_FILE
    try:
        key = load_key(kpath)
    except BoxKeyError as e:
        raise ArtifactError(f"{kpath}: {e}") from None
    if key.digest() != checksums.get("box_key"):
        raise ArtifactError(f"{kpath}: box key does not match this box (checksum mismatch)")
    input_shape = tuple(int(d) for d in manifest["input_shape"])
    if key.shape != input_shape:
        raise ArtifactError(f"{kpath}: box key shape {key.shape} differs from the input shape {input_shape}")

    try:
        model = build_model(manifest["arch"], **manifest["arch_kwargs"])
        state = load_file(str(wpath))
        model.load_state_dict(state, strict=True)
    except (KeyError, TypeError, RuntimeError, SafetensorError) as e:
        raise ArtifactError(f"{root}: weights do not fit architecture {manifest['arch']!r}: {e}") from None
    return BoxedModel(model, key, manifest, device)


def make_test_box(
    out_dir: str | os.PathLike[str],
    *,
    name: str = "test-box",
    version: str = "1",
    arch: str = "small_cnn",
    input_shape: tuple[int, ...] = (1, 8, 8),
    num_classes: int = 10,
    seed: int = 0,
    arch_extra: dict[str, Any] | None = None,
    dir_name: str | None = None,
) -> Path:
    """An untrained box with a deterministic key, for service tests: `out_dir/name` (or `out_dir/dir_name`
    for a model name that is no file name), fast (< 1 s)."""
    torch.manual_seed(seed)
    kwargs = arch_kwargs_for(tuple(input_shape), num_classes, **(arch_extra or {"width": 8}))
    model = build_model(arch, **kwargs)
    c = input_shape[0]
    return save_box(
        Path(out_dir) / (dir_name or name),
        model=model,
        arch=arch,
        arch_kwargs=kwargs,
        key=BoxKey.from_int_seed(seed, input_shape),
        name=name,
        version=version,
        input_shape=tuple(input_shape),
        class_names=[str(i) for i in range(num_classes)],
        normalization={"mean": [0.0] * c, "std": [1.0] * c},
        temperature=4.0,
        temperature_dis=4.0,
        data_digest="untrained",
        metrics={},
        extra={"test_box": True},
    )
