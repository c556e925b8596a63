"""Learned step size quantization (LSQ, Esser et al., 2020): a uniform fake quantizer whose step takes gradients.

``x -> s * clamp(round(x / s), low, high)`` with the straight-through estimator for ``round``. The step ``s``
gets LSQ's gradient, ``round(x/s) - x/s`` inside the grid and ``low`` or ``high`` where ``x`` is clipped, scaled by
``1 / sqrt(elements * high)`` so that steps of small and large tensors learn at comparable rates; ``x`` gets 1
inside the grid and 0 where clipped. Block reconstruction (:mod:`.reconstruction`) learns activation steps this
way; the learned step times ``high`` becomes the quantizer's amax, so inference runs the unchanged quantizer.
"""
from __future__ import annotations

import math

import torch

from ..fakequant import integer_range

__all__ = ["lsq_fake_quant", "step_and_range"]


def lsq_fake_quant(x: torch.Tensor, step: torch.Tensor, low: float, high: float,
                   grad_scale: float | None = None) -> torch.Tensor:
    """``x`` on the grid ``step * [low, high]`` with LSQ's gradients (``grad_scale`` defaults to LSQ's
    ``1 / sqrt(x.numel() * high)``)."""
    if grad_scale is None:
        grad_scale = 1.0 / math.sqrt(x.numel() * high)
    scaled = step * grad_scale
    step = (step - scaled).detach() + scaled  # the step's value, the step's gradient times grad_scale
    v = torch.clamp(x / step, low, high)
    return ((v.round() - v).detach() + v) * step


def step_and_range(quantizer) -> tuple[float, float, float]:
    """``(step, low, high)`` of a per-tensor uniform ``TensorQuantizer`` as it is now: its grid is
    ``step * [low, high]`` with ``step = amax / high``."""
    high, low = integer_range(quantizer.num_bits, quantizer.unsigned, quantizer.narrow_range)
    return float(quantizer.amax) / high, low, high
