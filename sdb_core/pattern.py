"""The second channel of a licensee's watermark: a class pattern on the dark knowledge.

The first channel (`sdb_core.watermark`) moves each row's top-1 probability by a cosine of the image. A
student learns that only as well as it can represent a smooth function of the image, and a `small_cnn:16`
distilled from 10,000 images does not learn it above its own smooth error (research/traceability/NOTES.md).
What every distilled student does learn is the teacher's dark knowledge: which wrong classes each class
resembles. So each licensee also gets a pattern U on the non-top classes, one value per (top-1 class c,
other class k): for a row whose top-1 is c, log p_k += a sqrt(D) U[c, k] for every k != c, and the other
classes are rescaled to keep the top-1 probability as it was (top-1 kept by construction: a row whose
runner-up would overtake it keeps no pattern). U is zero on the diagonal, has zero mean over each row's
non-top entries and unit norm: it lives in a space of D = C (C - 2) dimensions (80 for 10 classes), `a` is
the RMS shift of a non-top log-probability at the mark's temperature.

Issued patterns (slot 0, 1, ...) are orthonormal (keyed by the secret), so one licensee's pattern does not
show as another's. A student's residual R[c, k] (its centred non-top log-probabilities minus the
reference's, averaged over the probes of each reference top-1 class) projects on a pattern it did not learn
like on a random unit vector of that space: about N(0, |R|^2 / D), which the decoys (random patterns)
measure. A student that learned the pattern fully would reach z = sqrt(D), the channel's ceiling. Most of
a student's R is its family's own error; shadow students of the family (clean, distilled on the owner's
images) carry it too, and subtracting theirs instead of the reference's raises a leaker's z
(research/traceability/NOTES.md, fourth round).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import lru_cache

import numpy as np
import torch
from torch import Tensor


def _mask(num_classes: int) -> Tensor:
    """[C, C] bool: the entries (top-1 class c, other class k) a pattern moves: every k != c."""
    return ~torch.eye(num_classes, dtype=torch.bool)


def pattern_dims(num_classes: int) -> int:
    """D = C (C - 2): the dimension of the pattern space (0 for two classes: no pattern fits)."""
    return num_classes * max(num_classes - 2, 0)


def _project(g: Tensor) -> Tensor:
    """[n, C, C] -> zero diagonal and zero mean over each row's off-diagonal entries."""
    c = g.shape[-1]
    m = _mask(c)
    g = g * m
    return (g - g.sum(-1, keepdim=True) / max(c - 1, 1)) * m


def random_patterns(n: int, num_classes: int, rng: np.random.Generator) -> Tensor:
    """n independent uniformly random unit patterns [n, C, C] (float64)."""
    g = _project(torch.from_numpy(rng.standard_normal((n, num_classes, num_classes))))
    return g / g.flatten(1).norm(dim=1).clamp_min(1e-300)[:, None, None]


def orthonormal_patterns(n: int, num_classes: int, rng: np.random.Generator) -> Tensor:
    """min(n, D) mutually orthonormal unit patterns [k, C, C] (Haar-distributed rows of the space)."""
    c = num_classes
    k = min(n, pattern_dims(c))
    if k == 0:
        return torch.zeros(0, c, c, dtype=torch.float64)
    g = _project(torch.from_numpy(rng.standard_normal((k, c, c))))
    q, r = torch.linalg.qr(g.flatten(1).T)
    q = q * torch.sign(torch.diagonal(r))[None, :]
    return _project(q.T.reshape(k, c, c))  # rounding off the space's zeros


@lru_cache(maxsize=8)
def keyed_patterns(seed: int, num_classes: int, n: int) -> tuple[tuple[float, ...], ...]:
    """min(n, D) orthonormal patterns (flattened), deterministic from `seed` (an HMAC of the owner's
    secret): the issued slots' patterns."""
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence(seed)))
    return tuple(tuple(float(v) for v in u.flatten()) for u in orthonormal_patterns(n, num_classes, rng))


def one_pattern(rng: np.random.Generator, num_classes: int) -> tuple[float, ...]:
    """One random unit pattern (flattened); () where no pattern fits (two classes)."""
    if not pattern_dims(num_classes):
        return ()
    return tuple(float(v) for v in random_patterns(1, num_classes, rng)[0].flatten())


def apply_pattern(pattern: Tensor, probs: Tensor, amplitude: float) -> Tensor:
    """`probs` [N, C] with the pattern [C, C] on every row's non-top classes, whose total probability is
    kept (so the top-1 keeps its); rows the pattern would reorder at the top keep their probabilities."""
    p = probs.double()
    d = pattern_dims(p.shape[1])
    if amplitude == 0 or d == 0 or len(p) == 0:
        return probs
    top = p.argmax(dim=1, keepdim=True)
    m = _mask(p.shape[1])[top[:, 0]]
    q = torch.where(m, p * torch.exp(amplitude * math.sqrt(d) * pattern.double()[top[:, 0]]), 0.0)
    mass = (p * m).sum(1, keepdim=True)
    q = torch.where(m, q / q.sum(1, keepdim=True).clamp_min(1e-300) * mass, p)
    p1 = p.gather(1, top)[:, 0]
    kept = (q.scatter(1, top, -1.0).max(dim=1).values < p1) & (mass[:, 0] > 0)
    return torch.where(kept[:, None], q, p).to(probs.dtype)


def centred_log_residual(suspect: Tensor, reference: Tensor, shadows: Sequence[Tensor] = ()) -> Tensor:
    """R [C, C]: per reference top-1 class c, the mean over its probes of the suspect's non-top
    log-probabilities minus the reference's, each centred over the row's non-top classes. With `shadows`
    (clean students' probabilities on the same probes), minus their mean instead of the reference's: what
    is left of a suspect of their family is less of the family's own error (the rows' classes stay the
    reference's top-1, the class each row's pattern was chosen by)."""
    top = reference.argmax(dim=1)
    c = reference.shape[1]
    m = _mask(c)[top]

    def centred(p: Tensor) -> Tensor:
        lp = p.double().clamp_min(1e-30).log()
        return torch.where(m, lp - (lp * m).sum(1, keepdim=True) / max(c - 1, 1), 0.0)

    base = torch.stack([centred(s) for s in shadows]).mean(0) if shadows else centred(reference)
    r = centred(suspect) - base
    sums = torch.zeros(c, c, dtype=torch.float64).index_add_(0, top, r)
    counts = torch.bincount(top, minlength=c).clamp_min(1).double()
    return sums / counts[:, None]


def pattern_statistics(residual: Tensor, patterns: Tensor) -> Tensor:
    """The projection of the residual [C, C] on each pattern [M, C, C]: [M] (raw, before calibration)."""
    return (patterns.double().flatten(1) @ residual.double().flatten()).reshape(-1)


def analytic_scale(residual: Tensor) -> float:
    """|R| / sqrt(D): the spread of the residual's projection on a random unit pattern (the analytic null)."""
    d = pattern_dims(residual.shape[0])
    return max(1e-12, float(residual.double().norm()) / math.sqrt(max(d, 1)))


def analytic_z(raw: Tensor, residual: Tensor) -> Tensor:
    """raw projections scaled to N(0, 1) under a random unit pattern: raw sqrt(D) / |R|."""
    return raw / analytic_scale(residual)
