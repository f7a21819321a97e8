"""Distillation: the labelled mask, querying teachers, and students steered by the teacher."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sdb_core.data import Dataset
from sdb_core.distill import DistillConfig, distill, labelled_mask, query_teacher
from sdb_core.training import TrainConfig, accuracy, model_fn


def test_labelled_mask_fraction_is_exact_and_seeded() -> None:
    m = labelled_mask(1000, 0.1, seed=3)
    assert m.sum() == 100
    assert np.array_equal(m, labelled_mask(1000, 0.1, seed=3))
    assert not np.array_equal(m, labelled_mask(1000, 0.1, seed=4))


def test_query_teacher_batches_raw_inputs() -> None:
    seen: list[int] = []

    def teacher(x: torch.Tensor) -> torch.Tensor:
        seen.append(len(x))
        return torch.zeros(len(x), 3)

    out = query_teacher(teacher, np.zeros((10, 1, 2, 2), dtype=np.float32), batch_size=4)
    assert out.shape == (10, 3) and seen == [4, 4, 2]


def test_query_teacher_rejects_bad_teachers() -> None:
    with pytest.raises(ValueError, match="teacher returned"):
        query_teacher(lambda x: torch.zeros(1, 3), np.zeros((5, 1, 2, 2), dtype=np.float32))


def _oracle(ds: Dataset, correct: bool) -> object:
    """A pluggable teacher: logits from a lookup of the raw inputs (right or systematically wrong labels)."""
    table = {ds.x_train[i].tobytes(): int(ds.y_train[i]) for i in range(len(ds.x_train))}

    def fn(x: torch.Tensor) -> torch.Tensor:
        labels = torch.tensor([table[r.numpy().tobytes()] for r in x])
        if not correct:
            labels = (labels + 1) % 10
        return 6.0 * torch.nn.functional.one_hot(labels, 10).float()

    return fn


def test_teacher_function_steers_the_student(digits: Dataset) -> None:
    ds = digits.subset_train(300, seed=0)
    cfg = DistillConfig(labelled_fraction=0.1, train=TrainConfig(epochs=8, progress=False, device="cpu"))
    good = distill(ds, "mlp", _oracle(ds, True), cfg)  # type: ignore[arg-type]
    bad = distill(ds, "mlp", _oracle(ds, False), cfg)  # type: ignore[arg-type]
    dev = torch.device("cpu")
    acc_good = accuracy(model_fn(good, ds), ds.x_test, ds.y_test, dev)
    acc_bad = accuracy(model_fn(bad, ds), ds.x_test, ds.y_test, dev)
    assert acc_good > 70.0 and acc_bad < acc_good - 30.0


def test_scratch_uses_only_the_labelled_fraction(digits: Dataset) -> None:
    ds = digits.subset_train(300, seed=0)
    cfg = DistillConfig(labelled_fraction=0.05, train=TrainConfig(epochs=2, progress=False, device="cpu"))
    student = distill(ds, "mlp", None, cfg)
    assert isinstance(student, torch.nn.Module)
