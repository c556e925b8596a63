"""Train a timm model that quantsearch does not ship on Fashion-MNIST's 60k training split: ``resnet10t`` (the
CNN that ``benchmarks/bench_reconstruction.py`` refines beside the demo ViT) or ``vit6`` (a 6-block, 3-head,
96-wide ViT with 4x4 patches, the other ViT shape of ``benchmarks/bench_integer_vit.py``).

    python utils/train_fashion_cnn.py [--model resnet10t|vit6] [--epochs 3] [--out PATH]

The test split (where explore draws its calibration, search and hold-out images) is never seen during training.
The weights are a plain state dict, loaded by explore as ``model: NAME`` with ``model_kwargs`` from ``MODELS``
below and ``checkpoint: PATH``.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import timm
import torch
from torch import nn

from quantsearch.sources.data import load_fashion_mnist

KWARGS = {"num_classes": 10, "in_chans": 1}
MODELS = {  # short name: (timm name, keyword arguments)
    "resnet10t": ("resnet10t", KWARGS),
    "vit6": ("vit_tiny_patch16_224", {**KWARGS, "img_size": 28, "patch_size": 4, "depth": 6, "embed_dim": 96,
                                      "num_heads": 3}),
}
CACHE = Path(__file__).resolve().parents[1] / "benchmarks" / ".cache"
DEFAULT_OUT = CACHE / "resnet10t_fashion.pt"


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1000) -> float:
    model.eval()
    with torch.inference_mode():
        correct = sum((model(x[i:i + batch_size]).argmax(1) == y[i:i + batch_size]).sum().item()
                      for i in range(0, len(x), batch_size))
    return correct / len(x)


def train(epochs: int = 3, out: Path = DEFAULT_OUT, data: str | None = None, seed: int = 0,
          batch_size: int = 128, lr: float = 2e-3, model: str = "resnet10t") -> float:
    """Train, save the state dict to ``out`` and return the test accuracy."""
    torch.manual_seed(seed)
    train_x, train_y = load_fashion_mnist("train", data).tensors
    test_x, test_y = load_fashion_mnist("test", data).tensors
    name, kwargs = MODELS[model]
    model = timm.create_model(name, **kwargs)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    steps = len(train_x) // batch_size
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=epochs * steps, pct_start=0.15)
    loss_fn, start = nn.CrossEntropyLoss(label_smoothing=0.1), time.time()
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(len(train_x))
        for step in range(steps):
            idx = order[step * batch_size:(step + 1) * batch_size]
            x = train_x[idx]
            x = torch.where(torch.rand(len(x), 1, 1, 1) < 0.5, x.flip(-1), x)  # random horizontal flip
            loss = loss_fn(model(x), train_y[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
        print(f"epoch {epoch + 1}/{epochs}  loss {loss.item():.3f}  test acc {accuracy(model, test_x, test_y):.4f}"
              f"  {time.time() - start:.0f}s", flush=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.eval().state_dict(), out)
    return accuracy(model, test_x, test_y)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="resnet10t")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--data", default=None, help="folder with the IDX files (default: Debian's)")
    parser.add_argument("--out", type=Path, default=None, help="default: benchmarks/.cache/<model>_fashion.pt")
    args = parser.parse_args()
    out = args.out or CACHE / f"{args.model}_fashion.pt"
    print(f"saved {out}; FP32 test accuracy {train(args.epochs, out, args.data, model=args.model):.4f}")


if __name__ == "__main__":
    main()
