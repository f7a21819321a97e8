"""Which teacher a student distills from: a normal teacher's checkpoint (normal KD), a local box on one of its
paths, or none (scratch). A remote box is the client's (`sdb.client.remote_teacher`).

Light at import (the CLI builds its options from `BoxPath`); torch and the models load on use.
"""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from sdb_core.artifact import BoxedModel
    from sdb_core.data import Dataset
    from sdb_core.training import TeacherFn


class BoxPath(StrEnum):
    """A box's path: plain (what `/predict` serves), keyed (what a licensee gets), or with a wrong key."""

    plain = "plain"
    keyed = "keyed"
    wrong_key = "wrong-key"


def box_path_teacher(boxed: BoxedModel, path: BoxPath) -> TeacherFn:
    """The teacher function of one path of a loaded box."""
    if path is BoxPath.plain:
        return boxed.plain_logits
    if path is BoxPath.keyed:
        return boxed.keyed_logits
    from sdb_core.box import wrong_key_fn

    fn: TeacherFn = wrong_key_fn(boxed, boxed.manifest["lam"])
    return fn


def local_teacher(
    ds: Dataset,
    device: torch.device,
    *,
    teacher: Path | None = None,
    box_dir: Path | None = None,
    key_path: Path | None = None,
    path: BoxPath = BoxPath.keyed,
) -> tuple[TeacherFn | None, str]:
    """(teacher function, source label) for a teacher checkpoint or a local box; (None, "scratch") for
    neither. Raises ValueError for both."""
    if teacher is not None and box_dir is not None:
        raise ValueError("give a teacher checkpoint or a box, not both")
    if teacher is not None:
        from sdb_core.training import load_model, model_fn

        model, _ = load_model(teacher, device=device)
        return model_fn(model, ds), f"teacher:{teacher}"
    if box_dir is not None:
        from sdb_core.artifact import load_box

        boxed = load_box(box_dir, key_path=key_path, device=device)
        return box_path_teacher(boxed, path), f"box:{box_dir}:{path.value}"
    return None, "scratch"
