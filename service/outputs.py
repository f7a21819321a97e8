"""The numbers of an answer: one numerically stable softmax (float64 inside, float32 out)."""

from __future__ import annotations

import numpy as np


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """softmax(logits / temperature) per row, computed in float64 after subtracting the row maximum."""
    z = logits.astype(np.float64) / temperature
    z -= z.max(axis=1, keepdims=True)
    e = np.exp(z)
    out: np.ndarray = (e / e.sum(axis=1, keepdims=True)).astype(np.float32)
    return out
