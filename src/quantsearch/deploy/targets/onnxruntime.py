"""ONNX Runtime on a CPU as a deployment target: per-layer formats (Linear, Conv1d, Conv2d) that ONNX Runtime runs
as its own kernels.

A layer's gene is an index into :data:`FORMATS`, which runs from the least precise to fp32, as bits run from the
fewest to the most: a Conv takes the last two, a Linear all four (:meth:`RuntimeFormatModel.gene_ranges`). So the
search, its sensitivities and its ILP read a format gene as they read a bit-width: the top of the range is the
reference, each step down trades precision for speed or size.

- ``fp32``: the layer as exported (MatMul, Gemm or Conv, batch norm folded in).
- ``int8-static``: W8A8 with calibrated uint8 activation grids, Q/DQ that a default session fuses into
  QLinearConv (a Linear: QLinearMatMul or QGemm); see :mod:`.static`. ONNX Runtime itself evaluates any
  configuration with a static layer (batch-norm folding, the grid after a following Relu and shared input
  tensors are what the runtime computes, not PyTorch).
- ``int8-dynamic``: ``com.microsoft.DynamicQuantizeMatMul``. ONNX Runtime quantizes the input at run time, per
  tensor, to uint8 over ``[min(x, 0), max(x, 0)]`` of the whole tensor it is given (so the grid depends on the
  deployment batch size), multiplies in integers with the weight stored as int8 per output channel (symmetric,
  ``scale = max|w| / 127``) and returns float. ORT's own ``quantize_dynamic`` ran DeiT-S 1.4-1.75x faster than
  FP32 on a 2-core AVX2 CPU.
- ``int4-weight``: ``com.microsoft.MatMulNBits``: the weight as 4-bit codes in blocks of :data:`BLOCK` input
  features, symmetric per block (``scale = max|w| / 7``, codes -7..7 stored as ``code + 8``), float
  activations. Block 32 is ORT's own default and the block its CPU kernels pack; 16 doubles the scales (a quarter
  more bytes) and 64 or 128 lose accuracy on layers with outlier channels. Smaller, not always faster.

:class:`RuntimeFormatModel` simulates each format in PyTorch as ORT computes it and exposes the formats as the
genes of a :class:`~quantsearch.search.problem.LayerwiseQuantizationProblem` (``quantizer_names``, ``bit_widths``),
so the search runs on it unchanged. :func:`export_runtime_onnx` writes ORT's graph; :mod:`.latency` measures
what each format costs.
"""
from __future__ import annotations

import contextlib
import hashlib
from dataclasses import dataclass, field
import os
import tempfile
from collections import OrderedDict
from pathlib import Path
from typing import Iterable, Iterator, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from ..errors import ExportError
from .static import (conv_nodes, inline_identities, insert_static, run_batches, runtime_session, static_tensors,
                     tensor_ranges, uint8_grid)

__all__ = ["FORMATS", "FP32", "BLOCK", "RuntimeCalibration", "RuntimeFormatModel", "dynamic_uint8", "int8_channel_codes", "int4_block_codes",
           "format_nodes", "export_runtime_onnx", "CONVS"]

FORMATS = ("int4-weight", "int8-dynamic", "int8-static", "fp32")  # least precise first: the gene is the index
FP32, STATIC = FORMATS.index("fp32"), FORMATS.index("int8-static")
CONVS = (nn.Conv1d, nn.Conv2d)
BLOCK = 32
MS_DOMAIN = "com.microsoft"


@dataclass(frozen=True)
class RuntimeCalibration:
    """What a target run calibrates: ORT's MinMax range of each tensor an int8-static layer quantizes (by ONNX
    tensor name), as a run records it."""

    ranges: Mapping[str, tuple[float, float]]
    methods: Mapping[str, str] = field(default_factory=lambda: {"int8-static": "minmax"})

    def to_dict(self) -> dict:
        return {"target": "onnxruntime-cpu", "method": "minmax", "ranges": {t: list(r) for t, r in self.ranges.items()}}


def dynamic_uint8(x: torch.Tensor, batch: int) -> torch.Tensor:
    """``x`` through ORT's DynamicQuantizeLinear, one grid per ``batch`` samples along dim 0 (what a session at
    that batch size sees): ``scale = (max(x, 0) - min(x, 0)) / 255``, ``zp = round(-min / scale)``, codes
    ``clamp(round(x / scale) + zp, 0, 255)``; returns ``codes - zp`` (the integers) and the scale per sample."""
    n = x.shape[0]
    groups = torch.arange(n, device=x.device) // batch
    flat = x.reshape(n, -1)
    count = int(groups[-1]) + 1
    low = torch.zeros(count, device=x.device).scatter_reduce(0, groups, flat.amin(1), "amin").clamp(max=0)
    high = torch.zeros(count, device=x.device).scatter_reduce(0, groups, flat.amax(1), "amax").clamp(min=0)
    scale = (high - low) / 255
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    zero = torch.clamp(torch.round(-low / scale), 0, 255)
    shape = (n,) + (1,) * (x.dim() - 1)
    s, z = scale[groups].reshape(shape), zero[groups].reshape(shape)
    return torch.clamp(torch.round(x / s) + z, 0, 255) - z, s


def int8_channel_codes(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 codes per output channel (``round(w / s)``, ``s = max|w| / 127``; 1 where a row is zero)."""
    amax = weight.detach().abs().amax(1)
    scale = torch.where(amax > 0, amax / 127, torch.ones_like(amax))
    return torch.clamp(torch.round(weight.detach() / scale[:, None]), -127, 127), scale


def int4_block_codes(weight: torch.Tensor, block: int = BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric 4-bit codes in blocks of ``block`` input features (the last block zero-padded): codes
    ``[N, blocks, block]`` in -7..7 and scales ``[N, blocks]`` (``max|w| / 7``; 1 where a block is zero)."""
    n, k = weight.shape
    padded = torch.nn.functional.pad(weight.detach(), (0, -k % block)).reshape(n, -1, block)
    amax = padded.abs().amax(2)
    scale = torch.where(amax > 0, amax / 7, torch.ones_like(amax))
    return torch.clamp(torch.round(padded / scale[..., None]), -7, 7), scale


class RuntimeFormatModel(nn.Module):
    """``model`` with each Linear and Conv1d/Conv2d layer computed in its :data:`FORMATS` entry, as ONNX Runtime
    computes it at deployment batch size ``batch_size``.

    The layers are the genes (``quantizer_names``); ``bit_widths`` holds each one's format index (:data:`FP32`, the top, for fp32),
    as :class:`~quantsearch.search.problem.LayerwiseQuantizationProblem` expects; :meth:`gene_ranges` gives each
    layer's range (a Conv takes int8-static and fp32 only). Linear formats other than int8-static are simulated in
    PyTorch (weight codes computed once per layer and format). A configuration with an int8-static layer, or any
    configuration when ``evaluate_in="onnxruntime"``, is evaluated by ONNX Runtime itself: a default session
    (``threads`` intra-op threads when given) on the configuration's graph, so the accuracy the search sees is the
    runtime's. The graph is built on an FP32 export cached per input shape, so the weights must not change after
    the first export. int8-static needs :meth:`calibrate` first.
    """

    def __init__(self, model: nn.Module, batch_size: int = 1, threads: int | None = None,
                 evaluate_in: str = "auto"):
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"deployment batch size must be at least 1, not {batch_size}")
        if evaluate_in not in ("auto", "onnxruntime"):
            raise ValueError(f"evaluate_in must be 'auto' or 'onnxruntime', not {evaluate_in!r}")
        self.model, self.batch_size, self.threads, self.evaluate_in = model, int(batch_size), threads, evaluate_in
        self.layers = {name: m for name, m in model.named_modules()
                       if type(m) is nn.Linear or isinstance(m, CONVS)}
        if not self.layers:
            raise ValueError("the onnxruntime-cpu target has no layer to choose a format for: the model has no "
                             "nn.Linear, nn.Conv1d or nn.Conv2d")
        self._formats = dict.fromkeys(self.layers, FP32)
        self._weights: dict[tuple[str, str], torch.Tensor] = {}
        self._exports: dict[tuple, bytes] = {}  # FP32 ONNX per (input shape without batch, opset)
        self._sessions: OrderedDict = OrderedDict()  # the last configurations' sessions
        self.ranges: dict[str, tuple[float, float]] = {}  # calibrated min/max per ONNX tensor name

    @property
    def quantizer_names(self) -> list[str]:
        return list(self.layers)

    def __len__(self) -> int:
        return len(self.layers)

    def gene_ranges(self) -> dict[str, tuple[int, int]]:
        """Each layer's format indices, lowest and highest: int8-static..fp32 for a Conv, every format for a
        Linear."""
        return {n: (STATIC if isinstance(m, CONVS) else 0, FP32) for n, m in self.layers.items()}

    @property
    def bit_widths(self) -> list[int]:
        return list(self._formats.values())

    @bit_widths.setter
    def bit_widths(self, formats: Sequence[int] | Mapping[str, int]) -> None:
        if not isinstance(formats, Mapping):
            if len(formats) != len(self.layers):
                raise ValueError(f"expected {len(self.layers)} formats, got {len(formats)}")
            formats = dict(zip(self.layers, formats))
        ranges = self.gene_ranges()
        for name, index in formats.items():
            if name not in self.layers:
                raise KeyError(f"no Linear or Conv layer named {name!r}")
            lo, hi = ranges[name]
            if not lo <= int(index) <= hi:
                raise ValueError(f"layer {name!r}: format index {index} is not one of {lo}..{hi} "
                                 f"({', '.join(FORMATS[lo:hi + 1])})")
        for name, index in formats.items():
            self._set(name, int(index))

    def bits_dict(self) -> dict[str, int]:
        return dict(self._formats)

    @property
    def formats(self) -> dict[str, str]:
        """Each layer's format by name."""
        return {n: FORMATS[i] for n, i in self._formats.items()}

    def _set(self, name: str, index: int) -> None:
        self._formats[name] = index
        module, fmt = self.layers[name], FORMATS[index]
        if fmt in ("fp32", "int8-static"):  # int8-static runs in ONNX Runtime, never in this module
            module.__dict__.pop("forward", None)
        elif fmt == "int8-dynamic":
            module.forward = lambda x, m=module, n=name: self._dynamic(m, n, x)
        else:
            module.forward = lambda x, m=module, n=name: torch.nn.functional.linear(x, self._weight(n, fmt), m.bias)

    def _weight(self, name: str, fmt: str) -> torch.Tensor:
        """The layer's weight as the format stores it, dequantized (int8 codes and scales for int8-dynamic)."""
        key = (name, fmt)
        if key not in self._weights:
            weight = self.layers[name].weight
            if fmt == "int8-dynamic":
                self._weights[key] = int8_channel_codes(weight)
            else:
                codes, scale = int4_block_codes(weight)
                self._weights[key] = (codes * scale[..., None]).reshape(weight.shape[0], -1)[:, :weight.shape[1]]
        return self._weights[key]

    def _dynamic(self, module: nn.Linear, name: str, x: torch.Tensor) -> torch.Tensor:
        codes, scale = self._weight(name, "int8-dynamic")
        q, s = dynamic_uint8(x, self.batch_size)
        out = torch.nn.functional.linear(q, codes) * (s * scale)  # int32 accumulator x (a_scale x b_scale)
        return out if module.bias is None else out + module.bias

    @contextlib.contextmanager
    def fp32(self) -> Iterator["RuntimeFormatModel"]:
        """Within the block every layer computes in fp32 (the formats are kept and restored after)."""
        formats = dict(self._formats)
        try:
            for name in self.layers:
                self._set(name, FP32)
            yield self
        finally:
            for name, index in formats.items():
                self._set(name, index)

    quantization_disabled = fp32  # what an evaluator calls for the FP32 reference of a label-free metric

    def size_cost(self):
        """Bytes of the weights as ORT stores each format (:class:`~quantsearch.search.costs.RuntimeSize`): fp32
        4 a weight; int8 1 a weight plus a scale and zero point per output channel; int4 half a byte a weight plus
        a 4-byte scale per block of :data:`BLOCK`. Every other parameter (biases, norms, embeddings) is fp32."""
        from ...search.costs import RuntimeSize

        layers, covered = {}, set()
        for name, module in self.layers.items():
            n, k = module.weight.shape[0], module.weight[0].numel()
            blocks = -(-k // BLOCK)
            entry = {"fp32": 4 * n * k, "int8-static": n * k + 5 * n, "int8-dynamic": n * k + 5 * n,
                     "int4-weight": n * blocks * (BLOCK // 2 + 4)}
            lo, hi = self.gene_ranges()[name]
            layers[name] = {i: float(entry[FORMATS[i]]) for i in range(lo, hi + 1)}
            covered.add(id(module.weight))
        fixed = 4.0 * sum(p.numel() for p in self.model.parameters() if id(p) not in covered)
        return RuntimeSize(layers, fixed, FP32)

    def forward(self, *args, **kwargs):
        if self.evaluate_in == "onnxruntime" or "int8-static" in self.formats.values():
            return self._run_runtime(args[0])
        return self.model(*args, **kwargs)

    # -- ONNX Runtime as the evaluator ----------------------------------------------------------------------------
    def fp32_onnx(self, example: torch.Tensor, opset: int = 17) -> bytes:
        """The FP32 export (batch norm folded, dynamic batch), cached per input shape and opset."""
        key = (tuple(example.shape[1:]), opset)
        if key not in self._exports:
            from ..onnx_export import _export

            self.eval()
            with tempfile.TemporaryDirectory() as tmp, self.fp32():
                _export(self.model, example[:1].detach().cpu(), Path(tmp) / "fp32.onnx", opset, fold_constants=True)
                self._exports[key] = inline_identities((Path(tmp) / "fp32.onnx").read_bytes())
        return self._exports[key]

    def layer_nodes(self, graph) -> dict[str, object]:
        """Each layer's MatMul / Gemm / Conv node in an FP32 graph (layers not found are left out)."""
        linears = {n: m for n, m in self.layers.items() if not isinstance(m, CONVS)}
        convs = {n: m for n, m in self.layers.items() if isinstance(m, CONVS)}
        return {**{n: v[0] for n, v in _layer_nodes(graph, linears).items()}, **conv_nodes(graph, convs)}

    def calibrate(self, batches: Iterable, opset: int = 17) -> dict[str, tuple[float, float]]:
        """ORT's MinMax ranges of every tensor an int8-static layer would quantize, over ``batches`` (tensors or
        ``(input, target)`` pairs) run through the FP32 export. Needed once before any layer is int8-static."""
        import onnx

        batches = [b[0] if isinstance(b, (tuple, list)) else b for b in batches]  # (input, target) pairs
        if not batches:
            raise ValueError("calibration needs at least one batch")
        model_bytes = self.fp32_onnx(batches[0], opset)
        graph = onnx.load_from_string(model_bytes).graph
        pairs = static_tensors(graph, self.layer_nodes(graph))
        self.ranges = tensor_ranges(model_bytes, [t for p in pairs.values() for t in p], batches, self.threads)
        self._sessions.clear()
        return dict(self.ranges)

    def runtime_onnx(self, example: torch.Tensor, opset: int = 17):
        """ORT's graph (an ``onnx.ModelProto``) at the current formats: the FP32 export with each non-fp32 layer's
        node replaced by its format's kernel, or given its int8-static Q/DQ."""
        import onnx
        from onnx import helper

        model = onnx.load_from_string(self.fp32_onnx(example, opset))
        nodes = self.layer_nodes(model.graph)
        missing = [n for n, i in self._formats.items() if i != FP32 and n not in nodes]
        if missing:
            kind = "Conv" if isinstance(self.layers[missing[0]], CONVS) else "MatMul or Gemm"
            raise ExportError(f"layer {missing[0]!r}: no {kind} with its weight in the exported graph (shared or "
                              "transformed weight); keep it fp32")
        found = _layer_nodes(model.graph, {n: self.layers[n] for n, f in self.formats.items()
                                           if f in ("int8-dynamic", "int4-weight")})
        for name, hit in found.items():
            _replace(model.graph, hit, self.formats[name], self.layers[name].weight, name)
        static = [n for n, f in self.formats.items() if f == "int8-static"]
        if static:
            if not self.ranges:
                raise ExportError(f"layer {static[0]!r} is int8-static but the model is not calibrated: call "
                                  "calibrate(batches) first")
            nodes = self.layer_nodes(model.graph)
            grids = {t: uint8_grid(*r) for t, r in self.ranges.items()}
            insert_static(model.graph, {n: nodes[n] for n in static}, grids)
        model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
        _drop_unused(model.graph)
        return model

    def _run_runtime(self, x: torch.Tensor) -> torch.Tensor:
        """The current configuration in a default ORT session, fed the deployment batch size at a time where a
        dynamic grid depends on it (the whole input at once otherwise: every other format is per sample)."""
        key = (tuple(self.bit_widths), tuple(x.shape[1:]))
        if key not in self._sessions:
            self._sessions[key] = runtime_session(self.runtime_onnx(x).SerializeToString(), self.threads)
            while len(self._sessions) > 2:
                self._sessions.popitem(last=False)
        step = self.batch_size if "int8-dynamic" in self.formats.values() else max(1, len(x))
        return run_batches(self._sessions[key], x, step)


# -- ORT's graph ---------------------------------------------------------------------------------------------------
def _tensor(name: str, array: np.ndarray):
    from onnx import numpy_helper

    return numpy_helper.from_array(np.ascontiguousarray(array), name)


def format_nodes(fmt: str, x: str, y: str, weight: torch.Tensor, prefix: str,
                 bias: str | None = None) -> tuple[list, list]:
    """ONNX nodes and initializers computing ``y = x @ weight.T (+ bias)`` in format ``fmt`` (``bias``: the name
    of a 1-d initializer; int8-dynamic takes it into its kernel, 13 % faster than a separate Add on DeiT-S's
    fc1 shape, the others add it after)."""
    from onnx import helper

    n, k = weight.shape
    product = f"{y}_{fmt}" if bias and fmt != "int8-dynamic" else y
    add = [helper.make_node("Add", [product, bias], [y], name=f"{prefix}/bias")] if product != y else []
    if fmt == "fp32":
        wt = _tensor(f"{prefix}.weight_t", weight.detach().float().numpy().T)
        return [helper.make_node("MatMul", [x, wt.name], [product], name=f"{prefix}/MatMul"), *add], [wt]
    if fmt == "int8-dynamic":
        codes, scale = int8_channel_codes(weight)
        b = _tensor(f"{prefix}.weight_int8", codes.numpy().astype(np.int8).T)
        s = _tensor(f"{prefix}.weight_scale", scale.float().numpy())
        z = _tensor(f"{prefix}.weight_zero", np.zeros(n, np.int8))
        node = helper.make_node("DynamicQuantizeMatMul", [x, b.name, s.name, z.name] + ([bias] if bias else []),
                                [y], name=f"{prefix}/DynamicQuantizeMatMul", domain=MS_DOMAIN)
        return [node], [b, s, z]
    if fmt == "int4-weight":
        codes, scale = int4_block_codes(weight)
        stored = (codes.numpy().astype(np.int16) + 8).astype(np.uint8)  # [N, blocks, BLOCK]
        packed = stored[..., 0::2] | (stored[..., 1::2] << 4)  # low nibble first
        b = _tensor(f"{prefix}.weight_int4", packed)
        s = _tensor(f"{prefix}.weight_scales", scale.float().numpy().reshape(-1))
        node = helper.make_node("MatMulNBits", [x, b.name, s.name], [product], name=f"{prefix}/MatMulNBits",
                                domain=MS_DOMAIN, K=k, N=n, bits=4, block_size=BLOCK)
        return [node, *add], [b, s]
    raise ValueError(f"unknown format {fmt!r}; the onnxruntime-cpu target has {', '.join(FORMATS)}")


def _digest(array: np.ndarray) -> str:
    return hashlib.sha1(np.ascontiguousarray(array, dtype=np.float32).tobytes()).hexdigest()


def _layer_nodes(graph, layers: Mapping[str, nn.Linear]) -> dict[str, tuple]:
    """Each layer's MatMul or Gemm node in an exported FP32 graph, found by its weight's values (the exporter's
    names change between versions): ``{layer: (node, bias initializer name or None)}``."""
    from onnx import numpy_helper

    init = {t.name: t for t in graph.initializer}
    want = {}
    for name, module in layers.items():
        w = module.weight.detach().float().numpy()
        want[_digest(w.T)], want[_digest(w)] = (name, "t"), (name, "w")
    found = {}
    for node in graph.node:
        if node.op_type not in ("MatMul", "Gemm") or node.input[1] not in init:
            continue
        array = numpy_helper.to_array(init[node.input[1]])
        match = want.get(_digest(array)) if array.ndim == 2 else None
        if match is None:
            continue
        name, layout = match
        trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
        plain = node.op_type == "MatMul" or (
            all(a.name in ("transB", "alpha", "beta") for a in node.attribute) and
            all(a.f == 1.0 for a in node.attribute if a.name in ("alpha", "beta")) and
            next((a.i for a in node.attribute if a.name == "transA"), 0) == 0)
        if plain and (layout == "t") == (trans_b == 0) and name not in found:
            found[name] = (node, node.input[2] if node.op_type == "Gemm" and len(node.input) > 2 else None)
    return found


def export_runtime_onnx(rmodel: RuntimeFormatModel, path: str | Path, example: torch.Tensor,
                        opset: int = 17) -> dict:
    """Write ORT's graph of ``rmodel`` at its formats to ``path`` (:meth:`RuntimeFormatModel.runtime_onnx`). The
    file is written only once it loads in a default ONNX Runtime session. Returns the path and the count of each
    format."""
    import onnx

    from ..onnx_export import onnx_session

    path = Path(path)
    if path.suffix != ".onnx":
        raise ExportError(f"ONNX export path {path} must end in .onnx")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".onnx")
    os.close(fd)
    try:
        onnx.save(rmodel.runtime_onnx(example, opset), tmp)
        onnx_session(tmp)  # raises ExportError when a default session cannot load it
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
    counts = {f: sum(FORMATS[i] == f for i in rmodel.bit_widths) for f in FORMATS}
    return {"path": path, "formats": counts}


def _replace(graph, found: tuple, fmt: str, weight: torch.Tensor, name: str) -> None:
    """Swap one layer's MatMul/Gemm (and a MatMul's bias Add) for ``fmt``'s nodes, keeping the output's name."""
    node, bias = found
    out, removed = node.output[0], [node]
    if bias is None:  # a MatMul: its bias is the one Add reading it with a 1-d initializer of N values
        add = _bias_add(graph, out, weight.shape[0])
        if add is not None:
            bias, out = next(i for i in add.input if i != out), add.output[0]
            removed.append(add)
    new_nodes, inits = format_nodes(fmt, node.input[0], out, weight, name, bias)
    at = list(graph.node).index(node)
    for old in removed:
        graph.node.remove(old)
    for offset, new in enumerate(new_nodes):
        graph.node.insert(at + offset, new)
    graph.initializer.extend(inits)


def _bias_add(graph, product: str, n: int):
    """The Add that is the only reader of ``product`` and adds a 1-d initializer of ``n`` values, or None."""
    readers = [x for x in graph.node if product in x.input]
    shapes = {t.name: list(t.dims) for t in graph.initializer}
    if len(readers) == 1 and readers[0].op_type == "Add" and not any(o.name == product for o in graph.output):
        other = [i for i in readers[0].input if i != product]
        if len(other) == 1 and shapes.get(other[0]) == [n]:
            return readers[0]
    return None


def _drop_unused(graph) -> None:
    """Remove the FP32 weights that no node reads any more."""
    used = {i for n in graph.node for i in n.input}
    keep = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep)
