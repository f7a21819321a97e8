"""Sealed artifacts: a box's weights (and its box key, where it sits in the artifact) encrypted at rest.

Envelope encryption, as KMS-backed model stores do it: every artifact gets a fresh 256-bit data key; each of
its secret files is encrypted with AES-256-GCM under that data key (a fresh 96-bit random nonce per file and
per write, so a nonce is never reused under one key); the data key itself is encrypted ("wrapped") with
AES-256-GCM under a **master key** that lives in a secret store (a file in a secret-store mount, a Docker or
compose secret), never in the artifact. The additional authenticated data of both binds the manifest's name,
version and weights digest (and the file's role), so a sealed file moved to another artifact, a manifest
edited to point at other weights, or any byte of a sealed file changed is refused by the GCM tag.

Layout of a sealed artifact directory:

- `manifest.json`: readable public metadata as before, plus `seal`: the algorithm, the master key's id and
  the sealed files (never key material, wrapped or not);
- `seal.json`: the data key wrapped under the master key (nonce, ciphertext) and the master key's id;
- `weights.safetensors.sealed`, `box_key.json.sealed`: `MAGIC || nonce || AES-GCM(ciphertext || tag)`.

A master key file holds 64 hex characters (32 random bytes; `sdb seal-key new` writes one). Its id is derived
from it (`mk-` + 16 hex characters of HMAC-SHA256(key, "sdb seal key id")), so a key file cannot be
mis-named; that fingerprint says nothing usable about a random 256-bit key. `SDB_SEAL_KEY_FILE` names the
current master key (new seals use it, loads may use it); `SDB_SEAL_KEY_DIR` names a directory of further
`*.key` files that loads may use (older keys during a rotation). Nothing here writes plaintext to disk:
sealing reads the plaintext and writes ciphertext to a temporary file in the same directory, then renames it
into place; opening decrypts into memory.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM


@dataclass(frozen=True)
class SealConfig:
    algorithm: str = "AES-256-GCM"
    key_bytes: int = 32  # data keys and master keys: AES-256
    nonce_bytes: int = 12  # 96-bit nonces, random per encryption
    magic: bytes = b"SDBSEAL1"
    sealed_suffix: str = ".sealed"
    seal_file: str = "seal.json"
    seal_format: str = "sdb-seal"
    seal_format_version: int = 1
    master_key_suffix: str = ".key"  # the files of SDB_SEAL_KEY_DIR
    key_id_prefix: str = "mk-"
    key_id_hex: int = 16


CONFIG = SealConfig()
KEY_FILE_ENV = "SDB_SEAL_KEY_FILE"
KEY_DIR_ENV = "SDB_SEAL_KEY_DIR"
ROLE_WEIGHTS = "weights"
ROLE_BOX_KEY = "box_key"


class SealError(Exception):
    """A seal cannot be made or opened: one line naming the artifact and the setting, never key material."""


@dataclass(frozen=True)
class MasterKey:
    """A master key and where it came from. `repr()` shows the id and source only."""

    key: bytes = field(repr=False)
    source: str

    def __post_init__(self) -> None:
        if len(self.key) != CONFIG.key_bytes:
            raise SealError(f"{self.source}: a master key must be {CONFIG.key_bytes} bytes")

    @property
    def key_id(self) -> str:
        return key_id_of(self.key)


def key_id_of(key: bytes) -> str:
    mac = hmac.new(key, b"sdb seal key id", hashlib.sha256).hexdigest()
    return CONFIG.key_id_prefix + mac[: CONFIG.key_id_hex]


def new_master_key(path: str | os.PathLike[str]) -> MasterKey:
    """Write a fresh master key (64 hex characters, owner-only 0600; never over an existing file)."""
    p = Path(path)
    key = secrets.token_bytes(CONFIG.key_bytes)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(key.hex() + "\n")
    return MasterKey(key, str(p))


def read_master_key(path: str | os.PathLike[str], setting: str = KEY_FILE_ENV) -> MasterKey:
    p = Path(path)
    try:
        text = p.read_text().strip()
    except OSError as e:
        raise SealError(f"{setting}={p}: cannot read the master key file ({e.strerror})") from None
    except UnicodeDecodeError:
        text = ""
    try:
        key = bytes.fromhex(text)
    except ValueError:
        key = b""
    if len(key) != CONFIG.key_bytes:
        raise SealError(
            f"{setting}={p}: not a master key ({2 * CONFIG.key_bytes} hex characters; "
            "`sdb seal-key new FILE` writes one)"
        )
    return MasterKey(key, str(p))


@dataclass
class Keyring:
    """The master keys this process may use: `current` seals, every one of `keys` may open."""

    current: MasterKey | None = None
    keys: dict[str, MasterKey] = field(default_factory=dict)
    sources: str = f"{KEY_FILE_ENV} / {KEY_DIR_ENV}"

    @classmethod
    def from_paths(
        cls, key_file: str | os.PathLike[str] | None, key_dir: str | os.PathLike[str] | None = None
    ) -> Keyring:
        ring = cls()
        if key_file is not None and str(key_file):
            ring.current = read_master_key(key_file, KEY_FILE_ENV)
            ring.keys[ring.current.key_id] = ring.current
        if key_dir is not None and str(key_dir):
            d = Path(key_dir)
            if not d.is_dir():
                raise SealError(f"{KEY_DIR_ENV}={d}: not a directory")
            for p in sorted(d.glob(f"*{CONFIG.master_key_suffix}")):
                mk = read_master_key(p, KEY_DIR_ENV)
                ring.keys.setdefault(mk.key_id, mk)
        return ring

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Keyring:
        env = os.environ if environ is None else environ
        return cls.from_paths(env.get(KEY_FILE_ENV) or None, env.get(KEY_DIR_ENV) or None)

    def __bool__(self) -> bool:
        return bool(self.keys)

    def get(self, key_id: str, artifact: str) -> MasterKey:
        if not self.keys:
            raise SealError(
                f"{artifact}: sealed under master key {key_id}, but no master key is configured "
                f"(set {KEY_FILE_ENV} or {KEY_DIR_ENV})"
            )
        if key_id not in self.keys:
            raise SealError(
                f"{artifact}: sealed under master key {key_id}, which is not among the configured master "
                f"keys {sorted(self.keys)} ({KEY_FILE_ENV} / {KEY_DIR_ENV})"
            )
        return self.keys[key_id]

    def sealing_key(self, artifact: str) -> MasterKey:
        if self.current is None:
            raise SealError(f"{artifact}: no master key to seal with (set {KEY_FILE_ENV})")
        return self.current


def aad(manifest: Mapping[str, Any], role: str, extra: Mapping[str, str] | None = None) -> bytes:
    """What a ciphertext is bound to: the artifact's name, version and plaintext weights digest, its role."""
    body = {
        "alg": CONFIG.algorithm,
        "name": str(manifest["name"]),
        "version": str(manifest["version"]),
        "weights_sha256": str(manifest["checksums"].get("weights.safetensors")),
        "role": role,
        **(extra or {}),
    }
    return CONFIG.magic + json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


def encrypt(data_key: bytes, plaintext: bytes, aad: bytes) -> bytes:
    nonce = secrets.token_bytes(CONFIG.nonce_bytes)
    return CONFIG.magic + nonce + AESGCM(data_key).encrypt(nonce, plaintext, aad)


def decrypt(data_key: bytes, blob: bytes, aad: bytes) -> bytes:
    """Raises InvalidTag on any changed byte, another key or other AAD; ValueError on a malformed blob."""
    head = len(CONFIG.magic) + CONFIG.nonce_bytes
    if len(blob) < head + 16 or not blob.startswith(CONFIG.magic):
        raise ValueError("not a sealed file")
    view = memoryview(blob)  # no copy of a large ciphertext
    return AESGCM(data_key).decrypt(view[len(CONFIG.magic) : head], view[head:], aad)


@dataclass(frozen=True)
class SealRecord:
    """seal.json: the wrapped data key and the master key's id."""

    key_id: str
    wrapped: bytes  # MAGIC || nonce || AES-GCM(data key)

    def to_json(self) -> str:
        rec = {
            "format": CONFIG.seal_format,
            "version": CONFIG.seal_format_version,
            "algorithm": CONFIG.algorithm,
            "key_id": self.key_id,
            "wrapped_data_key": self.wrapped.hex(),
        }
        return json.dumps(rec, indent=2) + "\n"

    @classmethod
    def read(cls, root: Path) -> SealRecord:
        p = root / CONFIG.seal_file
        try:
            rec = json.loads(p.read_text())
            if rec.get("format") != CONFIG.seal_format or rec.get("version") != CONFIG.seal_format_version:
                raise ValueError
            if rec.get("algorithm") != CONFIG.algorithm:
                raise ValueError
            return cls(str(rec["key_id"]), bytes.fromhex(str(rec["wrapped_data_key"])))
        except FileNotFoundError:
            raise SealError(f"{root}: sealed, but {CONFIG.seal_file} is missing") from None
        except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError):
            raise SealError(f"{p}: not a valid seal record") from None


def _wrap_aad(manifest: Mapping[str, Any], key_id: str) -> bytes:
    return aad(manifest, "data_key", {"key_id": key_id})


def wrap(master: MasterKey, data_key: bytes, manifest: Mapping[str, Any]) -> SealRecord:
    return SealRecord(master.key_id, encrypt(master.key, data_key, _wrap_aad(manifest, master.key_id)))


def unwrap(record: SealRecord, keyring: Keyring, manifest: Mapping[str, Any], artifact: str) -> bytes:
    master = keyring.get(record.key_id, artifact)
    try:
        return decrypt(master.key, record.wrapped, _wrap_aad(manifest, record.key_id))
    except (InvalidTag, ValueError):
        raise SealError(
            f"{artifact}: the data key does not open under master key {record.key_id} "
            f"({CONFIG.seal_file} was modified, belongs to another artifact, or {KEY_FILE_ENV} holds another "
            "key under that id)"
        ) from None


def sealed_name(plain_name: str) -> str:
    return plain_name + CONFIG.sealed_suffix


def is_sealed(manifest: Mapping[str, Any]) -> bool:
    return isinstance(manifest.get("seal"), dict)


def open_file(root: Path, data_key: bytes, manifest: Mapping[str, Any], role: str, name: str) -> bytes:
    """Decrypt one sealed file of the artifact into memory."""
    p = root / name
    try:
        blob = p.read_bytes()
    except OSError as e:
        raise SealError(f"{p}: cannot read the sealed file ({e.strerror})") from None
    try:
        return decrypt(data_key, blob, aad(manifest, role))
    except (InvalidTag, ValueError):
        raise SealError(
            f"{p}: refused, the sealed file was modified or belongs to another artifact (GCM tag mismatch)"
        ) from None


def write_atomic(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Write `data` (ciphertext or public metadata only) to a temporary file beside `path`, then rename."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def new_data_key() -> bytes:
    return AESGCM.generate_key(bit_length=8 * CONFIG.key_bytes)
