"""Confidence: how far an accuracy measured on n images can be from the accuracy on all images like them.

A fraction metric (top-k, agreement) on n images is a binomial proportion; its Wilson score interval holds at the
stated level even near 0 or 1, where the normal approximation p +- z sqrt(p(1-p)/n) does not.

Paired: a quantized model and FP32 scored on the same images mostly hit and miss the same ones, so the drop
``FP32 - model`` is measured far more precisely than either accuracy: its standard error comes from the images on
which they disagree only (:func:`paired_drop`).
"""
from __future__ import annotations

import math
from statistics import NormalDist

__all__ = ["CONFIDENCE", "Z", "wilson_interval", "one_sided_z", "paired_drop"]

CONFIDENCE = 0.95
Z = 1.959963984540054  # the two-sided 95 % normal quantile


def wilson_interval(p: float, n: int, z: float = Z) -> tuple[float, float]:
    """The Wilson score interval of a proportion ``p`` observed on ``n`` trials."""
    if n <= 0:
        return 0.0, 1.0
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def one_sided_z(confidence: float) -> float:
    """The normal quantile of a one-sided bound at ``confidence`` (0.5: 0, the point estimate)."""
    return NormalDist().inv_cdf(float(confidence))


def paired_drop(reference_hits, hits, confidence: float) -> tuple[float, float]:
    """``(drop, upper)``: the observed drop ``mean(reference_hits - hits)`` over the same images and its one-sided
    upper confidence bound (normal approximation of the mean of per-image differences in {-1, 0, 1})."""
    import torch

    diff = torch.as_tensor(reference_hits).double() - torch.as_tensor(hits).double()
    n = diff.numel()
    if n == 0:
        raise ValueError("no images to compare")
    drop = float(diff.mean())
    spread = float(diff.std()) if n > 1 else 0.0
    return drop, drop + one_sided_z(confidence) * spread / math.sqrt(n)
