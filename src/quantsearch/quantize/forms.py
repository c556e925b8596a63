"""Quantizer forms: the grid a quantizer rounds to, one ``TensorQuantizer`` subclass per form.

- ``uniform``: pytorch-quantization's own grid (symmetric narrow range, or unsigned [0, amax]), through
  :class:`~quantsearch.quantize.fakequant.FastTensorQuantizer`, bit-identical to ``TensorQuantizer``.
- ``asymmetric`` (a zero point, for activations whose range is lopsided, such as GELU outputs or LayerNorm outputs):
  ``2^b`` levels from ``low`` to ``high`` (``low <= 0 <= high``, both fitted per width on calibration values by
  least squared error), ``scale = (high - low) / (2^b - 1)`` in float32 and the integer zero point
  ``round(-low / scale)``, so 0 is exact: ``(clamp(round(x / scale) + zero, 0, 2^b - 1) - zero) * scale``, as
  ONNX's uint8 QuantizeLinear / DequantizeLinear compute it.
- ``log2`` (FQ-ViT's log2 quantizer, for attention probabilities and other non-negative tensors with most mass
  near zero): ``b`` bits hold the powers ``amax * 2^-k`` for ``k = 0 .. 2^b - 2`` plus an exact zero.
  A value rounds to the nearest power in the log domain (``k = round(-log2(x / amax))``); one below the
  smallest power, zero or negative becomes 0, and one above amax saturates at amax. Its amax is the calibration
  maximum at every width (clipping the largest probabilities costs most).

- ``log-sqrt2`` (RepQ-ViT's log-sqrt(2) quantizer): the log2 grid with two powers per octave,
  ``amax * 2^(-k/2)`` for ``k = 0 .. 2^b - 2`` plus zero (``k = round(-2 log2(x / amax))``). At 4 bits its 15
  powers reach down to ``2^-7`` instead of ``2^-14``: finer steps where attention probabilities lie (about 1/tokens
  and up) and none spent on the values that round to zero anyway. A code deploys as a shift and, for odd ``k``, a
  multiply by ``1/sqrt(2)`` that folds into the next matmul's scale (RepQ-ViT's reparameterisation).

- ``log2-narrow``: log2 at 4 bits and below, uniform (unsigned) above; ``log-sqrt2-narrow`` the same with the
  log-sqrt(2) grid. The log grid's top steps (1, 1/2, 1/4)
  cost more than they save at 6-8 bits and pay at 3-4 (see the README's forms table), so a search that moves the
  attention probabilities between widths gets the better grid at each.

- ``per-head`` (separate ranges per q/k/v part and head): the last dimension of a Linear layer's features is
  split into its heads (``last dim / head_dim`` groups: ``3 x heads`` for a fused qkv output, ``heads`` for the
  attention output that ``proj`` reads), each group with its own uniform range (symmetric, or unsigned when never
  negative), fitted per width by least squared error. An integer attention multiplies each head's q, k and v
  separately, so each group's scale factors out of its own matmul.

- ``per-channel`` (RepQ-ViT, for LayerNorm outputs): each channel's range is folded into the LayerNorm's affine
  and the Linear layers that read it (:mod:`quantsearch.quantize.fold`), so the quantizer itself is the uniform
  per-tensor one on the folded tensor.

Cost: a ``b``-bit log2 code multiplies as a ``b``-bit shift, so BOPs and sizes count it as ``b`` bits, like a
uniform code; deployment as ONNX Q/DQ has no log grid, so export refuses it (by name). An asymmetric code also
counts as ``b`` bits: its zero point adds ``zero x (sum of the weights of each output)`` to an integer matmul, a
constant folded into the bias, not a multiply per element; it exports as uint8 Q/DQ with that zero point. A
per-head code is a ``b``-bit code too (one scale per head's matmul); it exports as per-axis Q/DQ on the last axis,
each group's scale repeated over its features. A per-channel fold costs nothing at inference: the deployed model
has the folded weights and a per-tensor quantizer.

On the hot path the forms follow :mod:`~quantsearch.quantize.fakequant`: eager on CPU their grids are Python
numbers, computed once per range and width; on GPU and under ``torch.compile`` nothing is read back from a buffer
in a forward (no device sync, no graph break), and no Python number that changes with the width is read either,
so one compiled graph serves every candidate (the width comes from buffers updated in place with ``num_bits``).

Forms are chosen per quantizer by name glob (``quant-forms`` in settings); :func:`resolve_forms` matches them.
"""
from __future__ import annotations

import fnmatch
import math
from typing import Iterable, Mapping

import torch

from .fakequant import FastTensorQuantizer
from .limits import DEFAULT_FORM, FORMS, check_forms, log_grid_at, log_steps

__all__ = ["FORMS", "AsymmetricTensorQuantizer", "Log2TensorQuantizer", "LogSqrt2TensorQuantizer",
           "NarrowLog2TensorQuantizer", "NarrowLogSqrt2TensorQuantizer",
           "PerChannelTensorQuantizer", "PerHeadTensorQuantizer", "QUANTIZER_CLASSES", "asymmetric_grid",
           "asymmetric_grid_tensors", "asymmetric_fake_quant", "fake_quantize", "fit_asymmetric", "fit_symmetric",
           "grouped_fake_quant", "head_groups", "log2_fake_quant", "uniform_fake_quant", "resolve_forms", "form_of"]


def uniform_fake_quant(x: torch.Tensor, amax, bits: int, unsigned: bool) -> torch.Tensor:
    """Symmetric narrow-range (or unsigned) fake quantization, as the uniform quantizers do it (``amax`` a number
    or a tensor that broadcasts, per channel); a channel whose amax is 0 stays 0."""
    bound = 2.0 ** (bits - 1 + int(unsigned)) - 1.0
    low = 0.0 if unsigned else -bound
    if not isinstance(amax, torch.Tensor):
        scale = bound / float(amax)
        return torch.clamp(torch.round(x * scale), low, bound) / scale
    amax = amax.to(dtype=x.dtype, device=x.device)
    scale = bound / torch.where(amax > 0, amax, torch.ones_like(amax))
    return torch.where(amax > 0, torch.clamp(torch.round(x * scale), low, bound) / scale, torch.zeros_like(x))


def log2_fake_quant(x: torch.Tensor, amax, bits: int | None, deepest: torch.Tensor | None = None,
                    steps: int = 1) -> torch.Tensor:
    """``x`` rounded to ``{0} U {amax * 2^(-k / steps) : k = 0 .. 2^b - 2}`` (nearest in the log domain; ``steps``
    powers per octave: 1 for log2, 2 for log-sqrt2); ``x`` is left as it was (the in-place steps work on the fresh
    ``x / amax``). ``deepest`` (``2^b - 2`` as a tensor) stands for ``bits`` in a compiled graph, which then serves
    every width."""
    deepest = 2.0 ** bits - 2.0 if deepest is None else deepest
    exponent = (x / amax).clamp_(min=0.0).log2_().mul_(-steps).round_()  # +inf where x <= 0
    zero = exponent > deepest
    out = exponent.clamp_(min=0.0).div_(-steps).exp2_().mul_(amax)
    return out.masked_fill_(zero, 0.0)


def asymmetric_grid(low: float, high: float, bits: int) -> tuple[float, float, float]:
    """``(scale, zero point, top code)`` of the asymmetric grid over ``[low, high]`` (widened to hold 0): the
    float32 scale and the integer zero point that ONNX's uint8 Q/DQ use too."""
    low, high = min(float(low), 0.0), max(float(high), 0.0)
    top = 2.0 ** bits - 1.0
    scale = float(torch.tensor((high - low) / top, dtype=torch.float32))
    if scale <= 0:
        raise ValueError(f"asymmetric range [{low}, {high}] is empty")
    return scale, float(min(max(round(-low / scale), 0), top)), top


def asymmetric_grid_tensors(low: torch.Tensor, high: torch.Tensor, top: torch.Tensor
                            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`asymmetric_grid` in tensor operations on the range buffers (no read back to Python: no device sync,
    no graph break), bit-identical: the same float64 steps and float32 rounding; ``top`` is ``2^b - 1``."""
    low, high, top = low.double().clamp(max=0.0), high.double().clamp(min=0.0), top.double()
    scale = ((high - low) / top).float()
    zero = torch.round(-low / scale.double()).clamp(min=0.0).minimum(top)
    return scale, zero.float(), top.float()


def asymmetric_fake_quant(x: torch.Tensor, low: float | None, high: float | None, bits: int | None,
                          grid: tuple | None = None) -> torch.Tensor:
    """``x`` on the asymmetric grid of ``[low, high]`` at ``bits`` (see the module docstring); ``grid`` is
    :func:`asymmetric_grid`'s answer (or :func:`asymmetric_grid_tensors`') when the caller holds it already."""
    scale, zero, top = grid or asymmetric_grid(low, high, bits)
    floor = torch.zeros_like(top) if isinstance(top, torch.Tensor) else 0.0  # clamp takes two numbers or two tensors
    out = x / scale
    return out.round_().add_(zero).clamp_(floor, top).sub_(zero).mul_(scale)


def fit_asymmetric(values: torch.Tensor, bits: int, steps: int = 16) -> tuple[float, float]:
    """``(low, high)`` with the least squared error on ``values`` at ``bits``, over a grid of clipped ranges
    (``low = min * a``, ``high = max * c``, ``a`` and ``c`` from 1/steps to 1); float32 values."""
    values = values.detach().float().flatten()
    vmin, vmax = min(float(values.min()), 0.0), max(float(values.max()), 0.0)
    fractions = torch.linspace(1.0 / steps, 1.0, steps).tolist()
    best, best_error = (vmin, vmax), math.inf
    for a in (fractions if vmin < 0 else [1.0]):
        for c in (fractions if vmax > 0 else [1.0]):
            low, high = vmin * a, vmax * c
            if high - low <= 0:
                continue
            error = float(torch.sum((asymmetric_fake_quant(values, low, high, bits) - values) ** 2))
            if error < best_error:
                best, best_error = (low, high), error
    return tuple(float(v) for v in torch.tensor(best, dtype=torch.float32))  # as the quantizer's buffers hold them


def grouped_fake_quant(x: torch.Tensor, amax, bits: int | None, unsigned: bool,
                       bound: torch.Tensor | None = None) -> torch.Tensor:
    """``x`` with its last dimension split into ``len(amax)`` equal groups, each on its own uniform grid (amax
    positive, as calibration makes it): the uniform grid's float32 steps, done in place on one fresh tensor.
    ``bound`` (``2^(b-1+unsigned) - 1`` as a tensor) stands for ``bits`` in a compiled graph, which then serves
    every width."""
    amax = torch.as_tensor(amax, dtype=torch.float32, device=x.device).flatten()
    groups = amax.numel()
    if x.shape[-1] % groups:
        raise ValueError(f"a last dimension of {x.shape[-1]} does not split into {groups} groups")
    bound = 2.0 ** (bits - 1 + int(unsigned)) - 1.0 if bound is None else bound
    # tensor / tensor, as TensorQuantizer divides (a number over a tensor is a reciprocal times the number)
    scale = torch.as_tensor(bound, dtype=torch.float32, device=x.device) / amax.reshape(groups, 1)
    out = x.reshape(*x.shape[:-1], groups, -1) * scale
    out.round_().clamp_(0.0 if unsigned else -bound, bound)
    return out.div_(scale).reshape(x.shape)


def fit_symmetric(values: torch.Tensor, bits: int, unsigned: bool, steps: int = 32) -> list[float]:
    """Per row of ``values`` ((groups, n)), the amax with the least squared error at ``bits`` among
    ``absmax * k / steps`` (k = 1 .. steps); float32 values, positive (an all-zero row gets 1)."""
    values = values.detach().float()
    absmax = values.abs().amax(dim=1)
    absmax = torch.where(absmax > 0, absmax, torch.ones_like(absmax))
    fractions = torch.linspace(1.0 / steps, 1.0, steps)
    errors = torch.stack([((uniform_fake_quant(values, (absmax * f)[:, None], bits, unsigned) - values) ** 2).sum(1)
                          for f in fractions])  # (steps, groups); the first minimum wins a tie
    return [float(v) for v in absmax * fractions[errors.argmin(0)]]


def head_groups(model: torch.nn.Module, name: str, module: torch.nn.Module, reads: bool) -> tuple[int, int]:
    """``(groups, width)``: how many per-head groups the ``width`` features that ``module`` (a Linear) writes, or
    ``reads``, split into: their width over ``head_dim`` of the nearest enclosing module with ``num_heads``
    (timm's attention). One line names what is missing when there is no such split."""
    where = f"quant-forms: quantizer {name!r} has the per-head form but"
    if not isinstance(module, torch.nn.Linear):
        raise ValueError(f"{where} {type(module).__name__} is not a Linear layer (per-head splits Linear features)")
    width = module.in_features if reads else module.out_features
    path = name.split(":")[0].split(".")
    for depth in range(len(path) - 1, -1, -1):
        parent = model.get_submodule(".".join(path[:depth]))
        heads = getattr(parent, "num_heads", None)
        if isinstance(heads, int) and heads > 0:
            head_dim = getattr(parent, "head_dim", None)
            if not isinstance(head_dim, int):
                dim = getattr(parent, "embed_dim", None) or getattr(parent, "dim", None)
                head_dim = dim // heads if isinstance(dim, int) else None
            if not head_dim or width % head_dim:
                raise ValueError(f"{where} its {width} features do not split into heads of "
                                 f"{head_dim} (num_heads {heads} of {'.'.join(path[:depth]) or 'the model'})")
            return width // head_dim, width
    raise ValueError(f"{where} no module around it has num_heads (per-head suits attention layers)")


def fake_quantize(form: str, x: torch.Tensor, amax, bits: int, unsigned: bool, low: float | None = None
                  ) -> torch.Tensor:
    """What a quantizer of ``form`` makes of ``x`` at ``bits`` (for estimates that do not run the model);
    ``low`` is an asymmetric quantizer's lower end (``amax`` its upper)."""
    if log_grid_at(form, bits):
        return log2_fake_quant(x, amax, bits, steps=log_steps(form))
    if form == "asymmetric":
        return asymmetric_fake_quant(x, float(low), float(amax), bits)
    if form == "per-head":
        return grouped_fake_quant(x, amax, bits, unsigned)
    return uniform_fake_quant(x, amax, bits, unsigned)


def _compiling() -> bool:
    return torch.compiler.is_compiling()


class Log2TensorQuantizer(FastTensorQuantizer):
    """A ``TensorQuantizer`` on the log2 grid: the same module, switches, calibration hooks and amax buffer.

    Compiled, the deepest power comes from a buffer updated in place with ``num_bits`` (as fakequant's integer
    range does), so one graph serves every width."""

    form = "log2"
    steps = 1  # powers per octave

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.register_buffer("_deepest", torch.tensor(2.0 ** self._num_bits - 2.0), persistent=False)

    def _refresh_range(self) -> None:
        super()._refresh_range()
        if hasattr(self, "_deepest"):
            self._deepest.fill_(2.0 ** self._num_bits - 2.0)

    def _quant_forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self._log2_forward(inputs)

    def _log2_forward(self, inputs: torch.Tensor) -> torch.Tensor:
        amax = getattr(self, "_amax", None)
        if amax is None:
            raise RuntimeError("a log2 quantizer needs amax: calibrate it first")
        if _compiling():
            return log2_fake_quant(inputs.float(), amax, None, self._deepest, self.steps).to(inputs.dtype)
        return log2_fake_quant(inputs.float(), amax, self._num_bits, steps=self.steps).to(inputs.dtype)


class LogSqrt2TensorQuantizer(Log2TensorQuantizer):
    """The log-sqrt(2) grid (RepQ-ViT's): two powers per octave."""

    form = "log-sqrt2"
    steps = 2


class AsymmetricTensorQuantizer(FastTensorQuantizer):
    """A ``TensorQuantizer`` with a zero point: ``amax`` holds the upper end of its range, the ``_low`` buffer the
    lower end (both set per width from calibration, like amax).

    Its grid (scale, zero point, top code) is Python numbers eager on CPU, computed once per range and width (keyed
    by the buffers' values, as fakequant keys amax); on GPU and compiled, tensor operations on the buffers (no
    device sync, no graph break), with the top code from the integer-range buffer, so one graph serves every
    width."""

    form = "asymmetric"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.register_buffer("_low", torch.tensor(0.0))
        self._grid: tuple = ((), None)  # (low, high, bits) -> asymmetric_grid, computed once per range and width

    def _current_range(self) -> list[float]:
        """The codes' range, ``[top, 0]``: uint codes 0 .. 2^b - 1 (the zero point shifts them)."""
        return [2.0 ** self._num_bits - 1.0, 0.0]

    @property
    def low(self) -> float:
        return float(self._low)

    @low.setter
    def low(self, value: float) -> None:
        self._low.fill_(float(value))

    def _quant_forward(self, inputs: torch.Tensor) -> torch.Tensor:
        amax = getattr(self, "_amax", None)
        if amax is None:
            raise RuntimeError("an asymmetric quantizer needs its range: calibrate it first")
        if inputs.is_cpu and not _compiling():
            key = (self._low.item(), amax.item(), self._num_bits)
            if self._grid[0] != key:
                self._grid = (key, asymmetric_grid(*key))
            grid = self._grid[1]
        else:
            grid = asymmetric_grid_tensors(self._low, amax, self._range[0])
        return asymmetric_fake_quant(inputs.float(), None, None, None, grid=grid).to(inputs.dtype)


class NarrowLog2TensorQuantizer(Log2TensorQuantizer):
    """log2 at ``LOG2_NARROW_TOP`` bits and below, the uniform unsigned grid above (calibrated per width).

    Compiled, both grids are computed and a buffer flag picks one, so one graph serves every width (the attention
    probabilities it quantizes are a small share of a forward; the two grids fuse into one kernel)."""

    form = "log2-narrow"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.register_buffer("_log_grid", torch.tensor(log_grid_at(self.form, self._num_bits)), persistent=False)

    def _refresh_range(self) -> None:
        super()._refresh_range()
        if hasattr(self, "_log_grid"):
            self._log_grid.fill_(log_grid_at(self.form, self._num_bits))

    def _quant_forward(self, inputs: torch.Tensor) -> torch.Tensor:
        if _compiling():
            return torch.where(self._log_grid, self._log2_forward(inputs), FastTensorQuantizer._quant_forward(
                self, inputs))
        if log_grid_at(self.form, self._num_bits):
            return self._log2_forward(inputs)
        return FastTensorQuantizer._quant_forward(self, inputs)


class NarrowLogSqrt2TensorQuantizer(NarrowLog2TensorQuantizer):
    """log-sqrt(2) at ``LOG2_NARROW_TOP`` bits and below, the uniform unsigned grid above."""

    form = "log-sqrt2-narrow"
    steps = 2


class PerChannelTensorQuantizer(FastTensorQuantizer):
    """The uniform per-tensor grid on a LayerNorm output whose per-channel ranges are folded into the model
    (:mod:`quantsearch.quantize.fold`): the form is in the model's weights, not in this module's arithmetic."""

    form = "per-channel"


class PerHeadTensorQuantizer(FastTensorQuantizer):
    """A ``TensorQuantizer`` with one uniform range per group of the last dimension (a head's q, k or v):
    ``amax`` holds ``groups`` values, set per width from calibration like a scalar amax. Compiled, the grid's
    bound comes from the integer-range buffer, so one graph serves every width."""

    form = "per-head"

    def __init__(self, *args, groups: int = 1, width: int = 1, **kwargs):
        super().__init__(*args, **kwargs)
        self.groups, self.width = int(groups), int(width)  # width: the features of the last dimension

    def _quant_forward(self, inputs: torch.Tensor) -> torch.Tensor:
        amax = getattr(self, "_amax", None)
        if amax is None or amax.numel() != self.groups:
            raise RuntimeError(f"a per-head quantizer needs {self.groups} amax values: calibrate it first")
        if _compiling():  # self._num_bits, a Python number, would key the graph by width
            return grouped_fake_quant(inputs.float(), amax, None, self._unsigned, self._range[0]).to(inputs.dtype)
        return grouped_fake_quant(inputs.float(), amax, self._num_bits, self._unsigned).to(inputs.dtype)


QUANTIZER_CLASSES = {"uniform": FastTensorQuantizer, "asymmetric": AsymmetricTensorQuantizer,
                     "log2": Log2TensorQuantizer, "log2-narrow": NarrowLog2TensorQuantizer,
                     "per-head": PerHeadTensorQuantizer, "per-channel": PerChannelTensorQuantizer,
                     "log-sqrt2": LogSqrt2TensorQuantizer, "log-sqrt2-narrow": NarrowLogSqrt2TensorQuantizer}
assert tuple(QUANTIZER_CLASSES) == FORMS


def form_of(quantizer) -> str:
    """The form of a quantizer module (plain ``TensorQuantizer``: uniform)."""
    return getattr(quantizer, "form", DEFAULT_FORM)


def resolve_forms(names: Iterable[str], globs: Mapping[str, str] | None, where: str = "quant-forms") -> dict[str, str]:
    """The form of every quantizer in ``names``: the first glob that matches it, else uniform.

    A glob that matches none of ``names`` is refused (a typo would otherwise pass silently)."""
    names = list(names)
    rules = list(check_forms(globs, where).items())
    for glob, form in rules:
        if not any(fnmatch.fnmatchcase(n, glob) for n in names):
            raise ValueError(f"{where}[{glob!r}] matches no activation quantizer (they look like {names[-1]!r})")
    return {n: next((f for g, f in rules if fnmatch.fnmatchcase(n, g)), DEFAULT_FORM) for n in names}
