"""The reliability tests' box: its name, and the forms in which its box key could leak."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from sdb_core.keys import load_key

MODEL = "test-box"


@dataclass(frozen=True)
class BoxSecrets:
    """Forms in which the box key could leak: its seed (hex, bytes) and its pattern's values."""

    seed_hex: str
    seed: bytes
    pattern_values: tuple[float, ...]

    @classmethod
    def of(cls, key_path: Path) -> BoxSecrets:
        key = load_key(key_path)
        return cls(
            seed_hex=key.seed.hex(),
            seed=key.seed,
            pattern_values=tuple(float(v) for v in key.pattern().flatten().tolist()),
        )
