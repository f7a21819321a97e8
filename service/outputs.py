"""The numbers of an answer: one numerically stable softmax (float64 inside, float32 out), always finite."""

from __future__ import annotations

import numpy as np

# With logits bounded by float32 (|l| < 3.5e38) and T >= MIN_TEMPERATURE, logits / T stays finite in float64.
MIN_TEMPERATURE = 0.01
MAX_TEMPERATURE = 1000.0


class NonFiniteOutputs(ValueError):
    """The model's outputs for these inputs are not finite (e.g. inputs near the float32 limit)."""


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """softmax(logits / temperature) per row, computed in float64 after subtracting the row maximum.

    Raises NonFiniteOutputs when a logit is NaN or infinite: no answer ever holds a NaN or an infinity.
    """
    if not np.isfinite(logits).all():
        raise NonFiniteOutputs("the model's outputs for these inputs are not finite (values too large?)")
    z = logits.astype(np.float64) / temperature
    z -= z.max(axis=1, keepdims=True)
    e = np.exp(z)
    out: np.ndarray = (e / e.sum(axis=1, keepdims=True)).astype(np.float32)
    return out


def top_k_indices(probs: np.ndarray, k: int) -> np.ndarray:
    """The k most probable classes of each row, most probable first (ties: lower index first)."""
    return np.argsort(-probs, axis=1, kind="stable")[:, : min(k, probs.shape[1])]
