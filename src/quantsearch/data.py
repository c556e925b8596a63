"""Data sources and the calibration / search / hold-out splits.

Fashion-MNIST (MIT licence, Zalando SE) is the embedded default: its 10k test split ships inside the package
(``quantsearch/data/``) so the demo runs after a plain ``pip install``; the 60k training split is read from
Debian's ``dataset-fashion-mnist`` (``/usr/share/datasets/fashion-mnist``) or any folder holding the IDX files.
"""
from __future__ import annotations

import gzip
import os
import struct
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, Subset, TensorDataset

__all__ = [
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_MEAN",
    "FASHION_MNIST_STD",
    "DEBIAN_FASHION_MNIST",
    "DataError",
    "Splits",
    "read_idx",
    "load_fashion_mnist",
    "load_dataset",
    "split_dataset",
]

FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
FASHION_MNIST_MEAN = 0.2860
FASHION_MNIST_STD = 0.3530
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


class DataError(ValueError):
    """A data source that cannot be read or is too small for what was asked of it."""


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (optionally gzip-compressed), the format of (Fashion-)MNIST."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except OSError as exc:
        raise DataError(f"cannot read IDX file {path}: {exc}") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise DataError(f"{path} is not an IDX file (bad magic number)")
    ndim = raw[3]
    shape = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    data = np.frombuffer(raw, dtype=dtype, offset=4 + 4 * ndim)
    if data.size != int(np.prod(shape)):
        raise DataError(f"{path} is truncated: header says {shape}, found {data.size} values")
    return data.reshape(shape)


def _fashion_mnist_files(split: str, root: str | os.PathLike | None) -> tuple[Path, Path]:
    prefix = {"train": "train", "test": "t10k"}[split]
    candidates = [Path(root)] if root is not None else []
    if root is None:
        if split == "test":
            candidates.append(Path(str(resources.files("quantsearch") / "data")))
        candidates.append(DEBIAN_FASHION_MNIST)
    for folder in candidates:
        images = folder / f"{prefix}-images-idx3-ubyte.gz"
        labels = folder / f"{prefix}-labels-idx1-ubyte.gz"
        if images.is_file() and labels.is_file():
            return images, labels
    where = ", ".join(str(c) for c in candidates)
    hint = " (apt-get install dataset-fashion-mnist)" if split == "train" else ""
    raise DataError(f"Fashion-MNIST {split} split not found in {where}{hint}")


def load_fashion_mnist(split: str = "test", root: str | os.PathLike | None = None) -> TensorDataset:
    """Fashion-MNIST as normalised float tensors of shape (N, 1, 28, 28) with int64 labels."""
    images_path, labels_path = _fashion_mnist_files(split, root)
    images = read_idx(images_path)
    labels = read_idx(labels_path)
    if images.shape[0] != labels.shape[0]:
        raise DataError(f"{images_path} holds {images.shape[0]} images but {labels_path} {labels.shape[0]} labels")
    x = torch.from_numpy(images.astype(np.float32) / 255.0).unsqueeze(1)
    x = (x - FASHION_MNIST_MEAN) / FASHION_MNIST_STD
    y = torch.from_numpy(labels.astype(np.int64))
    return TensorDataset(x, y)


def load_dataset(spec: str, image_size: int | None = None) -> Dataset:
    """A dataset from a spec string: ``fashion-mnist``, ``fashion-mnist:DIR`` or ``imagefolder:PATH``."""
    kind, _, arg = spec.partition(":")
    if kind == "fashion-mnist":
        return load_fashion_mnist("test", arg or None)
    if kind == "imagefolder":
        if not arg or not Path(arg).is_dir():
            raise DataError(f"imagefolder path {arg!r} is not a directory")
        from torchvision import datasets, transforms

        size = image_size or 224
        tf = transforms.Compose([
            transforms.Resize(int(size * 256 / 224)),
            transforms.CenterCrop(size),
            transforms.ToTensor(),
            transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
        ])
        return datasets.ImageFolder(arg, transform=tf)
    raise DataError(f"unknown dataset {spec!r}: use fashion-mnist, fashion-mnist:DIR or imagefolder:PATH")


@dataclass(frozen=True)
class Splits:
    """Disjoint calibration, search and hold-out parts of one dataset, with the indices that define them."""

    calibration: Subset
    search: Subset
    holdout: Subset

    def describe(self) -> dict:
        return {name: len(getattr(self, name)) for name in ("calibration", "search", "holdout")}


def split_dataset(dataset: Dataset, calibration: int, search: int, holdout: int | None = None,
                  seed: int = 0) -> Splits:
    """Shuffle once with ``seed`` and cut disjoint parts; ``holdout=None`` takes everything left."""
    n = len(dataset)
    rest = n - calibration - search
    holdout = rest if holdout is None else holdout
    if min(calibration, search) <= 0 or holdout < 0 or calibration + search + holdout > n:
        raise DataError(
            f"dataset has {n} samples, too few for calibration={calibration}, search={search}, holdout={holdout}")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    a, b = calibration, calibration + search
    return Splits(Subset(dataset, order[:a]), Subset(dataset, order[a:b]), Subset(dataset, order[b:b + holdout]))
