"""Train the embedded demo ViT on Fashion-MNIST's 60k training split and write its weights into the package.

    python utils/train_demo.py [--epochs 40] [--device cuda] [--data /usr/share/datasets/fashion-mnist]

The test split is never seen during training; its accuracy is printed at the end and recorded in the README.
Weights are saved as a plain state dict (loadable with ``torch.load(weights_only=True)``).
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from torch import nn

from quantsearch.sources.data import load_fashion_mnist
from quantsearch.sources.models import DEMO_WEIGHTS, create_demo_vit


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 2000) -> float:
    model.eval()
    with torch.inference_mode():
        correct = sum((model(x[i:i + batch_size]).argmax(1) == y[i:i + batch_size]).sum().item()
                      for i in range(0, len(x), batch_size))
    return correct / len(x)


def augment(x: torch.Tensor) -> torch.Tensor:
    """Random horizontal flip and a random shift of up to 2 pixels: cheap, on-device."""
    flip = torch.rand(len(x), device=x.device) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    dx, dy = (int(v) for v in torch.randint(-2, 3, (2,)))
    return torch.roll(x, shifts=(dy, dx), dims=(2, 3))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--data", default=None, help="folder with the IDX files (default: Debian's)")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "src/quantsearch/data" / DEMO_WEIGHTS))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    train_x, train_y = (t.to(device) for t in load_fashion_mnist("train", args.data).tensors)
    test_x, test_y = (t.to(device) for t in load_fashion_mnist("test", args.data).tensors)

    model = create_demo_vit(pretrained=False).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.05)
    steps_per_epoch = len(train_x) // args.batch_size
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=args.lr, total_steps=args.epochs * steps_per_epoch, pct_start=0.1)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=0.1)
    start = time.time()
    for epoch in range(args.epochs):
        model.train()
        order = torch.randperm(len(train_x), device=device)
        for step in range(steps_per_epoch):
            idx = order[step * args.batch_size:(step + 1) * args.batch_size]
            loss = loss_fn(model(augment(train_x[idx])), train_y[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
        if (epoch + 1) % 5 == 0 or epoch + 1 == args.epochs:
            print(f"epoch {epoch + 1}/{args.epochs}  loss {loss.item():.3f}  "
                  f"test acc {accuracy(model, test_x, test_y):.4f}  {time.time() - start:.0f}s", flush=True)
    model = model.cpu().eval()
    torch.save(model.state_dict(), args.out)
    print(f"saved {args.out}; FP32 test accuracy {accuracy(model, test_x.cpu(), test_y.cpu()):.4f}")


if __name__ == "__main__":
    main()
