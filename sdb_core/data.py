"""Datasets: the bundled default (scikit-learn's digits, 1x8x8, fixed split), Fashion-MNIST and any data set
in the MNIST IDX format, CIFAR-10/100 python-pickle directories, and `.npz` files with arrays `x` and `y`.

Inputs are kept RAW (float32 [N, C, H, W] in the dataset's native scale: digits 0..16, IDX and CIFAR
pixel/255);
the per-channel normalization computed on the training split travels with every model that uses it.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor


@dataclass(frozen=True)
class DataConfig:
    digits_test_size: int = 497  # 1797 digits -> 1300 train / 497 test
    split_seed: int = 0  # the fixed split; independent of the experiment seeds
    npz_test_fraction: float = 0.2
    fashion_mnist_dir: str = "/usr/share/datasets/fashion-mnist"  # Debian's dataset-fashion-mnist package


CONFIG = DataConfig()


class DataError(ValueError):
    """A dataset could not be read or has an unexpected layout."""


def _c_order(a: np.ndarray, dtype: type) -> np.ndarray:
    """`a` as a C-ordered array of `dtype` with the canonical strides. numpy calls an array whose size-1
    axis has another stride contiguous too, but torch then lays a batch out channels-last, and convolutions
    round differently than on the same array after a copy or a trip through pickle (to a worker process)."""
    a = np.ascontiguousarray(a, dtype=dtype)
    canonical = tuple(int(np.prod(a.shape[i + 1 :])) * a.itemsize for i in range(a.ndim))
    return a if a.strides == canonical else a.copy()


@dataclass
class Dataset:
    name: str
    x_train: np.ndarray  # float32 [N, C, H, W], raw scale
    y_train: np.ndarray  # int64 [N]
    x_test: np.ndarray
    y_test: np.ndarray
    class_names: list[str]
    mean: list[float] = field(default_factory=list)
    std: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        for a, dtype in (
            ("x_train", np.float32),
            ("x_test", np.float32),
            ("y_train", np.int64),
            ("y_test", np.int64),
        ):
            setattr(self, a, _c_order(getattr(self, a), dtype))
        if self.x_train.ndim != 4 or self.x_test.shape[1:] != self.x_train.shape[1:]:
            raise DataError(f"{self.name}: expected x of shape [N, C, H, W], got {self.x_train.shape}")
        if len(self.x_train) != len(self.y_train) or len(self.x_test) != len(self.y_test):
            raise DataError(f"{self.name}: x and y lengths differ")
        if not self.mean:
            self.mean = [float(v) for v in self.x_train.mean(axis=(0, 2, 3))]
            self.std = [max(float(v), 1e-6) for v in self.x_train.std(axis=(0, 2, 3))]

    def subset(self, idx: np.ndarray, name: str) -> Dataset:
        """The training images at `idx` as a data set of their own (same test set and normalization)."""
        return self._with_train(idx, f"{self.name}:{name}")

    def _with_train(self, idx: np.ndarray, name: str) -> Dataset:
        return Dataset(
            name,
            self.x_train[idx],
            self.y_train[idx],
            self.x_test,
            self.y_test,
            self.class_names,
            self.mean,
            self.std,
        )

    @property
    def input_shape(self) -> tuple[int, int, int]:
        c, h, w = self.x_train.shape[1:]
        return (int(c), int(h), int(w))

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def normalization(self) -> dict[str, list[float]]:
        return {"mean": list(self.mean), "std": list(self.std)}

    def normalize(self, x: Tensor) -> Tensor:
        mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(-1, 1, 1)
        std = torch.tensor(self.std, dtype=x.dtype, device=x.device).view(-1, 1, 1)
        return (x - mean) / std

    def digest(self) -> str:
        """sha256 over the exact arrays and labels of both splits (recorded in box manifests)."""
        h = hashlib.sha256()
        for a in (self.x_train, self.y_train, self.x_test, self.y_test):
            h.update(str(a.shape).encode())
            h.update(a.tobytes())
        return h.hexdigest()

    def subset_train(self, n: int, seed: int) -> Dataset:
        """A stratified-enough random subset of the training split (for reduced test configurations)."""
        idx = np.random.default_rng(seed).permutation(len(self.x_train))[:n]
        return self._with_train(idx, self.name)


def _stratified_split(
    x: np.ndarray, y: np.ndarray, test_size: int | float, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    from sklearn.model_selection import train_test_split

    xtr, xte, ytr, yte = train_test_split(x, y, test_size=test_size, random_state=seed, stratify=y)
    return xtr, ytr, xte, yte


def load_digits(config: DataConfig = CONFIG) -> Dataset:
    """scikit-learn's 8x8 digits (1797 images, shipped inside the sklearn package), fixed stratified split."""
    from sklearn.datasets import load_digits as _load

    d = _load()
    x = d.images.astype(np.float32)[:, None, :, :]
    xtr, ytr, xte, yte = _stratified_split(x, d.target, config.digits_test_size, config.split_seed)
    return Dataset("digits", xtr, ytr, xte, yte, [str(i) for i in range(10)])


class _SafeUnpickler(pickle.Unpickler):
    """CIFAR batches are pickles: allow only what they contain (numpy arrays, builtins), never code."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("builtins", "bytes"),
        ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise DataError(f"refusing to unpickle {module}.{name} (not a CIFAR batch)")


def _unpickle(path: Path) -> dict[Any, Any]:
    try:
        with path.open("rb") as f:
            obj = _SafeUnpickler(io.BytesIO(f.read()), encoding="bytes").load()
    except FileNotFoundError:
        raise DataError(f"{path}: not found") from None
    except (pickle.UnpicklingError, EOFError) as e:
        raise DataError(f"{path}: not a valid pickle ({e})") from None
    if not isinstance(obj, dict):
        raise DataError(f"{path}: expected a dict")
    return {(k.decode() if isinstance(k, bytes) else k): v for k, v in obj.items()}


def _names(values: Any) -> list[str]:
    return [v.decode() if isinstance(v, bytes) else str(v) for v in values]


def _cifar_images(batch: dict[Any, Any], path: Path) -> np.ndarray:
    data = np.asarray(batch.get("data"))
    if data.ndim != 2 or data.shape[1] != 3072:
        raise DataError(f"{path}: 'data' must be [N, 3072] uint8")
    return data.reshape(-1, 3, 32, 32).astype(np.float32) / 255.0


def load_cifar10(directory: str | os.PathLike[str]) -> Dataset:
    """The standard `cifar-10-batches-py` directory (data_batch_1..5, test_batch, batches.meta)."""
    d = Path(directory)
    trains = sorted(d.glob("data_batch_*"))
    if not trains:
        raise DataError(f"{d}: no data_batch_* files (expected the cifar-10-batches-py directory)")
    xs, ys = [], []
    for p in trains:
        b = _unpickle(p)
        xs.append(_cifar_images(b, p))
        ys.append(np.asarray(b["labels"]))
    test = _unpickle(d / "test_batch")
    meta = d / "batches.meta"
    names = _names(_unpickle(meta)["label_names"]) if meta.exists() else [str(i) for i in range(10)]
    return Dataset(
        "cifar10",
        np.concatenate(xs),
        np.concatenate(ys),
        _cifar_images(test, d / "test_batch"),
        np.asarray(test["labels"]),
        names,
    )


def load_cifar100(directory: str | os.PathLike[str]) -> Dataset:
    """The standard `cifar-100-python` directory (train, test, meta), fine labels."""
    d = Path(directory)
    train, test = _unpickle(d / "train"), _unpickle(d / "test")
    meta = d / "meta"
    names = _names(_unpickle(meta)["fine_label_names"]) if meta.exists() else [str(i) for i in range(100)]
    return Dataset(
        "cifar100",
        _cifar_images(train, d / "train"),
        np.asarray(train["fine_labels"]),
        _cifar_images(test, d / "test"),
        np.asarray(test["fine_labels"]),
        names,
    )


def _to_nchw(x: np.ndarray, path: Path) -> np.ndarray:
    if x.ndim == 3:
        return x[:, None]
    if x.ndim == 4:
        if x.shape[1] not in (1, 3) and x.shape[3] in (1, 3):
            return x.transpose(0, 3, 1, 2)
        return x
    raise DataError(f"{path}: x must be [N, H, W], [N, C, H, W] or [N, H, W, C], got {x.shape}")


def load_npz(path: str | os.PathLike[str], config: DataConfig = CONFIG) -> Dataset:
    """An `.npz` with `x`, `y` (split with a fixed stratified split) or `x_train`, `y_train`, `x_test`,
    `y_test`; optional `class_names`. Loaded with allow_pickle=False."""
    p = Path(path)
    try:
        z = np.load(p, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise DataError(f"{p}: cannot read .npz ({e})") from None
    with z:
        keys = set(z.files)
        if {"x_train", "y_train", "x_test", "y_test"} <= keys:
            xtr, ytr = _to_nchw(z["x_train"], p), z["y_train"]
            xte, yte = _to_nchw(z["x_test"], p), z["y_test"]
        elif {"x", "y"} <= keys:
            xtr, ytr, xte, yte = _stratified_split(
                _to_nchw(z["x"], p), z["y"], config.npz_test_fraction, config.split_seed
            )
        else:
            raise DataError(
                f"{p}: needs arrays x, y (or x_train, y_train, x_test, y_test); has {sorted(keys)}"
            )
        n_cls = int(max(ytr.max(), yte.max())) + 1
        names = (
            [str(s) for s in z["class_names"]] if "class_names" in keys else [str(i) for i in range(n_cls)]
        )
    return Dataset(p.stem, xtr, ytr, xte, yte, names)


FASHION_MNIST_CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]
_IDX_DTYPES: dict[int, Any] = {
    0x08: np.uint8,
    0x09: np.int8,
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
}
_IDX_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """One IDX file (the MNIST format, optionally gzip-compressed): magic 0x0000 TT DD, DD big-endian
    int32 dimensions, then the data. DataError on a wrong magic number, dimensions or length."""
    p = Path(path)
    try:
        raw = p.read_bytes()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
    except FileNotFoundError:
        raise DataError(f"{p}: not found") from None
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise DataError(f"{p}: cannot read ({e})") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise DataError(f"{p}: not an IDX file (bad magic number)")
    dtype, ndim = raw[2], raw[3]
    if dtype not in _IDX_DTYPES:
        raise DataError(f"{p}: unknown IDX data type 0x{dtype:02x}")
    if ndim == 0 or len(raw) < 4 + 4 * ndim:
        raise DataError(f"{p}: truncated IDX header")
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    dt = np.dtype(_IDX_DTYPES[dtype])
    expected = int(np.prod(dims)) * dt.itemsize
    body = len(raw) - 4 - 4 * ndim
    if body != expected:
        raise DataError(f"{p}: IDX header says {dims} ({expected} bytes of data), file has {body}")
    return np.frombuffer(raw, dtype=dt, offset=4 + 4 * ndim).reshape(dims)


def _find_idx(d: Path, stem: str) -> Path:
    for name in (stem, stem + ".gz"):
        if (d / name).is_file():
            return d / name
    # also accept the common dotted spelling (train-images.idx3-ubyte)
    dotted = stem.replace("-idx", ".idx")
    for name in (dotted, dotted + ".gz"):
        if (d / name).is_file():
            return d / name
    raise DataError(f"{d}: {stem}[.gz] not found (expected the four MNIST-format IDX files)")


def load_idx(
    directory: str | os.PathLike[str], name: str = "", class_names: list[str] | None = None
) -> Dataset:
    """A directory with the four standard MNIST-format files (train-images-idx3-ubyte,
    train-labels-idx1-ubyte, t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte, each optionally .gz).
    Pixels become float32 / 255."""
    d = Path(directory)
    if not d.is_dir():
        raise DataError(f"{d}: directory not found")
    arrays = {k: read_idx(_find_idx(d, stem)) for k, stem in _IDX_FILES.items()}
    for split in ("train", "test"):
        x, y = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        if x.ndim != 3:
            raise DataError(f"{d}: {split} images must be [N, H, W], got {x.shape}")
        if y.ndim != 1:
            raise DataError(f"{d}: {split} labels must be [N], got {y.shape}")
        if len(x) != len(y):
            raise DataError(f"{d}: {len(x)} {split} images but {len(y)} labels")
    ytr, yte = arrays["train_labels"].astype(np.int64), arrays["test_labels"].astype(np.int64)
    if min(ytr.min(), yte.min()) < 0:
        raise DataError(f"{d}: negative labels")
    n_cls = int(max(ytr.max(), yte.max())) + 1
    names = class_names or [str(i) for i in range(n_cls)]
    if len(names) < n_cls:
        raise DataError(f"{d}: labels go up to {n_cls - 1} but only {len(names)} class names")
    return Dataset(
        name or d.name,
        arrays["train_images"][:, None].astype(np.float32) / 255.0,
        ytr,
        arrays["test_images"][:, None].astype(np.float32) / 255.0,
        yte,
        list(names),
    )


def load_fashion_mnist(
    directory: str | os.PathLike[str] | None = None, config: DataConfig = CONFIG
) -> Dataset:
    """Zalando's Fashion-MNIST (60,000 train / 10,000 test, 1x28x28, 10 classes) from its IDX files, by
    default where Debian's `dataset-fashion-mnist` package installs them."""
    d = Path(directory or config.fashion_mnist_dir)
    if not d.is_dir():
        raise DataError(
            f"{d}: Fashion-MNIST not found; install it with `apt-get install dataset-fashion-mnist` "
            "(Debian/Ubuntu) or pass fashion-mnist:DIR with the four IDX files "
            "(train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz, "
            "t10k-labels-idx1-ubyte.gz)"
        )
    return load_idx(d, name="fashion-mnist", class_names=FASHION_MNIST_CLASSES)


def load_dataset(spec: str = "digits") -> Dataset:
    """`digits`, `fashion-mnist[:DIR]`, `idx:DIR`, `cifar10:DIR`, `cifar100:DIR`, `npz:FILE`, or a path
    (`.npz` file or a CIFAR directory)."""
    kind, _, arg = spec.partition(":")
    if spec == "digits":
        return load_digits()
    if kind == "fashion-mnist":
        return load_fashion_mnist(arg or None)
    if kind == "idx" and arg:
        return load_idx(arg)
    if kind == "cifar10" and arg:
        return load_cifar10(arg)
    if kind == "cifar100" and arg:
        return load_cifar100(arg)
    if kind == "npz" and arg:
        return load_npz(arg)
    p = Path(spec)
    if p.suffix == ".npz" and p.is_file():
        return load_npz(p)
    if p.is_dir() and (p / "test_batch").exists():
        return load_cifar10(p)
    if p.is_dir() and (p / "train").exists() and (p / "test").exists():
        return load_cifar100(p)
    raise DataError(
        f"unknown dataset {spec!r} "
        "(digits, fashion-mnist[:DIR], idx:DIR, cifar10:DIR, cifar100:DIR, npz:FILE)"
    )
