"""Boxed-model artifacts: a directory with `manifest.json`, `weights.safetensors` and `box_key.json`.

Weights are safetensors (loading never executes code). The manifest records the architecture (a zoo
name, never code), input shape, normalization, class names, lambda, temperatures, the data digest, the
evaluation metrics and sha256 checksums of the weights, of the box key and of the manifest itself.
The key file may be moved to a secret store and given to `load_box(key_path=...)`.

A sealed artifact (`sdb_core.seal`: AES-256-GCM under a per-artifact data key wrapped by a master key) holds
`weights.safetensors.sealed` (and `box_key.json.sealed`) instead; `load_box(keyring=...)` decrypts them
into memory and loads the weights from bytes, so the plaintext never touches the disk. `seal_artifact`,
`unseal_artifact` and `reseal_artifact` convert existing directories.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import Tensor, nn

from sdb_core import seal
from sdb_core.keys import BoxKey, BoxKeyError, key_from_json, key_record_bytes, load_key
from sdb_core.zoo import arch_kwargs_for, build_model, top1_logits

MANIFEST = "manifest.json"
WEIGHTS = "weights.safetensors"
KEY_FILE = "box_key.json"
FORMAT = "sdb-box"
FORMAT_VERSION = 1


class ArtifactError(Exception):
    """A box artifact is missing, malformed or tampered with. Never contains key material."""


def _manifest_digest(manifest: dict[str, Any]) -> str:
    body = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _manifest_bytes(manifest: dict[str, Any]) -> bytes:
    manifest["manifest_sha256"] = _manifest_digest(manifest)
    return (json.dumps(manifest, indent=2) + "\n").encode()


def _seal_section(master: seal.MasterKey, with_box_key: bool) -> dict[str, Any]:
    files = {seal.ROLE_WEIGHTS: seal.sealed_name(WEIGHTS)}
    if with_box_key:
        files[seal.ROLE_BOX_KEY] = seal.sealed_name(KEY_FILE)
    return {"algorithm": seal.CONFIG.algorithm, "key_id": master.key_id, "files": files}


def _write_sealed(
    root: Path, manifest: dict[str, Any], master: seal.MasterKey, weights: bytes, box_key: bytes | None
) -> None:
    """Encrypt weights (and box key) under a fresh data key into root, then seal.json, then the manifest with
    its `seal` section (the commit point: until it is renamed into place the artifact is what it was)."""
    data_key = seal.new_data_key()
    manifest["seal"] = _seal_section(master, box_key is not None)
    files = manifest["seal"]["files"]
    blob = seal.encrypt(data_key, weights, seal.aad(manifest, seal.ROLE_WEIGHTS))
    seal.write_atomic(root / files[seal.ROLE_WEIGHTS], blob)
    if box_key is not None:
        blob = seal.encrypt(data_key, box_key, seal.aad(manifest, seal.ROLE_BOX_KEY))
        seal.write_atomic(root / files[seal.ROLE_BOX_KEY], blob)
    record = seal.wrap(master, data_key, manifest)
    seal.write_atomic(root / seal.CONFIG.seal_file, record.to_json().encode())
    seal.write_atomic(root / MANIFEST, _manifest_bytes(manifest))


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
    master: seal.MasterKey | None = None,
) -> Path:
    """Write a box artifact atomically (a sibling temp dir renamed into place). Returns the directory. With
    a master key it is sealed as it is written: weights and box key reach the disk only encrypted."""
    out = Path(out_dir)
    if tuple(key.shape) != tuple(input_shape):
        raise ArtifactError(f"box key shape {key.shape} differs from the input shape {tuple(input_shape)}")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        state = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
        weights = save_safetensors(state, metadata={"format": FORMAT})
        key_bytes = key_record_bytes(key)
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
            "checksums": {WEIGHTS: hashlib.sha256(weights).hexdigest(), "box_key": key.digest()},
            "extra": extra or {},
        }
        if master is not None:
            _write_sealed(tmp, manifest, master, weights, key_bytes)
        else:
            seal.write_atomic(tmp / WEIGHTS, weights)
            seal.write_atomic(tmp / KEY_FILE, key_bytes, mode=0o600)
            seal.write_atomic(tmp / MANIFEST, _manifest_bytes(manifest))
        # mkdtemp makes 0700: the directory, weights and manifest are readable; a plaintext key stays 0600.
        os.chmod(tmp, 0o755)
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


class SealedArtifactError(ArtifactError):
    """A sealed artifact cannot be opened (no master key, an unknown one, a tampered or swapped file)."""


@dataclass
class ArtifactBytes:
    """An artifact's secret files, read (and decrypted, when sealed) into memory."""

    manifest: dict[str, Any]
    weights: bytes
    box_key: bytes | None  # None: the artifact holds no box key file
    sealed: bool


def read_artifact(root: Path, keyring: seal.Keyring | None = None) -> ArtifactBytes:
    """The manifest, and the weights and box key as bytes (decrypted in memory when sealed), checked against
    the manifest's checksums. ArtifactError (SealedArtifactError for the seal) on anything wrong."""
    if not root.is_dir():
        raise ArtifactError(f"{root}: box directory not found")
    manifest = read_manifest(root)
    if seal.is_sealed(manifest):
        try:
            weights, box_key = _open_sealed(root, manifest, keyring or seal.Keyring())
        except seal.SealError as e:
            raise SealedArtifactError(str(e)) from None
    else:
        wpath = root / WEIGHTS
        try:
            weights = wpath.read_bytes()
        except FileNotFoundError:
            raise ArtifactError(f"{root}: {WEIGHTS} not found") from None
        kpath = root / KEY_FILE
        box_key = kpath.read_bytes() if kpath.is_file() else None
    # A sealed file's GCM tag already authenticates it, with the manifest's weights digest in its AAD.
    if not seal.is_sealed(manifest) and hashlib.sha256(weights).hexdigest() != manifest["checksums"].get(
        WEIGHTS
    ):
        raise ArtifactError(f"{root / WEIGHTS}: weights checksum mismatch (modified or corrupted)")
    return ArtifactBytes(manifest, weights, box_key, seal.is_sealed(manifest))


def _open_sealed(
    root: Path, manifest: dict[str, Any], keyring: seal.Keyring, *, resealing: bool = False
) -> tuple[bytes, bytes | None]:
    section = manifest["seal"]
    if section.get("algorithm") != seal.CONFIG.algorithm:
        raise seal.SealError(f"{root}: unsupported seal algorithm {section.get('algorithm')!r}")
    record = seal.SealRecord.read(root)
    # seal.json is renamed into place before the manifest: a reseal that stopped between the two left the
    # new key id in seal.json only; a rerun of it (resealing) finishes the job, a load refuses.
    if record.key_id != section.get("key_id") and not resealing:
        raise seal.SealError(
            f"{root}: {seal.CONFIG.seal_file} names master key {record.key_id} but the manifest "
            f"{section.get('key_id')} (an interrupted `sdb reseal`? run it again)"
        )
    data_key = seal.unwrap(record, keyring, manifest, str(root))
    files = section.get("files", {})
    weights = seal.open_file(root, data_key, manifest, seal.ROLE_WEIGHTS, files[seal.ROLE_WEIGHTS])
    box_key = None
    if seal.ROLE_BOX_KEY in files:
        box_key = seal.open_file(root, data_key, manifest, seal.ROLE_BOX_KEY, files[seal.ROLE_BOX_KEY])
    return weights, box_key


def load_box(
    path: str | os.PathLike[str],
    *,
    key_path: str | os.PathLike[str] | None = None,
    device: str | torch.device = "cpu",
    keyring: seal.Keyring | None = None,
) -> BoxedModel:
    """Load a box, verifying manifest, weights and key checksums; ArtifactError on anything wrong. A sealed
    box is decrypted in memory with a master key of `keyring` (default: SDB_SEAL_KEY_FILE / SDB_SEAL_KEY_DIR
    of the environment, read only when the box is sealed)."""
    root = Path(path)
    if keyring is None and (root / seal.CONFIG.seal_file).is_file():
        try:
            keyring = seal.Keyring.from_env()
        except seal.SealError as e:
            raise SealedArtifactError(f"{root}: {e}") from None
    art = read_artifact(root, keyring)
    manifest = art.manifest
    checksums = manifest["checksums"]

    kpath = Path(key_path) if key_path is not None else root / KEY_FILE
    try:
        if key_path is None and art.box_key is not None:
            key = key_from_json(art.box_key.decode("utf-8", errors="replace"))
        else:
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
        state = load_safetensors(art.weights)
        model.load_state_dict(state, strict=True)
    except (KeyError, TypeError, RuntimeError, SafetensorError) as e:
        raise ArtifactError(f"{root}: weights do not fit architecture {manifest['arch']!r}: {e}") from None
    return BoxedModel(model, key, manifest, device)


def seal_artifact(path: str | os.PathLike[str], master: seal.MasterKey) -> Path:
    """Seal a plaintext artifact in place: ciphertext written beside the plaintext (temporary file, rename),
    the manifest renamed into place last, then the plaintext weights and box key removed."""
    root = Path(path)
    if root.is_dir() and seal.is_sealed(read_manifest(root)):
        raise SealedArtifactError(f"{root}: already sealed (use `sdb reseal` to change its master key)")
    art = read_artifact(root)
    manifest = dict(art.manifest)
    _write_sealed(root, manifest, master, art.weights, art.box_key)
    for name in (WEIGHTS, KEY_FILE):
        (root / name).unlink(missing_ok=True)
    return root


def unseal_artifact(path: str | os.PathLike[str], keyring: seal.Keyring) -> Path:
    """Turn a sealed artifact back into plaintext files (a migration away from sealing): weights 0644, box
    key 0600, the manifest without its `seal` renamed into place last, then the sealed files removed."""
    root = Path(path)
    art = read_artifact(root, keyring)
    if not art.sealed:
        raise ArtifactError(f"{root}: not sealed")
    manifest = dict(art.manifest)
    files = dict(manifest.pop("seal")["files"])
    seal.write_atomic(root / WEIGHTS, art.weights)
    if art.box_key is not None:
        seal.write_atomic(root / KEY_FILE, art.box_key, mode=0o600)
    seal.write_atomic(root / MANIFEST, _manifest_bytes(manifest))
    for name in (*files.values(), seal.CONFIG.seal_file):
        (root / name).unlink(missing_ok=True)
    return root


def reseal_artifact(
    path: str | os.PathLike[str], keyring: seal.Keyring, master: seal.MasterKey, *, rekey: bool = False
) -> Path:
    """Rotation: re-wrap the artifact's data key under `master` (seal.json, then the manifest's key id),
    without retraining or re-encrypting. `rekey`: also draw a fresh data key and re-encrypt every file (after
    a leak, when old copies of seal.json may be out there)."""
    root = Path(path)
    manifest = read_manifest(root)
    if not seal.is_sealed(manifest):
        raise ArtifactError(f"{root}: not sealed (use `sdb seal`)")
    try:  # every file opened (tags checked) before anything is rewritten
        weights, box_key = _open_sealed(root, manifest, keyring, resealing=True)
    except seal.SealError as e:
        raise SealedArtifactError(str(e)) from None
    if rekey:  # every file changes: build the new artifact beside the old one, then swap the directories
        tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.", dir=root.parent))
        old = root.with_name(f".{root.name}.old-{os.getpid()}")
        try:
            shutil.copytree(root, tmp, dirs_exist_ok=True)
            _write_sealed(tmp, manifest, master, weights, box_key)
            os.chmod(tmp, 0o755)
            os.replace(root, old)
            os.replace(tmp, root)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        shutil.rmtree(old, ignore_errors=True)
        return root
    record = seal.SealRecord.read(root)
    data_key = seal.unwrap(record, keyring, manifest, str(root))
    manifest["seal"] = {**manifest["seal"], "key_id": master.key_id}
    seal.write_atomic(root / seal.CONFIG.seal_file, seal.wrap(master, data_key, manifest).to_json().encode())
    seal.write_atomic(root / MANIFEST, _manifest_bytes(manifest))
    return root


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
    extra: dict[str, Any] | None = None,
) -> Path:
    """An untrained box with a deterministic key, for service tests: `out_dir/name` (or `out_dir/dir_name`
    for a model name that is no file name), fast (< 1 s). `extra`: more of the manifest's "extra"."""
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
        extra={"test_box": True, **(extra or {})},
    )
