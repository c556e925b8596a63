"""int8 static (W8A8) for ONNX Runtime on a CPU: the Q/DQ graph surgery that ORT fuses into QLinearConv (and, on a
Linear, QLinearMatMul / QGemm), its MinMax calibration, and the graph that times one such layer.

A static layer reads ``DequantizeLinear(int8 codes, per-output-channel scale, axis)`` as its weight (symmetric,
``scale = max|w| / 127``, the weight the FP32 export holds, batch norm already folded in) and has a
``QuantizeLinear -> DequantizeLinear`` pair (uint8, static scale and zero point) on its input tensor and on its
output tensor. When the output's only reader is a Relu, or a Clip whose lower end is at least 0 (ReLU6), the pair
goes after it: ORT then drops the Relu / Clip into the integer kernel. A default session fuses the pattern into
one integer kernel, and only with the output pair does a Conv become QLinearConv (with the input pair alone it
stays a float Conv, slower than FP32). A tensor read by several static layers gets one pair. The bias stays float;
ORT's own pass rounds it to int32.

Ranges are ORT's MinMax calibration of each tensor over the calibration batches (:func:`uint8_grid`). Batch norm
folding, the output pair after a following activation and shared input tensors are not simulated in PyTorch:
the runtime itself evaluates any configuration with a static layer (see
:class:`~quantsearch.deploy.targets.onnxruntime.RuntimeFormatModel`).
"""
from __future__ import annotations

from typing import Iterable, Mapping

import numpy as np
import torch
from torch import nn

from ..errors import ExportError

__all__ = ["inline_identities", "uint8_grid", "static_weight_codes", "conv_nodes", "static_tensors", "insert_static",
           "tensor_ranges", "tensor_shapes", "runtime_session", "run_batches", "spec_key",
           "conv_spec", "conv_graph"]

LOOK_THROUGH = ("Relu", "Clip")


def uint8_grid(low: float, high: float) -> tuple[float, int]:
    """ORT's MinMax activation grid over ``[low, high]``: ``rmin = min(0, low)``, ``rmax = max(0, high)``,
    ``scale = (rmax - rmin) / 255`` and uint8 zero point ``round(-rmin / scale)`` (scale 1, zero point 0 when the
    range is empty)."""
    rmin, rmax = min(0.0, float(low)), max(0.0, float(high))
    scale = float(np.float32((rmax - rmin) / 255))
    if scale == 0:
        return 1.0, 0
    return scale, int(np.clip(np.round(-rmin / scale), 0, 255))


def static_weight_codes(weight: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 codes per slice along ``axis`` (``round(w / s)``, ``s = max|w| / 127``, 1 where zero)."""
    moved = np.moveaxis(weight.astype(np.float32), axis, 0)
    amax = np.abs(moved.reshape(moved.shape[0], -1)).max(1)
    scale = np.where(amax > 0, amax / 127, 1.0).astype(np.float32)
    shape = [1] * weight.ndim
    shape[axis] = -1
    return np.clip(np.round(weight / scale.reshape(shape)), -127, 127).astype(np.int8), scale


def inline_identities(model_bytes: bytes) -> bytes:
    """The graph with each Identity of an initializer removed, its readers reading the initializer: the exporter
    writes one initializer and Identity copies for equal weights (zero-initialised blocks of a fresh model)."""
    import onnx

    model = onnx.load_from_string(model_bytes)
    graph = model.graph
    init = {t.name for t in graph.initializer}
    outputs = {o.name for o in graph.output}
    alias = {n.output[0]: n.input[0] for n in graph.node
             if n.op_type == "Identity" and n.input[0] in init and n.output[0] not in outputs}
    if not alias:
        return model_bytes
    keep = [n for n in graph.node if not (n.op_type == "Identity" and n.output[0] in alias)]
    for node in keep:
        for i, name in enumerate(node.input):
            node.input[i] = alias.get(name, name)
    del graph.node[:]
    graph.node.extend(keep)
    return model.SerializeToString()


# -- finding the layers -------------------------------------------------------------------------------------------
def _scope_module(node_name: str) -> str | None:
    """The module path in a TorchScript exporter's node name: ``/layer1/layer1.0/conv1/Conv`` -> layer1.0.conv1
    (each scope is the module's qualified name, the last one its attribute name)."""
    parts = [p for p in node_name.split("/") if p][:-1]
    if not parts:
        return None
    return parts[0] if len(parts) == 1 else f"{parts[-2]}.{parts[-1]}"


def _proportional(folded: np.ndarray, weight: np.ndarray) -> bool:
    """Whether ``folded`` is ``weight`` scaled per output channel (what batch-norm folding does)."""
    if folded.shape != weight.shape:
        return False
    f, w = folded.reshape(len(folded), -1), weight.reshape(len(weight), -1)
    k = (f * w).sum(1) / np.maximum((w * w).sum(1), 1e-30)
    return bool(np.allclose(f, k[:, None] * w, rtol=1e-4, atol=1e-6 * max(1e-30, np.abs(f).max())))


def conv_nodes(graph, convs: Mapping[str, nn.Module]) -> dict[str, object]:
    """Each Conv module's ONNX Conv node: by the node name's module scope where the exporter wrote one, else by
    its weight up to a per-channel factor (batch norm folded in)."""
    from onnx import numpy_helper

    init = {t.name: t for t in graph.initializer}
    nodes = [n for n in graph.node if n.op_type == "Conv" and n.input[1] in init]
    found, taken = {}, set()
    for node in nodes:
        name = _scope_module(node.name)
        if name in convs and name not in found and \
                tuple(init[node.input[1]].dims) == tuple(convs[name].weight.shape):
            found[name] = node
            taken.add(node.name)
    for name, module in convs.items():
        if name in found:
            continue
        weight = module.weight.detach().float().numpy()
        for node in nodes:
            if node.name not in taken and _proportional(numpy_helper.to_array(init[node.input[1]]), weight):
                found[name] = node
                taken.add(node.name)
                break
    return found


def _constant(graph, name: str) -> float | None:
    from onnx import numpy_helper

    for t in graph.initializer:
        if t.name == name:
            return float(numpy_helper.to_array(t).reshape(-1)[0])
    for n in graph.node:
        if n.op_type == "Constant" and n.output[0] == name and n.attribute[0].name == "value":
            return float(numpy_helper.to_array(n.attribute[0].t).reshape(-1)[0])
    return None


def activation_after(graph, node):
    """The Relu, or Clip with a lower end >= 0, that is the only reader of ``node``'s output, else None."""
    out = node.output[0]
    readers = [n for n in graph.node if out in n.input]
    if len(readers) != 1 or any(o.name == out for o in graph.output) or readers[0].op_type not in LOOK_THROUGH:
        return None
    act = readers[0]
    if act.op_type == "Clip":
        low = _constant(graph, act.input[1]) if len(act.input) > 1 and act.input[1] else None
        if low is None or low < 0:
            return None
    return act


def static_tensors(graph, nodes: Mapping[str, object]) -> dict[str, tuple[str, str]]:
    """Each layer's quantized input and output tensor (the output after a following Relu / ReLU6)."""
    out = {}
    for layer, node in nodes.items():
        act = activation_after(graph, node)
        out[layer] = (node.input[0], (act or node).output[0])
    return out


# -- calibration --------------------------------------------------------------------------------------------------
def _exposing(model_bytes: bytes, tensors: list[str], threads: int | None):
    """A session on the FP32 graph, unoptimised, with ``tensors`` as extra outputs."""
    import onnx
    import onnxruntime as ort

    model = onnx.load_from_string(model_bytes)
    outputs = {o.name for o in model.graph.output}
    model.graph.output.extend(onnx.ValueInfoProto(name=t) for t in tensors if t not in outputs)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # the tensors as exported
    if threads:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def tensor_ranges(model_bytes: bytes, tensors: Iterable[str], batches: Iterable[torch.Tensor],
                  threads: int | None = None) -> dict[str, tuple[float, float]]:
    """Min and max of each named tensor of the FP32 graph over ``batches`` (the tensors exposed as outputs)."""
    names = list(dict.fromkeys(tensors))
    session = _exposing(model_bytes, names, threads)
    ranges: dict[str, tuple[float, float]] = {}
    for batch in batches:
        values = session.run(names, {"input": batch.detach().cpu().float().contiguous().numpy()})
        for name, v in zip(names, values):
            low, high = float(v.min()), float(v.max())
            old = ranges.get(name, (low, high))
            ranges[name] = (min(old[0], low), max(old[1], high))
    if not ranges:
        raise ValueError("calibration needs at least one batch")
    return ranges


def tensor_shapes(model_bytes: bytes, tensors: Iterable[str], example: torch.Tensor) -> dict[str, tuple]:
    """The shape of each named tensor of the FP32 graph on ``example``."""
    names = list(dict.fromkeys(tensors))
    values = _exposing(model_bytes, names, None).run(names, {"input": example.detach().cpu().float().numpy()})
    return {n: tuple(v.shape) for n, v in zip(names, values)}


# -- graph surgery ------------------------------------------------------------------------------------------------
def _weight_axis(node) -> int:
    """The weight's output-channel axis: 0 for Conv and Gemm(transB=1), 1 for MatMul and Gemm(transB=0)."""
    if node.op_type == "Conv":
        return 0
    if node.op_type == "Gemm":
        return 0 if next((a.i for a in node.attribute if a.name == "transB"), 0) else 1
    return 1


def _qdq(tensor: str, grid: tuple[float, int]) -> tuple[list, list, str]:
    from onnx import helper, numpy_helper

    scale = numpy_helper.from_array(np.array(grid[0], np.float32), f"{tensor}_static_scale")
    zero = numpy_helper.from_array(np.array(grid[1], np.uint8), f"{tensor}_static_zero")
    q = helper.make_node("QuantizeLinear", [tensor, scale.name, zero.name], [f"{tensor}_static_q"],
                         name=f"{tensor}_static/Q")
    dq = helper.make_node("DequantizeLinear", [q.output[0], scale.name, zero.name], [f"{tensor}_static_dq"],
                          name=f"{tensor}_static/DQ")
    return [q, dq], [scale, zero], dq.output[0]


def _dq_weight(graph, node, layer: str) -> None:
    """Point ``node``'s weight input at ``DequantizeLinear`` of its per-channel int8 codes."""
    from onnx import helper, numpy_helper

    init = {t.name: t for t in graph.initializer}
    weight = numpy_helper.to_array(init[node.input[1]])
    axis = _weight_axis(node)
    codes, scale = static_weight_codes(weight, axis)
    c = numpy_helper.from_array(codes, f"{layer}.weight_int8")
    s = numpy_helper.from_array(scale, f"{layer}.weight_scale")
    z = numpy_helper.from_array(np.zeros(len(scale), np.int8), f"{layer}.weight_zero")
    dq = helper.make_node("DequantizeLinear", [c.name, s.name, z.name], [f"{layer}.weight_dq"],
                          name=f"{layer}/weight/DQ", axis=axis)
    graph.initializer.extend([c, s, z])
    graph.node.append(dq)
    node.input[1] = dq.output[0]


def insert_static(graph, nodes: Mapping[str, object], grids: Mapping[str, tuple[float, int]]) -> None:
    """Make each ``{layer: node}`` static: int8 weight through DequantizeLinear, and one Q/DQ pair on each of its
    input and output tensors (``grids`` by tensor name, see :func:`static_tensors`), every reader of a
    quantized tensor reading the pair's output. Leaves the nodes topologically sorted."""
    for layer, node in nodes.items():
        _dq_weight(graph, node, layer)
    tensors = dict.fromkeys(t for pair in static_tensors(graph, nodes).values() for t in pair)
    outputs = {o.name for o in graph.output}
    for tensor in tensors:
        if tensor not in grids:
            raise ExportError(f"tensor {tensor!r} has no calibrated range: calibrate the model first")
        new, inits, out = _qdq(tensor, grids[tensor])
        if tensor in outputs:  # the producer writes a float copy; the pair's output keeps the graph output's name
            producer = next(n for n in graph.node if tensor in n.output)
            producer.output[list(producer.output).index(tensor)] = new[0].input[0] = f"{tensor}_float"
            new[1].output[0] = tensor
        else:
            for reader in graph.node:
                for i, name in enumerate(reader.input):
                    if name == tensor:
                        reader.input[i] = out
        graph.node.extend(new)
        graph.initializer.extend(inits)
    _toposort(graph)


def _toposort(graph) -> None:
    known = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {""}
    pending, ordered = list(graph.node), []
    while pending:
        ready = [n for n in pending if all(i in known for i in n.input)]
        if not ready:
            raise ExportError(f"graph surgery left a cycle at node {pending[0].name!r}")
        for n in ready:
            known.update(n.output)
        ordered += ready
        pending = [n for n in pending if n not in ready]
    copies = [type(n)() for n in ordered]
    for c, n in zip(copies, ordered):
        c.CopyFrom(n)
    del graph.node[:]
    graph.node.extend(copies)


# -- one layer, for the latency table -----------------------------------------------------------------------------
def conv_spec(graph, node, input_shape: tuple) -> dict:
    """What a Conv's latency depends on: input shape at the deployment batch, weight shape, attributes, and the
    activation after it (Relu, Clip bounds or none)."""
    from onnx import helper

    init = {t.name: t for t in graph.initializer}
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    act = activation_after(graph, node)
    act_spec = None
    if act is not None:
        act_spec = ["Relu"] if act.op_type == "Relu" else [
            "Clip", _constant(graph, act.input[1]),
            _constant(graph, act.input[2]) if len(act.input) > 2 and act.input[2] else None]
    return {"input": list(input_shape), "weight": list(init[node.input[1]].dims), "bias": len(node.input) > 2,
            "attrs": {k: (list(v) if isinstance(v, (list, tuple)) else v) for k, v in sorted(attrs.items())
                      if not isinstance(v, bytes)}, "act": act_spec}


def spec_key(spec: Mapping, fmt: str) -> str:
    """The latency cache key of one conv in one format: every field of its spec."""
    shape = lambda s: "x".join(map(str, s))  # noqa: E731
    attrs = ",".join(f"{k}={shape(v) if isinstance(v, list) else v}" for k, v in spec["attrs"].items())
    act = "none" if spec["act"] is None else ":".join(map(str, spec["act"]))
    return f"{fmt}|conv|{shape(spec['input'])}|{shape(spec['weight'])}|bias={int(spec['bias'])}|{attrs}|{act}"


def conv_graph(spec: Mapping, fmt: str) -> bytes:
    """A one-conv graph as the model has it (its activation included), fp32 or int8-static, seeded weights."""
    from onnx import TensorProto, helper, numpy_helper

    g = np.random.default_rng(0)
    w = numpy_helper.from_array((g.standard_normal(spec["weight"]) * 0.05).astype(np.float32), "w")
    inits = [w] + ([numpy_helper.from_array(np.zeros(spec["weight"][0], np.float32), "b")] if spec["bias"] else [])
    conv = helper.make_node("Conv", ["x", "w"] + (["b"] if spec["bias"] else []), ["c"], name="conv",
                            **spec["attrs"])
    nodes, last = [conv], "c"
    if spec["act"] is not None:
        bounds = []
        for i, v in enumerate(spec["act"][1:]):
            if v is not None:
                inits.append(numpy_helper.from_array(np.array(v, np.float32), f"clip{i}"))
            bounds.append(f"clip{i}" if v is not None else "")
        nodes.append(helper.make_node(spec["act"][0], ["c"] + bounds, ["a"], name="act"))
        last = "a"
    nodes.append(helper.make_node("Identity", [last], ["y"]))
    graph = helper.make_graph(nodes, "conv", [helper.make_tensor_value_info("x", TensorProto.FLOAT, spec["input"])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    if fmt == "int8-static":
        low = 0 if spec["act"] is not None else -4  # ORT folds a Relu into a zero point of 0
        insert_static(graph, {"conv": conv}, {"x": uint8_grid(-4, 4), last: uint8_grid(low, 4)})
    elif fmt != "fp32":
        raise ValueError(f"a Conv layer has no format {fmt!r}; it takes fp32 or int8-static")
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()


def runtime_session(model, threads: int | None = None, spinning: bool = True):
    """A default ONNX Runtime CPU session on a file or serialized model (only the thread count set, when given).
    ``spinning=False`` for one-layer timing sessions: a single kernel gains nothing from threads that spin after
    it, and spinning threads of one session would steal the cores of the next one timed."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def run_batches(session, x: torch.Tensor, step: int) -> torch.Tensor:
    """``x`` through an ORT session ``step`` samples at a time (what a server at that batch size computes: a
    dynamic grid depends on it), back as a tensor on ``x``'s device."""
    data = x.detach().cpu().float().contiguous().numpy()
    out = np.concatenate([session.run(None, {"input": data[i:i + step]})[0] for i in range(0, len(data), step)])
    return torch.from_numpy(out).to(x.device)
