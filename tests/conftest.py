import os
from pathlib import Path

import pytest
import torch
from torch import nn

from quantsearch.sources.data import load_fashion_mnist, split_dataset
from quantsearch.sources.models import create_demo_vit


@pytest.fixture(scope="session")
def fashion():
    return load_fashion_mnist()


@pytest.fixture(scope="session")
def splits(fashion):
    return split_dataset(fashion, calibration=500, search=1000, holdout=1000, seed=0)


@pytest.fixture
def demo_vit():
    return create_demo_vit()


class SmallConvNet(nn.Module):
    """Two convs and a linear head: small enough to check by hand."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(4, 8, 3, stride=2, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        x = self.pool(self.conv2(self.relu(self.conv1(x))))
        return self.fc(x.flatten(1))


@pytest.fixture
def convnet():
    return SmallConvNet().eval()


def fake_quant_by_hand(x, amax, bits):
    """round(x * (2^(b-1)-1) / amax), clamped to the narrow signed range, rescaled."""
    bound = 2 ** (bits - 1) - 1
    scale = bound / amax
    return torch.clamp(torch.round(x * scale), -bound, bound) / scale


def write_fashion_pngs(folder, count, start=0, by_class=False):
    """The first ``count`` shipped Fashion-MNIST test images as 28x28 grey PNG files, in nested folders (by class
    name when ``by_class``); returns their dataset indices in the order of the sorted file paths."""
    from pathlib import Path

    import numpy as np
    from PIL import Image

    from quantsearch.sources.data import FASHION_MNIST_CLASSES, _fashion_mnist_files, read_idx

    images_path, labels_path = _fashion_mnist_files("test", None)
    images, labels = read_idx(images_path), read_idx(labels_path)
    folder = Path(folder)
    written = []
    for i in range(start, start + count):
        sub = FASHION_MNIST_CLASSES[labels[i]].replace("/", "-") if by_class else f"part{i % 3}"
        path = folder / sub / f"img_{i:05d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.asarray(images[i])).save(path)
        written.append((str(path), i))
    return [i for _, i in sorted(written)]


def assert_real_png(path, min_side=100):
    """``path`` decodes as a PNG image (PIL's integrity check) at least ``min_side`` pixels on each side, and is
    not a single flat colour (a figure with something drawn on it)."""
    from PIL import Image

    with Image.open(path) as image:
        assert image.format == "PNG", (path, image.format)
        assert min(image.size) >= min_side, (path, image.size)
        image.verify()
    with Image.open(path) as image:  # verify() leaves the image unusable: decode it again, fully
        low, high = image.convert("L").getextrema()
    assert low < high, (path, "a blank image")


NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "pareto_analysis.ipynb"


def execute_notebook(env: dict):
    """The analysis notebook executed top to bottom in a fresh kernel that sees ``env`` (and this checkout's
    ``src``) in its environment; returns the executed notebook."""
    import nbformat
    from nbclient import NotebookClient

    notebook = nbformat.read(NOTEBOOK, as_version=4)
    env = {**env, "PYTHONPATH": str(NOTEBOOK.parents[1] / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # the kernel inherits this process's environment
    try:
        NotebookClient(notebook, timeout=600, kernel_name="python3",
                       resources={"metadata": {"path": str(NOTEBOOK.parent)}}).execute()
    finally:
        for k, v in old.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    return notebook
