"""Per-channel against per-tensor int8 weights in DynamicQuantizeMatMul, and ORT's own quantize_dynamic, on DeiT-S.

    python benchmarks/bench_dynamic_scales.py

The target's int8-dynamic format keeps a weight scale per output channel; ORT's ``quantize_dynamic`` keeps one
per tensor. This asks whether per-tensor scales run faster (which would make a per-tensor format worth adding):
every Linear of a timm DeiT-S (random weights: only latency is judged) as int8-dynamic per channel, the same
weights re-coded per tensor, and ORT's ``quantize_dynamic`` of the FP32 export, four files in one interleaved loop
(default sessions, 2 threads, median of 10), at batch 1 and 8.
"""
import numpy as np, torch, timm, tempfile, onnx, warnings, logging
from pathlib import Path
warnings.filterwarnings("ignore"); logging.disable(logging.WARNING)
from onnx import numpy_helper
from quantsearch.deploy.targets.onnxruntime import RuntimeFormatModel, export_runtime_onnx, FORMATS
from quantsearch.deploy.targets.latency import measure_end_to_end
from quantsearch.deploy.targets.baselines import ort_quantized
torch.manual_seed(0)
m = timm.create_model("deit_small_patch16_224", pretrained=False).eval()
r = RuntimeFormatModel(m)
x = torch.randn(1, 3, 224, 224)
tmp = Path(tempfile.mkdtemp())
with r.fp32():
    fp32 = export_runtime_onnx(r, tmp / "fp32.onnx", x)["path"]
r.bit_widths = {n: (1 if lo == 0 else 3) for n, (lo, hi) in r.gene_ranges().items()}
chan = export_runtime_onnx(r, tmp / "chan.onnx", x)["path"]
model = onnx.load(chan)
inits = {t.name: t for t in model.graph.initializer}
for node in model.graph.node:
    if node.op_type == "DynamicQuantizeMatMul":
        b, s, z = node.input[1], node.input[2], node.input[3]
        codes = numpy_helper.to_array(inits[b]).astype(np.float32) * numpy_helper.to_array(inits[s])[None, :]
        scale = np.abs(codes).max() / 127
        q = np.clip(np.round(codes / scale), -127, 127).astype(np.int8)
        inits[b].CopyFrom(numpy_helper.from_array(q, b))
        inits[s].CopyFrom(numpy_helper.from_array(np.array([scale], np.float32), s))
        inits[z].CopyFrom(numpy_helper.from_array(np.zeros(1, np.int8), z))
onnx.save(model, tmp / "tensor.onnx")
ort = ort_quantized(fp32, tmp, [x])
paths = {"fp32": fp32, "ours per-channel": chan, "ours per-tensor": tmp / "tensor.onnx", "ORT dynamic": ort["ORT dynamic int8"]}
print(f"# bench_dynamic_scales, onnxruntime {__import__('onnxruntime').__version__}; x = speed-up over FP32 in the loop")
for b in (1, 8):
    feed = np.random.default_rng(0).standard_normal((b, 3, 224, 224), dtype=np.float32)
    t = measure_end_to_end(paths, feed, threads=2, repeats=10)
    print(b, {k: f"{1e3*v:.1f} ms {t['fp32']/v:.2f}x" for k, v in t.items()})
