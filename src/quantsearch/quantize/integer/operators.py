"""The integer operators as modules: each holds its calibrated input range and computes in integers when on.

An operator is off (the float operator it replaces) while calibration observes its input and while the model's
quantization is off (the FP32 reference); on, it reads its input on a fixed grid (``amax / (2^(b-1) - 1)``, ``b``
the operator's input width: 16 bits by default, FQ-ViT's 8 with PTF factors for its LayerNorm), computes in int64
codes (:mod:`.softmax`, :mod:`.gelu`, :mod:`.layernorm`), and returns the float image of its integer output, which
the quantizer after it requantizes as it would a Linear layer's int32 accumulator. Its input range is the
maximum of ``|x|`` over the calibration pass (one pass, beside the quantizers' statistics).
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .arithmetic import to_int
from .gelu import shift_gelu
from .layernorm import ptf_alpha, ptf_codes, int_layernorm
from .softmax import log_int_softmax, shiftmax

__all__ = ["IntegerOperator", "IntegerSoftmax", "IntegerGELU", "IntegerLayerNorm", "ResidualGrid",
           "DEFAULT_INPUT_BITS", "PROBABILITY_BITS", "PTF_INPUT_BITS"]

DEFAULT_INPUT_BITS = 16  # logits, GELU inputs, the residual stream: 16-bit grids, as I-ViT's 16-bit adds
PROBABILITY_BITS = 16  # Shiftmax's output codes (p ~ code / 2^15), requantized by the probabilities' quantizer
PTF_INPUT_BITS = 8  # FQ-ViT quantizes the LayerNorm input at 8 bits with power-of-two factors per channel


class IntegerOperator(nn.Module):
    """One nonlinear operator: its implementation, input width and calibrated input range."""

    kind = ""

    def __init__(self, name: str, impl: str, input_bits: int = DEFAULT_INPUT_BITS):
        super().__init__()
        self.name, self.impl, self.input_bits = name, impl, int(input_bits)
        self.register_buffer("amax", torch.zeros(()))
        self.enabled, self.observing, self.calibrated = True, False, False
        self._scale = 0.0  # the input grid's step, a Python number (no device sync in a forward)

    @property
    def active(self) -> bool:
        return self.enabled and not self.observing

    def observe(self, x: torch.Tensor) -> None:
        self.amax = torch.maximum(self.amax, x.detach().abs().amax().float())

    def begin_calibration(self) -> None:
        self.amax.zero_()
        self.observing, self.calibrated = True, False

    def end_calibration(self) -> None:
        self.observing = False
        self.load_state(self.state())

    def state(self) -> dict:
        """The calibrated range as data (calibration files and bit-configs record it)."""
        return {"amax": float(self.amax)}

    def load_state(self, state: dict) -> None:
        """Set the range from :meth:`state`'s data (other keys, such as the implementation's name, are ignored)."""
        amax = float(state["amax"])
        self.amax.fill_(amax)
        self._scale = max(amax, 1e-12) / (2 ** (self.input_bits - 1) - 1)
        self.calibrated = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.observing:
            self.observe(x)
        if not self.active:
            return self.reference(x)
        return self._straight_through(self._checked_integer(x), x, lambda: self.reference(x))

    def _checked_integer(self, *inputs: torch.Tensor) -> torch.Tensor:
        if not self.calibrated:
            raise RuntimeError(f"integer operator {self.name!r} is not calibrated: calibrate the model first")
        return self.integer(*inputs).to(inputs[0].dtype)

    @staticmethod
    def _straight_through(out: torch.Tensor, x: torch.Tensor, reference: Callable[[], torch.Tensor]) -> torch.Tensor:
        """While refining, the float operator's gradient (I-ViT's straight-through estimator)."""
        if x.requires_grad and torch.is_grad_enabled():
            ref = reference()
            return ref + (out - ref).detach()
        return out

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def integer(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"{self.name}, {self.impl}, input {self.input_bits} bits"


class IntegerSoftmax(IntegerOperator):
    """Softmax over the last dimension: I-ViT's Shiftmax or FQ-ViT's Log-Int-Softmax. The latter's log2 codes
    take the width of the probabilities' quantizer (``output_bits``, a callable: it changes with the candidate)."""

    kind = "softmax"

    def __init__(self, name: str, impl: str, output_bits: Callable[[], int] = lambda: 8,
                 input_bits: int = DEFAULT_INPUT_BITS):
        super().__init__(name, impl, input_bits)
        self.output_bits = output_bits

    def reference(self, x):
        return x.softmax(dim=-1)

    def integer(self, x):
        codes = to_int(x.float(), self._scale, self.input_bits)
        if self.impl == "ivit":
            return shiftmax(codes, self._scale, PROBABILITY_BITS).float() * 2.0 ** (1 - PROBABILITY_BITS)
        bits = int(self.output_bits())
        k = log_int_softmax(codes, self._scale, bits)
        return torch.where(k == 2 ** bits - 1, 0.0, torch.pow(2.0, -k.float()))


class IntegerGELU(IntegerOperator):
    """I-ViT's ShiftGELU in place of an ``nn.GELU``."""

    kind = "gelu"

    def __init__(self, name: str, impl: str, module: nn.GELU, input_bits: int = DEFAULT_INPUT_BITS):
        super().__init__(name, impl, input_bits)
        self.approximate = module.approximate

    def reference(self, x):
        return F.gelu(x, approximate=self.approximate)

    def integer(self, x):
        codes, scale = shift_gelu(to_int(x.float(), self._scale, self.input_bits), self._scale)
        return codes.float() * scale


class IntegerLayerNorm(IntegerOperator):
    """I-ViT's I-LayerNorm (16-bit input) or FQ-ViT's (8-bit input with PTF factors) in place of an
    ``nn.LayerNorm`` over the last dimension; the module keeps its affine (folds and refinements change it)."""

    kind = "layernorm"

    def __init__(self, name: str, impl: str, module: nn.LayerNorm):
        super().__init__(name, impl, PTF_INPUT_BITS if impl == "fqvit" else DEFAULT_INPUT_BITS)
        self.module = [module]  # not a child: the model owns it
        channels = int(module.normalized_shape[-1])
        self.register_buffer("channel_amax", torch.zeros(channels))
        self._ptf: tuple[float, torch.Tensor] | None = None

    def observe(self, x):
        super().observe(x)
        if self.impl == "fqvit":
            self.channel_amax = torch.maximum(self.channel_amax, x.detach().abs().flatten(0, -2).amax(0).float())

    def begin_calibration(self):
        super().begin_calibration()
        self.channel_amax.zero_()

    def state(self):
        state = super().state()
        if self.impl == "fqvit":
            state["channel_amax"] = [float(v) for v in self.channel_amax]
        return state

    def load_state(self, state):
        super().load_state(state)
        if self.impl == "fqvit":
            values = torch.tensor(state["channel_amax"], dtype=torch.float32, device=self.channel_amax.device)
            if values.shape != self.channel_amax.shape:
                raise ValueError(f"integer operator {self.name!r}: {len(values)} channel ranges for "
                                 f"{len(self.channel_amax)} channels")
            self.channel_amax.copy_(values)
            self._ptf = ptf_alpha(self.channel_amax, self.input_bits)

    def reference(self, x):
        ln = self.module[0]
        return F.layer_norm(x, ln.normalized_shape, ln.weight, ln.bias, ln.eps)

    def integer(self, x):
        ln = self.module[0]
        if self.impl == "fqvit":
            s, alpha = self._ptf
            codes = ptf_codes(x.float(), s, alpha.to(x.device), self.input_bits)
        else:
            codes = to_int(x.float(), self._scale, self.input_bits)
        out, scale = int_layernorm(codes, ln.weight, ln.bias)
        return out.float() * scale


class ResidualGrid(IntegerOperator):
    """A residual add on a ``bits``-bit grid (I-ViT's 16-bit adds): both inputs are requantized to the grid of
    the sum and added as integers, saturating. Without a branch it puts one tensor on its grid (the stream's
    entry into the first block)."""

    kind = "add"

    def forward(self, x: torch.Tensor, branch: torch.Tensor | None = None) -> torch.Tensor:
        total = x if branch is None else x + branch
        if self.observing:
            self.observe(total)
        if not self.active:
            return total
        inputs = (x,) if branch is None else (x, branch)
        return self._straight_through(self._checked_integer(*inputs), total, lambda: total)

    def integer(self, x, branch=None):
        bound = 2 ** (self.input_bits - 1) - 1
        codes = to_int(x.float(), self._scale, self.input_bits)
        if branch is not None:
            codes = (codes + to_int(branch.float(), self._scale, self.input_bits)).clamp_(-bound, bound)
        return codes.float() * self._scale
