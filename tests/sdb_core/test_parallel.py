"""sdb_core.parallel: batch shards, and fit() on 2 gloo processes against fit() in one process."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from sdb_core import parallel
from sdb_core.data import Dataset
from sdb_core.training import accuracy, model_fn
from sdb_core.zoo import arch_kwargs_for, build_model
from tests._support import parallel as worker


@pytest.mark.parametrize("world", [1, 2, 3, 8])
@pytest.mark.parametrize("n", [0, 1, 7, 64, 65])
def test_shards_cover_a_batch_once_and_evenly(monkeypatch: pytest.MonkeyPatch, world: int, n: int) -> None:
    monkeypatch.setattr(parallel, "world_size", lambda: world)
    parts = []
    for r in range(world):
        monkeypatch.setattr(parallel, "rank", lambda r=r: r)
        parts.append(list(range(n))[parallel.shard(n)])
    assert [i for p in parts for i in p] == list(range(n))
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1


def test_single_process_helpers_do_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert not parallel.launched() and not parallel.active()
    assert parallel.init("cpu") == "cpu"
    assert parallel.shard(5) == slice(0, 5)
    assert parallel.broadcast_object("x") == "x"
    assert torch.equal(parallel.from_main(lambda: torch.ones(2)), torch.ones(2))
    model = torch.nn.Linear(2, 2)
    model(torch.ones(1, 2)).sum().backward()
    before = model.weight.grad.clone()  # type: ignore[union-attr]
    parallel.all_reduce_gradients(model.parameters(), 0.5)
    assert torch.equal(model.weight.grad, before)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def two_rank_states(tmp_path_factory: pytest.TempPathFactory, digits: Dataset) -> Path:
    """fit() on 2 gloo ranks: an mlp for 2 epochs, then a small_cnn (BatchNorm) for 2 epochs."""
    out = tmp_path_factory.mktemp("ddp")
    jobs = [("mlp", 2), ("small_cnn", 2)]
    mp.start_processes(
        worker.worker, args=(2, str(out / "init"), digits, jobs, str(out)), nprocs=2, start_method="spawn"
    )
    return out


@pytest.mark.slow
def test_two_processes_take_the_same_steps_as_one(
    two_rank_states: Path, digits: Dataset, tmp_path: Path
) -> None:
    """Without BatchNorm or randomness in the step, sharded batches + summed weighted gradients are the
    one-process SGD step up to float rounding (the last batch is uneven: 10 + 9 samples)."""
    threads = torch.get_num_threads()
    try:
        worker.train(digits, "mlp", 2, tmp_path / "one.pt")
    finally:
        torch.set_num_threads(threads)
    one = torch.load(tmp_path / "one.pt", weights_only=True)
    r0 = torch.load(two_rank_states / "mlp-rank0.pt", weights_only=True)
    r1 = torch.load(two_rank_states / "mlp-rank1.pt", weights_only=True)
    for k in one:
        assert torch.equal(r0[k], r1[k]), k
        assert torch.allclose(r0[k], one[k], atol=1e-5, rtol=1e-4), (k, (r0[k] - one[k]).abs().max())


@pytest.mark.slow
def test_batchnorm_model_is_the_same_on_both_ranks_and_sane(two_rank_states: Path, digits: Dataset) -> None:
    """Each rank normalizes with its shard's statistics and the running statistics are averaged across ranks:
    both ranks end with the model rank 0 saves, and in eval mode (running statistics) it classifies well."""
    r0 = torch.load(two_rank_states / "small_cnn-rank0.pt", weights_only=True)
    r1 = torch.load(two_rank_states / "small_cnn-rank1.pt", weights_only=True)
    assert r0.keys() == r1.keys()
    for k in r0:
        assert torch.equal(r0[k], r1[k]), k
    assert all((r0[k] > 0).all() for k in r0 if k.endswith("running_var"))
    model = build_model("small_cnn", **arch_kwargs_for(digits.input_shape, digits.num_classes))
    model.load_state_dict(r0)
    top1 = accuracy(model_fn(model, digits), digits.x_test, digits.y_test, torch.device("cpu"))
    assert top1 >= 85.0, top1


@pytest.mark.slow
def test_distill_asks_the_teacher_once_from_rank_0(two_rank_states: Path, digits: Dataset) -> None:
    """A remote teacher sees the requests of one process: rank 0 asks, the answers are broadcast."""
    asked = [json.loads((two_rank_states / f"asked-rank{r}.json").read_text()) for r in (0, 1)]
    assert asked == [len(digits.x_train), 0]
