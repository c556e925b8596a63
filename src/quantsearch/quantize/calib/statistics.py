"""The calibrator: :class:`TensorStatistics`, everything one calibration pass records for one quantizer.

It takes the place of a pytorch-quantization calibrator (``collect(x)`` on every tensor while calibration is on)
and keeps, in one pass, the running absmax, a moving average of per-batch absmax, the minimum and maximum and, for
the histogram methods, a ``HistogramCalibrator`` histogram of |x| and, for asymmetric and per-head quantizers, a
seeded sample of the signed values (whole rows of the last dimension for per-head ones: each head's range is
fitted on its own features; they keep each feature's max |x| too, for method max); :meth:`TensorStatistics.amax`
then answers any method at any bit-width without another forward pass.
"""
from __future__ import annotations

import math
import warnings

import numpy as np
import torch

from .histogram import entropy_amax, mse_amax, percentile_amax
from .methods import MethodSpec

with warnings.catch_warnings():
    warnings.simplefilter("ignore", FutureWarning)
    from pytorch_quantization.calib import HistogramCalibrator

__all__ = ["NUM_BINS", "TensorStatistics"]

NUM_BINS = 2048
SAMPLE_PER_BATCH = 16384  # signed values kept per batch for a range fit (seeded, uniform over the tensor)
SAMPLE_SIZE = 65536  # at most this many in all
ROWS_FACTOR = 4  # whole rows (per-head ranges) keep this many times more: each head's range sees a share


class TensorStatistics:
    """Everything one calibration pass records for one quantizer; it stands in as the quantizer's calibrator.

    ``TensorQuantizer`` calls ``collect(x)`` on every tensor while calibration is on (once per batch for a module
    used once per forward).
    """

    def __init__(self, histogram: bool = False, momentum: float = 0.95, num_bins: int = NUM_BINS,
                 sample: bool = False, rows: bool = False):
        self.momentum = float(momentum)
        self.num_bins = num_bins
        self.histogram = HistogramCalibrator(8, None, False, num_bins=num_bins) if histogram else None
        self.sampling = bool(sample or rows)
        self.rows = bool(rows)  # sample whole rows of the last dimension (per-head ranges)
        self.reset()

    def reset(self) -> None:
        self.batches = 0
        self.nonfinite = 0  # batches holding NaN or Inf (left out of every statistic)
        self.absmax = 0.0
        self.moving_max: float | None = None
        self.min = math.inf
        self.max = -math.inf
        self.feature_absmax: torch.Tensor | None = None  # with rows: max |x| per feature of the last dimension
        self._samples: list[torch.Tensor] = []
        if self.histogram is not None:
            self.histogram.reset()

    def collect(self, x: torch.Tensor) -> None:
        x = x.detach()
        if x.numel() == 0:
            return
        lo, hi = (float(v) for v in torch.aminmax(x))
        if not (math.isfinite(lo) and math.isfinite(hi)):
            self.nonfinite += 1
            return
        absmax = max(-lo, hi)
        self.min, self.max = min(self.min, lo), max(self.max, hi)
        self.absmax = max(self.absmax, absmax)
        self.moving_max = absmax if self.moving_max is None else (
            self.momentum * self.moving_max + (1 - self.momentum) * absmax)
        self.batches += 1
        if self.histogram is not None:
            self.histogram.collect(x)
        if self.rows:
            features = x.reshape(-1, x.shape[-1]).abs().amax(0).float()  # on the device: no sync per batch
            self.feature_absmax = features if self.feature_absmax is None else torch.maximum(self.feature_absmax,
                                                                                             features)
        if self.sampling:
            flat = x.reshape(-1, x.shape[-1]) if self.rows else x.reshape(-1)
            keep = max(1, ROWS_FACTOR * SAMPLE_PER_BATCH // flat[0].numel()) if self.rows else SAMPLE_PER_BATCH
            self._samples.append((self._draw(flat, keep) if len(flat) > keep else flat).float().cpu())

    def _draw(self, flat: torch.Tensor, keep: int) -> torch.Tensor:
        """``keep`` rows of ``flat`` drawn uniformly, with replacement, seeded by the batch number (the same
        positions for every run): a permutation of the whole tensor would cost O(numel) to keep 16k values."""
        pick = torch.randint(len(flat), (keep,), generator=torch.Generator().manual_seed(self.batches))
        return flat[pick.to(flat.device)]

    def sample(self) -> torch.Tensor:
        """The signed values kept (at most ``SAMPLE_SIZE``, seeded), for a range fit; with ``rows``, whole rows
        ((rows, last dimension), at most ``ROWS_FACTOR x SAMPLE_SIZE`` values: each group gets its share)."""
        values = torch.cat(self._samples) if self._samples else torch.zeros(0)
        cap = max(1, ROWS_FACTOR * SAMPLE_SIZE // values[0].numel()) if self.rows and len(values) else SAMPLE_SIZE
        if len(values) > cap:
            values = values[torch.randperm(len(values), generator=torch.Generator().manual_seed(0))[:cap]]
        return values

    def hist(self) -> tuple[np.ndarray, np.ndarray]:
        """Counts and bin edges of |x| (as pytorch-quantization hands them to its amax searches)."""
        counts = self.histogram._calib_hist.int().cpu().numpy()
        edges = self.histogram._calib_bin_edges.cpu().numpy()
        return counts, edges[: len(counts) + 1]

    def amax(self, spec: MethodSpec, num_bits: int, unsigned: bool) -> float:
        """The amax that ``spec`` picks for a ``num_bits`` quantizer (on the unsigned grid when ``unsigned``)."""
        if spec.method == "max":
            return self.absmax
        if spec.method == "moving-max":
            return float(self.moving_max)
        counts, edges = self.hist()
        if spec.method == "percentile":
            return percentile_amax(counts, edges, spec.percentile)
        if spec.method == "entropy":
            return entropy_amax(counts, edges, num_bits, unsigned)
        return mse_amax(counts, edges, num_bits, unsigned)
