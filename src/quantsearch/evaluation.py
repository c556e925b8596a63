"""Evaluation: the metric a candidate configuration is judged by, on a fixed split held in memory.

Batches are materialised once (on the target device) so a search of thousands of candidates pays the data
pipeline once, not per candidate.
"""
from __future__ import annotations

from typing import Iterable

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

__all__ = ["NumericalError", "AccuracyEvaluator", "materialize"]


class NumericalError(ArithmeticError):
    """The model produced NaN or Inf: the configuration is recorded as failed, never silently scored."""


def materialize(data: Dataset | Iterable, batch_size: int, device: torch.device | str = "cpu",
                limit: int | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Collect ``(inputs, labels)`` batches into memory, at most ``limit`` samples."""
    loader = data if not isinstance(data, Dataset) else DataLoader(data, batch_size=batch_size, shuffle=False)
    batches, seen = [], 0
    for x, y in loader:
        if limit is not None and seen + len(x) > limit:
            x, y = x[: limit - seen], y[: limit - seen]
        if len(x):
            batches.append((x.to(device), y.to(device)))
        seen += len(x)
        if limit is not None and seen >= limit:
            break
    return batches


class AccuracyEvaluator:
    """Top-1 accuracy of a model on fixed batches."""

    name = "top1"

    def __init__(self, data: Dataset | Iterable, batch_size: int = 500, device: torch.device | str = "cpu",
                 limit: int | None = None, compile: bool = False):
        self.batches = materialize(data, batch_size, device, limit)
        self.num_samples = sum(len(y) for _, y in self.batches)
        if self.num_samples == 0:
            raise ValueError("the evaluation split is empty")
        self.compile = compile
        self._compiled: dict[int, nn.Module] = {}

    def runner(self, model: nn.Module) -> nn.Module:
        """The module that runs the batches: ``model`` itself, or its ``torch.compile``-d form (built once).

        With :class:`~quantsearch.fakequant.FastTensorQuantizer` bit-widths and amax are tensors, so one compiled
        graph serves every candidate configuration.
        """
        if not self.compile:
            return model
        if id(model) not in self._compiled:
            self._compiled[id(model)] = torch.compile(model, dynamic=False)
        return self._compiled[id(model)]

    def __call__(self, model: nn.Module) -> float:
        model.eval()
        run = self.runner(model)
        correct = 0
        with torch.inference_mode():
            for x, y in self.batches:
                logits = run(x)
                if not torch.isfinite(logits).all():
                    raise NumericalError("model output holds NaN or Inf")
                correct += int((logits.argmax(1) == y).sum())
        return correct / self.num_samples
