"""Data sources, the preprocessing that turns an image into a model input, and the calibration / search / hold-out
splits.

Sources (:func:`load_dataset`): ``fashion-mnist[:DIR]``, ``imagefolder:PATH`` (labels from folder names or a class
index file), ``images:PATH`` (unlabeled images, label :data:`NO_LABEL`), and ``package.module:callable`` returning
a torch ``Dataset``. Items are ``(image_tensor, label)``.

Fashion-MNIST (MIT licence, Zalando SE) is the embedded default: its 10k test split ships inside the package
(``quantsearch/data/``) so the demo runs after a plain ``pip install``; the 60k training split is read from
Debian's ``dataset-fashion-mnist`` (``/usr/share/datasets/fashion-mnist``) or any folder holding the IDX files.
"""
from __future__ import annotations

import gzip
import importlib
import inspect
import json
import os
import struct
from dataclasses import asdict, dataclass, replace
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

from ..fingerprints import fingerprint_values

__all__ = [
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_MEAN",
    "FASHION_MNIST_STD",
    "DEBIAN_FASHION_MNIST",
    "DataError",
    "IMAGE_EXTENSIONS",
    "NO_LABEL",
    "Preprocessing",
    "ImageFiles",
    "read_class_index",
    "data_loader",
    "default_workers",
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
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
NO_LABEL = -1  # the label of an image from an unlabeled source
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "lanczos", "box", "hamming")
CROP_MODES = ("center", "squash", "border")
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


@dataclass(frozen=True)
class Preprocessing:
    """How an image becomes the model's input tensor: timm's evaluation transform (resize to ``size / crop_pct``,
    crop ``size``, scale to [0, 1], normalise). Models say what they expect (see ``models.model_preprocessing``);
    a config's ``preprocessing`` mapping overrides any field."""

    input_size: tuple[int, int, int] = (3, 224, 224)
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    interpolation: str = "bilinear"
    crop_pct: float = 0.875
    crop_mode: str = "center"

    def __post_init__(self):  # one mean or std value applies to every channel
        for key in ("mean", "std"):
            value = tuple(float(v) for v in getattr(self, key))
            if len(value) == 1 and self.channels > 1:
                value = value * self.channels
            if len(value) != self.channels:
                raise DataError(f"preprocessing {key} has {len(value)} values for {self.channels} input channels")
            object.__setattr__(self, key, value)
        object.__setattr__(self, "input_size", tuple(int(v) for v in self.input_size))

    @property
    def channels(self) -> int:
        return self.input_size[0]

    @classmethod
    def fields(cls) -> tuple[str, ...]:
        return tuple(cls.__dataclass_fields__)

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> "Preprocessing":
        """From timm's data config (``resolve_data_config``); unknown keys are ignored."""
        return cls().with_overrides({k: v for k, v in values.items() if k in cls.fields()})

    def with_overrides(self, overrides: Mapping[str, Any]) -> "Preprocessing":
        """A copy with ``overrides`` applied; ``input_size`` may be one number (square), ``[H, W]`` or ``[C, H, W]``;
        a one-element mean or std applies to every channel."""
        check_preprocessing(overrides)
        values = dict(overrides)
        if "input_size" in values:
            size = values["input_size"]
            size = [size] if isinstance(size, (int, float)) else list(size)
            size = size * 2 if len(size) == 1 else size
            values["input_size"] = tuple(int(v) for v in ([self.channels] + size if len(size) == 2 else size))
        for key in ("mean", "std"):
            if key in values:
                value = values[key]
                values[key] = tuple(float(v) for v in ([value] if isinstance(value, (int, float)) else value))
        return replace(self, **values)

    def with_channels(self, channels: int) -> "Preprocessing":
        """The same preprocessing for ``channels`` input channels (1 = grey: mean of the RGB statistics)."""
        mean = (sum(self.mean) / len(self.mean),) * channels
        std = (sum(self.std) / len(self.std),) * channels
        return replace(self, input_size=(channels, *self.input_size[1:]), mean=mean, std=std)

    @property
    def image_mode(self) -> str:
        """The PIL mode images are converted to before the transform (grey images become RGB and back)."""
        if self.channels not in (1, 3):
            raise DataError(f"image files can feed a model with 1 or 3 input channels, not {self.channels}")
        return "L" if self.channels == 1 else "RGB"

    def transform(self) -> Callable:
        """The transform from a PIL image to a normalised tensor of ``input_size``."""
        from timm.data import create_transform

        return create_transform(input_size=self.input_size, is_training=False, interpolation=self.interpolation,
                                mean=self.mean, std=self.std, crop_pct=self.crop_pct, crop_mode=self.crop_mode)

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


def check_preprocessing(values: Any) -> None:
    """Check a ``preprocessing`` mapping's keys and value types without loading anything (one-line DataError)."""
    if not isinstance(values, Mapping):
        raise DataError(f"preprocessing must be a mapping of {', '.join(Preprocessing.fields())}")
    for key, value in values.items():
        if key not in Preprocessing.fields():
            raise DataError(f"preprocessing: unknown key {key!r} (known: {', '.join(Preprocessing.fields())})")
        if key == "input_size":
            size = [value] if isinstance(value, (int, float)) else value
            if not isinstance(size, (list, tuple)) or not 1 <= len(size) <= 3 \
                    or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in size):
                raise DataError(f"preprocessing input_size must be N, [H, W] or [C, H, W] of positive integers, "
                                f"got {value!r}")
        elif key in ("mean", "std"):
            seq = [value] if isinstance(value, (int, float)) else value
            if not isinstance(seq, (list, tuple)) or not seq \
                    or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in seq):
                raise DataError(f"preprocessing {key} must be a number or a list of numbers, got {value!r}")
            if key == "std" and any(v <= 0 for v in seq):
                raise DataError(f"preprocessing std must be positive, got {value!r}")
        elif key == "interpolation" and value not in INTERPOLATIONS:
            raise DataError(f"preprocessing interpolation must be one of {', '.join(INTERPOLATIONS)}, got {value!r}")
        elif key == "crop_mode" and value not in CROP_MODES:
            raise DataError(f"preprocessing crop_mode must be one of {', '.join(CROP_MODES)}, got {value!r}")
        elif key == "crop_pct" and (isinstance(value, bool) or not isinstance(value, (int, float))
                                    or not 0 < value <= 1):
            raise DataError(f"preprocessing crop_pct must lie in (0, 1], got {value!r}")


DEMO_PREPROCESSING = Preprocessing((1, 28, 28), (FASHION_MNIST_MEAN,), (FASHION_MNIST_STD,), "bilinear", 1.0)


def _open_image(path: str | os.PathLike, mode: str):
    from PIL import Image

    try:
        with Image.open(path) as image:
            return image.convert(mode)
    except (OSError, ValueError) as exc:
        raise DataError(f"cannot read image {path}: {exc}") from None


class ImageFiles(Dataset):
    """Image files with optional labels, each read, converted (RGB or grey) and transformed on access."""

    def __init__(self, files: list[Path], labels: list[int] | None, preprocessing: Preprocessing):
        self.files = list(files)
        self.labels = list(labels) if labels is not None else [NO_LABEL] * len(self.files)
        self.preprocessing = preprocessing
        self.mode = preprocessing.image_mode
        self._transform = preprocessing.transform()

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self._transform(_open_image(self.files[index], self.mode)), self.labels[index]


class _ArrayImages(Dataset):
    """uint8 images held in memory (Fashion-MNIST), transformed like image files for models that want other sizes."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, preprocessing: Preprocessing):
        self.images, self.labels = images, labels
        self.mode = preprocessing.image_mode
        self._transform = preprocessing.transform()

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        from PIL import Image

        return self._transform(Image.fromarray(self.images[index]).convert(self.mode)), int(self.labels[index])


def _image_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())


def read_class_index(path: str | os.PathLike) -> dict[str, int]:
    """Folder name -> class index, from a JSON or text file.

    JSON: ``{"n01440764": 0, ...}``, Keras' ``{"0": ["n01440764", "tench"], ...}`` or a list of folder names in
    index order. Text: one class per line in index order, the folder name first (``n01440764 tench, Tinca tinca``).
    """
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise DataError(f"cannot read class index {path}: {exc.strerror}") from None
    pairs: list[tuple[str, int]] = []
    if path.suffix == ".json":
        try:
            payload = json.loads(text)
        except ValueError as exc:
            raise DataError(f"class index {path} is not valid JSON: {exc}") from None
        if isinstance(payload, list):
            pairs = [(str(name), i) for i, name in enumerate(payload)]
        elif isinstance(payload, dict) and all(isinstance(v, int) for v in payload.values()):
            pairs = [(str(k), int(v)) for k, v in payload.items()]
        elif isinstance(payload, dict) and all(isinstance(v, list) and v for v in payload.values()):
            try:
                pairs = [(str(v[0]), int(k)) for k, v in payload.items()]
            except ValueError:
                raise DataError(f"class index {path}: keys must be class indices") from None
        else:
            raise DataError(f"class index {path} must map folder -> index, index -> [folder, ...], "
                            "or list folders in index order")
    else:
        lines = [line.split()[0] for line in text.splitlines() if line.strip()]
        pairs = [(name, i) for i, name in enumerate(lines)]
    mapping: dict[str, int] = {}
    for name, index in pairs:
        if name in mapping:
            raise DataError(f"class index {path} names {name!r} twice")
        mapping[name] = index
    if not mapping:
        raise DataError(f"class index {path} is empty")
    return mapping


def _image_folder(root: Path, preprocessing: Preprocessing, class_index: str | os.PathLike | None) -> ImageFiles:
    folders = sorted(p.name for p in root.iterdir() if p.is_dir())
    if not folders:
        raise DataError(f"imagefolder {root} has no class folders (use images:{root} for unlabeled images)")
    if class_index is not None:
        mapping = read_class_index(class_index)
        unknown = [f for f in folders if f not in mapping]
        if unknown:
            raise DataError(f"class folder {unknown[0]!r} of {root} is not in the class index {class_index}")
    else:
        mapping = {name: i for i, name in enumerate(folders)}
    files, labels = [], []
    for name in folders:
        found = _image_files(root / name)
        files += found
        labels += [mapping[name]] * len(found)
    if not files:
        raise DataError(f"imagefolder {root} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
    return ImageFiles(files, labels, preprocessing)


def _dataset_from_callable(spec: str, kwargs: Mapping[str, Any], preprocessing: Preprocessing) -> Dataset:
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # the user's spec, reported in one line
        raise DataError(f"cannot import module {module_name!r} for dataset {spec!r}: {exc}") from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise DataError(f"{module_name!r} has no callable {attr!r} (dataset {spec!r})")
    kwargs = dict(kwargs)
    try:
        accepts_transform = "transform" in inspect.signature(factory).parameters
    except (TypeError, ValueError):
        accepts_transform = False
    if accepts_transform and "transform" not in kwargs:  # hand it the model's preprocessing
        kwargs["transform"] = preprocessing.transform()
    try:
        dataset = factory(**kwargs)
    except TypeError as exc:
        raise DataError(f"{spec}(**dataset_kwargs) failed: {exc}") from None
    if not (hasattr(dataset, "__getitem__") and hasattr(dataset, "__len__")):
        raise DataError(f"{spec!r} returned {type(dataset).__name__}, not a map-style torch Dataset")
    if len(dataset) == 0:
        raise DataError(f"dataset {spec!r} is empty")
    first = dataset[0]
    x = first[0] if isinstance(first, (tuple, list)) else first
    if not isinstance(x, torch.Tensor):
        raise DataError(f"dataset {spec!r} yields {type(x).__name__} items, not tensors: give the callable a "
                        "'transform' parameter (it receives the model's preprocessing) or return tensors")
    return dataset


def load_dataset(spec: str, preprocessing: Preprocessing | None = None, class_index: str | os.PathLike | None = None,
                 **kwargs: Any) -> Dataset:
    """A dataset from a spec string; images are turned into tensors as ``preprocessing`` says.

    ``fashion-mnist[:DIR]`` (normalised 28x28 tensors; resized like image files when ``preprocessing`` asks for
    another size), ``imagefolder:PATH`` (one folder per class; ``class_index`` maps folder names to indices),
    ``images:PATH`` (every image under PATH, unlabeled) or ``package.module:callable`` (called with ``kwargs``, and
    with ``transform=`` when it takes one).
    """
    kind, _, arg = spec.partition(":")
    if kind == "fashion-mnist":
        if preprocessing is None or preprocessing == DEMO_PREPROCESSING:
            return load_fashion_mnist("test", arg or None)
        images_path, labels_path = _fashion_mnist_files("test", arg or None)
        return _ArrayImages(read_idx(images_path), read_idx(labels_path), preprocessing)
    preprocessing = preprocessing or Preprocessing()
    if kind in ("imagefolder", "images"):
        root = Path(arg)
        if not arg or not root.is_dir():
            raise DataError(f"{kind} path {arg!r} is not a directory")
        if kind == "imagefolder":
            return _image_folder(root, preprocessing, class_index)
        files = _image_files(root)
        if not files:
            raise DataError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) under {root}")
        return ImageFiles(files, None, preprocessing)
    if ":" in spec and kind.replace(".", "").replace("_", "").isalnum():
        return _dataset_from_callable(spec, kwargs, preprocessing)
    raise DataError(f"unknown dataset {spec!r}: use fashion-mnist[:DIR], imagefolder:PATH, images:PATH "
                    "or package.module:callable")


def default_workers(dataset: Dataset) -> int:
    """Worker processes for loading ``dataset``: none for tensors already in memory, else up to 8 (one per core)."""
    inner = dataset.dataset if isinstance(dataset, Subset) else dataset
    if isinstance(inner, TensorDataset):
        return 0
    return max(0, min(8, (os.cpu_count() or 1)))


def data_loader(dataset: Dataset, batch_size: int, device: torch.device | str = "cpu",
                workers: int | None = None) -> DataLoader:
    """A loader in dataset order: worker processes decode images, pinned memory speeds copies to a GPU."""
    workers = default_workers(dataset) if workers is None else workers
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers,
                      pin_memory=torch.device(device).type == "cuda")


@dataclass(frozen=True)
class Splits:
    """Disjoint calibration, search, hold-out and (optional) validation parts of one dataset, with their indices.

    The validation part re-checks the candidates of the front before they are reported; the hold-out part stays
    untouched until the end."""

    calibration: Subset
    search: Subset
    holdout: Subset
    validation: Subset | None = None

    @property
    def names(self) -> tuple[str, ...]:
        """The parts this split has (validation only when it holds images)."""
        return ("calibration", "search", *(("validation",) if self.validation else ()), "holdout")

    def describe(self) -> dict:
        return {name: len(getattr(self, name)) for name in self.names}

    def indices(self) -> dict[str, list[int]]:
        """The dataset indices of each part (what ``splits.json`` of a run records)."""
        return {name: list(getattr(self, name).indices) for name in self.names}

    def fingerprint(self) -> dict[str, str]:
        """A SHA-256 of each part's indices: two runs used the same images iff these agree."""
        return {name: fingerprint_values(idx) for name, idx in self.indices().items()}


def split_dataset(dataset: Dataset, calibration: int, search: int, holdout: int | None = None,
                  seed: int = 0, validation: int = 0) -> Splits:
    """Shuffle once with ``seed`` and cut disjoint parts, in the order calibration, search, validation, hold-out;
    ``holdout=None`` takes everything left. Without a validation part the cuts are those of earlier versions."""
    n = len(dataset)
    rest = n - calibration - search - validation
    holdout = rest if holdout is None else holdout
    if min(calibration, search) <= 0 or min(holdout, validation) < 0 or calibration + search + validation + holdout > n:
        raise DataError(f"dataset has {n} samples, too few for calibration={calibration}, search={search}, "
                        f"{f'validation={validation}, ' if validation else ''}holdout={holdout}")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    a, b, c = calibration, calibration + search, calibration + search + validation
    return Splits(Subset(dataset, order[:a]), Subset(dataset, order[a:b]), Subset(dataset, order[c:c + holdout]),
                  Subset(dataset, order[b:c]) if validation else None)
