"""ONNX export: a quantized model as standard QuantizeLinear / DequantizeLinear (Q/DQ) ONNX.

What each quantizer becomes (the Q/DQ form TensorRT's explicit quantization and ONNX Runtime read):

- **activation**, signed, ``b`` bits: ``Clip(x, -qmax*s, qmax*s) -> QuantizeLinear(s, uint8 128) ->
  DequantizeLinear`` with ``qmax = 2^(b-1) - 1`` and ``s = amax / qmax``: the signed grid shifted into uint8 by
  its zero point 128 (the same values; uint8 activations are what ONNX Runtime's u8s8 integer kernels take, and an
  int8 zero point trips ONNX Runtime 1.32's Q/DQ propagation at opset 21: the Q nodes it inserts fail their own
  type check). The Clip keeps
  the narrow range (and, below 8 bits, the width's own grid); rounding is to nearest, ties to even, as in PyTorch.
  Unsigned (data never negative): uint8 with zero point 0, ``qmax = 2^b - 1``, ``Clip(x, 0, qmax*s)``.
- **activation**, asymmetric form: uint8 with its zero point ``z`` and ``s = (high - low) / (2^b - 1)``, below 8
  bits after ``Clip(x, -z*s, (2^b - 1 - z)*s)``: exactly the fake quantizer's ``round(x / s)`` grid.
- **activation**, per-head form: per-axis Q/DQ on the last axis (uint8, zero point 128 where signed), each group's
  ``s = amax / qmax`` repeated over its features, below 8 bits after an elementwise Max/Min with the per-feature
  grid ends.
- log2 and log-sqrt2 quantizers (and their -narrow ones at 4 bits and below) have no Q/DQ form and are refused by
  name.
- **weight**, per output channel: the integer codes themselves, computed exactly as the fake quantizer computes
  them, stored as an int8 constant (packed int4 at opset 21 where every code fits in [-8, 7]), then
  ``DequantizeLinear(codes, amax / qmax, axis=0)``. The FP32 weights are not in the file.
- Widths above 8 bits have no 8-bit Q/DQ form and are refused by name; so is a model the exporter cannot trace.

The opset is 17 (``LayerNormalization`` exists), 21 when weights are packed as int4. The PyTorch fake
quantizer computes ``round(x * (qmax / amax)) / (qmax / amax)``; ONNX computes ``round(x / s) * s``. The two
agree except where a value lies within one float32 rounding step of a half-way point, which changes a code by one
(see :func:`compare_onnx`, which measures it).
"""
from __future__ import annotations

import contextlib
import os
import re
import tempfile
import time
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from ..quantize.forms import asymmetric_grid
from ..quantize.limits import log_grid_at
from .errors import ExportError

__all__ = ["OPSET", "INT4_OPSET", "export_onnx", "export_fp32_onnx", "onnx_session", "run_onnx", "onnx_latency",
           "compare_onnx", "runtime_kernels", "integer_kernels", "RUNTIMES", "INTEGER_KERNELS"]

# how ONNX Runtime runs the Q/DQ graph: "reference" executes each Q/DQ as written, in float (its bias-quantizing
# pass off, the one basic pass that changes numbers); "deployed" is exactly what a user's
# ``onnxruntime.InferenceSession(path)`` runs: every optimisation on, biases rounded to int32 at input x weight
# scale, Q/DQ pairs fused into integer kernels, no pass turned off and no retry
RUNTIMES = {"reference": ("ORT_ENABLE_BASIC", ["WeightBiasQuantization"]), "deployed": ("default", [])}

OPSET = 17
INT4_OPSET = 21
MAX_EXPORT_BITS = 8


class _ActivationQDQ(torch.autograd.Function):
    """Fake quantization that traces as Clip -> QuantizeLinear -> DequantizeLinear, always on uint8 (a signed grid
    through zero point 128)."""

    @staticmethod
    def forward(ctx, x, scale: float, qmin: int, qmax: int, unsigned: bool):
        return torch.clamp(torch.round(x / scale), qmin, qmax) * scale

    @staticmethod
    def symbolic(g, x, scale: float, qmin: int, qmax: int, unsigned: bool):
        def const(value, dtype):
            return g.op("Constant", value_t=torch.tensor(value, dtype=dtype))

        s, zero = const(scale, torch.float32), const(_zero_point(unsigned), torch.uint8)
        if (qmin, qmax) != (0, 255):  # the grid is narrower than uint8's: Clip to its ends
            x = g.op("Clip", x, const(qmin * scale, torch.float32), const(qmax * scale, torch.float32))
        out = g.op("DequantizeLinear", g.op("QuantizeLinear", x, s, zero), s, zero)
        out.setType(x.type())
        return out


def _zero_point(unsigned: bool) -> int:
    """The uint8 zero point that holds a symmetric grid: 0 for unsigned data, 128 for signed (codes -128..127)."""
    return 0 if unsigned else 128


class _AsymmetricQDQ(torch.autograd.Function):
    """Asymmetric fake quantization that traces as [Clip ->] QuantizeLinear -> DequantizeLinear with a uint8 zero
    point."""

    @staticmethod
    def forward(ctx, x, scale: float, zero: float, top: float):
        return (torch.round(x / scale) + zero).clamp(0.0, top).sub(zero) * scale

    @staticmethod
    def symbolic(g, x, scale: float, zero: float, top: float):
        def const(value, dtype):
            return g.op("Constant", value_t=torch.tensor(value, dtype=dtype))

        s, z = const(scale, torch.float32), const(int(zero), torch.uint8)
        if top != 255:
            x = g.op("Clip", x, const(-zero * scale, torch.float32), const((top - zero) * scale, torch.float32))
        out = g.op("DequantizeLinear", g.op("QuantizeLinear", x, s, z), s, z)
        out.setType(x.type())
        return out


class _PerHeadQDQ(torch.autograd.Function):
    """Per-head fake quantization (one scale per feature of the last axis) that traces as [Max -> Min ->]
    QuantizeLinear -> DequantizeLinear along axis -1."""

    @staticmethod
    def forward(ctx, x, scale: torch.Tensor, qmin: int, qmax: int, unsigned: bool):
        return torch.clamp(torch.round(x / scale), qmin, qmax) * scale

    @staticmethod
    def symbolic(g, x, scale, qmin: int, qmax: int, unsigned: bool):
        zero = g.op("Constant", value_t=torch.full((scale.type().sizes()[0],), _zero_point(unsigned),
                                                   dtype=torch.uint8))
        if (qmin, qmax) != (0, 255):
            low = g.op("Mul", scale, g.op("Constant", value_t=torch.tensor(float(qmin))))
            high = g.op("Mul", scale, g.op("Constant", value_t=torch.tensor(float(qmax))))
            x = g.op("Min", g.op("Max", x, low), high)
        out = g.op("DequantizeLinear", g.op("QuantizeLinear", x, scale, zero, axis_i=-1), scale, zero, axis_i=-1)
        out.setType(x.type())
        return out


class _WeightDQ(torch.autograd.Function):
    """Integer weight codes and per-channel scales that trace as one DequantizeLinear on an int8 constant."""

    @staticmethod
    def forward(ctx, codes, scale):
        shape = (-1,) + (1,) * (codes.dim() - 1)
        return codes.float() * scale.reshape(shape)

    @staticmethod
    def symbolic(g, codes, scale):
        zero = g.op("Constant", value_t=torch.zeros(scale.type().sizes()[0], dtype=torch.int8))
        out = g.op("DequantizeLinear", codes, scale, zero, axis_i=0)
        out.setType(codes.type().with_dtype(torch.float32))
        return out


def weight_codes(weight: torch.Tensor, amax: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The int8 codes of a per-channel, narrow-range, symmetric quantizer, as pytorch-quantization rounds them
    (``round(w * qmax / amax)``), and the ONNX scale per channel (``amax / qmax``; 1 where amax is 0)."""
    qmax = 2.0 ** (bits - 1) - 1.0
    amax = amax.detach().float().reshape(-1)
    shape = (-1,) + (1,) * (weight.dim() - 1)
    zero = amax <= 1.0 / (1 << 24)  # pytorch-quantization's threshold: such a channel quantizes to 0
    scale_pt = torch.where(zero, torch.zeros_like(amax), torch.tensor(qmax) / amax)
    codes = torch.clamp((weight.detach().float() * scale_pt.reshape(shape)).round(), -qmax, qmax)
    scale = torch.where(zero, torch.ones_like(amax), amax / qmax)
    return codes.to(torch.int8), scale.float()


def _check_exportable(qmodel) -> None:
    for name, form in qmodel.forms.items():
        q = qmodel.quantizer(name)
        if log_grid_at(form, q.num_bits) and not q._disabled:
            grid = form.removesuffix("-narrow")
            raise ExportError(f"quantizer {name!r} has the {form} form (the {grid} grid at {q.num_bits} bits): ONNX "
                              "Q/DQ holds uniform grids only; export a bit-config whose quantizers are uniform or "
                              "asymmetric")
    for name, q in qmodel.named_quantizers():
        if not q._disabled and q.num_bits > MAX_EXPORT_BITS:
            raise ExportError(f"quantizer {name!r} is at {q.num_bits} bits: Q/DQ export covers 2 to "
                              f"{MAX_EXPORT_BITS} bits (int8/uint8 with a Clip); lower it or leave it unquantized")


@contextlib.contextmanager
def _qdq_forms(qmodel) -> Iterator[None]:
    """Within the block, activation quantizers trace as Q/DQ and weights as DequantizeLinear of integer codes."""
    patched, swaps, coded = [], [], []
    weights = set(qmodel.weight_names)
    try:
        for name, q in qmodel.named_quantizers():
            if q._disabled or not q._if_quant:
                continue
            if name in weights:
                module = qmodel.weight_module(name)
                codes, scale = weight_codes(module.weight, q.amax, q.num_bits)
                swaps.append((q, q._disabled))
                q._disabled = True  # the fake-quantized float weight is not swapped in: the codes are used
                _use_codes(module, codes, scale)
                coded.append(module)
            elif getattr(q, "form", "uniform") == "asymmetric":
                scale, zero, top = asymmetric_grid(q.low, float(q.amax), q.num_bits)
                q.forward = lambda x, s=scale, z=zero, t=top: _AsymmetricQDQ.apply(x, s, z, t)
                patched.append(q)
            elif getattr(q, "form", "uniform") == "per-head":
                bits, unsigned = q.num_bits, bool(q.unsigned)
                qmax = 2 ** bits - 1 if unsigned else 2 ** (bits - 1) - 1
                scale = (q.amax.detach().float().flatten() / qmax).repeat_interleave(q.width // q.groups)
                q.forward = (lambda x, s=scale, lo=0 if unsigned else -qmax, hi=qmax, u=unsigned:
                             _PerHeadQDQ.apply(x, s, lo, hi, u))
                patched.append(q)
            else:
                bits, unsigned = q.num_bits, bool(q.unsigned)
                qmax = 2 ** bits - 1 if unsigned else 2 ** (bits - 1) - 1
                scale = float(q.amax) / qmax
                q.forward = (lambda x, s=scale, lo=0 if unsigned else -qmax, hi=qmax, u=unsigned:
                             _ActivationQDQ.apply(x, s, lo, hi, u))
                patched.append(q)
        yield
    finally:
        for q in patched:
            del q.forward
        for module in coded:
            _drop_codes(module)
        for q, was in swaps:
            q._disabled = was


class _Codes(torch.nn.Module):
    """A parametrization that replaces a weight by ``DequantizeLinear(codes, scale)`` (the original is unused)."""

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor):
        super().__init__()
        self.codes, self.scale = codes, scale

    def forward(self, _weight):
        return _WeightDQ.apply(self.codes, self.scale)


def _use_codes(module, codes: torch.Tensor, scale: torch.Tensor) -> None:
    """``module`` computes with ``DequantizeLinear(codes, scale)`` as its weight, whatever its forward does with it
    (timm's same-padding convolutions included)."""
    from torch.nn.utils import parametrize

    parametrize.register_parametrization(module, "weight", _Codes(codes, scale), unsafe=True)


def _drop_codes(module) -> None:
    from torch.nn.utils import parametrize

    parametrize.remove_parametrizations(module, "weight", leave_parametrized=False)


def _export(model, example: torch.Tensor, path: Path, opset: int, fold_constants: bool = False) -> None:
    import warnings

    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(model, (example,), str(path), dynamo=False, opset_version=opset,
                              input_names=["input"], output_names=["output"], do_constant_folding=fold_constants,
                              dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}})
        except Exception as exc:  # noqa: BLE001 - an operator ONNX lacks, a graph that cannot be traced
            message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            op = re.search(r"operator '([\w:.]+)'", message)
            where = _module_calling(model, example, op.group(1)) if op else None
            raise ExportError(f"cannot export {f'layer {where!r} ' if where else ''}to ONNX opset {opset}: "
                              f"{message}") from None


def _module_calling(model, example: torch.Tensor, op: str) -> str | None:
    """The innermost module whose forward runs the ATen operator ``op`` (``aten::fft_rfft``), or None."""
    from torch.overrides import TorchFunctionMode
    from torch.utils._python_dispatch import TorchDispatchMode

    short = op.split("::")[-1]
    names = {m: n for n, m in model.named_modules()}
    stack, found = [], []

    def enter(module, _args) -> None:
        stack.append(names[module])

    def leave(_module, _args, _output) -> None:
        stack.pop()

    handles = [m.register_forward_pre_hook(enter) for m in names] + [
        m.register_forward_hook(leave, always_call=True) for m in names]

    def seen(name: str) -> None:
        if not found and stack and name in (op, short):
            found.append(stack[-1])

    class Functions(TorchFunctionMode):  # Python-level names (torch.fft.rfft is fft_rfft)
        def __torch_function__(self, func, types, args=(), kwargs=None):
            seen(getattr(func, "__name__", ""))
            return func(*args, **(kwargs or {}))

    class Kernels(TorchDispatchMode):  # ATen operators (aten::fft_rfft)
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen(func._schema.name)
            return func(*args, **(kwargs or {}))

    try:
        with torch.no_grad(), Functions(), Kernels():
            model(example)
    except Exception:  # noqa: BLE001 - locating is best effort
        pass
    finally:
        for handle in handles:
            handle.remove()
    return (found[0] or "(the model itself)") if found else None


def _pack_nibbles(values: np.ndarray) -> bytes:
    """Signed 4-bit values, two per byte, the first in the low nibble (ONNX's INT4 layout)."""
    flat = values.astype(np.int8).flatten()
    if len(flat) % 2:
        flat = np.append(flat, np.int8(0))
    nibbles = (flat & 0x0F).astype(np.uint8)
    return (nibbles[0::2] | (nibbles[1::2] << 4)).tobytes()


def _pack_int4(model) -> int:
    """Store every weight DequantizeLinear's int8 codes that fit in [-8, 7] as packed int4 (opset 21), in place;
    returns how many were packed."""
    import onnx
    from onnx import helper, numpy_helper

    producers = {out: node for node in model.graph.node for out in node.output}
    packed = 0
    for node in model.graph.node:
        if node.op_type != "DequantizeLinear" or not any(a.name == "axis" for a in node.attribute):
            continue
        source, zero = producers.get(node.input[0]), producers.get(node.input[2])
        if source is None or source.op_type != "Constant" or zero is None or zero.op_type != "Constant":
            continue
        codes = numpy_helper.to_array(source.attribute[0].t)
        if codes.dtype != np.int8 or codes.min() < -8 or codes.max() > 7:
            continue
        for constant, values in ((source, codes), (zero, np.zeros(codes.shape[0], dtype=np.int8))):
            tensor = helper.make_tensor(constant.output[0], onnx.TensorProto.INT4, values.shape,
                                        _pack_nibbles(values), raw=True)
            constant.attribute[0].t.CopyFrom(tensor)
        packed += 1
    return packed


def export_onnx(qmodel, path: str | Path, example: torch.Tensor, int4: bool = True,
                opset: int | None = None) -> dict:
    """Write ``qmodel`` at its current bits and ranges as Q/DQ ONNX to ``path`` (see the module docstring).

    ``example`` is one input batch (its batch dimension is exported as dynamic). ``opset`` is 17 (weights stay
    int8), 21, or None: 21 where ``int4`` packs a weight, else 17. The file is written only once it loads in a
    default ONNX Runtime session (when onnxruntime is installed): a file a user cannot load is never handed over.
    Returns what was written: path, opset, the quantizers exported, and how many weights were packed as int4.
    """
    import onnx
    from onnx import version_converter

    path = Path(path)
    if path.suffix != ".onnx":
        raise ExportError(f"ONNX export path {path} must end in .onnx")
    if opset not in (None, OPSET, INT4_OPSET):
        raise ExportError(f"ONNX opset {opset} is not offered: {OPSET}, or {INT4_OPSET} (int4 weights)")
    _check_exportable(qmodel)
    qmodel.eval()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".onnx")  # never half a file
    os.close(fd)
    try:
        with _qdq_forms(qmodel):
            _export(qmodel, example, Path(tmp), OPSET)
        model = onnx.load(tmp)
        packed = _pack_int4(model) if int4 and opset != OPSET else 0
        final = INT4_OPSET if packed or opset == INT4_OPSET else OPSET
        if final != OPSET:
            model = version_converter.convert_version(model, final)
        del model.graph.value_info[:]  # optional shape annotations (the runtime infers them): a smaller file
        onnx.checker.check_model(model)
        onnx.save(model, tmp)
        _check_loads(tmp, path)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
    counts = {op: sum(n.op_type == op for n in model.graph.node) for op in ("QuantizeLinear", "DequantizeLinear")}
    return {"path": path, "opset": final, "int4_weights": packed, **counts}


def _check_loads(tmp: str, path: Path) -> None:
    """Raise :class:`ExportError` (naming ``path``) unless ``tmp`` loads in a default ONNX Runtime session."""
    try:
        import onnxruntime  # noqa: F401 - an optional extra: without it there is nothing to check against
    except ImportError:
        return
    try:
        onnx_session(tmp)
    except ExportError as exc:
        raise ExportError(str(exc).replace(tmp, str(path)) + "; nothing was written") from None


def export_fp32_onnx(qmodel, path: str | Path, example: torch.Tensor) -> Path:
    """The same model with quantization off, for size and latency comparisons."""
    path = Path(path)
    qmodel.eval()
    with qmodel.quantization_disabled():
        _export(qmodel, example, path, OPSET)
    return path


def onnx_session(path: str | Path, runtime: str = "deployed", threads: int | None = None):
    """An ONNX Runtime CPU session as :data:`RUNTIMES` says: "deployed" is a default session (only the thread
    count set, when given). A file that does not load raises :class:`ExportError` naming ONNX Runtime's reason."""
    import onnxruntime as ort

    level, disabled = RUNTIMES[runtime]
    options = ort.SessionOptions()
    if level != "default":
        options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
        options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"],
                                    disabled_optimizers=disabled)
    except Exception as exc:  # noqa: BLE001 - ONNX Runtime raises its own Fail/InvalidGraph types
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        session = "a default session" if level == "default" else f"a {runtime} session ({level})"
        raise ExportError(f"ONNX Runtime {ort.__version__} cannot load {path} in {session}: {reason}") from None


INTEGER_KERNELS = ("QLinearConv", "QLinearMatMul", "MatMulInteger", "ConvInteger", "MatMulIntegerToFloat",
                   "DynamicQuantizeMatMul", "MatMulNBits", "QGemm", "QLinearAdd", "QLinearMul")


def runtime_kernels(path: str | Path) -> dict[str, int]:
    """The operators a default ONNX Runtime CPU session runs for ``path`` after its graph optimisations, counted
    by type: which layers really became integer kernels (see :data:`INTEGER_KERNELS`)."""
    import onnx
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        options = ort.SessionOptions()
        options.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
        options.log_severity_level = 3  # the note that a saved optimised graph is hardware-specific
        ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        graph = onnx.load(options.optimized_model_filepath).graph
    counts: dict[str, int] = {}
    for node in graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: -kv[1]))


def integer_kernels(kernels: dict[str, int]) -> dict[str, int]:
    """The integer kernels among :func:`runtime_kernels`' counts (see :data:`INTEGER_KERNELS`)."""
    return {k: v for k, v in kernels.items() if k in INTEGER_KERNELS}


def run_onnx(session, evaluate) -> tuple[float, list[torch.Tensor]]:
    """``evaluate``'s metric (an :class:`~quantsearch.search.evaluator.Evaluator`) computed on the ONNX model's
    outputs for the evaluator's own batches; returns the metric and the outputs."""
    metric, outputs = evaluate.metric, []
    metric.reset()
    for i, (x, y) in enumerate(evaluate.batches):
        out = torch.from_numpy(session.run(None, {"input": x.cpu().contiguous().numpy()})[0])
        outputs.append(out)
        metric.update(out, y.cpu(), evaluate.references[i].cpu() if evaluate.references is not None else None)
    return metric.compute(), outputs


def onnx_latency(sessions: dict, batch: np.ndarray, repeats: int = 20) -> dict[str, float]:
    """Median seconds per call of each ONNX Runtime session on ``batch``, measured interleaved (same load)."""
    times = {name: [] for name in sessions}
    for session in sessions.values():  # warm-up
        session.run(None, {"input": batch})
    for _ in range(repeats):
        for name, session in sessions.items():
            start = time.perf_counter()
            session.run(None, {"input": batch})
            times[name].append(time.perf_counter() - start)
    return {name: float(np.median(t)) for name, t in times.items()}


def compare_onnx(path: str | Path, qmodel, evaluate) -> dict:
    """The metric of the ONNX model in each of :data:`RUNTIMES` on ``evaluate``'s images, beside PyTorch's, and on
    how many images each runtime's top-1 class equals PyTorch's fake-quant model's."""
    qmodel.eval()
    with torch.no_grad():
        reference = torch.cat([qmodel(x).float().cpu() for x, _ in evaluate.batches]).argmax(1)
    out = {"pytorch": evaluate(qmodel), "images": int(len(reference))}
    for runtime in RUNTIMES:
        value, outputs = run_onnx(onnx_session(path, runtime), evaluate)
        out[runtime] = value
        out[f"{runtime}_agreeing"] = int((torch.cat(outputs).argmax(1) == reference).sum())
    return out
