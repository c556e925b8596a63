"""Integer LayerNorm: I-ViT's I-LayerNorm and FQ-ViT's Power-of-Two-Factor (PTF) input.

- **I-LayerNorm** (I-ViT): integer codes ``x`` (the 16-bit residual stream) over ``C`` channels; the mean is an
  integer division, the variance a sum of squares, the standard deviation an integer square root by Newton's
  iteration (:func:`~.arithmetic.isqrt`), and the normalised value ``y * floor((2^31 - 1) / std)``, shifted right
  by ``1 + guard`` bits (``guard = ceil(log2(C) / 2)``) so that it stays below ``2^30`` for any ``C``: scale
  ``sqrt(C) / 2^(30 - guard)``. The affine adds ``floor(bias / weight / scale)`` as an integer; the weight becomes
  the per-channel scale of the output, which the next requantization absorbs.
- **PTF** (FQ-ViT): the input is quantized per channel with scale ``s * 2^alpha_c`` (``alpha_c`` in ``0..K``, one
  layer-wide ``s``), so channels with a wide range keep it while narrow ones keep resolution; a left shift by
  ``alpha_c`` puts every channel's code on the common grid ``s``, and the statistics are I-LayerNorm's.

The sum of squares needs ``2 (bits - 1) + log2 C`` bits: an int64 accumulator for 16-bit inputs.
"""
from __future__ import annotations

import math

import torch

from .arithmetic import INT32_MAX, floor_div, isqrt, round_div, shift_right

__all__ = ["PTF_K", "int_layernorm", "ptf_alpha", "ptf_codes"]

PTF_K = 3  # FQ-ViT: factors 1, 2, 4, 8


def int_layernorm(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(codes, scale)`` of I-LayerNorm over the last dimension of integer codes ``x`` (their own scale cancels):
    ``LayerNorm(x) ~ codes * scale``, ``scale`` per channel (a tensor of the last dimension's size)."""
    channels = x.shape[-1]
    guard = math.ceil(math.log2(channels) / 2)  # |y| / std <= sqrt(C): 2^31 * sqrt(C) / 2^guard < 2^31 * 2
    mean = round_div(x.sum(dim=-1, keepdim=True), channels)
    y = x - mean
    std = isqrt((y * y).sum(dim=-1, keepdim=True))
    factor = floor_div(torch.full_like(std, INT32_MAX), std.clamp(min=1))
    y = shift_right(y * factor, 1 + guard)  # y / std * 2^(30 - guard): |codes| < 2^30
    unit = math.sqrt(channels) / 2 ** (30 - guard)  # (x - mean) / sigma = codes * unit
    one = torch.ones(channels, dtype=torch.float64, device=x.device)
    weight = one if weight is None else weight.detach().double()
    if bias is not None:
        safe = torch.where(weight == 0, one, weight)
        y = y + torch.floor(bias.detach().double() / safe / unit).to(torch.int64)  # a compile-time constant
    return y, (weight * unit).float()


def ptf_alpha(channel_amax: torch.Tensor, bits: int, k: int = PTF_K) -> tuple[float, torch.Tensor]:
    """``(s, alpha)``: the layer scale and each channel's power-of-two factor. ``s`` puts the widest channel on
    the grid at factor ``2^k``; ``alpha_c`` is the smallest factor that holds channel ``c``'s range, the finest
    grid that clips nothing (FQ-ViT picks among the same ``k + 1`` factors by squared error)."""
    bound = 2 ** (bits - 1) - 1
    top = float(channel_amax.max())
    s = max(top, 1e-12) / bound / 2 ** k
    need = torch.log2((channel_amax.double() / (s * bound)).clamp(min=1.0))
    return s, torch.ceil(need - 1e-9).clamp(0, k).to(torch.int64)


def ptf_codes(x: torch.Tensor, s: float, alpha: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes of ``x`` on the common grid ``s``: each channel quantized at ``s * 2^alpha_c`` (``bits`` bits), then
    shifted left by ``alpha_c``."""
    bound = 2 ** (bits - 1) - 1
    codes = torch.round(x / (s * torch.pow(2.0, alpha.to(x.dtype)))).clamp_(-bound, bound).to(torch.int64)
    return torch.bitwise_left_shift(codes, alpha)
