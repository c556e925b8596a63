"""Confidence: how far an accuracy measured on n images can be from the accuracy on all images like them.

A fraction metric (top-k, agreement) on n images is a binomial proportion; its Wilson score interval holds at the
stated level even near 0 or 1, where the normal approximation p +- z sqrt(p(1-p)/n) does not.
"""
from __future__ import annotations

import math

__all__ = ["CONFIDENCE", "Z", "wilson_interval"]

CONFIDENCE = 0.95
Z = 1.959963984540054  # the two-sided 95 % normal quantile


def wilson_interval(p: float, n: int, z: float = Z) -> tuple[float, float]:
    """The Wilson score interval of a proportion ``p`` observed on ``n`` trials."""
    if n <= 0:
        return 0.0, 1.0
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)
