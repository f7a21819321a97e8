"""A `training.fit` worker for tests/sdb_core/test_parallel.py: one rank of a gloo group started by
torch.multiprocessing (a module of its own, so spawned children can import it)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.distributed as dist

from sdb_core.data import Dataset
from sdb_core.distill import DistillConfig, distill
from sdb_core.training import TrainConfig, fit
from sdb_core.zoo import arch_kwargs_for, build_model

N_TRAIN = 1299  # with batch 64 the last global batch has 19 samples: shards of 10 and 9


def train(ds: Dataset, arch: str, epochs: int, out: Path) -> None:
    """fit() a seeded `arch` on `ds` (1 thread) and save its state dict to `out`."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = build_model(arch, **arch_kwargs_for(ds.input_shape, ds.num_classes))
    cfg = TrainConfig(epochs=epochs, batch_size=64, lr=0.05, seed=0, device="cpu", progress=False)

    def step(idx: torch.Tensor, xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(model(xb), yb)

    fit(model, ds, step, cfg, desc=arch, n_train=N_TRAIN)
    torch.save(model.state_dict(), out)


def distill_once(ds: Dataset) -> int:
    """A 1-epoch KD student from a counting teacher; returns how many samples this rank asked it about."""
    asked = 0

    def teacher(x: torch.Tensor) -> torch.Tensor:
        nonlocal asked
        asked += len(x)
        return torch.nn.functional.one_hot(torch.zeros(len(x), dtype=torch.long), ds.num_classes).float()

    cfg = DistillConfig(train=TrainConfig(epochs=1, seed=0, device="cpu", progress=False))
    distill(ds, "mlp", teacher, cfg)
    return asked


def worker(
    rank: int, world: int, init_file: str, ds: Dataset, jobs: list[tuple[str, int]], out_dir: str
) -> None:
    """Each (arch, epochs) job in turn, in one process group; the data set comes pickled from the parent
    (no scikit-learn import in the children)."""
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        for arch, epochs in jobs:
            train(ds, arch, epochs, Path(out_dir) / f"{arch}-rank{rank}.pt")
        asked = distill_once(ds)
        (Path(out_dir) / f"asked-rank{rank}.json").write_text(json.dumps(asked))
    finally:
        dist.destroy_process_group()
