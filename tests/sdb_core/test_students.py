"""Students trained on worker processes are the students trained in this process (same seeds, one thread
each): the pool changes where they train, not what they learn."""

from __future__ import annotations

from functools import partial

import numpy as np
import torch
from torch import nn

from sdb_core.data import Dataset
from sdb_core.distill import DistillConfig, distill
from sdb_core.students import Job, StudentJob, StudentPool
from sdb_core.training import TrainConfig


def _same(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def _here_and_there(jobs: list[Job]) -> tuple[list[nn.Module], list[nn.Module]]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        here = StudentPool(1).train(jobs)
    finally:
        torch.set_num_threads(threads)
    with StudentPool(2) as pool:
        there = pool.train(jobs)
    return here, there


def test_the_pool_trains_the_same_students_in_order(digits: Dataset) -> None:
    ds = digits.subset(np.arange(200), "small")
    cfg = DistillConfig(
        alpha=0.9, temperature=4.0, labelled_fraction=0.1, train=TrainConfig(epochs=2, progress=False)
    )
    logits = torch.randn(len(ds.x_train), digits.num_classes, generator=torch.Generator().manual_seed(0))
    jobs: list[Job] = [
        StudentJob(ds, "mlp", {"hidden": 16}, logits, cfg, "kd"),
        StudentJob(ds, "mlp", {"hidden": 16}, None, cfg, "scratch"),
        StudentJob(ds, "mlp", {"hidden": 24}, logits * 2, cfg, "kd wide"),
        partial(distill, ds, "mlp", None, cfg, arch_extra={"hidden": 16}),
    ]
    here, there = _here_and_there(jobs)
    assert len(there) == 4
    assert all(_same(a, b) for a, b in zip(here, there, strict=True))
    assert not _same(here[0], here[1])
    assert _same(here[1], here[3])  # the same student, whichever way the job is written


def test_convolutional_students_too_whatever_the_strides_the_images_came_with(digits: Dataset) -> None:
    """A one-channel array laid out [N, H, W, C] and transposed has a channel stride numpy ignores; torch
    would lay its batches out channels-last, and a copy of the data sent to a worker not: the convolutions
    would round differently there. `Dataset` gives its arrays the canonical strides."""
    x = digits.x_train[:200].transpose(0, 2, 3, 1).copy(order="C").transpose(0, 3, 1, 2)
    assert x.strides[1] != x.strides[0]  # the odd layout (contiguous to numpy all the same)
    ds = Dataset("odd", x, digits.y_train[:200], digits.x_test[:50], digits.y_test[:50], digits.class_names)
    assert ds.x_train.strides == (x.strides[0], x.strides[0], x.shape[3] * 4, 4)
    cfg = DistillConfig(labelled_fraction=0.1, train=TrainConfig(epochs=2, progress=False))
    logits = torch.randn(200, digits.num_classes, generator=torch.Generator().manual_seed(1)) * 5
    jobs: list[Job] = [StudentJob(ds, "small_cnn", {"width": 4}, logits, cfg, "kd")]
    here, there = _here_and_there(jobs)
    assert _same(here[0], there[0])
