"""Training: determinism, resuming from checkpoints, model checkpoint round trips."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch

from sdb_core.data import Dataset
from sdb_core.training import TrainConfig, accuracy, load_model, model_fn, save_model, train_classifier


def _small(ds: Dataset) -> Dataset:
    return ds.subset_train(200, seed=0)


def test_training_is_deterministic_and_learns(digits: Dataset) -> None:
    ds = _small(digits)
    cfg = TrainConfig(epochs=4, seed=5, progress=False, device="cpu")
    a, _ = train_classifier(ds, "mlp", cfg)
    b, _ = train_classifier(ds, "mlp", cfg)
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb)
    assert accuracy(model_fn(a, ds), ds.x_test, ds.y_test, torch.device("cpu")) > 50.0  # chance is 10


def test_resume_from_checkpoint_matches_an_uninterrupted_run(digits: Dataset, tmp_path: Path) -> None:
    ds = _small(digits)
    full, _ = train_classifier(ds, "mlp", TrainConfig(epochs=4, seed=1, progress=False, device="cpu"))
    ckpt = tmp_path / "resume.pt"
    partial = TrainConfig(epochs=4, seed=1, progress=False, device="cpu", checkpoint_every=2)
    _interrupted_run(ds, partial, ckpt, stop_after=2)
    resumed, _ = train_classifier(ds, "mlp", partial, checkpoint=ckpt)
    for pa, pb in zip(full.parameters(), resumed.parameters(), strict=True):
        assert torch.allclose(pa, pb, atol=1e-6)


def _interrupted_run(ds: Dataset, cfg: TrainConfig, ckpt: Path, stop_after: int) -> None:
    import sdb_core.training as tr

    original = tr.tqdm

    class Stop(Exception):
        pass

    class Limited:
        def __init__(self, it: range, **kw: object) -> None:
            self.it = it

        def __iter__(self) -> Iterator[int]:
            for i, e in enumerate(self.it):
                if i == stop_after:
                    raise Stop
                yield e

        def set_postfix(self, **kw: object) -> None:
            pass

    tr.tqdm = Limited  # type: ignore[assignment]
    try:
        train_classifier(ds, "mlp", cfg, checkpoint=ckpt)
    except Stop:
        pass
    finally:
        tr.tqdm = original
    assert torch.load(ckpt, weights_only=True)["epoch"] == stop_after


def test_model_checkpoint_round_trip(digits: Dataset, tmp_path: Path) -> None:
    ds = _small(digits)
    model, kwargs = train_classifier(ds, "mlp", TrainConfig(epochs=1, progress=False, device="cpu"))
    save_model(tmp_path / "m", model, arch="mlp", arch_kwargs=kwargs, ds=ds, metrics={"top1": 1.0})
    loaded, meta = load_model(tmp_path / "m")
    x = torch.from_numpy(ds.x_test[:4])
    assert torch.allclose(model_fn(model, ds)(x), model_fn(loaded, ds)(x))
    assert meta["data_digest"] == ds.digest()
