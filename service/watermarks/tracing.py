"""One trace, shared by `sdb trace` and POST /admin/trace: every watermark ever issued (from the database)
tested on a suspect's answers to probe images, against the box's own keyed answers. A key with at least
`MIN_OWN_IMAGES` images of its own kept (service/watermarks/samples.py) is tested on those, where a student
it taught carries its mark far more; the others on the owner's probe images.

The reference is the served box's keyed path at temperature 1 with no watermark (what every licensee's
labels start from); `sdb_core.trace` does the statistics (matched filter, analytic null, decoys, Holm).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any

import numpy as np
import torch
from torch import Tensor

from sdb_core.trace import TraceConfig, trace_licensees
from service.crud.watermarks import IssuedWatermark
from service.watermarks.issuer import Shape, Watermarker

ProbFn = Callable[[Tensor], Any]  # raw inputs -> probabilities [N, C] (tensor or array)
MIN_OWN_IMAGES = 100  # fewer kept images of its own: the key is tested on the owner's probes


class NothingToTrace(ValueError):
    """No API key was ever watermarked: there is nothing to test a suspect against."""


class WatermarkMismatch(ValueError):
    """The watermark secret in use does not give the watermark ids stored on the keys."""


@dataclass(frozen=True)
class KeyVerdict:
    """One issued watermark's result, with the key and user it belongs to."""

    watermark_id: str
    key_id: int
    key_prefix: str
    key_name: str | None
    user_id: int
    user_name: str
    key_state: str  # active, revoked, expired, watermark off
    statistic: float | None
    log10_p: float | None
    p_value: float
    log10_corrected_p: float | None
    corrected_p: float
    verdict: str  # "match" or "no evidence"
    rank: int
    decoys_above: int
    own_images: int  # the key's own images it was tested on; 0: the owner's probe images
    top1_statistic: float | None = None  # the channels' z (statistic is the larger)
    pattern_statistic: float | None = None


def key_state(w: IssuedWatermark, now: datetime) -> str:
    if w.revoked_at is not None:
        return "revoked"
    if w.expires_at is not None and w.expires_at <= now:
        return "expired"
    return "active" if w.watermarked else "watermark off"


def _as_tensor_fn(fn: ProbFn) -> Callable[[Tensor], Tensor]:
    return lambda x: torch.as_tensor(fn(x))


def run_trace(
    *,
    suspect: ProbFn,
    reference: ProbFn,
    probes: np.ndarray,
    issued: Sequence[IssuedWatermark],
    marks: Watermarker,
    model: Shape,
    cfg: TraceConfig,
    now: datetime,
    decoy_secret: bytes | None = None,
    suspect_name: str = "",
    own_images: Mapping[int, np.ndarray] | None = None,
    shadows: Sequence[ProbFn] = (),
) -> dict[str, Any]:
    """The report: one row per issued watermark (best first), the matches, and the decoys' check.
    `own_images`: key id -> the images that key sent (`samples.images_of`); `cfg.probes` bounds the
    queries to the suspect in all (`sdb_core.trace.trace_licensees`). `shadows`: clean students of the
    suspect's presumed family, for the class pattern channel (`sdb_core.trace.trace`)."""
    if not issued:
        raise NothingToTrace("no API key was ever watermarked: nothing to trace a suspect against")
    bad = marks.mismatched((w.key_id, w.prefix, w.watermark_id) for w in issued)
    if bad:
        raise WatermarkMismatch(
            f"{len(bad)} of {len(issued)} watermarked keys were issued under another watermark secret (keys "
            f"{', '.join(map(str, bad[:10]))}): use the secret the service had (SDB_WATERMARK_SECRET, _FILE, "
            "or the SDB_JWT_SECRET it was derived from)"
        )
    watermarks = [marks.watermark(w.key_id, w.prefix, w.slot, model) for w in issued]
    shared = torch.from_numpy(np.ascontiguousarray(probes, dtype=np.float32))
    own = {
        k: torch.from_numpy(np.ascontiguousarray(v, dtype=np.float32))
        for k, v in (own_images or {}).items()
        if len(v) >= MIN_OWN_IMAGES
    }
    probe_sets = [own.get(w.key_id, shared) for w in issued]
    report = trace_licensees(
        _as_tensor_fn(suspect),
        _as_tensor_fn(reference),
        probe_sets,
        watermarks,
        cfg,
        decoy_secret=decoy_secret,
        watermark_cfg=marks.config(model),
        shadows=[_as_tensor_fn(fn) for fn in shadows],
    )
    rows: list[KeyVerdict] = []
    for r, w in zip(report.results, issued, strict=True):  # results come in the order of `watermarks`
        rows.append(
            KeyVerdict(
                watermark_id=w.watermark_id,
                key_id=w.key_id,
                key_prefix=w.prefix,
                key_name=w.key_name,
                user_id=w.user_id,
                user_name=w.user_name,
                key_state=key_state(w, now),
                statistic=_finite(r.statistic),
                log10_p=_finite(r.log10_p),
                p_value=r.p_value,
                log10_corrected_p=_finite(r.log10_corrected_p),
                corrected_p=r.corrected_p,
                verdict=r.verdict,
                rank=r.rank,
                decoys_above=r.decoys_above,
                own_images=r.probes if w.key_id in own else 0,
                top1_statistic=_finite(r.top1_statistic),
                pattern_statistic=None if r.pattern_statistic is None else _finite(r.pattern_statistic),
            )
        )
    rows.sort(key=lambda v: v.rank)
    summary = report.to_dict()
    return {
        "model": model.name,
        "suspect": suspect_name,
        "probes": report.probes,
        "alpha": report.alpha,
        "correction": report.correction,
        "watermarks_tested": len(rows),
        "matches": [asdict(v) for v in rows if v.verdict == "match"],
        "keys": [asdict(v) for v in rows],
        "decoys": {
            (k.removeprefix("decoy_") if k != "decoys" else "count"): summary[k]
            for k in (
                "decoys",
                "decoy_false_positive_rate",
                "decoy_false_positive_rate_corrected",
                "decoy_ks",
                "null",
                "null_location",
                "null_scale",
                "decoy_z_mean",
                "decoy_z_std",
            )
        },
    }


def _finite(v: float) -> float | None:
    return float(v) if np.isfinite(v) else None


def keyed_reference(keyed_logits: Callable[[Tensor], Tensor]) -> Callable[[Tensor], Tensor]:
    """The box's keyed path at temperature 1, without any watermark: the clean reference."""

    def ref(x: Tensor) -> Tensor:
        with torch.inference_mode():
            return torch.softmax(keyed_logits(x).float(), dim=1)

    return ref


def probe_images(x_pool: np.ndarray, n: int, seed: int) -> np.ndarray:
    """`n` probe images drawn without replacement from the owner's pool (all of it when n is larger)."""
    rng = np.random.default_rng(seed)
    idx = rng.permutation(len(x_pool))[: min(n, len(x_pool))]
    return np.ascontiguousarray(x_pool[np.sort(idx)], dtype=np.float32)
