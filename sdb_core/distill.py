"""Hinton knowledge distillation from any teacher function, and the scratch baseline.

A `TeacherFn` maps a batch of RAW inputs [N, *input_shape] to logits: a local model, a box's plain or keyed
path, a box fed a wrong key, or the HTTP API (`sdb.client.remote_teacher`). Without augmentation the
teacher is queried once per training sample (the API customer's setting); with augmentation, per batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from sdb_core import parallel
from sdb_core.data import Dataset
from sdb_core.losses import hinton_kd_loss
from sdb_core.training import TeacherFn, TrainConfig, fit, resolve_device, seed_everything
from sdb_core.zoo import arch_kwargs_for, build_model

__all__ = ["DistillConfig", "TeacherFn", "distill", "distill_logits", "labelled_mask", "query_teacher"]


@dataclass
class DistillConfig:
    alpha: float = 0.9
    temperature: float = 4.0
    labelled_fraction: float = 1.0  # < 1: the transfer set's labels are mostly unknown (CE on this fraction)
    teacher_batch_size: int = 256
    teacher_progress: bool = False  # a progress bar while the teacher answers (a remote one takes a while)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=40, lr=0.05))


def labelled_mask(n: int, fraction: float, seed: int) -> np.ndarray:
    """Which training samples keep their label (a fixed random subset of size round(fraction * n))."""
    mask = np.zeros(n, dtype=bool)
    k = max(1, round(fraction * n)) if fraction > 0 else 0
    mask[np.random.default_rng(seed + 7919).permutation(n)[:k]] = True
    return mask


def query_teacher(teacher: TeacherFn, x: np.ndarray, batch_size: int = 256, progress: bool = False) -> Tensor:
    """The teacher's logits for every sample of x (RAW inputs), on CPU as float32."""
    outs = []
    starts = range(0, len(x), batch_size)
    for s in tqdm(starts, desc="teacher", disable=not progress, leave=False):
        with torch.no_grad():
            outs.append(teacher(torch.from_numpy(x[s : s + batch_size])).float().cpu())
    out = torch.cat(outs)
    if out.shape[0] != len(x) or out.dim() != 2:
        raise ValueError(f"teacher returned logits of shape {tuple(out.shape)} for {len(x)} inputs")
    return out


def distill(
    ds: Dataset,
    arch: str,
    teacher: TeacherFn | None,
    cfg: DistillConfig,
    *,
    arch_extra: dict[str, Any] | None = None,
    desc: str = "student",
) -> nn.Module:
    """Train a student of `arch` on ds's training split; `teacher=None` trains the scratch baseline
    (CE on the labelled fraction only)."""
    if teacher is not None and not cfg.train.augment:
        # Under torchrun rank 0 asks the teacher once and sends the answers to the other ranks.
        logits = parallel.from_main(
            lambda: query_teacher(teacher, ds.x_train, cfg.teacher_batch_size, cfg.teacher_progress)
        )
        return distill_logits(ds, arch, logits, cfg, arch_extra=arch_extra, desc=desc)
    student, mask = _new_student(ds, arch, cfg, arch_extra)
    if teacher is not None:  # augmented batches: the teacher is asked about each one
        return _fit_kd(ds, student, None, teacher, cfg, mask, desc)
    keep = mask.cpu().numpy()
    sub = Dataset(
        ds.name, ds.x_train[keep], ds.y_train[keep], ds.x_test, ds.y_test, ds.class_names, ds.mean, ds.std
    )

    def ce_step(idx: Tensor, xb: Tensor, yb: Tensor) -> Tensor:
        return F.cross_entropy(student(xb), yb)

    # Same number of optimizer steps as the KD students would see over the full transfer set.
    scratch_cfg = cfg.train
    if keep.sum() < len(keep):
        factor = max(1, round(len(keep) / max(int(keep.sum()), 1)))
        scratch_cfg = TrainConfig(**{**cfg.train.__dict__, "epochs": cfg.train.epochs * factor})
    return fit(student, sub, ce_step, scratch_cfg, desc=desc)


def distill_logits(
    ds: Dataset,
    arch: str,
    logits: Tensor,
    cfg: DistillConfig,
    *,
    arch_extra: dict[str, Any] | None = None,
    desc: str = "student",
) -> nn.Module:
    """`distill` from teacher logits already computed for every training sample (one query per sample,
    shared by every student that learns from the same answers)."""
    if logits.shape[0] != len(ds.x_train):
        raise ValueError(f"{logits.shape[0]} teacher logits for {len(ds.x_train)} training samples")
    student, mask = _new_student(ds, arch, cfg, arch_extra)
    return _fit_kd(ds, student, logits.to(mask.device), None, cfg, mask, desc)


def _new_student(
    ds: Dataset, arch: str, cfg: DistillConfig, arch_extra: dict[str, Any] | None
) -> tuple[nn.Module, Tensor]:
    """A freshly seeded student of `arch` and the mask of training samples whose label is known."""
    seed_everything(cfg.train.seed)
    student = build_model(arch, **arch_kwargs_for(ds.input_shape, ds.num_classes, **(arch_extra or {})))
    mask = labelled_mask(len(ds.x_train), cfg.labelled_fraction, cfg.train.seed)
    return student, torch.from_numpy(mask).to(resolve_device(cfg.train.device))


def _fit_kd(
    ds: Dataset,
    student: nn.Module,
    precomputed: Tensor | None,
    teacher: TeacherFn | None,
    cfg: DistillConfig,
    mask_t: Tensor,
    desc: str,
) -> nn.Module:
    device = resolve_device(cfg.train.device)

    def kd_step(idx: Tensor, xb: Tensor, yb: Tensor) -> Tensor:
        idx = idx.to(device)
        if precomputed is not None:
            t_logits = precomputed[idx]
        else:  # augmented batch: ask the teacher about exactly what the student sees (raw scale)
            assert teacher is not None
            mean = torch.tensor(ds.mean, device=device).view(-1, 1, 1)
            std = torch.tensor(ds.std, device=device).view(-1, 1, 1)
            t_logits = teacher((xb * std + mean).cpu()).float().to(device)
        labelled = None if cfg.labelled_fraction >= 1.0 else mask_t[idx]
        return hinton_kd_loss(student(xb), t_logits, yb, cfg.alpha, cfg.temperature, labelled)

    return fit(student, ds, kd_step, cfg.train, desc=desc)
