"""Datasets: the digits split, CIFAR pickle directories (no code in pickles), npz files, dataset specs."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest

from sdb_core.data import DataError, Dataset, load_cifar10, load_cifar100, load_dataset, load_npz


def test_digits_split_is_fixed(digits: Dataset) -> None:
    assert digits.input_shape == (1, 8, 8) and digits.num_classes == 10
    assert len(digits.x_train) + len(digits.x_test) == 1797
    assert digits.x_train.dtype == np.float32 and digits.x_train.max() <= 16
    assert load_dataset("digits").digest() == digits.digest()
    assert len(digits.normalization["mean"]) == 1


def _batch(n: int, rng: np.random.Generator, label_key: bytes, classes: int) -> dict[bytes, object]:
    return {
        b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
        label_key: rng.integers(0, classes, n).tolist(),
    }


def test_cifar10_pickle_directory(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    for i in (1, 2):
        (tmp_path / f"data_batch_{i}").write_bytes(pickle.dumps(_batch(6, rng, b"labels", 10)))
    (tmp_path / "test_batch").write_bytes(pickle.dumps(_batch(4, rng, b"labels", 10)))
    names = [f"c{i}".encode() for i in range(10)]
    (tmp_path / "batches.meta").write_bytes(pickle.dumps({b"label_names": names}))
    ds = load_cifar10(tmp_path)
    assert ds.x_train.shape == (12, 3, 32, 32) and ds.x_test.shape == (4, 3, 32, 32)
    assert ds.class_names[3] == "c3" and ds.x_train.min() >= 0.0 and ds.x_train.max() <= 1.0
    assert len(ds.mean) == 3
    assert load_dataset(f"cifar10:{tmp_path}").digest() == ds.digest()


def test_cifar100_pickle_directory(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    (tmp_path / "train").write_bytes(pickle.dumps(_batch(8, rng, b"fine_labels", 100)))
    (tmp_path / "test").write_bytes(pickle.dumps(_batch(3, rng, b"fine_labels", 100)))
    (tmp_path / "meta").write_bytes(
        pickle.dumps({b"fine_label_names": [f"n{i}".encode() for i in range(100)]})
    )
    ds = load_cifar100(tmp_path)
    assert ds.num_classes == 100 and ds.x_train.shape == (8, 3, 32, 32) and len(ds.y_test) == 3


class _Evil:
    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (print, ("pwned",))


def test_cifar_loader_refuses_code_in_pickles(tmp_path: Path) -> None:
    (tmp_path / "data_batch_1").write_bytes(pickle.dumps({b"data": _Evil(), b"labels": [0]}))
    with pytest.raises(DataError, match="refusing to unpickle"):
        load_cifar10(tmp_path)


def test_npz_with_x_y_is_split(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    x = rng.random((50, 6, 6), dtype=np.float32)
    y = np.repeat(np.arange(5), 10)
    np.savez(tmp_path / "d.npz", x=x, y=y)
    ds = load_npz(tmp_path / "d.npz")
    assert ds.input_shape == (1, 6, 6) and len(ds.x_train) == 40 and len(ds.x_test) == 10
    assert ds.num_classes == 5
    assert load_dataset(str(tmp_path / "d.npz")).digest() == ds.digest()


def test_npz_with_explicit_split_and_channels_last(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    np.savez(
        tmp_path / "d.npz",
        x_train=rng.random((8, 4, 4, 3)),
        y_train=np.arange(8) % 2,
        x_test=rng.random((2, 4, 4, 3)),
        y_test=np.array([0, 1]),
        class_names=np.array(["a", "b"]),
    )
    ds = load_npz(tmp_path / "d.npz")
    assert ds.input_shape == (3, 4, 4) and ds.class_names == ["a", "b"]


def test_npz_without_arrays_fails_clearly(tmp_path: Path) -> None:
    np.savez(tmp_path / "d.npz", a=np.zeros(3))
    with pytest.raises(DataError, match="needs arrays"):
        load_npz(tmp_path / "d.npz")


def test_unknown_dataset_spec() -> None:
    with pytest.raises(DataError, match="unknown dataset"):
        load_dataset("imagenet")


# ---------------------------------------------------------------- IDX (the MNIST format) and Fashion-MNIST


def _idx_bytes(a: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, a.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in a.shape)
    return header + a.astype(np.uint8).tobytes()


def _write_idx_dir(d: Path, n_train: int = 12, n_test: int = 5, compress: bool = True) -> None:
    import gzip

    rng = np.random.default_rng(0)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28)),
        "train-labels-idx1-ubyte": np.arange(n_train) % 10,
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28)),
        "t10k-labels-idx1-ubyte": np.arange(n_test) % 10,
    }
    d.mkdir(parents=True, exist_ok=True)
    for name, a in arrays.items():
        raw = _idx_bytes(a)
        if compress:
            (d / f"{name}.gz").write_bytes(gzip.compress(raw))
        else:
            (d / name).write_bytes(raw)


@pytest.mark.parametrize("compress", [True, False])
def test_idx_directory(tmp_path: Path, compress: bool) -> None:
    _write_idx_dir(tmp_path, compress=compress)
    ds = load_dataset(f"idx:{tmp_path}")
    assert ds.x_train.shape == (12, 1, 28, 28) and ds.x_test.shape == (5, 1, 28, 28)
    assert ds.x_train.dtype == np.float32 and ds.x_train.min() >= 0.0 and ds.x_train.max() <= 1.0
    assert list(ds.y_train[:3]) == [0, 1, 2] and ds.num_classes == 10
    fm = load_dataset(f"fashion-mnist:{tmp_path}")
    assert fm.name == "fashion-mnist" and fm.class_names[0] == "T-shirt/top" and fm.digest() == ds.digest()


def test_idx_errors_are_clear(tmp_path: Path) -> None:
    from sdb_core.data import read_idx

    bad = tmp_path / "bad"
    bad.write_bytes(b"\x01\x02\x08\x01" + (3).to_bytes(4, "big") + b"abc")
    with pytest.raises(DataError, match="magic"):
        read_idx(bad)
    short = tmp_path / "short"
    short.write_bytes(bytes([0, 0, 0x08, 2]) + (3).to_bytes(4, "big") + (4).to_bytes(4, "big") + b"x" * 5)
    with pytest.raises(DataError, match=r"\(3, 4\).*12 bytes.*has 5"):
        read_idx(short)
    odd = tmp_path / "odd"
    odd.write_bytes(bytes([0, 0, 0x07, 1]) + (1).to_bytes(4, "big") + b"x")
    with pytest.raises(DataError, match="data type"):
        read_idx(odd)
    # image and label counts must agree
    d = tmp_path / "mismatch"
    _write_idx_dir(d)
    (d / "t10k-labels-idx1-ubyte.gz").unlink()
    (d / "t10k-labels-idx1-ubyte").write_bytes(_idx_bytes(np.zeros(4)))
    with pytest.raises(DataError, match="5 test images but 4 labels"):
        load_dataset(f"idx:{d}")
    with pytest.raises(DataError, match="t10k-images"):
        (d / "t10k-images-idx3-ubyte.gz").unlink()
        load_dataset(f"idx:{d}")


def test_missing_fashion_mnist_says_what_to_install(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="apt-get install dataset-fashion-mnist"):
        load_dataset(f"fashion-mnist:{tmp_path / 'nowhere'}")


@pytest.mark.slow
@pytest.mark.skipif(
    not Path("/usr/share/datasets/fashion-mnist").is_dir(), reason="dataset-fashion-mnist is not installed"
)
def test_installed_fashion_mnist() -> None:
    ds = load_dataset("fashion-mnist")
    assert ds.x_train.shape == (60_000, 1, 28, 28) and ds.x_test.shape == (10_000, 1, 28, 28)
    assert np.bincount(ds.y_test).tolist() == [1000] * 10
    assert ds.class_names[-1] == "Ankle boot"
