"""Box keys: the secret input pattern of a boxed model.

A key is a pattern with the model's input shape, drawn from a 32-byte seed made by `secrets`.
The pattern is reproducible from the seed alone, so only the seed (plus shape and lambda) is stored,
in its own file, apart from the weights. `apply` mixes the pattern into already-normalized inputs.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

SEED_BYTES = 32
KEY_FORMAT = "sdb-box-key"
KEY_FORMAT_VERSION = 1


class BoxKeyError(ValueError):
    """A key file is missing, malformed, or does not fit. The message never contains key material."""


@dataclass(frozen=True)
class BoxKey:
    """The box key. Secret: `repr()` shows only the shape and lambda, never the seed."""

    seed: bytes = field(repr=False)
    shape: tuple[int, ...]
    lam: float = 0.5

    def __post_init__(self) -> None:
        if not isinstance(self.seed, bytes) or len(self.seed) != SEED_BYTES:
            raise BoxKeyError(f"a box key seed must be {SEED_BYTES} bytes")
        if not self.shape or any(int(d) <= 0 for d in self.shape):
            raise BoxKeyError(f"invalid key shape {self.shape!r}")
        object.__setattr__(self, "shape", tuple(int(d) for d in self.shape))
        if not 0.0 < float(self.lam) < 1.0:
            raise BoxKeyError(f"lambda must be in (0, 1), got {self.lam}")

    @classmethod
    def generate(cls, shape: tuple[int, ...] | list[int], lam: float = 0.5) -> BoxKey:
        return cls(seed=secrets.token_bytes(SEED_BYTES), shape=tuple(shape), lam=lam)

    @classmethod
    def from_int_seed(cls, seed: int, shape: tuple[int, ...] | list[int], lam: float = 0.5) -> BoxKey:
        """A deterministic key for tests and reproducible experiments (never for production boxes)."""
        return cls(seed=hashlib.sha256(f"sdb-test-key:{seed}".encode()).digest(), shape=tuple(shape), lam=lam)

    def pattern(self, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> Tensor:
        """The key pattern (standard-normal, like a normalized input), reproducible from the seed."""
        return _pattern_cpu(self.seed, self.shape).to(device=device or "cpu", dtype=dtype, copy=True)

    def apply(self, x: Tensor) -> Tensor:
        """lam * x + (1 - lam) * pattern, for already-normalized x of shape [..., *shape]."""
        n = len(self.shape)
        if tuple(x.shape[-n:]) != self.shape:
            raise ValueError(f"input shape {tuple(x.shape)} does not end with the key shape {self.shape}")
        return self.lam * x + (1.0 - self.lam) * self.pattern(x.device, x.dtype)

    def digest(self) -> str:
        """A one-way fingerprint (sha256 of the canonical key record) for integrity checks."""
        return hashlib.sha256(_canonical(self).encode()).hexdigest()

    def __str__(self) -> str:
        return repr(self)


@lru_cache(maxsize=64)
def _pattern_cpu(seed: bytes, shape: tuple[int, ...]) -> Tensor:
    # numpy's PCG64 stream from a SeedSequence is stable across platforms, unlike torch's RNG across devices.
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence(int.from_bytes(seed, "big"))))
    return torch.from_numpy(rng.standard_normal(shape).astype(np.float32))


def _record(key: BoxKey) -> dict[str, object]:
    return {
        "format": KEY_FORMAT,
        "version": KEY_FORMAT_VERSION,
        "seed": key.seed.hex(),
        "shape": list(key.shape),
        "lam": float(key.lam),
    }


def _canonical(key: BoxKey) -> str:
    return json.dumps(_record(key), sort_keys=True, separators=(",", ":"))


def key_record_bytes(key: BoxKey) -> bytes:
    """The content of a key file (what `save_key` writes), for sealing it without writing it in the clear."""
    return (json.dumps(_record(key), indent=2) + "\n").encode()


def save_key(key: BoxKey, path: str | os.PathLike[str]) -> None:
    """Write the key as JSON, readable by the owner only (0600)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(p.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(_record(key), f, indent=2)
        f.write("\n")
    os.replace(tmp, p)


def key_from_json(text: str) -> BoxKey:
    """Parse a key record (the content of a key file, e.g. from a secret store)."""
    try:
        rec = json.loads(text)
    except json.JSONDecodeError:
        raise BoxKeyError("box key file is not valid JSON") from None
    if not isinstance(rec, dict) or rec.get("format") != KEY_FORMAT:
        raise BoxKeyError("box key file has the wrong format")
    if rec.get("version") != KEY_FORMAT_VERSION:
        raise BoxKeyError(f"unsupported box key file version {rec.get('version')!r}")
    try:
        seed = bytes.fromhex(str(rec["seed"]))
        shape = tuple(int(d) for d in rec["shape"])
        lam = float(rec["lam"])
    except (KeyError, TypeError, ValueError):
        raise BoxKeyError("box key file is missing or has malformed fields") from None
    return BoxKey(seed=seed, shape=shape, lam=lam)


def load_key(path: str | os.PathLike[str]) -> BoxKey:
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as e:
        raise BoxKeyError(f"cannot read box key file {p}: {e.strerror}") from None
    return key_from_json(text)
