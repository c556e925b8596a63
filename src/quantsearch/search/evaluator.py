"""The evaluator: a metric (:mod:`quantsearch.sources.metrics`) of a model on a fixed split held in memory.

Batches are materialised once (on the target device) so a search of thousands of candidates pays the data
pipeline once, not per candidate. The FP32 outputs the label-free metrics compare with are computed once, when the evaluator is built, and kept on
the device beside the batches (for ``kl``, log-probabilities; for ``agreement``, only the top-1 classes).
"""
from __future__ import annotations

import math
from contextlib import nullcontext
from typing import Any, Iterable

import torch
from torch import nn
from torch.utils.data import Dataset

from ..sources.metrics import Metric, MetricError, get_metric

__all__ = [
    "NumericalError",
    "amp_dtype",
    "Evaluator",
    "AccuracyEvaluator",
    "materialize",
    "EarlyRejection",
    "EarlyRejected",
]


class NumericalError(ArithmeticError):
    """The model produced NaN or Inf: the configuration is recorded as failed, never silently scored."""


class EarlyRejected(Exception):
    """A candidate stopped part-way: its metric on the whole split is below the floor with high confidence.

    ``accuracy`` is the metric on the ``samples`` images seen (of ``total``); ``p_value`` is the test's (see
    :class:`EarlyRejection`).
    """

    def __init__(self, accuracy: float, samples: int, total: int, p_value: float, bar: float | None = None):
        below = "the floor" if bar is None else f"{100 * bar:.2f} %, what a point of its costs must beat"
        super().__init__(f"{'rejected' if bar is None else 'dominated'} after {samples} of {total} images: "
                         f"{100 * accuracy:.2f} % so far, below {below} with p = {p_value:.2g}")
        self.accuracy, self.samples, self.total, self.p_value = accuracy, samples, total, p_value
        self.bar = bar  # None: below the floor; a number: cannot enter the front (see Evaluator.__call__)


# -- data in memory ----------------------------------------------------------------------------------------------
def _split_batch(batch) -> tuple[torch.Tensor, torch.Tensor]:
    from ..sources.data import NO_LABEL

    if isinstance(batch, (tuple, list)):
        x = batch[0]
        y = batch[1] if len(batch) > 1 else None
    else:
        x, y = batch, None
    if y is None:
        y = torch.full((len(x),), NO_LABEL, dtype=torch.long)
    return x, torch.as_tensor(y)


def materialize(data: Dataset | Iterable, batch_size: int, device: torch.device | str = "cpu",
                limit: int | None = None, workers: int | None = None,
                channels_last: bool = False) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Collect ``(inputs, labels)`` batches on ``device``, at most ``limit`` samples (label -1: none)."""
    from ..sources.data import data_loader

    device = torch.device(device)
    loader = data_loader(data, batch_size, device, workers) if isinstance(data, Dataset) else data
    batches, seen = [], 0
    for batch in loader:
        x, y = _split_batch(batch)
        if limit is not None and seen + len(x) > limit:
            x, y = x[: limit - seen], y[: limit - seen]
        if len(x):
            x = x.to(device, non_blocking=True)
            if channels_last and x.dim() == 4:
                x = x.contiguous(memory_format=torch.channels_last)
            batches.append((x, y.to(device, non_blocking=True)))
        seen += len(x)
        if limit is not None and seen >= limit:
            break
    return batches


def amp_dtype(device: torch.device | str) -> torch.dtype:
    """The autocast type: float16 on CUDA (pytorch-quantization quantizes half tensors in float32, exactly),
    bfloat16 on CPU (quantized in bfloat16 itself: rounding may move a value by one quantization step)."""
    return torch.float16 if torch.device(device).type == "cuda" else torch.bfloat16


# -- early rejection ---------------------------------------------------------------------------------------------
class EarlyRejection:
    """Stop evaluating a candidate once its accuracy on the whole split is below ``floor`` with high confidence.

    **The bound.** The search split is a random sample (``split_dataset`` shuffles), so its first ``n`` images are a
    uniformly random subset of its ``N`` images, drawn without replacement. If the candidate is right on ``K`` of
    the ``N`` images, the number right among the first ``n`` is hypergeometric, ``X ~ H(N, K, n)``. The candidate
    meets the floor iff ``K >= K0``, the fewest hits whose fraction ``K0 / N`` reaches ``floor``. After ``k`` hits in
    ``n`` images the test of "meets the floor" has the exact p-value ``P(X <= k | K = K0)`` (the largest over all
    ``K >= K0``, since ``X`` grows stochastically with ``K``). The candidate is rejected when that p-value is at most
    ``(1 - confidence) / m``, ``m`` being the number of checkpoints (a union bound over the checks), so a candidate
    that meets the floor on the whole split is rejected with probability at most ``1 - confidence`` (0.1 % at the
    default 99.9 %), whatever its accuracy. A candidate that cannot reach ``K0`` even if every remaining image were
    right has p-value 0 and is always rejected.

    **Racing.** The same test against a higher bar (``Evaluator.__call__(model, bar=...)``: the best accuracy
    among the evaluated points that cost no more) stops a candidate that cannot enter the front; a candidate
    that would is stopped with probability at most ``1 - confidence`` by the same argument.

    **The slices.** Checkpoints after 1, 2, 4, 8, ... batches (doubling slices), never after the last batch.
    """

    def __init__(self, floor: float, confidence: float = 0.999):
        if not 0.0 < float(confidence) < 1.0:
            raise ValueError(f"early-rejection confidence must lie in (0, 1), got {confidence}")
        self.floor, self.confidence = float(floor), float(confidence)

    @staticmethod
    def checkpoints(num_batches: int) -> list[int]:
        """Batch counts after which to test: 1, 2, 4, ... below ``num_batches``."""
        points, b = [], 1
        while b < num_batches:
            points.append(b)
            b *= 2
        return points

    def hits_needed(self, total: int, floor: float | None = None) -> int:
        """``K0``: the fewest hits out of ``total`` whose fraction (as a float, as the floor is compared) reaches
        ``floor`` (default: the floor)."""
        floor = self.floor if floor is None else float(floor)
        k0 = max(0, min(total, math.ceil(floor * total)))
        while k0 < total and k0 / total < floor:
            k0 += 1
        while k0 > 0 and (k0 - 1) / total >= floor:
            k0 -= 1
        return k0

    def p_value(self, hits: int, seen: int, total: int, floor: float | None = None) -> float:
        """``P(X <= hits)`` for ``X ~ H(total, K0, seen)``: how likely so few hits are if ``floor`` (default: the
        floor) is met."""
        from scipy.stats import hypergeom

        return float(hypergeom.cdf(hits, total, self.hits_needed(total, floor), seen))

    def rejects(self, hits: int, seen: int, total: int, checks: int,
                floor: float | None = None) -> tuple[bool, float]:
        """Whether ``hits`` in the first ``seen`` of ``total`` images reject (against ``floor``, default the
        floor), with ``checks`` tests in all."""
        p = self.p_value(hits, seen, total, floor)
        return p <= (1.0 - self.confidence) / max(1, checks), p


# -- the evaluator -----------------------------------------------------------------------------------------------
class Evaluator:
    """A metric of a model on fixed batches held on ``device``: ``evaluator(model) -> float``.

    Args:
        data: a Dataset (loaded once, in order) or an iterable of batches.
        metric: a name or a :class:`Metric` (see :func:`get_metric`).
        reference: the model whose outputs label-free metrics compare with; a ``QuantizedActivationsModel`` is
            run with quantization disabled, so this is the FP32 model. Its outputs are computed here, once.
        channels_last: store 4-D input batches channels-last (convert the model too, for the speed-up).
        amp: run forward passes under ``torch.autocast`` (see :func:`amp_dtype`).
        workers: loader worker processes (None: see ``data.default_workers``).
        compile: run candidates through ``torch.compile`` (one graph for every configuration, see :meth:`runner`).

    ``early_rejection`` (off by default; see :meth:`reject_below`) makes a call stop part-way and raise
    :class:`EarlyRejected` for a candidate clearly below the floor.
    """

    early_rejection: EarlyRejection | None = None

    def __init__(self, data: Dataset | Iterable, metric: str | Metric = "top1", batch_size: int = 500,
                 device: torch.device | str = "cpu", limit: int | None = None, reference: nn.Module | None = None,
                 channels_last: bool = False, amp: bool = False, workers: int | None = None,
                 metric_kwargs: dict | None = None, compile: bool = False):
        self.device = torch.device(device)
        self.compile = bool(compile)
        self._compiled: dict[int, nn.Module] = {}
        self.metric = get_metric(metric, self.device, **(metric_kwargs or {}))
        self.amp = bool(amp)
        self.batches = materialize(data, batch_size, self.device, limit, workers, channels_last)
        self.num_samples = sum(len(y) for _, y in self.batches)
        if self.num_samples == 0:
            raise ValueError("the evaluation split is empty")
        if self.metric.needs_labels and any(bool((y < 0).any()) for _, y in self.batches):
            raise MetricError(f"metric {self.metric.name} needs labels and this data has none: "
                              f"use --metric agreement or kl for unlabeled images")
        self.references: list[torch.Tensor] | None = None
        if self.metric.needs_reference:
            if reference is None:
                raise MetricError(f"metric {self.metric.name} compares with the FP32 model: give reference=model")
            self.references = self.reference_outputs(reference)

    @property
    def name(self) -> str:
        return self.metric.name

    def reject_below(self, floor: float | None, confidence: float = 0.999) -> None:
        """Turn early rejection on against ``floor`` (None: off). Needs a metric that is a fraction of samples."""
        if floor is None:
            self.early_rejection = None
            return
        if self.metric.successes is Metric.successes or not self.higher_is_better:
            raise MetricError(f"early rejection needs a metric that counts hits per image (top-k, agreement), "
                              f"not {self.metric.name}")
        self.early_rejection = EarlyRejection(floor, confidence)

    @property
    def higher_is_better(self) -> bool:
        return bool(self.metric.higher_is_better)

    @property
    def fraction(self) -> bool:
        return bool(self.metric.fraction)

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

    def _forward(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(self.device.type, dtype=amp_dtype(self.device)) if self.amp else nullcontext():
            return model(x)

    def reference_outputs(self, model: nn.Module) -> list[torch.Tensor]:
        """What the metric keeps of ``model``'s FP32 outputs, per batch, on the device."""
        model.eval()
        fp32 = model.quantization_disabled() if hasattr(model, "quantization_disabled") else nullcontext()
        # the model's own weights: a refined bit-config applied before the evaluators exist must not move FP32
        own = model.unrefined() if getattr(model, "refined", None) else nullcontext()
        references = []
        with own, fp32, torch.inference_mode():
            for x, _ in self.batches:
                outputs = self._forward(model, x)
                if not torch.isfinite(outputs).all():
                    raise NumericalError("output holds NaN or Inf, so it cannot be the reference of "
                                         f"metric {self.metric.name}")
                references.append(self.metric.reference(outputs))
        return references

    def __call__(self, model: nn.Module, bar: float | None = None) -> float:
        """The metric of ``model`` on the split. With early rejection on, a candidate clearly below the floor
        raises :class:`EarlyRejected`; so does one clearly below ``bar`` (racing: the accuracy it must beat to
        enter the front), with ``EarlyRejected.bar`` set."""
        model.eval()
        run = self.runner(model)
        self.metric.reset()
        rejection = self.early_rejection
        checks = set(rejection.checkpoints(len(self.batches))) if rejection is not None else set()
        bar = None if rejection is None or bar is None or bar <= rejection.floor else float(bar)
        with torch.inference_mode():
            finite = torch.ones((), dtype=torch.bool, device=self.device)
            for i, (x, y) in enumerate(self.batches):
                outputs = self._forward(run, x)
                finite &= torch.isfinite(outputs).all()
                self.metric.update(outputs, y, self.references[i] if self.references is not None else None)
                if i + 1 in checks:
                    self._check(rejection, len(checks), bar, finite, model, run)
        if not bool(finite):
            raise NumericalError(self._nonfinite(model, run))
        return self.metric.compute()

    def sample_hits(self, model: nn.Module) -> torch.Tensor | None:
        """Per image of the split, in order, whether ``model`` scores a hit (None: the metric counts no hits), for
        paired comparisons on the same images (see :mod:`quantsearch.search.confidence`)."""
        model.eval()
        run, hits = self.runner(model), []
        with torch.inference_mode():
            for i, (x, y) in enumerate(self.batches):
                hit = self.metric.hits(self._forward(run, x), y,
                                       self.references[i] if self.references is not None else None)
                if hit is None:
                    return None
                hits.append(hit.cpu())
        return torch.cat(hits)

    def _check(self, rejection: EarlyRejection, checks: int, bar: float | None, finite, model, run) -> None:
        """Raise :class:`EarlyRejected` if the hits so far reject the floor (or, failing that, ``bar``)."""
        hits, seen = self.metric.successes()
        rejected, p = rejection.rejects(hits, seen, self.num_samples, checks)
        dominated = False
        if not rejected and bar is not None:
            rejected, p = rejection.rejects(hits, seen, self.num_samples, checks, bar)
            dominated = rejected
        if rejected:
            if not bool(finite):
                raise NumericalError(self._nonfinite(model, run))
            raise EarlyRejected(hits / seen, seen, self.num_samples, p, bar if dominated else None)

    def _nonfinite(self, model: nn.Module, run: nn.Module) -> str:
        """The message of a NaN/Inf output: the first batch that has one and, for a quantized model, where."""
        with torch.inference_mode():
            bad = next((i for i, (x, _) in enumerate(self.batches)
                        if not torch.isfinite(self._forward(run, x)).all()), None)
        message = "model output holds NaN or Inf" + ("" if bad is None else f" (batch {bad})")
        where = model.locate_nonfinite(self.batches[bad][0]) if bad is not None and hasattr(
            model, "locate_nonfinite") else None
        return f"{message}: {where}" if where else message


class AccuracyEvaluator(Evaluator):
    """Top-1 accuracy of a model on fixed batches."""

    def __init__(self, data: Dataset | Iterable, batch_size: int = 500, device: torch.device | str = "cpu",
                 limit: int | None = None, **kwargs: Any):
        super().__init__(data, "top1", batch_size, device, limit, **kwargs)
