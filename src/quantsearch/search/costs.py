"""Cost models: what a configuration of bit-widths costs, as a number to minimise.

A cost model is a callable ``bits: Mapping[str, int] -> float`` (bits of every quantizer, by name) with a
``name`` and the cost of the FP32 model (``fp32``), so that every cost can also be reported normalised
(0.25 = a quarter of FP32).

All costs but ``bits`` come from one shape-recording forward pass (:func:`profile_model`) on one sample, run with
quantization off. A ``TorchFunctionMode`` sees every call of ``F.linear``, ``F.conv1d/2d/3d``, ``matmul`` (``@``),
``mm``/``bmm``/``addmm``/``baddbmm`` and ``scaled_dot_product_attention``, whether a module makes it or not, so
the two attention matmuls of a timm ``Attention`` with fused attention off (``q @ k^T`` and ``attn @ v``, which
are no modules) are counted like any layer. For each multiply it records the MACs and which quantizer produced
each operand: the quantizer's output tensor is tagged with its name, and the tag follows the tensor through
operations that keep it on the quantizer's grid (views, reshapes, permutes, indexing, ``unbind``, dropout, ReLU,
max pooling, zero padding, multiplying or dividing by a Python number such as ``q * scale``). Any other
operation (an add, a softmax, a LayerNorm, average pooling) yields an unquantized tensor, counted at 32 bits.
A Conv/Linear weight is counted at the bits of its ``<module>:weight`` quantizer, or 32 bits without one.

- ``bits``: the sum of num_bits over all quantizers (the original tool's objective).
- ``activation-memory``: bytes of one sample's quantized activations, sum of bits x elements / 8.
- ``model-size``: bytes of the parameters, weight bits x elements / 8, unquantized parameters (biases,
  norms, embeddings, weights without a quantizer) at 32 bits.
- ``bops``: bit operations of one sample, sum over multiplies of MACs x bits of one operand x bits of the other
  (HAWQ / AIMET style), unquantized operands at 32 bits.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Mapping, Protocol, Sequence

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

__all__ = ["CostModel", "TotalBits", "ActivationMemory", "ModelSize", "BOPs", "UnaryTable", "Latency", "RuntimeSize",
           "TARGET_COSTS", "COSTS", "get_costs", "MatmulOp", "ModelProfile", "profile_model", "UNQUANTIZED_BITS"]

UNQUANTIZED_BITS = 32

# operations whose output holds the same values (or a subset, or zeros) as their one tensor input
_KEEP_GRID = frozenset({
    "view", "view_as", "reshape", "reshape_as", "flatten", "unflatten", "permute", "transpose", "t", "swapaxes",
    "movedim", "squeeze", "unsqueeze", "expand", "expand_as", "contiguous", "clone", "detach", "to", "__getitem__",
    "select", "narrow", "unbind", "chunk", "split", "tensor_split",
    "dropout", "dropout1d", "dropout2d", "dropout3d", "alpha_dropout", "feature_alpha_dropout",
    "relu", "relu_", "max_pool1d", "max_pool2d", "max_pool3d", "_max_pool1d", "_max_pool2d", "_max_pool3d",
    "adaptive_max_pool1d", "adaptive_max_pool2d", "adaptive_max_pool3d", "pad",
})
# the same grid at another scale, when the other operand is a Python number
_SCALE = frozenset({"mul", "__mul__", "__rmul__", "div", "__truediv__"})
_CONV = frozenset({"conv1d", "conv2d", "conv3d"})
_MATMUL = frozenset({"matmul", "__matmul__", "__rmatmul__", "mm", "bmm"})
_ADD_MATMUL = frozenset({"addmm", "baddbmm"})


@dataclass(frozen=True)
class MatmulOp:
    """One multiply of a sample's forward pass.

    ``operands`` holds the quantizer name of each operand (None: unquantized, 32 bits): for Conv/Linear the
    weight's then the input's; for a matmul the left then the right operand's.
    """

    name: str
    kind: str  # conv, linear or matmul
    macs: int
    operands: tuple[str | None, str | None]


@dataclass(frozen=True)
class ModelProfile:
    """What the costs need, recorded in one forward pass of one sample."""

    ops: tuple[MatmulOp, ...]
    activation_elements: Mapping[str, int]  # elements per sample through each activation quantizer
    weight_elements: Mapping[str, int]  # elements of the weight behind each weight quantizer
    unquantized_parameters: int  # parameter elements stored at 32 bits

    @property
    def macs(self) -> int:
        return sum(op.macs for op in self.ops)


def _tensors(value) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in _tensors(v)]
    return []


class _Recorder(TorchFunctionMode):
    """Counts the MACs of every multiply and follows quantized tensors through grid-preserving operations."""

    def __init__(self, weight_quantizer: Mapping[int, str], weight_module: Mapping[int, str], scope: list[str]):
        super().__init__()
        self.weight_quantizer = weight_quantizer  # id(Parameter) -> quantizer name
        self.weight_module = weight_module  # id(Parameter) -> module name
        self.scope = scope  # names of the modules being called, innermost last
        self.tags: dict[int, tuple[torch.Tensor, str]] = {}  # the tensor is kept so that its id stays unique
        self.ops: list[MatmulOp] = []
        self._counts: dict[tuple[str, str], int] = {}

    def tag(self, tensor: torch.Tensor, name: str) -> None:
        self.tags[id(tensor)] = (tensor, name)

    def tag_of(self, tensor) -> str | None:
        entry = self.tags.get(id(tensor)) if isinstance(tensor, torch.Tensor) else None
        return entry[1] if entry is not None and entry[0] is tensor else None

    def _op_name(self, kind: str) -> str:
        """``<module>:<kind><i>``: the i-th such call made by the innermost module being called."""
        scope = self.scope[-1] if self.scope else ""
        index = self._counts.get((scope, kind), 0)
        self._counts[(scope, kind)] = index + 1
        return f"{scope}:{kind}{index}"

    def _weighted(self, kind: str, x, weight, macs: int) -> None:
        owner = self.weight_module.get(id(weight))
        name = owner if owner is not None else self._op_name(kind)
        self.ops.append(MatmulOp(name, kind, int(macs), (self.weight_quantizer.get(id(weight)), self.tag_of(x))))

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = getattr(func, "__name__", "")
        inputs = _tensors(list(args)) + _tensors(list(kwargs.values()))
        if name == "linear":
            x, weight = args[0], args[1] if len(args) > 1 else kwargs["weight"]
            self._weighted("linear", x, weight, x.numel() * weight.shape[0])
        elif name in _CONV:
            x, weight = args[0], args[1] if len(args) > 1 else kwargs["weight"]
            self._weighted("conv", x, weight, out.numel() * math.prod(weight.shape[1:]))
        elif name in _MATMUL or name in _ADD_MATMUL:
            a, b = (args[1], args[2]) if name in _ADD_MATMUL else (args[0], args[1])
            if name == "__rmatmul__":
                a, b = b, a
            self.ops.append(MatmulOp(self._op_name("matmul"), "matmul", int(out.numel() * a.shape[-1]),
                                     (self.tag_of(a), self.tag_of(b))))
        elif name == "scaled_dot_product_attention":
            q, k, v = (list(args) + [kwargs.get(n) for n in ("query", "key", "value")[len(args):]])[:3]
            batch = math.prod(q.shape[:-2])
            scores = batch * q.shape[-2] * k.shape[-2]
            self.ops.append(MatmulOp(self._op_name("matmul"), "matmul", int(scores * q.shape[-1]),
                                     (self.tag_of(q), self.tag_of(k))))
            self.ops.append(MatmulOp(self._op_name("matmul"), "matmul", int(scores * v.shape[-1]),
                                     (None, self.tag_of(v))))  # the probabilities are never quantized inside
        keep = (name in _KEEP_GRID and len(inputs) == 1) or (
            name in _SCALE and len(inputs) == 1 and len(args) == 2
            and any(isinstance(a, numbers.Number) and not isinstance(a, bool) for a in args))
        source = self.tag_of(inputs[0]) if keep else None
        for tensor in _tensors(out):
            if source is not None:
                self.tag(tensor, source)
            else:  # a new tensor, or one changed in place (x += y): off any quantizer's grid
                self.tags.pop(id(tensor), None)
        return out


def profile_model(qmodel, example_input: torch.Tensor) -> ModelProfile:
    """Record ops, MACs, activation and parameter sizes of ``qmodel`` in one forward pass of one sample.

    ``example_input`` is a batch; only its first sample is used, so every count is per sample.
    """
    model = qmodel.model
    x = example_input[:1]
    activations = set(qmodel.activation_names)
    modules = dict(model.named_modules())
    weight_quantizer = {id(qmodel.weight_module(n).weight): n for n in qmodel.weight_names}
    weight_module = {id(m.weight): name for name, m in modules.items()
                     if isinstance(getattr(m, "weight", None), nn.Parameter)}
    scope: list[str] = []
    recorder = _Recorder(weight_quantizer, weight_module, scope)
    elements: dict[str, int] = {}

    def observe(name):
        def hook(_quantizer, args, output):
            elements[name] = elements.get(name, 0) + args[0].numel()
            recorder.tag(output, name)
        return hook

    handles = [q.register_forward_hook(observe(n)) for n, q in qmodel.named_quantizers() if n in activations]
    def enter(name):
        def hook(_module, _args):
            scope.append(name)
        return hook

    def leave(_module, _args, _output):
        scope.pop()

    for name, module in modules.items():
        handles.append(module.register_forward_pre_hook(enter(name)))
        handles.append(module.register_forward_hook(leave, always_call=True))
    was_training = qmodel.training
    try:
        qmodel.eval()
        with qmodel.quantization_disabled(), torch.no_grad(), recorder:
            qmodel(x)
    finally:
        for handle in handles:
            handle.remove()
        qmodel.train(was_training)
    missing = [n for n in qmodel.activation_names if n not in elements]
    if missing:
        raise ValueError(f"quantizer {missing[0]!r} saw no tensor in the shape-recording pass")
    weight_elements, stored = {}, set()
    for n in qmodel.weight_names:  # a weight shared by two layers is stored once, at the first one's bits
        weight = qmodel.weight_module(n).weight
        weight_elements[n] = 0 if id(weight) in stored else weight.numel()
        stored.add(id(weight))
    total = sum(p.numel() for p in model.parameters())
    return ModelProfile(tuple(recorder.ops), elements, weight_elements, total - sum(weight_elements.values()))


class CostModel(Protocol):
    name: str
    fp32: float

    def __call__(self, bits: Mapping[str, int]) -> float: ...


class TotalBits:
    """The sum of num_bits over all quantizers: the original tool's objective."""

    name = "bits"

    def __init__(self, quantizer_names: Sequence[str]):
        self.fp32 = float(UNQUANTIZED_BITS * len(quantizer_names))

    def __call__(self, bits: Mapping[str, int]) -> float:
        return float(sum(bits.values()))


class ActivationMemory:
    """Bytes of one sample's quantized activations: sum of bits x elements / 8."""

    name = "activation-memory"

    def __init__(self, profile: ModelProfile):
        self.elements = dict(profile.activation_elements)
        self.fp32 = UNQUANTIZED_BITS * sum(self.elements.values()) / 8

    def __call__(self, bits: Mapping[str, int]) -> float:
        return sum(bits[n] * e for n, e in self.elements.items()) / 8


class ModelSize:
    """Bytes of the parameters: quantized weights at their bits, every other parameter at 32 bits."""

    name = "model-size"

    def __init__(self, profile: ModelProfile):
        self.elements = dict(profile.weight_elements)
        self.unquantized = profile.unquantized_parameters
        self.fp32 = UNQUANTIZED_BITS * (sum(self.elements.values()) + self.unquantized) / 8

    def __call__(self, bits: Mapping[str, int]) -> float:
        return (sum(bits[n] * e for n, e in self.elements.items()) + UNQUANTIZED_BITS * self.unquantized) / 8


class BOPs:
    """Bit operations of one sample: sum over multiplies of MACs x operand bits x operand bits."""

    name = "bops"

    def __init__(self, profile: ModelProfile):
        self.ops = profile.ops
        self.fp32 = float(profile.macs * UNQUANTIZED_BITS * UNQUANTIZED_BITS)

    def __call__(self, bits: Mapping[str, int]) -> float:
        def width(name):
            return UNQUANTIZED_BITS if name is None else bits[name]

        return float(sum(op.macs * width(op.operands[0]) * width(op.operands[1]) for op in self.ops))


class UnaryTable:
    """A cost that is a fixed part plus one entry per layer for its gene value: what a runtime's formats cost,
    measured or counted by the target (:mod:`quantsearch.deploy.targets`). ``top`` is fp32's gene."""

    name = "table"

    def __init__(self, layers: Mapping[str, Mapping[int, float]], fixed: float, top: int):
        self.layers = {n: {int(g): float(s) for g, s in v.items()} for n, v in layers.items()}
        self.fixed = float(fixed)
        self.fp32 = self.fixed + sum(v[top] for v in self.layers.values())  # every layer at gene ``top`` (fp32)

    def __call__(self, bits: Mapping[str, int]) -> float:
        return self.fixed + sum(v[bits[n]] for n, v in self.layers.items())


class Latency(UnaryTable):
    """Milliseconds per call on a runtime at the deployment batch size: a measured fixed part plus each layer's
    measured entry for its format (a latency table's, :mod:`quantsearch.deploy.targets.latency`)."""

    name = "latency"


class RuntimeSize(UnaryTable):
    """Bytes of the weights as the runtime stores them: each layer's in its format (codes and scales), every other
    parameter as fp32."""

    name = "size"


TARGET_COSTS = ("latency", "size")  # the costs of a deployment target (--target), in the runtime's own units


COSTS = {"bits": TotalBits, "activation-memory": ActivationMemory, "model-size": ModelSize, "bops": BOPs}


def parse_cost_names(names: str | Sequence[str], target: str | None = None) -> list[str]:
    """``"bops,model-size"`` -> ``["bops", "model-size"]``, checked against :data:`COSTS` (a deployment
    ``target``'s: :data:`TARGET_COSTS`)."""
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    names = list(names)
    known = TARGET_COSTS if target else tuple(COSTS)
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        other = "the proxies without a target" if target else "a --target's costs"
        where = f" of target {target}" if target else ""
        hint = f" ({unknown[0]} is one of {other})" if unknown and unknown[0] in (*COSTS, *TARGET_COSTS) else ""
        raise ValueError(f"unknown cost{where} {unknown[0] if unknown else '(none)'!r}; choose from "
                         f"{', '.join(known)}{hint}")
    if len(set(names)) != len(names):
        raise ValueError(f"cost {next(n for n in names if names.count(n) > 1)!r} is given twice")
    return names


def get_costs(names: str | Sequence[str], qmodel, example_input: torch.Tensor | None = None,
              profile: ModelProfile | None = None) -> list[CostModel]:
    """Cost models by name (``"bops"``, ``"bops,model-size"`` or a list) for a quantized model.

    Every cost but ``bits`` needs a :class:`ModelProfile`: pass one, or an example input to record it.
    """
    names = parse_cost_names(names)
    if profile is None and any(n != "bits" for n in names):
        if example_input is None:
            raise ValueError(f"cost {next(n for n in names if n != 'bits')!r} needs an example input to record "
                             "the model's shapes")
        profile = profile_model(qmodel, example_input)
    return [TotalBits(qmodel.quantizer_names) if n == "bits" else COSTS[n](profile) for n in names]
