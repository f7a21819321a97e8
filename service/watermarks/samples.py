"""Each watermarked API key's own images: a sample of what it sent to /distill-batch, kept per model, that
`sdb trace` and POST /admin/trace probe a suspect with for that key.

Why: a student reproduces its licensee's mark on the images it was taught on far more than on fresh ones
(docs/traceability.md, "Tracing on the licensee's own images"). Which images: every image gets a rank, the
first 63 bits of HMAC-SHA256 under a key derived from the watermark secret, and a key keeps the `keep`
smallest ranks it ever sent per model (a bottom-k sample): a uniform sample of the distinct images sent, the
same whatever order they come in, and one a licensee can neither predict nor steer without the secret.
A call adds to the sample after its answer is committed; once the sample is full, only images ranked below
the current k-th (a fraction k/n of the n sent) reach the database, and this process remembers that bound.

These are licensee data: kept only for keys whose soft labels are watermarked, only `SDB_LICENSEE_IMAGES`
of them per key and model (0 keeps none), read only by a trace, deleted with the key's user.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import threading
from collections.abc import Sequence

import numpy as np

from service.crud import licensee_images as crud
from service.db.session import Database

logger = logging.getLogger(__name__)

RANK_LABEL = "sdb-licensee-images"


class LicenseeImages:
    """Keeps the per-key image samples of one process (thread-safe); `images_of` reads them back."""

    def __init__(self, db: Database, key: bytes, keep: int) -> None:
        """`key`: the ranks' HMAC key, `Watermarker.derived_key(RANK_LABEL)` (the secret stays there)."""
        self.db = db
        self.keep = keep
        self._key = key
        self._bounds: dict[tuple[int, str], int] = {}  # (key id, model) -> k-th smallest rank kept
        self._lock = threading.Lock()

    def ranks(self, x: np.ndarray) -> np.ndarray:
        """The keyed rank of every image of x [N, ...] (int64, >= 0)."""
        rows = np.ascontiguousarray(x, dtype=np.float32).reshape(len(x), -1)
        return np.array(
            [
                int.from_bytes(hmac.new(self._key, r.tobytes(), hashlib.sha256).digest()[:8], "big") >> 1
                for r in rows
            ],
            dtype=np.int64,
        )

    def offer(self, key_id: int, model: str, x: np.ndarray) -> None:
        """Add what belongs in the key's sample of the images x [N, ...] it sent for `model`."""
        if self.keep <= 0 or len(x) == 0:
            return
        ranks = self.ranks(x)
        with self._lock:
            bound = self._bounds.get((key_id, model))
        if bound is not None and not (ranks < bound).any():
            return
        with self.db.write() as s:
            new = crud.offer(s, key_id, model, x, ranks, self.keep)
        if new is not None:
            with self._lock:
                self._bounds[(key_id, model)] = new

    def offer_safely(self, key_id: int, model: str, x: np.ndarray) -> None:
        """`offer` after a call was answered: a failure is logged, never raised (the call is settled)."""
        try:
            self.offer(key_id, model, x)
        except Exception as exc:  # the database, usually; the sample can miss a call
            logger.warning("licensee images not kept for key %s: %s", key_id, type(exc).__name__)


def images_of(
    db: Database, key_ids: Sequence[int], model: str, input_shape: tuple[int, ...], limit: int
) -> dict[int, np.ndarray]:
    """Each key's kept images for `model` as float32 [n, *input_shape], smallest ranks first, at most
    `limit` each (keys with none left out)."""
    if limit <= 0:
        return {}
    with db.session() as s:
        kept = crud.kept_images(s, key_ids, model, limit)
    size = int(np.prod(input_shape)) * 4
    out = {}
    for key_id, blobs in kept.items():
        blobs = [b for b in blobs if len(b) == size]  # a model whose input shape changed keeps none
        if blobs:
            out[key_id] = np.frombuffer(b"".join(blobs), dtype=np.float32).reshape(len(blobs), *input_shape)
    return out
