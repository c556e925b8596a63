"""``QuantizedActivationsModel``: fake-quantize chosen activations (and weights) of an unchanged PyTorch model.

One pytorch-quantization ``TensorQuantizer`` per selected module runs from that module's forward hook on its
output (or from a forward pre-hook on its input, for tensors that no module produces), plus one quantizer on the
model input. Optionally every Conv/Linear weight gets a per-output-channel quantizer (``<module>:weight``): a
forward pre-hook swaps the fake-quantized weight in for the duration of the call and a forward hook swaps the
original back, so the user's model keeps its class and its weights; :meth:`QuantizedActivationsModel.remove`
detaches every hook and restores the model exactly.
"""
from __future__ import annotations

import math
import warnings
from collections import OrderedDict
from contextlib import contextmanager
from typing import Iterable, Iterator, Mapping, Sequence

import torch
from torch import nn
from torch.nn.modules.module import _global_forward_hooks

with warnings.catch_warnings():  # pytorch-quantization 2.1.3 uses torch.jit.script at import time
    warnings.simplefilter("ignore", FutureWarning)
    from pytorch_quantization.nn import TensorQuantizer
    from pytorch_quantization.tensor_quant import QuantDescriptor

from .fakequant import FastTensorQuantizer, quiet_quantizers
from .fold import ChannelFold, FoldError, check_foldable, fold_into
from .forms import QUANTIZER_CLASSES, form_of, head_groups, resolve_forms
from .limits import DEFAULT_FORM, MAX_BITS, MIN_BITS
from .integer import IntegerOps
from .predicates import PredicateLike, get_target

__all__ = ["QuantizedActivationsModel", "INPUT_QUANTIZER", "WEIGHT_SUFFIX", "WEIGHT_LAYERS", "MIN_BITS",
           "MAX_BITS", "make_quantizer", "make_weight_quantizer", "quiet_quantizers", "amax_for_bits"]

INPUT_QUANTIZER = "input"
INPUT_SUFFIX = ":input"
WEIGHT_SUFFIX = ":weight"
WEIGHT_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)  # weight shape (out, in, ...): channels on axis 0


def make_quantizer(num_bits: int = 8, fast: bool = True, form: str = DEFAULT_FORM,
                   heads: tuple[int, int] = (1, 1)) -> TensorQuantizer:
    """A per-tensor fake quantizer of ``form`` with a max calibrator; uniform: symmetric narrow range.

    Narrow range ([-(2^(b-1)-1), 2^(b-1)-1]) keeps the integer grid symmetric, as TensorRT and FQ-ViT do.
    ``fast`` picks :class:`~quantsearch.fakequant.FastTensorQuantizer` (bit-identical, faster forward) for the
    uniform form; other forms exist only as such subclasses (:mod:`quantsearch.quantize.forms`). ``heads``: a
    per-head quantizer's ``(groups, features)``.
    """
    desc = QuantDescriptor(num_bits=num_bits, fake_quant=True, axis=None, calib_method="max", narrow_range=True)
    cls = QUANTIZER_CLASSES[form] if fast or form != DEFAULT_FORM else TensorQuantizer
    with quiet_quantizers():
        return cls(desc, groups=heads[0], width=heads[1]) if form == "per-head" else cls(desc)


def make_weight_quantizer(num_bits: int = 8) -> TensorQuantizer:
    """A per-output-channel (axis 0), symmetric, narrow-range fake quantizer for Conv/Linear weights."""
    desc = QuantDescriptor(num_bits=num_bits, fake_quant=True, axis=(0,), calib_method="max", narrow_range=True)
    with quiet_quantizers():
        return TensorQuantizer(desc)


def channel_absmax(weight: torch.Tensor) -> torch.Tensor:
    """max|w| per output channel, shaped to broadcast against ``weight`` ((out, 1, ...))."""
    return weight.detach().abs().amax(dim=tuple(range(1, weight.dim())), keepdim=True)


class WeightFakeQuant:
    """Runs a module's forward with its fake-quantized weight, keeping the original for everything else.

    The fake-quantized weight is cached per bit-width (weights do not change during a search, so a forward pass
    never re-quantizes them); the cache is dropped when the weight tensor is replaced or modified in place, or
    when amax is set. The swap assigns ``weight.data`` (the Parameter object stays), and ``always_call`` puts the
    original back even when the forward raises. Meant for inference: gradients would see the original weight.
    """

    def __init__(self, module: nn.Module, quantizer: TensorQuantizer):
        self.module, self.quantizer = module, quantizer
        self.cache: dict[int, torch.Tensor] = {}
        self._source: tuple | None = None
        self._saved: torch.Tensor | None = None

    def quantized(self, bits: int) -> torch.Tensor:
        weight = self.module.weight
        source = (weight.data_ptr(), weight._version, weight.dtype, weight.device)
        if source != self._source:
            self.cache.clear()
            self._source = source
        cached = self.cache.get(bits)
        if cached is None:
            with torch.inference_mode(False), torch.no_grad():
                cached = self.quantizer(weight.detach()).detach()
            self.cache[bits] = cached
        return cached

    def before(self, module: nn.Module, _args) -> None:
        q = self.quantizer
        if q._disabled or not q._if_quant or self._saved is not None:
            return
        fake = self.quantized(q.num_bits)
        self._saved = module.weight.data
        module.weight.data = fake

    def after(self, module: nn.Module, _args, _output) -> None:
        self.restore()

    def restore(self) -> None:
        if self._saved is not None:
            self.module.weight.data = self._saved
            self._saved = None


def _owns_output(module: nn.Module, hook, args: tuple, output: torch.Tensor) -> bool:
    """Whether the output hook ``hook`` may quantize ``output`` in place: in evaluation (inference mode), as the
    first hook to see it, on a fresh tensor that is neither a view nor sharing storage with an input (``Identity``,
    eval-mode ``Dropout`` and in-place activations return their input, which other code still reads)."""
    if not torch.is_inference_mode_enabled() or output._base is not None or _global_forward_hooks:
        return False
    if next(iter(module._forward_hooks.values())) is not hook:
        return False
    storage = output.untyped_storage().data_ptr()
    return not any(isinstance(a, torch.Tensor) and a.untyped_storage().data_ptr() == storage for a in args)


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
        if isinstance(quantizer, FastTensorQuantizer) and args[0].dtype == torch.float32:
            return None  # its fast path clamps to the grid's floor already (a fallback path would not)
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
        weight_quantizers: ``True`` puts a per-output-channel weight quantizer (``<module>:weight``, amax =
            max|w| per channel) on every Conv1d/2d/3d and Linear layer; a predicate narrows that choice.
            Weight quantizers come after the activation quantizers in :attr:`quantizer_names`.
        fast: use the bit-identical fast fake-quant forward (``False``: plain ``TensorQuantizer``, for comparison).
        forms: ``{name glob: form}`` for activation quantizers (first match wins; default uniform); see
            :mod:`quantsearch.quantize.forms`. Weight quantizers are uniform per channel.

    ``amax_table`` maps a quantizer name to ``{num_bits: amax}`` (filled by calibration): setting
    :attr:`bit_widths` then gives every quantizer its own bit-width's amax, with no forward pass.
    """

    def __init__(self, model: nn.Module, predicate: PredicateLike = "conv2d", quantize_input: bool = True,
                 num_bits: int = 8, weight_quantizers: bool | PredicateLike = False, fast: bool = True,
                 forms: Mapping[str, str] | None = None, integer_ops: str | Mapping[str, str] | None = None,
                 integer_add_bits: int = 16):
        super().__init__()
        self.fast = fast
        self.model = model
        self.target = get_target(predicate)
        self._quantizers: "OrderedDict[str, TensorQuantizer]" = OrderedDict()
        self._handles: list = []
        self._weights: "OrderedDict[str, WeightFakeQuant]" = OrderedDict()
        self._fused_attn: dict[nn.Module, bool] = {}
        self._modules_of: dict[str, nn.Module] = {}  # the module whose output (or input) each quantizer sees
        self._folds: dict[str, ChannelFold] = {}
        self._refined: dict[str, torch.Tensor] = {}
        self._originals: dict[nn.Parameter, torch.Tensor] = {}  # parameters as they were before folds, refinements
        self.amax_table: dict[str, dict[int, float]] = {}
        self.low_table: dict[str, dict[int, float]] = {}  # asymmetric quantizers' lower ends, per width
        if self.target.unfuse_attention:
            for module in model.modules():
                if isinstance(getattr(module, "fused_attn", None), bool):
                    self._fused_attn[module] = module.fused_attn
                    module.fused_attn = False

        slots = [(INPUT_QUANTIZER, model, True)] if quantize_input else []
        for name, module in model.named_modules():
            if name and self.target.inputs(name, module):
                slots.append((name + INPUT_SUFFIX, module, True))
            if name and self.target.outputs(name, module):
                slots.append((name, module, False))
        chosen_forms = resolve_forms([n for n, _, _ in slots], forms) if slots else {}
        for name, module, pre in slots:
            form = chosen_forms[name]
            heads = head_groups(model, name, module, pre) if form == "per-head" else (1, 1)
            if form == "per-channel":
                check_foldable(name, module, pre)
            self._add(name, module, num_bits, pre, form, heads)
        self._activation_names = list(self._quantizers)
        if weight_quantizers is not False and weight_quantizers is not None:
            chosen = None if weight_quantizers is True else get_target(weight_quantizers).outputs
            for name, module in model.named_modules():
                if (isinstance(module, WEIGHT_LAYERS) and isinstance(getattr(module, "weight", None), nn.Parameter)
                        and (chosen is None or chosen(name, module))):
                    self._add_weight(name, module, num_bits)
        # registered as children so that .to(device) and state_dict() carry amax
        self.quantizers = nn.ModuleList(self._quantizers.values())
        self.integer = IntegerOps(model, integer_ops, integer_add_bits, self._output_bits)
        self.integer_operators = nn.ModuleList(self.integer)

    def _output_bits(self, module: nn.Module):
        """The current width of the quantizer on ``module``'s output (8 without one), as a callable."""
        name = next((n for n, m in self._modules_of.items() if m is module and not n.endswith(INPUT_SUFFIX)), None)
        quantizer = self._quantizers.get(name) if name else None
        return (lambda: quantizer.num_bits) if quantizer is not None else (lambda: 8)

    # -- construction ------------------------------------------------------------------------------------------
    def _add(self, name: str, module: nn.Module, num_bits: int, pre: bool, form: str = DEFAULT_FORM,
             heads: tuple[int, int] = (1, 1)) -> None:
        quantizer = make_quantizer(num_bits, self.fast, form, heads)
        self._quantizers[name] = quantizer
        self._modules_of[name] = module
        if pre:
            def hook(_module, args, q=quantizer):
                if args and isinstance(args[0], torch.Tensor):
                    return (q(args[0]),) + tuple(args[1:])
                return None
            self._handles.append(module.register_forward_pre_hook(hook))
        else:
            owned = getattr(quantizer, "quantize_owned", None)

            def hook(module, args, output, q=quantizer):
                if not isinstance(output, torch.Tensor):
                    return None
                if owned is not None and _owns_output(module, hook, args, output):
                    return owned(output)
                return q(output)
            self._handles.append(module.register_forward_hook(hook))

    def _add_weight(self, name: str, module: nn.Module, num_bits: int) -> None:
        quantizer = make_weight_quantizer(num_bits)
        quantizer.register_buffer("_amax", channel_absmax(module.weight))
        swap = WeightFakeQuant(module, quantizer)
        self._quantizers[name + WEIGHT_SUFFIX] = quantizer
        self._weights[name + WEIGHT_SUFFIX] = swap
        self._handles.append(module.register_forward_pre_hook(swap.before))
        self._handles.append(module.register_forward_hook(swap.after, always_call=True))

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    def remove(self) -> nn.Module:
        """Detach every hook, restore weights (folds and refinements undone) and fused attention, and return the
        original model."""
        self._restore_originals()
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for swap in self._weights.values():
            swap.restore()
            swap.cache.clear()
        for module, fused in self._fused_attn.items():
            module.fused_attn = fused
        self._fused_attn.clear()
        self.integer.remove()
        return self.model

    # -- names and bits ----------------------------------------------------------------------------------------
    @property
    def quantizer_names(self) -> list[str]:
        """Quantizer names: activations in network order (``input``, module names, ``<module>:input`` for
        pre-hooks), then weights (``<module>:weight``)."""
        return list(self._quantizers)

    @property
    def activation_names(self) -> list[str]:
        return list(self._activation_names)

    @property
    def weight_names(self) -> list[str]:
        return list(self._weights)

    @property
    def forms(self) -> dict[str, str]:
        """The form of every quantizer (see :mod:`quantsearch.quantize.forms`; weights are uniform)."""
        return {n: form_of(q) for n, q in self._quantizers.items()}

    def weight_module(self, name: str) -> nn.Module:
        """The Conv/Linear layer whose weight the quantizer ``name`` (``<module>:weight``) quantizes."""
        try:
            return self._weights[name].module
        except KeyError:
            raise KeyError(f"no weight quantizer named {name!r}") from None

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
            if self.low_table.get(name):
                self._quantizers[name].low = amax_for_bits(self.low_table[name], b)

    def bits_dict(self) -> dict[str, int]:
        return dict(zip(self._quantizers, self.bit_widths))

    # -- amax and switches -------------------------------------------------------------------------------------
    @property
    def amax(self) -> dict[str, float | list[float] | None]:
        """amax per quantizer: a float for activations (None before calibration), a list for weights (one per
        output channel) and per-head activations (one per group)."""
        values = {}
        for n, q in self._quantizers.items():
            amax = q.amax
            if amax is None:
                values[n] = None
            elif n in self._weights or form_of(q) == "per-head":
                values[n] = [float(v) for v in amax.flatten().tolist()]
            else:
                values[n] = float(amax)
        return values

    @amax.setter
    def amax(self, values: Mapping[str, float | Sequence[float]]) -> None:
        unknown = [n for n in values if n not in self._quantizers]
        if unknown:
            raise KeyError(f"no quantizer named {unknown[0]!r}")
        for name, value in values.items():
            self._set_amax(name, value)

    def _set_amax(self, name: str, value: float | Sequence[float]) -> None:
        quantizer = self._quantizers[name]
        if name in self._weights:
            weight = self._weights[name].module.weight
            shape = (weight.shape[0],) + (1,) * (weight.dim() - 1)
            tensor = torch.as_tensor(value, dtype=torch.float32).flatten()
            if tensor.numel() != shape[0]:
                raise ValueError(f"amax of {name!r} needs {shape[0]} values (one per output channel), "
                                 f"got {tensor.numel()}")
            tensor = tensor.reshape(shape)
            self._weights[name].cache.clear()
        elif form_of(quantizer) == "per-head":
            tensor = torch.as_tensor(value, dtype=torch.float32).flatten()
            if tensor.numel() != quantizer.groups or not bool(torch.isfinite(tensor).all() and (tensor > 0).all()):
                raise ValueError(f"amax of per-head {name!r} needs {quantizer.groups} positive finite values (one "
                                 f"per head and part), got {tensor.tolist()}")
        else:
            if not math.isfinite(float(value)) or float(value) <= 0:
                raise ValueError(f"amax {value} for {name!r}: it must be positive and finite")
            tensor = torch.tensor(float(value), dtype=torch.float32)
        if hasattr(quantizer, "_amax") and quantizer._amax.shape == tensor.shape:
            quantizer._amax.data.copy_(tensor)
        else:
            quantizer.register_buffer("_amax", tensor.to(self._device()))

    # -- per-channel folds (RepQ-ViT) --------------------------------------------------------------------------
    def quantized_module(self, name: str) -> nn.Module:
        """The module whose output (or, for ``<module>:input``, input) activation quantizer ``name`` sees."""
        try:
            return self._modules_of[name]
        except KeyError:
            raise KeyError(f"no activation quantizer named {name!r}") from None

    @property
    def folds(self) -> dict[str, ChannelFold]:
        """The per-channel folds in place, by quantizer (see :mod:`quantsearch.quantize.fold`)."""
        return dict(self._folds)

    @folds.setter
    def folds(self, folds: Mapping[str, ChannelFold]) -> None:
        """Undo the folds (and refinements) in place, then make ``folds`` (each on a per-channel quantizer's
        LayerNorm and the Linear layers it names) and put the refinements back; the weight quantizers of the
        layers touched take their new weights' max|w|."""
        refined = self._refined
        touched = self._restore_originals()
        for name, fold in folds.items():
            if form_of(self.quantizer(name)) != "per-channel":
                raise FoldError(f"quantizer {name!r} has the {form_of(self.quantizer(name))} form: only a "
                                "per-channel quantizer carries a fold")
            norm = self.quantized_module(name)
            try:
                linears = [self.model.get_submodule(n) for n in fold.into]
            except AttributeError as exc:
                raise FoldError(f"the fold of {name!r} moves into a layer the model lacks ({exc})") from None
            if len(fold.scale) != norm.weight.numel() or any(
                    getattr(m, "in_features", None) != norm.weight.numel() for m in linears):
                raise FoldError(f"the fold of {name!r} has {len(fold.scale)} channels; its LayerNorm and the "
                                "layers it moves into do not")
            for module in (norm, *linears):
                for param in (module.weight, module.bias):
                    self._originals.setdefault(param, param.detach().clone())
                    touched.add(param)
            fold_into(norm, linears, fold)
            self._folds[name] = fold
        for wname, swap in self._weights.items():
            if swap.module.weight in touched:
                self._set_amax(wname, channel_absmax(swap.module.weight).flatten().tolist())
        self._put_refined(refined)

    def _restore_originals(self) -> set:
        """Put every folded or refined parameter back as the model had it; returns the parameters touched."""
        touched = set(self._originals)
        with torch.no_grad():
            for param, original in self._originals.items():
                param.copy_(original)
        self._originals.clear()
        self._folds, self._refined = {}, {}
        return touched

    @property
    def refined(self) -> dict[str, torch.Tensor]:
        """Parameters a refinement changed (:mod:`quantsearch.quantize.refine`), by state-dict key, on top of the
        folds; the model's own values come back with :meth:`remove` and inside :meth:`unfolded`."""
        return dict(self._refined)

    @refined.setter
    def refined(self, values: Mapping[str, torch.Tensor]) -> None:
        folds = self._folds
        self._refined = {}
        self.folds = folds  # from the model's own weights again, refinements dropped
        self._put_refined(values)

    def add_refined(self, values: Mapping[str, torch.Tensor]) -> None:
        """Put ``values`` in place on top of the refinements so far (a refinement going layer by layer), without
        re-making the folds and the earlier refinements as assigning :attr:`refined` does."""
        self._put_refined(values, add=True)

    def _put_refined(self, values: Mapping[str, torch.Tensor], add: bool = False) -> None:
        params = dict(self.model.named_parameters())
        for key, value in values.items():
            param = params.get(key)
            if param is None or tuple(param.shape) != tuple(value.shape):
                what = "no such parameter" if param is None else f"shape {list(param.shape)}"
                raise ValueError(f"refined parameter {key!r} of shape {list(value.shape)} does not fit the model "
                                 f"({what})")
            self._originals.setdefault(param, param.detach().clone())
            with torch.no_grad():
                param.copy_(value)
        for swap in self._weights.values():
            swap.cache.clear()
        self._refined = (self._refined if add else {}) | {k: v.detach().clone() for k, v in values.items()}

    @contextmanager
    def _weight_amax_kept(self) -> Iterator[None]:
        """The weight quantizers' amax as they are now, set again when the block ends (folds reset them)."""
        amax = {n: a for n, a in self.amax.items() if n in self._weights and a is not None}
        try:
            yield
        finally:
            for name, value in amax.items():
                self._set_amax(name, value)

    @contextmanager
    def unrefined(self) -> Iterator["QuantizedActivationsModel"]:
        """The model with its folds but without refinements inside the block (a refinement's FP32 reference)."""
        refined = self.refined
        with self._weight_amax_kept():
            self.refined = {}
            try:
                yield self
            finally:
                self.refined = refined

    @contextmanager
    def unfolded(self) -> Iterator["QuantizedActivationsModel"]:
        """The model's own weights inside the block (for fingerprints); folds and refinements come back after it."""
        folds, refined = self.folds, self.refined
        with self._weight_amax_kept():
            self._restore_originals()
            try:
                yield self
            finally:
                self._refined = refined
                self.folds = folds

    @property
    def lows(self) -> dict[str, float]:
        """The lower end of each asymmetric quantizer's range (its upper end is its amax)."""
        return {n: q.low for n, q in self._quantizers.items() if hasattr(q, "low")}

    @lows.setter
    def lows(self, values: Mapping[str, float]) -> None:
        ours = self.lows
        unknown = [n for n in values if n not in ours]
        if unknown:
            raise KeyError(f"no asymmetric quantizer named {unknown[0]!r}")
        for name, value in values.items():
            if not math.isfinite(float(value)) or float(value) > 0:
                raise ValueError(f"low {value} for {name!r}: it must be finite and at most 0")
            self._quantizers[name].low = float(value)

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
        return all(v is not None for v in self.amax.values()) and all(op.calibrated for op in self.integer)

    def set_quantization(self, enabled: bool) -> None:
        for q in self._quantizers.values():
            q.enable() if enabled else q.disable()
        for op in self.integer:
            op.enabled = enabled

    @contextmanager
    def quantization_disabled(self) -> Iterator["QuantizedActivationsModel"]:
        """Run the FP32 model inside the block (the hooks stay, the quantizers pass tensors through, the integer
        operators compute in float)."""
        previous = [q._disabled for q in self._quantizers.values()]
        ops = [op.enabled for op in self.integer]
        self.set_quantization(False)
        try:
            yield self
        finally:
            for q, was in zip(self._quantizers.values(), previous):
                q._disabled = was
            for op, was in zip(self.integer, ops):
                op.enabled = was

    # -- integer operators -------------------------------------------------------------------------------------
    @property
    def integer_ops(self) -> dict[str, str]:
        """The implementation of every nonlinear operator found (``float`` where it stays float)."""
        return dict(self.integer.choices)

    @property
    def integer_state(self) -> dict[str, dict]:
        """Each integer operator's calibrated range, as data."""
        return {op.name: op.state() for op in self.integer}

    @integer_state.setter
    def integer_state(self, states: Mapping[str, dict]) -> None:
        names = [op.name for op in self.integer]
        if sorted(states) != sorted(names):
            other = next(iter(set(states) ^ set(names)))
            raise ValueError(f"integer operator {other!r} is in {'one' if other in states else 'the model'} but "
                             f"not the {'model' if other in states else 'other'}")
        for op in self.integer:
            op.load_state(states[op.name])

    @property
    def integer_only(self) -> bool:
        """Whether every nonlinear operator is integer and every weight layer has a weight quantizer."""
        from .integer import float_operators

        weighted = [m for m in self.model.modules() if isinstance(m, WEIGHT_LAYERS)]
        return not float_operators(self.model, self.integer_ops) and len(self._weights) == len(weighted)

    def calibrate(self, batches: Iterable, num_batches: int | None = None, method: str = "max",
                  **options) -> dict[str, float]:
        """Calibrate over ``num_batches`` batches (quantization off meanwhile); returns each activation's amax.

        ``method`` and ``options`` are those of :func:`quantsearch.calibration.calibrate`, which fills
        :attr:`amax_table` and :attr:`unsigned` too.
        """
        from .calib import calibrate

        calibrate(self, batches, num_batches, method=method, **options)
        amax = self.amax
        return {n: amax[n] for n in self.activation_names}

    def tensor_shapes(self, example: torch.Tensor) -> dict[str, list[int]]:
        """Per-sample shape (batch dimension dropped) of the tensor each quantizer sees, from one forward pass.

        A bit-config records these so that applying it to a model whose tensors differ is refused. Quantization
        is off during the pass; a quantizer that sees no tensor is absent from the result.
        """
        shapes: dict[str, list[int]] = {}

        def record(name):
            def hook(_module, args, _output):
                if args and isinstance(args[0], torch.Tensor):
                    shapes.setdefault(name, [int(d) for d in args[0].shape[1:]])
            return hook

        handles = [q.register_forward_hook(record(n)) for n, q in self._quantizers.items()]
        try:
            with torch.inference_mode(), self.quantization_disabled():
                self.model(example.to(self._device()))
        finally:
            for handle in handles:
                handle.remove()
        return shapes

    def locate_nonfinite(self, example: torch.Tensor) -> str | None:
        """Where NaN or Inf first appears in a forward pass of ``example`` with the current bits, by quantizer name.

        A quantizer whose input was finite and whose output is not made the fault (an amax or a weight that does
        not quantize); one whose input already was not names the first quantized tensor downstream of the fault.
        None if the pass is finite throughout.
        """
        for name, swap in self._weights.items():  # weights first: a fake-quantized weight is cached per width
            q = swap.quantizer
            if not q._disabled and q._if_quant and not torch.isfinite(swap.quantized(q.num_bits)).all():
                return f"weight quantizer {name!r} ({q.num_bits} bits) makes NaN or Inf from a finite weight"
        found: list[str] = []

        def check(name):
            def hook(_module, args, output):
                if found or not args or not isinstance(args[0], torch.Tensor):
                    return
                if not torch.isfinite(args[0]).all():
                    found.append(f"NaN or Inf reaches quantizer {name!r}: made upstream of it, not by a quantizer")
                elif isinstance(output, torch.Tensor) and not torch.isfinite(output).all():
                    found.append(f"quantizer {name!r} ({_module.num_bits} bits, amax "
                                 f"{float(_module.amax.max()) if _module.amax is not None else None:g}) turns a "
                                 "finite tensor into NaN or Inf")
            return hook

        handles = [q.register_forward_hook(check(n)) for n, q in self._quantizers.items() if n not in self._weights]
        try:
            with torch.no_grad():  # not inference mode: no quantizer overwrites the input its check reads
                output = self.model(example.to(self._device()))
        finally:
            for handle in handles:
                handle.remove()
        if found:
            return found[0]
        if isinstance(output, torch.Tensor) and not torch.isfinite(output).all():
            return "NaN or Inf appears after the last quantizer"
        return None

    def extra_repr(self) -> str:
        return f"{len(self)} quantizers ({self.target.description})"
