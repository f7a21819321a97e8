"""Students trained on worker processes are the students trained in this process (same seeds, one thread
each): the pool changes where they train, not what they learn."""

from __future__ import annotations

import numpy as np
import torch

from sdb_core.data import Dataset
from sdb_core.distill import DistillConfig
from sdb_core.trace_students import StudentJob, StudentPool
from sdb_core.training import TrainConfig


def test_the_pool_trains_the_same_students_in_order(digits: Dataset) -> None:
    ds = digits.subset(np.arange(200), "small")
    cfg = DistillConfig(
        alpha=0.9, temperature=4.0, labelled_fraction=0.1, train=TrainConfig(epochs=2, progress=False)
    )
    logits = torch.randn(len(ds.x_train), digits.num_classes, generator=torch.Generator().manual_seed(0))
    jobs = [
        StudentJob(ds, "mlp", {"hidden": 16}, logits, cfg, "kd"),
        StudentJob(ds, "mlp", {"hidden": 16}, None, cfg, "scratch"),
        StudentJob(ds, "mlp", {"hidden": 24}, logits * 2, cfg, "kd wide"),
    ]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        here = StudentPool(1).train(jobs)
    finally:
        torch.set_num_threads(threads)
    with StudentPool(2) as pool:
        there = pool.train(jobs)
    assert len(there) == 3
    for a, b in zip(here, there, strict=True):
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys()
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(here[0].state_dict()["1.weight"], here[1].state_dict()["1.weight"])
