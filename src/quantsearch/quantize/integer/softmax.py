"""Integer softmax: I-ViT's Shiftmax and FQ-ViT's Log-Int-Softmax, on int64 codes of the logits.

Both take the logits as integer codes ``x`` on a grid of ``scale`` (the attention scores, requantized from the
int32 ``q @ k^T``), subtract the row maximum, and compute ``exp`` without float:

- **Shiftmax** (I-ViT): ``e^x = 2^(x log2 e)``, with ``x log2 e ~ x + x/2 - x/16`` by shifts; ``2^x`` splits into
  an integer power (a shift) and ``2^r ~ 1 + r/2`` on ``r in (-1, 0]``. Probabilities are an integer division by
  the row sum, on ``out_bits`` bits (``p ~ code / 2^(out_bits-1)``).
- **Log-Int-Softmax** (FQ-ViT): I-BERT's second-order polynomial ``exp`` on ``(-ln 2, 0]`` and a shift, then the
  ratio ``sum / exp`` as an integer and its base-2 logarithm rounded (``p ~ 2^-k``), at ``bits`` bits: codes
  ``k = 0 .. 2^b - 2`` and zero, the log2 form's grid with amax 1.

Intermediate sums need up to about ``log2(tokens) + n + log2(1/scale)`` bits: int64 accumulators, as I-BERT's
CPU kernels use; the shift ``n`` of the base-2 exponent is as large as they allow (:func:`safe_shift`).
"""
from __future__ import annotations

import math

import torch

from .arithmetic import floor_div, round_div, shift_right

__all__ = ["LOG_SOFTMAX_N", "safe_shift", "shift_exp", "shiftmax", "polynomial_exp", "log_int_softmax"]

LOG_SOFTMAX_N = 30  # I-BERT / FQ-ViT
_IBERT_COEF = (0.35815147, 0.96963238, 1.0)  # exp(x) ~ a (x + b/a)^2 ... on (-ln 2, 0]: a x^2 + b x + c


def shift_exp(x: torch.Tensor, scale: float, n: int) -> tuple[torch.Tensor, float]:
    """I-ViT's ``exp`` of non-positive codes ``x`` on a grid of ``scale``: ``(codes, unit)`` with
    ``e^(x scale) ~ codes * unit``; exponents below ``-n`` (base 2) clamp to ``2^-n``."""
    x = x + shift_right(x, 1) - shift_right(x, 4)  # x * log2(e), by shifts
    x0 = math.floor(-1.0 / scale)  # -1 in base-2 exponent units: a compile-time constant
    x = torch.maximum(x, torch.full_like(x, n * x0))
    q = floor_div(x, x0)  # 0 .. n: the integer part of the (negated) base-2 exponent
    r = x - x0 * q  # (x0, 0]: the fraction, 2^(r/|x0|) ~ 1 + r / (2 |x0|)
    codes = shift_right(torch.bitwise_left_shift(r - 2 * x0, n - q), 1)  # (|x0| + r/2) * 2^(n - q)
    return codes, 1.0 / (-x0 * 2 ** n)


def safe_shift(scale: float, terms: int, n: int | None = None) -> int:
    """The largest ``n`` (at least the paper's, unless given) whose shift-based exps, summed over ``terms``, stay
    below ``2^46`` (room for a 16-bit numerator in int64): I-ViT fixes ``n`` (15 for Shiftmax, 23 for ShiftGELU)
    for int32, which clamps every exponent below ``-n`` and costs accuracy on rows with a large maximum."""
    if n is not None:
        return n
    return 46 - (math.floor(1.0 / scale) + 1).bit_length() - max(terms - 1, 0).bit_length()


def shiftmax(x: torch.Tensor, scale: float, out_bits: int = 16, n: int | None = None, dim: int = -1
             ) -> torch.Tensor:
    """I-ViT's Shiftmax of integer logits ``x`` over ``dim``: codes of the probabilities with scale
    ``2^-(out_bits - 1)``; ``n``: see :func:`safe_shift`."""
    n = safe_shift(scale, int(x.shape[dim]), n)
    x = x - x.amax(dim=dim, keepdim=True)
    codes, _ = shift_exp(x, scale, n)
    total = codes.sum(dim=dim, keepdim=True)
    return floor_div(torch.bitwise_left_shift(codes, out_bits - 1), total)


def polynomial_exp(x: torch.Tensor, scale: float, n: int = LOG_SOFTMAX_N) -> torch.Tensor:
    """I-BERT's integer ``exp`` of non-positive codes ``x``: ``e^(x scale)`` up to one positive factor per call
    (``a scale^2 / 2^n``), which cancels in a softmax."""
    a, b, c = _IBERT_COEF
    b_int, c_int = math.floor(b / a / scale), math.floor(c / a / scale ** 2)
    x0 = math.floor(-0.6931 / scale)  # -ln 2
    x = torch.maximum(x, torch.full_like(x, n * x0))
    q = floor_div(x, x0)
    r = x - x0 * q
    z = r * (r + b_int) + c_int
    return torch.bitwise_left_shift(z, n - q).clamp_(min=0)


def log_int_softmax(x: torch.Tensor, scale: float, bits: int, n: int = LOG_SOFTMAX_N, dim: int = -1
                    ) -> torch.Tensor:
    """FQ-ViT's Log-Int-Softmax of integer logits ``x`` over ``dim``: the log2 codes ``k`` (``p ~ 2^-k``), with
    ``2^bits - 1`` standing for zero (the grid of the log2 form at amax 1)."""
    x = x - x.amax(dim=dim, keepdim=True)
    # exps shifted below 2^40, so that sums over a few thousand tokens stay inside int64
    top = math.floor(1.0 / _IBERT_COEF[0] / scale ** 2)  # the polynomial's largest value, at x = 0
    n = min(n, 62 - top.bit_length())  # exp stays inside int64
    exp = polynomial_exp(x, scale, n)
    exp = shift_right(exp, max(0, (top << n).bit_length() - 40))
    total = exp.sum(dim=dim, keepdim=True)
    ratio = round_div(total, exp.clamp(min=1))  # sum / exp >= 1; exp == 0 gives a huge ratio (below the grid)
    k = _log2_floor(ratio)
    k = k + (ratio - torch.bitwise_left_shift(torch.ones_like(k), k) >= _pow2_half(k)).to(k.dtype)  # FQ-ViT
    zero = (k >= 2 ** bits - 1) | (exp == 0)
    return torch.where(zero, torch.full_like(k, 2 ** bits - 1), k)


def _log2_floor(x: torch.Tensor) -> torch.Tensor:
    """``floor(log2 x)`` of positive int64 codes, by a binary search over shifts."""
    k = torch.zeros_like(x)
    for step in (32, 16, 8, 4, 2, 1):
        big = shift_right(x, k + step) > 0
        k = k + big.to(x.dtype) * step
    return k


def _pow2_half(k: torch.Tensor) -> torch.Tensor:
    """``2^(k-1)`` for ``k >= 1`` and 1 for ``k = 0`` (FQ-ViT's rounding threshold above ``2^k``)."""
    return torch.bitwise_left_shift(torch.ones_like(k), (k - 1).clamp(min=0))
