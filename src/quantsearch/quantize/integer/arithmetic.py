"""Integer arithmetic that the integer operators share: grids, floor shifts and divisions, square roots.

Values are ``int64`` tensors, so every operator is bit-exact on CPU and GPU alike (no float rounding can differ
between devices). A float number enters only as a constant computed once from a calibrated scale (the
compile-time step of an integer kernel); the forward on a tensor is integer operations only.
"""
from __future__ import annotations

import math

import torch

__all__ = ["INT32_MAX", "to_int", "shift_right", "floor_div", "round_div", "isqrt"]

INT32_MAX = 2 ** 31 - 1
ISQRT_STEPS = 40  # from 2^16 to the root of any n < 2^62: about 15 halvings, then quadratic convergence


def to_int(x: torch.Tensor, scale: float | torch.Tensor, bits: int) -> torch.Tensor:
    """``x`` on the symmetric narrow ``bits``-bit grid of ``scale`` as int64 codes (the requantization of an
    upstream integer tensor, simulated on its float image)."""
    bound = 2 ** (bits - 1) - 1
    return torch.round(x / scale).clamp_(-bound, bound).to(torch.int64)


def shift_right(x: torch.Tensor, k: int | torch.Tensor) -> torch.Tensor:
    """``floor(x / 2^k)``: an arithmetic right shift."""
    return torch.bitwise_right_shift(x, k)


def floor_div(x: torch.Tensor, d: int | torch.Tensor) -> torch.Tensor:
    """``floor(x / d)`` in integers."""
    return torch.div(x, d, rounding_mode="floor")


def round_div(x: torch.Tensor, d: int | torch.Tensor) -> torch.Tensor:
    """``x / d`` rounded half up, in integers (``d > 0``)."""
    return torch.div(2 * x + d, 2 * d, rounding_mode="floor")


def isqrt(n: torch.Tensor, start: int = 2 ** 16) -> torch.Tensor:
    """``floor(sqrt(n))`` of a non-negative int64 tensor by Newton's iteration in integers (I-ViT's I-LayerNorm
    starts at ``2^16``): one step from any start lands at or above the root, then it falls to it."""
    def step(x):
        return shift_right(x + floor_div(n, x.clamp(min=1)), 1)

    current = step(torch.full_like(n, start))  # at or above the root (AM-GM), wherever it started
    tracing = torch.jit.is_tracing()  # an exported graph runs a fixed count: enough below 2^62, min keeps it exact
    for _ in range(ISQRT_STEPS):
        nxt = step(current)
        if not tracing and bool((nxt >= current).all()):
            break
        current = torch.minimum(current, nxt)
    return torch.where(n == 0, torch.zeros_like(n), current)

