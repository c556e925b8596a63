"""A faster per-tensor fake quantization behind pytorch-quantization's ``TensorQuantizer``.

``TensorQuantizer`` stays the public module and configuration (num_bits, amax, unsigned, narrow range,
calibrators). :class:`FastTensorQuantizer` only replaces the arithmetic of its per-tensor fake-quant forward with
the same float32 operations in the same order (``x * scale``, round half to even, clamp, ``/ scale`` with
``scale = (2^(b-1+unsigned) - 1) / amax``), done in place on one fresh tensor instead of through an autograd
Function with temporaries and per-call checks. The result is bit-identical to ``TensorQuantizer`` (tests compare
them on random and real activations).

Eager on CPU, scale and clamp take Python numbers (the float32 ``scale``, held per amax value and width): a 0-dim
tensor operand takes PyTorch's broadcasting path, about 3x slower per op on CPU, with the same float32 results
(on GPU the tensor operands stay: reading amax there would synchronise). Under ``torch.compile`` the integer
range comes from a tensor buffer updated in place when ``num_bits`` changes, so a
compiled model holds one graph for every candidate configuration: no Python number that changes between
candidates is baked into it.

Anything else (per-channel amax, learned amax, fp16 inputs, gradients) falls back to ``TensorQuantizer``.
Two deliberate differences: an unsigned quantizer clamps a negative value to 0 instead of raising, and amax must
be positive (calibration refuses zero or non-finite amax before a forward pass can meet it).
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import warnings

import torch
from absl import logging as absl_logging

with warnings.catch_warnings():  # pytorch-quantization 2.1.3 uses torch.jit.script at import time
    warnings.simplefilter("ignore", FutureWarning)
    from pytorch_quantization.nn import TensorQuantizer

__all__ = ["FastTensorQuantizer", "TensorQuantizer", "integer_range", "quiet_quantizers"]



@contextmanager
def quiet_quantizers() -> Iterator[None]:
    """Silence pytorch-quantization's absl warnings on routine calls (enable/disable calib, load amax)."""
    level = absl_logging.get_verbosity()
    absl_logging.set_verbosity(absl_logging.ERROR)
    try:
        yield
    finally:
        absl_logging.set_verbosity(level)


def integer_range(num_bits: int, unsigned: bool, narrow_range: bool) -> list[float]:
    """``[high, low]``: the integer codes a quantizer of these settings rounds to."""
    bound = 2.0 ** (num_bits - 1 + int(unsigned)) - 1.0
    low = 0.0 if unsigned else (-bound if narrow_range else -bound - 1.0)
    return [bound, low]


class FastTensorQuantizer(TensorQuantizer):
    """``TensorQuantizer`` with an allocation-light, compile-friendly per-tensor fake-quant forward."""

    form = "uniform"  # the grid it rounds to (see quantsearch.quantize.forms)
    _owned = False  # inside quantize_owned: the fast path may overwrite its input

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.register_buffer("_range", torch.tensor(self._current_range()), persistent=False)
        self._scalars: tuple = ((), 0.0, 0.0, 0.0)  # (key, scale, low, bound) of the eager CPU path

    def _current_range(self) -> list[float]:
        return integer_range(self._num_bits, self._unsigned, self._narrow_range)

    def _refresh_range(self) -> None:
        if hasattr(self, "_range"):
            self._range.copy_(torch.tensor(self._current_range()))

    # the setters update the range buffer in place (same storage, so compiled graphs see the new values)
    @TensorQuantizer.num_bits.setter
    def num_bits(self, value):
        self._num_bits = int(value)
        self._refresh_range()

    @TensorQuantizer.unsigned.setter
    def unsigned(self, value):
        self._unsigned = bool(value)
        self._refresh_range()

    @TensorQuantizer.narrow_range.setter
    def narrow_range(self, value):
        self._narrow_range = bool(value)
        self._refresh_range()

    def _quant_forward(self, inputs: torch.Tensor) -> torch.Tensor:
        amax = getattr(self, "_amax", None)
        if (amax is None or amax.numel() != 1 or not self._fake_quant or self._learn_amax
                or TensorQuantizer.use_fb_fake_quant or inputs.dtype != torch.float32
                or (inputs.requires_grad and torch.is_grad_enabled()) or self._scale_amax is not None):
            return super()._quant_forward(inputs)
        if inputs.is_cpu and not torch.compiler.is_compiling():
            scale, low, bound = self._eager_scalars(amax)
        else:
            bound, low = self._range[0], self._range[1]
            scale = bound / amax  # the same float32 scale TensorQuantizer computes: tensor(bound) / amax
        out = inputs.mul_(scale) if self._owned else inputs * scale
        out.round_()
        out.clamp_(low, bound)
        return out.div_(scale)

    def quantize_owned(self, inputs: torch.Tensor) -> torch.Tensor:
        """``self(inputs)``, overwriting ``inputs`` where the fast path applies: for a caller that owns the tensor
        (nothing else holds it), it saves allocating and first touching an output as large as the input."""
        self._owned = True
        try:
            return self(inputs)
        finally:
            self._owned = False

    def _eager_scalars(self, amax: torch.Tensor) -> tuple[float, float, float]:
        """``(scale, low, bound)`` as Python numbers, computed in float32 once per amax value and width (keyed by
        the value itself, so an amax changed in any way, ``.data`` writes included, is seen)."""
        key = (amax.item(), self._num_bits, self._unsigned, self._narrow_range)
        if self._scalars[0] != key:
            bound, low = self._current_range()
            scale = float(torch.tensor(bound, dtype=torch.float32) / amax)
            self._scalars = (key, scale, low, bound)
        return self._scalars[1:]
