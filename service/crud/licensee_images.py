"""The images each watermarked API key sent, kept per model as a bottom-k sample of their keyed ranks
(service/watermarks/samples.py computes the ranks; this module only stores and trims)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session

from service.db.models import LicenseeImage


def kth_rank(session: Session, key_id: int, model: str, keep: int) -> int | None:
    """The `keep`-th smallest rank kept for (key, model): an image enters the sample only below it. None
    while fewer than `keep` are kept."""
    q = (
        select(LicenseeImage.rank)
        .where(LicenseeImage.api_key_id == key_id, LicenseeImage.model == model)
        .order_by(LicenseeImage.rank)
        .offset(keep - 1)
        .limit(1)
    )
    v = session.scalar(q)
    return None if v is None else int(v)


def offer(
    session: Session, key_id: int, model: str, images: np.ndarray, ranks: np.ndarray, keep: int
) -> int | None:
    """Add the images (float32 [N, ...]) whose rank is below the current `keep`-th smallest and not kept yet,
    then drop all but the `keep` smallest ranks. Returns the new `keep`-th smallest rank (None while fewer
    are kept). The same image always has the same rank, so a resent image is kept at most once; the result
    does not depend on the order images arrive in."""
    if keep <= 0 or len(images) == 0:
        return kth_rank(session, key_id, model, keep) if keep > 0 else None
    bound = kth_rank(session, key_id, model, keep)
    ranks = np.asarray(ranks, dtype=np.int64)
    chosen: dict[int, int] = {}
    for i in np.argsort(ranks, kind="stable"):
        r = int(ranks[i])
        if (bound is None or r < bound) and r not in chosen:
            chosen[r] = int(i)
        if len(chosen) >= keep:
            break
    if not chosen:
        return bound
    present = set(
        session.scalars(
            select(LicenseeImage.rank).where(
                LicenseeImage.api_key_id == key_id,
                LicenseeImage.model == model,
                LicenseeImage.rank.in_(list(chosen)),
            )
        )
    )
    session.add_all(
        LicenseeImage(
            api_key_id=key_id,
            model=model,
            rank=r,
            image=np.ascontiguousarray(images[i], dtype=np.float32).tobytes(),
        )
        for r, i in chosen.items()
        if r not in present
    )
    session.flush()
    new_bound = kth_rank(session, key_id, model, keep)
    if new_bound is not None:
        session.execute(
            delete(LicenseeImage).where(
                LicenseeImage.api_key_id == key_id,
                LicenseeImage.model == model,
                LicenseeImage.rank > new_bound,
            )
        )
    return new_bound


def kept_images(session: Session, key_ids: Sequence[int], model: str, limit: int) -> dict[int, list[bytes]]:
    """Each key's kept images for `model` (raw float32 bytes), smallest ranks first, at most `limit` each."""
    out: dict[int, list[bytes]] = {}
    if not key_ids or limit <= 0:
        return out
    rows = session.execute(
        select(LicenseeImage.api_key_id, LicenseeImage.image)
        .where(LicenseeImage.api_key_id.in_(list(key_ids)), LicenseeImage.model == model)
        .order_by(LicenseeImage.api_key_id, LicenseeImage.rank)
    )
    for key_id, image in rows:
        kept = out.setdefault(int(key_id), [])
        if len(kept) < limit:
            kept.append(bytes(image))
    return out


def kept_counts(session: Session, model: str | None = None) -> dict[int, int]:
    """How many images are kept per key (for `model`, or over all models)."""
    q = select(LicenseeImage.api_key_id, func.count()).group_by(LicenseeImage.api_key_id)
    if model is not None:
        q = q.where(LicenseeImage.model == model)
    return {int(k): int(n) for k, n in session.execute(q)}
