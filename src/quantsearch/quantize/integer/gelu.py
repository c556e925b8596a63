"""Integer GELU: I-ViT's ShiftGELU, ``GELU(x) ~ x * sigmoid(1.702 x)`` with the sigmoid from shift-based exps.

``sigmoid(t) = e^t / (e^t + 1)``; with the row maximum ``m`` subtracted for range, ``e^(t-m) / (e^(t-m) + e^-m)`` (``m >= 0``),
both exps by :func:`~.softmax.shift_exp` and the ratio by one integer division. The sigmoid is on ``out_bits``
bits (scale ``2^-(out_bits-1)``), and the output code is ``x * sigmoid`` with scale ``scale * 2^-(out_bits-1)``.
"""
from __future__ import annotations

import torch

from .arithmetic import floor_div
from .softmax import safe_shift, shift_exp

__all__ = ["SIGMOID_BITS", "shift_gelu"]

SIGMOID_BITS = 8  # I-ViT: the sigmoid's codes, scale 2^-7


def shift_gelu(x: torch.Tensor, scale: float, n: int | None = None, sigmoid_bits: int = SIGMOID_BITS,
               dim: int = -1) -> tuple[torch.Tensor, float]:
    """``(codes, scale)`` of ShiftGELU on integer codes ``x`` (grid ``scale``): ``GELU ~ codes * scale``; ``n``:
    see :func:`~.softmax.safe_shift` (I-ViT's 23 clamps the sigmoid of rows whose maximum passes about 10)."""
    sig_scale = scale * 1.702  # the sigmoid reads the same codes on a 1.702x grid: a constant, not a multiply
    n = safe_shift(sig_scale, 2, n)
    top = x.amax(dim=dim, keepdim=True).clamp(min=0)  # any m >= 0 keeps both exponents non-positive
    exp, _ = shift_exp(x - top, sig_scale, n)
    exp_top, _ = shift_exp(-top, sig_scale, n)
    sigmoid = floor_div(torch.bitwise_left_shift(exp, sigmoid_bits - 1), exp + exp_top)
    return x * sigmoid, scale / 2 ** (sigmoid_bits - 1)
