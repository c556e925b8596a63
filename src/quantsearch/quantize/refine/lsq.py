"""Learned step size quantization (LSQ, Esser et al., 2020): a uniform fake quantizer whose step takes gradients.

``x -> s * clamp(round(x / s), low, high)`` with the straight-through estimator for ``round``. The step ``s``
gets LSQ's gradient, ``round(x/s) - x/s`` inside the grid and ``low`` or ``high`` where ``x`` is clipped, scaled by
``1 / sqrt(elements * high)`` so that steps of small and large tensors learn at comparable rates; ``x`` gets 1
inside the grid and 0 where clipped. Block reconstruction (:mod:`.reconstruction`) learns activation steps this
way; the learned step times ``high`` becomes the quantizer's amax, so inference runs the unchanged quantizer.

The same holds per group for the per-head form (one step per head and q/k/v part), and for the asymmetric form
as LSQ+ (Bhalgat et al., 2020) learns it: both ends of the range, the zero point rounded straight through.
A log2 grid has no step to learn: it is scale-free, so the straight-through gradient of its top vanishes
inside the range.
"""
from __future__ import annotations

import math

import torch

__all__ = ["lsq_asymmetric", "lsq_fake_quant", "lsq_grouped"]


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


def _through(x: torch.Tensor) -> torch.Tensor:
    """``round(x)`` forward, the identity backward."""
    return (x.round() - x).detach() + x


def lsq_grouped(x: torch.Tensor, steps: torch.Tensor, low: float, high: float) -> torch.Tensor:
    """:func:`lsq_fake_quant` with the last dimension of ``x`` split into ``len(steps)`` groups, one step each
    (the per-head form's grid)."""
    groups = steps.numel()
    parts = x.reshape(*x.shape[:-1], groups, x.shape[-1] // groups)
    scale = 1.0 / math.sqrt(parts[..., 0, :].numel() * high)
    return lsq_fake_quant(parts, steps.reshape(groups, 1), low, high, scale).reshape(x.shape)


def lsq_asymmetric(x: torch.Tensor, low: torch.Tensor, high: torch.Tensor, top: float) -> torch.Tensor:
    """``x`` on the asymmetric grid of ``[low, high]`` with ``top + 1`` codes (the asymmetric form's: scale
    ``(high - low) / top``, zero point ``round(-low / scale)``), both ends learned, LSQ's gradient scale."""
    grad_scale = 1.0 / math.sqrt(x.numel() * top)
    low = (low - low * grad_scale).detach() + low * grad_scale
    high = (high - high * grad_scale).detach() + high * grad_scale
    scale = (high.clamp(min=0.0) - low.clamp(max=0.0)) / top
    zero = _through(-low.clamp(max=0.0) / scale).clamp(0.0, top)
    codes = torch.clamp(_through(x / scale) + zero, 0.0, top)
    return (codes - zero) * scale
