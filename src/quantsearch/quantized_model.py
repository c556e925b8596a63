"""``QuantizedActivationsModel``: fake-quantize chosen activations of an unchanged PyTorch model.

One pytorch-quantization ``TensorQuantizer`` per selected module runs from that module's forward hook on its
output (or from a forward pre-hook on its input, for tensors that no module produces), plus one quantizer on the
model input. The user's model keeps its class and its weights; :meth:`QuantizedActivationsModel.remove`
detaches every hook and restores the model exactly.
"""
from __future__ import annotations

import warnings
from collections import OrderedDict
from contextlib import contextmanager
from typing import Iterable, Iterator, Mapping, Sequence

import torch
from absl import logging as absl_logging
from torch import nn

with warnings.catch_warnings():  # pytorch-quantization 2.1.3 uses torch.jit.script at import time
    warnings.simplefilter("ignore", FutureWarning)
    from pytorch_quantization.nn import TensorQuantizer
    from pytorch_quantization.tensor_quant import QuantDescriptor

from .predicates import PredicateLike, get_target

__all__ = ["QuantizedActivationsModel", "INPUT_QUANTIZER", "MIN_BITS", "MAX_BITS", "make_quantizer",
           "quiet_quantizers", "amax_for_bits"]

INPUT_QUANTIZER = "input"
INPUT_SUFFIX = ":input"
MIN_BITS, MAX_BITS = 2, 16


@contextmanager
def quiet_quantizers() -> Iterator[None]:
    """Silence pytorch-quantization's absl warnings on routine calls (enable/disable calib, load amax)."""
    level = absl_logging.get_verbosity()
    absl_logging.set_verbosity(absl_logging.ERROR)
    try:
        yield
    finally:
        absl_logging.set_verbosity(level)


def make_quantizer(num_bits: int = 8) -> TensorQuantizer:
    """A per-tensor, symmetric, narrow-range fake quantizer with a max calibrator.

    Narrow range ([-(2^(b-1)-1), 2^(b-1)-1]) keeps the integer grid symmetric, as TensorRT and FQ-ViT do.
    """
    desc = QuantDescriptor(num_bits=num_bits, fake_quant=True, axis=None, calib_method="max", narrow_range=True)
    with quiet_quantizers():
        return TensorQuantizer(desc)


def amax_for_bits(table: Mapping[int, float], bits: int) -> float:
    """The amax a per-bit-width table gives ``bits``: its own entry, else the nearest width's (higher on a tie)."""
    if bits in table:
        return table[bits]
    return table[min(table, key=lambda b: (abs(b - bits), -b))]


def _clamp_negatives_when_unsigned(quantizer: TensorQuantizer, args: tuple):
    """An unsigned quantizer represents [0, amax]: a negative input is clamped to 0, the grid's floor.

    pytorch-quantization raises on a negative input to an unsigned quantizer instead; a quantizer is made unsigned
    because its calibration data was never negative, and a value unseen in calibration must not abort a search.
    """
    if quantizer.unsigned and quantizer._if_quant and not quantizer._disabled and args:
        return (args[0].clamp_min(0),) + tuple(args[1:])
    return None


class QuantizedActivationsModel(nn.Module):
    """A model whose selected activations pass through fake quantizers.

    Args:
        model: any ``nn.Module``; it is hooked in place, not copied.
        predicate: a preset name (``conv2d``, ``linear``, ``vit``, ``all-leaf``), a predicate
            ``(qualified_name, module) -> bool`` choosing the modules whose output is quantized, or a
            :class:`~quantsearch.predicates.Target`.
        quantize_input: also quantize the model input (quantizer ``"input"``).
        num_bits: the initial bit-width of every quantizer.

    ``amax_table`` maps a quantizer name to ``{num_bits: amax}`` (filled by calibration): setting
    :attr:`bit_widths` then gives every quantizer its own bit-width's amax, with no forward pass.
    """

    def __init__(self, model: nn.Module, predicate: PredicateLike = "conv2d", quantize_input: bool = True,
                 num_bits: int = 8):
        super().__init__()
        self.model = model
        self.target = get_target(predicate)
        self._quantizers: "OrderedDict[str, TensorQuantizer]" = OrderedDict()
        self._handles: list = []
        self._fused_attn: dict[nn.Module, bool] = {}
        self.amax_table: dict[str, dict[int, float]] = {}
        if self.target.unfuse_attention:
            for module in model.modules():
                if isinstance(getattr(module, "fused_attn", None), bool):
                    self._fused_attn[module] = module.fused_attn
                    module.fused_attn = False

        if quantize_input:
            self._add(INPUT_QUANTIZER, model, num_bits, pre=True)
        for name, module in model.named_modules():
            if name and self.target.inputs(name, module):
                self._add(name + INPUT_SUFFIX, module, num_bits, pre=True)
            if name and self.target.outputs(name, module):
                self._add(name, module, num_bits, pre=False)
        # registered as children so that .to(device) and state_dict() carry amax
        self.quantizers = nn.ModuleList(self._quantizers.values())

    # -- construction ------------------------------------------------------------------------------------------
    def _add(self, name: str, module: nn.Module, num_bits: int, pre: bool) -> None:
        quantizer = make_quantizer(num_bits)
        self._quantizers[name] = quantizer
        if pre:
            def hook(_module, args, q=quantizer):
                if args and isinstance(args[0], torch.Tensor):
                    return (q(args[0]),) + tuple(args[1:])
                return None
            self._handles.append(module.register_forward_pre_hook(hook))
        else:
            def hook(_module, _args, output, q=quantizer):
                return q(output) if isinstance(output, torch.Tensor) else None
            self._handles.append(module.register_forward_hook(hook))

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    def remove(self) -> nn.Module:
        """Detach every hook, restore fused attention, and return the original model."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for module, fused in self._fused_attn.items():
            module.fused_attn = fused
        self._fused_attn.clear()
        return self.model

    # -- names and bits ----------------------------------------------------------------------------------------
    @property
    def quantizer_names(self) -> list[str]:
        """Quantizer names in network order: ``input``, then module names (``<module>:input`` for pre-hooks)."""
        return list(self._quantizers)

    def named_quantizers(self) -> Iterator[tuple[str, TensorQuantizer]]:
        return iter(self._quantizers.items())

    def quantizer(self, name: str) -> TensorQuantizer:
        try:
            return self._quantizers[name]
        except KeyError:
            raise KeyError(f"no quantizer named {name!r}") from None

    def __len__(self) -> int:
        return len(self._quantizers)

    @property
    def bit_widths(self) -> list[int]:
        return [q.num_bits for q in self._quantizers.values()]

    @bit_widths.setter
    def bit_widths(self, bits: Sequence[int] | Mapping[str, int]) -> None:
        if isinstance(bits, Mapping):
            unknown = [n for n in bits if n not in self._quantizers]
            if unknown:
                raise KeyError(f"no quantizer named {unknown[0]!r}")
            items = bits.items()
        else:
            bits = list(bits)
            if len(bits) != len(self._quantizers):
                raise ValueError(f"expected {len(self._quantizers)} bit-widths, got {len(bits)}")
            items = zip(self._quantizers, bits)
        for name, b in items:
            b = int(b)
            if not MIN_BITS <= b <= MAX_BITS:
                raise ValueError(f"bit-width {b} for {name!r} outside {MIN_BITS}..{MAX_BITS}")
            self._quantizers[name].num_bits = b
            if self.amax_table.get(name):
                self._set_amax(name, amax_for_bits(self.amax_table[name], b))

    def bits_dict(self) -> dict[str, int]:
        return dict(zip(self._quantizers, self.bit_widths))

    # -- amax and switches -------------------------------------------------------------------------------------
    @property
    def amax(self) -> dict[str, float | None]:
        """Calibrated amax per quantizer (None before calibration)."""
        return {n: (float(q.amax) if q.amax is not None else None) for n, q in self._quantizers.items()}

    @amax.setter
    def amax(self, values: Mapping[str, float]) -> None:
        unknown = [n for n in values if n not in self._quantizers]
        if unknown:
            raise KeyError(f"no quantizer named {unknown[0]!r}")
        for name, value in values.items():
            self._set_amax(name, value)

    def _set_amax(self, name: str, value: float) -> None:
        quantizer = self._quantizers[name]
        tensor = torch.tensor(float(value), dtype=torch.float32)
        if hasattr(quantizer, "_amax"):
            quantizer._amax.data.copy_(tensor)
        else:
            quantizer.register_buffer("_amax", tensor.to(self._device()))

    @property
    def unsigned(self) -> dict[str, bool]:
        """Whether each quantizer uses the unsigned integer range [0, 2^b - 1] (twice the signed resolution)."""
        return {n: bool(q.unsigned) for n, q in self._quantizers.items()}

    @unsigned.setter
    def unsigned(self, values: Mapping[str, bool]) -> None:
        unknown = [n for n in values if n not in self._quantizers]
        if unknown:
            raise KeyError(f"no quantizer named {unknown[0]!r}")
        for name, flag in values.items():
            quantizer = self._quantizers[name]
            quantizer.unsigned = bool(flag)
            if flag and not getattr(quantizer, "_clamps_negatives", False):
                quantizer.register_forward_pre_hook(_clamp_negatives_when_unsigned)
                quantizer._clamps_negatives = True

    def _device(self) -> torch.device:
        param = next(self.model.parameters(), None)
        return param.device if param is not None else torch.device("cpu")

    @property
    def is_calibrated(self) -> bool:
        return all(v is not None for v in self.amax.values())

    def set_quantization(self, enabled: bool) -> None:
        for q in self._quantizers.values():
            q.enable() if enabled else q.disable()

    @contextmanager
    def quantization_disabled(self) -> Iterator["QuantizedActivationsModel"]:
        """Run the FP32 model inside the block (the hooks stay, the quantizers pass tensors through)."""
        previous = [q._disabled for q in self._quantizers.values()]
        self.set_quantization(False)
        try:
            yield self
        finally:
            for q, was in zip(self._quantizers.values(), previous):
                q._disabled = was

    def calibrate(self, batches: Iterable, num_batches: int | None = None, method: str = "max",
                  **options) -> dict[str, float]:
        """Calibrate over ``num_batches`` batches (quantization off meanwhile); returns the current amax per quantizer.

        ``method`` and ``options`` are those of :func:`quantsearch.calibration.calibrate`, which fills
        :attr:`amax_table` and :attr:`unsigned` too.
        """
        from .calibration import calibrate

        calibrate(self, batches, num_batches, method=method, **options)
        return self.amax

    def extra_repr(self) -> str:
        return f"{len(self)} quantizers ({self.target.description})"
