"""Metrics: what a candidate configuration is judged by (:func:`get_metric`):

- ``top1``, ``top5`` (any ``topK``): accuracy against the labels.
- ``agreement``: the fraction of images whose top-1 class is the FP32 model's top-1 class. Needs no labels.
- ``kl``: the mean KL divergence KL(p_fp32 || p_quantized) of the softmax outputs, in nats. Needs no labels;
  lower is better.
- ``package.module:callable``: a torchmetrics-style class (``update(outputs, labels)``, ``compute()``, optional
  ``reset()``), or a function ``fn(outputs, labels) -> float`` called once on the whole split. Either may take a
  ``reference`` argument (the FP32 outputs) and declare ``higher_is_better = False``.

The FP32 outputs the label-free metrics compare with are computed once, when the evaluator is built, and kept on
the device beside the batches (for ``kl``, log-probabilities; for ``agreement``, only the top-1 classes).
"""
from __future__ import annotations

import importlib
import inspect
import re
from typing import Any

import torch

__all__ = ["MetricError", "Metric", "TopK", "Agreement", "KLDivergence", "BUILTIN_METRICS", "get_metric"]

BUILTIN_METRICS = ("top1", "top5", "agreement", "kl")


class MetricError(ValueError):
    """A metric that cannot be built, or that cannot be computed on this data (labels missing)."""


# -- metrics -----------------------------------------------------------------------------------------------------
class Metric:
    """A metric accumulated over batches: ``reset``, ``update`` per batch, ``compute`` at the end.

    ``reference(outputs)`` says what to keep of the FP32 outputs of a batch (for metrics that compare with them).
    ``fraction`` metrics are shown as percentages.
    """

    name = "metric"
    higher_is_better = True
    needs_labels = False
    needs_reference = False
    fraction = False

    def reference(self, outputs: torch.Tensor) -> torch.Tensor:
        return outputs

    def reset(self) -> None:
        raise NotImplementedError

    def update(self, outputs: torch.Tensor, labels: torch.Tensor, reference: torch.Tensor | None) -> None:
        raise NotImplementedError

    def compute(self) -> float:
        raise NotImplementedError

    def successes(self) -> tuple[int, int] | None:
        """``(hits, samples)`` so far for a metric that is a fraction of samples (top-k, agreement), else None."""
        return None

    def hits(self, outputs: torch.Tensor, labels: torch.Tensor, reference: torch.Tensor | None) -> torch.Tensor | None:
        """Per sample, whether it counts as a hit (a metric that is a fraction of samples), else None; paired
        comparisons with FP32 on the same images use it."""
        return None


class TopK(Metric):
    """The fraction of samples whose label is among the ``k`` highest outputs."""

    needs_labels = True
    fraction = True

    def __init__(self, k: int = 1):
        self.k = int(k)
        self.name = f"top{self.k}"
        self.reset()

    def reset(self) -> None:
        self.correct, self.total = 0, 0

    def hits(self, outputs, labels, reference=None) -> torch.Tensor:
        if self.k == 1:
            return outputs.argmax(1) == labels
        return (outputs.topk(min(self.k, outputs.shape[1]), dim=1).indices == labels[:, None]).any(1)

    def update(self, outputs, labels, reference=None) -> None:
        self.correct = self.correct + self.hits(outputs, labels).sum()  # on the device: one sync, in compute
        self.total += len(labels)

    def compute(self) -> float:
        return float(self.correct) / self.total

    def successes(self) -> tuple[int, int]:
        return int(self.correct), self.total


class Agreement(Metric):
    """The fraction of samples whose top-1 class equals the FP32 model's top-1 class."""

    name = "agreement"
    needs_reference = True
    fraction = True

    def __init__(self):
        self.reset()

    def reference(self, outputs):
        return outputs.argmax(1)

    def reset(self) -> None:
        self.same, self.total = 0, 0

    def hits(self, outputs, labels, reference) -> torch.Tensor:
        return outputs.argmax(1) == reference

    def update(self, outputs, labels, reference) -> None:
        self.same = self.same + self.hits(outputs, labels, reference).sum()
        self.total += len(reference)

    def compute(self) -> float:
        return float(self.same) / self.total

    def successes(self) -> tuple[int, int]:
        return int(self.same), self.total


class KLDivergence(Metric):
    """Mean KL(p_fp32 || p) over samples, of the softmax over dimension 1, in nats (float32 throughout)."""

    name = "kl"
    higher_is_better = False
    needs_reference = True

    def __init__(self):
        self.reset()

    def reference(self, outputs):
        return torch.log_softmax(outputs.float(), dim=1)

    def reset(self) -> None:
        self.sum, self.total = 0.0, 0

    def update(self, outputs, labels, reference) -> None:
        log_q = torch.log_softmax(outputs.float(), dim=1)
        self.sum = self.sum + (reference.exp() * (reference - log_q)).sum()
        self.total += len(reference)

    def compute(self) -> float:
        return float(self.sum) / self.total


def _takes(fn, name: str) -> bool:
    try:
        return name in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


class _StatefulMetric(Metric):
    """A user object with ``update(outputs, labels[, reference])`` and ``compute()`` (torchmetrics works as is)."""

    def __init__(self, name: str, obj: Any, device: torch.device):
        self.name, self.obj = name, obj
        if hasattr(obj, "to"):
            obj.to(device)
        self.higher_is_better = getattr(obj, "higher_is_better", True) is not False
        self.needs_reference = _takes(obj.update, "reference")

    def reset(self) -> None:
        if hasattr(self.obj, "reset"):
            self.obj.reset()

    def update(self, outputs, labels, reference) -> None:
        if self.needs_reference:
            self.obj.update(outputs, labels, reference=reference)
        else:
            self.obj.update(outputs, labels)

    def compute(self) -> float:
        value = self.obj.compute()
        return float(value.item() if isinstance(value, torch.Tensor) else value)


class _FunctionMetric(Metric):
    """A user function ``fn(outputs, labels[, reference]) -> float`` on the outputs of the whole split."""

    def __init__(self, name: str, fn, kwargs: dict):
        self.name, self.fn, self.kwargs = name, fn, kwargs
        self.higher_is_better = getattr(fn, "higher_is_better", True) is not False
        self.needs_reference = _takes(fn, "reference")
        self.reset()

    def reset(self) -> None:
        self.outputs, self.labels, self.references = [], [], []

    def update(self, outputs, labels, reference) -> None:
        self.outputs.append(outputs)
        self.labels.append(labels)
        if reference is not None:
            self.references.append(reference)

    def compute(self) -> float:
        extra = {"reference": torch.cat(self.references)} if self.needs_reference else {}
        value = self.fn(torch.cat(self.outputs), torch.cat(self.labels), **extra, **self.kwargs)
        return float(value.item() if isinstance(value, torch.Tensor) else value)


def get_metric(spec: str | Metric, device: torch.device | str = "cpu", **kwargs: Any) -> Metric:
    """A metric by name: ``top1``, ``top5`` (any ``topK``), ``agreement``, ``kl``, or ``package.module:callable``
    (a class is instantiated with ``kwargs``; a function receives them on every call)."""
    if isinstance(spec, Metric):
        return spec
    top = re.fullmatch(r"top(\d+)", spec)
    if top and int(top.group(1)) >= 1:
        return TopK(int(top.group(1)))
    if spec == "agreement":
        return Agreement()
    if spec == "kl":
        return KLDivergence()
    module_name, colon, attr = spec.partition(":")
    if not colon or not attr:
        raise MetricError(f"unknown metric {spec!r}: use {', '.join(BUILTIN_METRICS)} or package.module:callable")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:
        raise MetricError(f"cannot import module {module_name!r} for metric {spec!r}: {exc}") from None
    obj = getattr(module, attr, None)
    if obj is None or not callable(obj):
        raise MetricError(f"{module_name!r} has no callable {attr!r} (metric {spec!r})")
    if inspect.isclass(obj):
        try:
            instance = obj(**kwargs)
        except TypeError as exc:
            raise MetricError(f"{spec}(**metric_kwargs) failed: {exc}") from None
        if not (callable(getattr(instance, "update", None)) and callable(getattr(instance, "compute", None))):
            raise MetricError(f"metric class {spec!r} must have update(outputs, labels) and compute() methods")
        return _StatefulMetric(spec, instance, torch.device(device))
    return _FunctionMetric(spec, obj, dict(kwargs))
