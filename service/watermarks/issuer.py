"""The per-API-key watermark of /distill-batch: derived from the watermark secret and the key, applied to
the keyed soft labels after the softmax at the requested temperature (top-1 unchanged), cached per model.

A key's licensee string is `api-key:<id>:<prefix>`: the id names the row, and the prefix (random per key)
keeps two keys apart even when a rebuilt database hands out the same id again under the same secret.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import threading
from collections import OrderedDict
from collections.abc import Iterable
from typing import Any, Protocol

import numpy as np
import torch

from sdb_core.watermark import (
    Watermark,
    WatermarkBasis,
    WatermarkConfig,
    apply_watermark,
    bank_size,
    basis_from_manifest,
    config_from_manifest,
    derive_watermark,
    watermark_id,
)
from service.watermarks.secret import WatermarkSecret

logger = logging.getLogger(__name__)

CACHE_SIZE = 4096  # derived watermarks kept (one per key and model in use)
TINY = float(np.finfo(np.float32).tiny)


class Shape(Protocol):
    """What deriving a model's watermark needs to know of it (a ServedModel, a BoxedModel)."""

    @property
    def name(self) -> str: ...
    @property
    def input_shape(self) -> tuple[int, ...]: ...
    @property
    def num_classes(self) -> int: ...


def _manifest(model: object) -> dict[str, Any] | None:
    manifest = getattr(model, "manifest", None) or getattr(getattr(model, "box", None), "manifest", None)
    return manifest if isinstance(manifest, dict) else None


def basis_of(model: object) -> WatermarkBasis | None:
    """The box's fitted watermark basis from its manifest (a BoxedModel, or a ServedModel's box); None for
    boxes made before watermarks (the data-free default basis then)."""
    manifest = _manifest(model)
    return basis_from_manifest(manifest) if manifest is not None else None


def config_of(model: object) -> WatermarkConfig:
    """The watermark configuration the box records; the legacy one for boxes that record none."""
    manifest = _manifest(model)
    return config_from_manifest(manifest if manifest is not None else {})


def licensee(key_id: int, prefix: str) -> str:
    return f"api-key:{int(key_id)}:{prefix}"


class Watermarker:
    """Derives, caches and applies the watermarks of one process (thread-safe)."""

    def __init__(
        self, secret: WatermarkSecret, disabled_models: Iterable[str] = (), cfg: WatermarkConfig | None = None
    ) -> None:
        self._secret = secret.value
        self.source = secret.source
        self.cfg = cfg  # None: each box's own configuration (config_of)
        self.disabled_models = frozenset(disabled_models)
        self.bank_size = bank_size(cfg or WatermarkConfig())
        self._cache: OrderedDict[tuple[int, str, int, str], Watermark] = OrderedDict()
        self._bases: dict[tuple[str, int], tuple[WatermarkBasis | None, WatermarkConfig]] = {}
        self._lock = threading.Lock()

    def __repr__(self) -> str:  # never shows the secret
        return f"Watermarker(source={self.source!r}, disabled_models={sorted(self.disabled_models)})"

    def derived_key(self, label: str) -> bytes:
        """A key for another purpose, HMAC-SHA256(secret, label): the secret itself stays here."""
        return hmac.new(self._secret, label.encode(), hashlib.sha256).digest()

    def watermark_id(self, key_id: int, prefix: str) -> str:
        """The public id of the key's watermark (stored on the key, shown to administrators)."""
        return watermark_id(self._secret, licensee(key_id, prefix))

    def watermark(self, key_id: int, prefix: str, slot: int, model: Shape) -> Watermark:
        """The key's watermark for this model's inputs, classes and basis (derived once, then cached)."""
        k = (int(key_id), prefix, int(slot), model.name)
        with self._lock:
            found = self._cache.get(k)
            if found is not None:
                self._cache.move_to_end(k)
                return found
        wm = derive_watermark(
            self._secret,
            licensee(key_id, prefix),
            input_shape=tuple(model.input_shape),
            num_classes=int(model.num_classes),
            cfg=self.config(model),
            basis=self.basis(model),
            slot=int(slot),
        )
        with self._lock:
            self._cache[k] = wm
            while len(self._cache) > CACHE_SIZE:
                self._cache.popitem(last=False)
        return wm

    def basis(self, model: Shape) -> WatermarkBasis | None:
        """The model's basis, read from its manifest once per model object."""
        return self._read(model)[0]

    def config(self, model: Shape) -> WatermarkConfig:
        """The configuration the model's watermarks are made with: the one given to this Watermarker, else
        the one its box records (read once per model object)."""
        return self.cfg or self._read(model)[1]

    def _read(self, model: Shape) -> tuple[WatermarkBasis | None, WatermarkConfig]:
        k = (model.name, id(model))
        if k not in self._bases:
            self._bases[k] = (basis_of(model), config_of(model))
        return self._bases[k]

    def mismatched(self, keys: Iterable[tuple[int, str, str]]) -> list[int]:
        """Ids of the keys (id, prefix, stored watermark id) whose stored id this secret does not give."""
        return [kid for kid, prefix, stored in keys if self.watermark_id(kid, prefix) != stored]


def apply(wm: Watermark, x: np.ndarray, labels: np.ndarray, served: int = 0) -> np.ndarray:
    """The watermarked soft labels (float32, rows sum to 1). A row whose top-1 the mark would change (a tie
    broken the other way) keeps its unmarked probabilities: the returned top-1 is always the keyed path's."""
    with torch.inference_mode():
        marked = apply_watermark(wm, torch.from_numpy(x), torch.from_numpy(labels), served)
    out = np.ascontiguousarray(marked.detach().cpu().numpy(), dtype=np.float32)
    changed = out.argmax(axis=1) != labels.argmax(axis=1)
    if changed.any():
        out[changed] = labels[changed]
    return out


def consistent_logits(marked: np.ndarray, logits: np.ndarray, temperature: float) -> np.ndarray:
    """Logits whose softmax at `temperature` gives the marked soft labels (T log p), each row shifted to the
    keyed logits' maximum: a watermarked answer never carries the unmarked keyed logits."""
    z = temperature * np.log(np.clip(marked.astype(np.float64), TINY, None))
    z += (logits.max(axis=1, keepdims=True) - z.max(axis=1, keepdims=True)).astype(np.float64)
    return np.ascontiguousarray(z, dtype=np.float32)


def mark_answer(
    marks: Watermarker,
    key_id: int,
    prefix: str,
    slot: int,
    model: Shape,
    x: np.ndarray,
    labels: np.ndarray,
    logits: np.ndarray,
    temperature: float,
    served: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """The /distill-batch answer of a watermarked key: (marked soft labels, logits consistent with them).
    `served`: the samples the key was served before this call (the class pattern starts after a number)."""
    marked = apply(marks.watermark(key_id, prefix, slot, model), x, labels, served)
    return marked, consistent_logits(marked, logits, temperature)
