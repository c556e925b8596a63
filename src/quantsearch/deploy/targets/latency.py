"""Latency on this machine: each layer in each format, measured in ONNX Runtime, cached per machine.

A layer's latency is measured as a one-layer ONNX graph (the format's kernel and the bias Add) at the layer's
input shape at the deployment batch size, in a session with the run's thread count. A Conv's graph is its ONNX
node as exported (batch norm folded, its attributes, its input shape at the deployment batch) with the Relu or
ReLU6 after it, in fp32 and in int8-static (Q/DQ in and out, which ORT runs as Transpose to NHWC, QLinearConv,
Transpose back: in a chain of static convs the Transposes cancel, so an isolated entry is an upper bound). Sessions are timed
interleaved (each repeat runs every graph once, so a load spike hits all alike) and the median is kept. Layers
of the same shape share one measurement (a ViT's blocks repeat). The rest of the graph (norms, softmax, adds,
reshapes, the attention matmuls) is one measured fixed part: the FP32 export's own latency, timed in the same
loop, less its layers' FP32 latencies. A configuration's predicted latency is the fixed part plus its layers'
entries: unary terms, like BOPs.

The cache (``$XDG_CACHE_HOME/quantsearch/latency.json``) keys every entry by machine (CPU model, thread count,
ONNX Runtime version) and by shape (a Conv's: every attribute and its activation) and format, so a second run on the same machine measures only the model's
fixed part. A table file from another machine is refused in one line.
"""
from __future__ import annotations

import json
import os
import platform
import tempfile
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Mapping

import numpy as np
import torch

from ..errors import ExportError
from .onnxruntime import CONVS, FORMATS, FP32, STATIC, RuntimeFormatModel, export_runtime_onnx, format_nodes
from .static import conv_graph, conv_spec, insert_static, runtime_session, spec_key, tensor_shapes, uint8_grid

__all__ = ["LatencyTable", "LatencyError", "WholeModelLatency", "machine", "layer_shapes", "conv_specs",
           "measure_latency", "measure_end_to_end", "cache_path", "mixes_conv_layouts"]

WHOLE_REPEATS = 5  # interleaved rounds, at least, when a search times one configuration whole (median kept)
WHOLE_SECONDS, WHOLE_MAX_ROUNDS = 2.0, 40  # a fast graph gets more rounds: as many as fill this long, at most this
SCHEMA_VERSION = 3  # 3: each layer's entries by format name; 2: by index, fp32 first
GAP = 0.05  # seconds for idle threads to stop spinning between two timed sessions
BLOCK_SECONDS, MAX_CALLS = 0.01, 30  # a fast graph's consecutive timed calls fill about this long, at most this many


class LatencyError(ValueError):
    """A latency table that does not fit this machine, model or target."""


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine(threads: int | None = None) -> dict:
    """What a latency depends on besides the graph: CPU model, intra-op threads (0 = ONNX Runtime's default),
    ONNX Runtime version."""
    import onnxruntime as ort

    return {"cpu": _cpu_model(), "threads": int(threads or 0), "onnxruntime": ort.__version__}


def cache_path() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "quantsearch" / "latency.json"


def _machine_key(m: Mapping) -> str:
    return f"{m['cpu']}|threads={m['threads']}|onnxruntime={m['onnxruntime']}"


def _op_key(shape: tuple, n: int, fmt: str) -> str:
    return f"{fmt}|{'x'.join(map(str, shape))}|{n}"


def layer_shapes(rmodel: RuntimeFormatModel, example: torch.Tensor) -> dict[str, tuple[tuple, int]]:
    """Each Linear layer's input shape for a batch of ``rmodel.batch_size`` samples, and its output features."""
    shapes, handles = {}, []

    def record(name):
        def hook(module, args, _out) -> None:
            shapes.setdefault(name, (tuple(args[0].shape), module.out_features))
        return hook

    for name, module in rmodel.layers.items():
        if not isinstance(module, CONVS):
            handles.append(module.register_forward_hook(record(name)))
    batch = example[:1].expand(rmodel.batch_size, *example.shape[1:])
    try:
        with torch.no_grad(), rmodel.fp32():
            rmodel.model(batch)
    finally:
        for h in handles:
            h.remove()
    return shapes


def conv_specs(rmodel: RuntimeFormatModel, example: torch.Tensor) -> dict[str, dict]:
    """Each Conv layer's ONNX node as its latency depends on it (:func:`~.static.conv_spec`): input shape at the
    deployment batch size, weight shape, attributes, the activation after it."""
    import onnx

    convs = [n for n, m in rmodel.layers.items() if isinstance(m, CONVS)]
    if not convs:
        return {}
    model_bytes = rmodel.fp32_onnx(example)
    graph = onnx.load_from_string(model_bytes).graph
    nodes = rmodel.layer_nodes(graph)
    missing = [n for n in convs if n not in nodes]
    if missing:
        raise LatencyError(f"layer {missing[0]!r}: no Conv with its weight in the exported graph")
    shapes = tensor_shapes(model_bytes, [nodes[n].input[0] for n in convs], example[:1])
    return {n: conv_spec(graph, nodes[n], (rmodel.batch_size, *shapes[nodes[n].input[0]][1:])) for n in convs}


@dataclass
class LatencyTable:
    """Seconds per layer per format (by format name, the formats of the layer's gene range: two for a Conv, four
    for a Linear) and the fixed rest, on ``machine``."""

    machine: dict
    batch_size: int
    layers: dict[str, dict[str, float]]
    fixed: float
    fp32_measured: float = 0.0
    measured_ops: int = field(default=0, compare=False)  # measured now, not taken from the cache
    uniform: dict = field(default_factory=dict)  # seconds of each uniform configuration, measured whole

    def predict(self, formats: Mapping[str, int]) -> float:
        """The predicted seconds of a configuration (format index per layer; missing layers are fp32)."""
        return self.cost()({n: int(formats.get(n, FP32)) for n in self.layers}) / 1e3

    def reanchored(self, uniform: Mapping[str, float]) -> "LatencyTable":
        """This table with its whole-model anchors measured again (``uniform``: seconds of FP32 and of each uniform
        format, timed now): FP32's change moves the fixed part, and each format's layer deltas scale by how much
        that format's uniform saving changed. Predictions of the uniform configurations are then exact again, so
        what is left between a mixed configuration's prediction and its measurement is the table's additivity
        error, not the machine's drift since the table was measured."""
        if not set(self.uniform) <= set(uniform):
            raise LatencyError(f"re-anchoring needs every uniform configuration the table was anchored on: "
                               f"{', '.join(sorted(set(self.uniform) - set(uniform)))} missing")
        scale = {f: (uniform[f] - uniform["fp32"]) / (t - self.uniform["fp32"]) if t != self.uniform["fp32"] else 1.0
                 for f, t in self.uniform.items() if f != "fp32"}
        layers = {n: {f: v["fp32"] + (s - v["fp32"]) * scale.get(f, 1.0) for f, s in v.items()}
                  for n, v in self.layers.items()}
        return LatencyTable(self.machine, self.batch_size, layers, self.fixed + uniform["fp32"] - self.uniform["fp32"],
                            uniform["fp32"], 0, dict(uniform))

    def cost(self):
        """The table as a search cost (:class:`~quantsearch.search.costs.Latency`, in milliseconds): entries by
        gene value."""
        from ...search.costs import Latency

        return Latency({n: {FORMATS.index(f): 1e3 * s for f, s in v.items()} for n, v in self.layers.items()},
                       1e3 * self.fixed, FP32)

    def check_fits(self, rmodel: RuntimeFormatModel, threads: int | None = None) -> None:
        """One line naming the first mismatch between this table and the machine, model or batch size."""
        here = machine(threads)
        for key in ("cpu", "threads", "onnxruntime"):
            if self.machine.get(key) != here[key]:
                raise LatencyError(f"latency table measured with {key} {self.machine.get(key)!r}, this machine has "
                                   f"{here[key]!r}: measure it here")
        if self.batch_size != rmodel.batch_size:
            raise LatencyError(f"latency table is for batch size {self.batch_size}, the run deploys at "
                               f"{rmodel.batch_size}")
        missing = sorted(set(rmodel.layers) ^ set(self.layers))
        if missing:
            raise LatencyError(f"latency table and model differ at layer {missing[0]!r}")
        for name, (lo, hi) in rmodel.gene_ranges().items():
            if set(self.layers[name]) != set(FORMATS[lo:hi + 1]):
                raise LatencyError(f"latency table has formats {', '.join(self.layers[name])} for layer {name!r}, "
                                   f"the target {', '.join(FORMATS[lo:hi + 1])}")

    def to_dict(self) -> dict:
        return {"version": SCHEMA_VERSION, "formats": list(FORMATS), "machine": self.machine,
                "batch_size": self.batch_size, "fixed": self.fixed, "fp32_measured": self.fp32_measured,
                "uniform": self.uniform, "layers": self.layers}

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=1))
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> "LatencyTable":
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, ValueError) as exc:
            raise LatencyError(f"cannot read latency table {path}: {exc}") from None
        _check_schema(data, path)
        return cls(data["machine"], data["batch_size"], {n: dict(v) for n, v in data["layers"].items()},
                   data["fixed"], data.get("fp32_measured", 0.0), uniform=data.get("uniform", {}))


def mixes_conv_layouts(rmodel: RuntimeFormatModel, formats: Mapping[str, int]) -> bool:
    """Whether a configuration runs some Convs as int8-static and others in fp32: ORT then lays tensors out two
    ways (NHWC around QLinearConv, NCHWc around a float Conv) and converts at every boundary, which the table's
    unary terms cannot see (``benchmarks/bench_latency_mixed.py``)."""
    used = {int(formats.get(n, FP32)) for n, m in rmodel.layers.items() if isinstance(m, CONVS)}
    return STATIC in used and FP32 in used


class WholeModelLatency:
    """The latency table as the search's cost, except for configurations that :func:`mixes_conv_layouts`: those
    are timed whole. Their ORT graph is timed interleaved with the FP32 graph, ``repeats`` rounds or more (as many
    as fill ``seconds``: a fast graph's rounds are noisier and cheap), and the median of the rounds' ratios
    (each round's two times are seconds apart, so the machine's drift cancels) is scaled by the table's FP32
    time, so every point of a front is on the table's one time base whatever the machine did since the table was
    measured. Each configuration is timed once (cached); the search evaluates a configuration's accuracy in ORT
    anyway, and this costs a few calls at the deployment batch.

    The ILP, surrogate and guided search read the unary terms (``additive``, ``layers``, ``fixed``), as for any
    table cost: a model of the cost never times anything."""

    name = "latency"

    def __init__(self, table: "LatencyTable", rmodel: RuntimeFormatModel, example: torch.Tensor,
                 threads: int | None = None, repeats: int = WHOLE_REPEATS, seconds: float = WHOLE_SECONDS):
        unary = self.additive = table.cost()  # what a model of the cost probes: the unary terms alone
        self.layers, self.fixed, self.fp32 = unary.layers, unary.fixed, unary.fp32
        self.rmodel, self.threads, self.repeats, self.seconds = rmodel, threads, int(repeats), float(seconds)
        self.batch = example[:1].expand(rmodel.batch_size, *example.shape[1:]).contiguous().cpu()
        self.timed: dict[tuple, float] = {}  # ms of each configuration timed whole, by its gene values
        self._fp32_session = None

    def __call__(self, bits: Mapping[str, int]) -> float:
        if not mixes_conv_layouts(self.rmodel, bits):
            return self.additive(bits)
        key = tuple(int(bits[n]) for n in self.rmodel.quantizer_names)
        if key not in self.timed:
            self.timed[key] = self.fp32 * self._ratio(dict(zip(self.rmodel.quantizer_names, key)))
        return self.timed[key]

    def _ratio(self, formats: Mapping[str, int]) -> float:
        """This configuration's time per call as a multiple of FP32's, timed interleaved with it now."""
        rmodel, saved = self.rmodel, self.rmodel.bit_widths
        try:
            rmodel.bit_widths = formats
            graph = rmodel.runtime_onnx(self.batch[:1]).SerializeToString()
        finally:
            rmodel.bit_widths = saved
        if self._fp32_session is None:
            self._fp32_session = runtime_session(rmodel.fp32_onnx(self.batch[:1]), self.threads)
        feed = {"input": self.batch.numpy()}
        runs = {"fp32": (self._fp32_session, feed), "whole": (runtime_session(graph, self.threads), feed)}
        ratios, start = [], time.perf_counter()
        while len(ratios) < self.repeats or (time.perf_counter() - start < self.seconds
                                             and len(ratios) < WHOLE_MAX_ROUNDS):
            round_ = _time_interleaved(runs, 1)  # a ratio per round: drift between rounds cancels
            ratios.append(round_["whole"] / round_["fp32"])
        return float(np.median(ratios))


def _check_schema(data, path) -> None:
    import jsonschema

    number = {"type": "number", "minimum": 0}
    schema = {
        "type": "object", "required": ["version", "formats", "machine", "batch_size", "fixed", "layers"],
        "properties": {
            "version": {"const": SCHEMA_VERSION}, "formats": {"const": list(FORMATS)},
            "machine": {"type": "object", "required": ["cpu", "threads", "onnxruntime"],
                        "properties": {"cpu": {"type": "string"}, "threads": {"type": "integer", "minimum": 0},
                                       "onnxruntime": {"type": "string"}}},
            "batch_size": {"type": "integer", "minimum": 1}, "fixed": {"type": "number"}, "fp32_measured": number,
            "uniform": {"type": "object", "additionalProperties": number},
            "layers": {"type": "object", "additionalProperties": {
                "type": "object", "propertyNames": {"enum": list(FORMATS)}, "additionalProperties": number,
                "required": ["fp32"]}}}}
    try:
        jsonschema.validate(data, schema)
    except jsonschema.ValidationError as exc:
        where = "/".join(map(str, exc.absolute_path)) or "(top)"
        raise LatencyError(f"latency table {path}: {where}: {exc.message}") from None


def _op_graph(shape: tuple, n: int, fmt: str) -> bytes:
    """A one-Linear graph: ``x [shape] -> fmt's kernel -> + bias``, with seeded random weights (int8-static: its
    MatMul with Q/DQ on ``x`` and on the product)."""
    from onnx import TensorProto, helper, numpy_helper

    g = torch.Generator().manual_seed(0)
    weight = torch.randn(n, shape[-1], generator=g) * 0.05
    bias = numpy_helper.from_array(np.zeros(n, np.float32), "bias")
    if fmt == "int8-static":  # its Q/DQ pair goes on the product, before the bias Add
        nodes, inits = format_nodes("fp32", "x", "product", weight, "layer")
        nodes.append(helper.make_node("Add", ["product", "bias"], ["y"]))
    else:
        nodes, inits = format_nodes(fmt, "x", "y", weight, "layer", bias="bias")
    graph = helper.make_graph(nodes, "layer", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(shape))],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [*inits, bias])
    if fmt == "int8-static":
        insert_static(graph, {"layer": graph.node[0]}, {"x": uint8_grid(-4, 4), "product": uint8_grid(-4, 4)})
        used = {i for n in graph.node for i in n.input}
        kept = [t for t in graph.initializer if t.name in used]  # the float weight the DequantizeLinear replaced
        del graph.initializer[:]
        graph.initializer.extend(kept)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                    helper.make_opsetid("com.microsoft", 1)])
    return model.SerializeToString()


def _time_interleaved(runs: Mapping[str, tuple], repeats: int, gap: float = GAP, calls: int = 3,
                      block: float = BLOCK_SECONDS) -> dict[str, float]:
    """Median over ``repeats`` rounds of each ``(session, feed)``'s fastest of ``calls`` consecutive timed calls
    (more for a fast graph: as many as fill ``block`` seconds, up to :data:`MAX_CALLS`); each round visits every
    session in turn: a pause of ``gap`` seconds, an untimed call, then the timed ones.

    Interleaving spreads a load spike over all sessions alike. The pause lets the idle threads of the session
    before (ONNX Runtime's, or PyTorch's after an export) stop spinning; the untimed call wakes this session's own
    pool; the fastest of a few calls in a row drops a call that a neighbour on this shared machine interrupted
    (benchmarks/bench_timing_stability.py: four identical sessions 15-60 % apart timed one call a round, 2-30 %
    this way; this shared machine stays noisy either way). A sub-millisecond graph gets more calls: one
    interruption costs it more, relatively, and more calls cost little."""
    times = {k: [] for k in runs}
    for _ in range(repeats):
        for key, (session, feed) in runs.items():
            time.sleep(gap)
            start = time.perf_counter()
            session.run(None, feed)
            warm = time.perf_counter() - start
            best = float("inf")
            for _ in range(min(MAX_CALLS, max(calls, int(block / max(warm, 1e-6))))):
                start = time.perf_counter()
                session.run(None, feed)
                best = min(best, time.perf_counter() - start)
            times[key].append(best)
    return {k: float(np.median(v)) for k, v in times.items()}


def _layer_ops(rmodel: RuntimeFormatModel, example: torch.Tensor) -> dict[str, list[tuple]]:
    """Each layer's one-layer graphs, one per format in its gene range: ``(format, cache key, build, input
    shape)``."""
    ops = {}
    for name, (shape, n) in layer_shapes(rmodel, example).items():
        ops[name] = [(f, _op_key(shape, n, f), partial(_op_graph, shape, n, f), shape) for f in FORMATS]
    for name, spec in conv_specs(rmodel, example).items():
        ops[name] = [(f, spec_key(spec, f), partial(conv_graph, spec, f), tuple(spec["input"]))
                     for f in FORMATS[STATIC:]]
    return {name: ops[name] for name in rmodel.layers}


def measure_latency(rmodel: RuntimeFormatModel, example: torch.Tensor, threads: int | None = None,
                    repeats: int = 20, cache: str | Path | None = "default") -> LatencyTable:
    """The :class:`LatencyTable` of ``rmodel`` at its deployment batch size: layer entries from the cache where
    this machine measured the same layer (shape, conv attributes) and format before, the rest and the fixed part
    measured now."""
    here = machine(threads)
    cache = cache_path() if cache == "default" else (Path(cache) if cache else None)
    stored = _read_cache(cache).get(_machine_key(here), {}) if cache else {}
    ops = _layer_ops(rmodel, example)
    todo = {key: (build, shape) for per in ops.values() for _, key, build, shape in per if key not in stored}
    runs = {key: (runtime_session(build(), threads, spinning=False),
                  {"x": np.random.default_rng(0).standard_normal(shape, dtype=np.float32)})
            for key, (build, shape) in todo.items()}
    with tempfile.TemporaryDirectory() as tmp:
        paths, members = _uniform_models(rmodel, example, Path(tmp))
        batch = example[:1].expand(rmodel.batch_size, *example.shape[1:]).contiguous().numpy()
        # the whole models alone, as a server runs them (threads spinning between kernels), then the layers
        models = _time_interleaved({f: (runtime_session(str(p), threads), {"input": batch})
                                    for f, p in paths.items()}, repeats)
        times = _time_interleaved(runs, repeats) if runs else {}
    if cache and times:
        _write_cache(cache, here, times)
    entries = {**stored, **times}
    isolated = {name: {f: entries[key] for f, key, _, _ in per} for name, per in ops.items()}
    layers = _in_graph(isolated, models, members)
    fixed = models["fp32"] - sum(v["fp32"] for v in isolated.values())
    return LatencyTable(here, rmodel.batch_size, layers, fixed, models["fp32"], len(times), models)


def _uniform_models(rmodel: RuntimeFormatModel, example: torch.Tensor, folder: Path):
    """ORT's graph with every layer that takes it in each format (the rest fp32; int8-static only once
    calibrated): ``({format: path}, {format: [layers in it]})``."""
    paths, members, saved = {}, {}, rmodel.bit_widths
    try:
        for index, fmt in enumerate(FORMATS):
            chosen = [n for n, (lo, hi) in rmodel.gene_ranges().items() if lo <= index <= hi]
            if index != FP32 and (not chosen or (fmt == "int8-static" and not rmodel.ranges)):
                continue
            rmodel.bit_widths = {n: (index if n in chosen else FP32) for n in rmodel.quantizer_names}
            paths[fmt] = export_runtime_onnx(rmodel, folder / f"{fmt}.onnx", example[:1])["path"]
            members[fmt] = chosen
    finally:
        rmodel.bit_widths = saved
    return paths, members


def _in_graph(isolated: Mapping[str, list], models: Mapping[str, float], members: Mapping[str, list]) -> dict:
    """Each layer's entry per format, as it costs inside the model: its one-layer fp32 time, plus its share (by
    its one-layer time in that format) of what turning every such layer to that format changed in the whole
    model. One-layer graphs pay what a chain shares (NCHWc reorders around a float Conv, Transposes around
    QLinearConv, the call itself); this makes every uniform configuration's prediction its measured time."""
    layers = {n: dict(v) for n, v in isolated.items()}
    for fmt, names in members.items():
        if fmt == "fp32":
            continue
        share = sum(isolated[n][fmt] for n in names)
        change = models[fmt] - models["fp32"]
        for n in names:
            layers[n][fmt] = max(isolated[n]["fp32"] + change * isolated[n][fmt] / share, 1e-9)
    return layers


def _read_cache(path: Path | None) -> dict:
    if path is None or not path.exists():
        return {}
    try:
        data = json.loads(path.read_text())
    except ValueError:
        return {}  # a damaged cache is re-measured, never trusted
    if not isinstance(data, dict) or data.get("version") != SCHEMA_VERSION:
        return {}
    return {m: {k: float(v) for k, v in ops.items() if isinstance(v, (int, float)) and v > 0}
            for m, ops in data.get("machines", {}).items() if isinstance(ops, dict)}


def _write_cache(path: Path, here: dict, measured: Mapping[str, float]) -> None:
    machines = _read_cache(path)
    machines.setdefault(_machine_key(here), {}).update(measured)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"version": SCHEMA_VERSION, "machines": machines}, indent=0))
    os.replace(tmp, path)


def measure_end_to_end(paths: Mapping[str, str | Path], batch: np.ndarray, threads: int | None = None,
                       repeats: int = 20) -> dict[str, float]:
    """Median seconds per call of each ONNX file in a default session (the thread count set when given),
    measured interleaved on ``batch``."""
    try:
        runs = {name: (runtime_session(str(p), threads), {"input": batch}) for name, p in paths.items()}
    except Exception as exc:  # noqa: BLE001 - ONNX Runtime's own error types
        raise ExportError(f"ONNX Runtime cannot load a model to time: {str(exc).splitlines()[0]}") from None
    return _time_interleaved(runs, repeats)
