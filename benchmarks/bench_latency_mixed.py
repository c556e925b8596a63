"""Where the latency table's additive model fails: CNN configurations that mix int8-static and fp32 convs.

    python benchmarks/bench_latency_mixed.py [--model resnet18] [--batch 8] [--mixes 20]

A timm CNN with random weights (only latency is judged), its latency table measured as a run measures it, then
FP32, uniform int8-static, an alternating configuration and ``--mixes`` random mixes of int8-static and fp32 convs
exported and timed end to end, interleaved in one loop (default sessions, 2 threads). For each it prints the
measured time against two predictions:

- **unary**: the table as the search uses it (one entry per layer per format, uniform configurations exact);
- **timed whole**: what the search now uses (:class:`~quantsearch.deploy.targets.latency.WholeModelLatency`):
  a configuration that mixes int8-static and fp32 convs timed whole against FP32, one at a time before the check,
  the ratio on the table's FP32 time; raw, and re-anchored on the check's own FP32 time (the machine's drift out);
- **pairwise**: the one-layer graphs' times plus a term per edge between two layers (the layers a layer's output
  reaches through Relu, Add, pooling and reshapes), ``alpha_family x elements`` when both ends run in the same
  family (int8-static, or float), fitted exactly on FP32, uniform static and the alternating configuration; and its
  leave-one-out error when fitted by least squares on every measured configuration.

Then ONNX Runtime's own profile (kernel time per operator type) of FP32, static and the alternating configuration
shows where a mixed configuration's time goes.
"""
from __future__ import annotations

import argparse
import collections
import json
import logging
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np


def _edges(rmodel, example):
    """``{(producer, consumer): elements of the tensor between them}`` over the FP32 graph's layer nodes."""
    import onnx

    from quantsearch.deploy.targets.static import tensor_shapes

    through = {"Relu", "Clip", "Add", "MaxPool", "AveragePool", "GlobalAveragePool", "Flatten", "Reshape", "Concat"}
    model_bytes = rmodel.fp32_onnx(example)
    graph = onnx.load_from_string(model_bytes).graph
    nodes = rmodel.layer_nodes(graph)
    layer_of = {node.name: name for name, node in nodes.items()}
    readers = collections.defaultdict(list)
    for node in graph.node:
        for tensor in node.input:
            readers[tensor].append(node)
    edges = {}
    for layer, node in nodes.items():
        stack, seen = [node.output[0]], set()
        while stack:
            tensor = stack.pop()
            if tensor in seen:
                continue
            seen.add(tensor)
            for reader in readers[tensor]:
                if reader.name in layer_of and reader.input[0] == tensor:
                    edges[(layer, layer_of[reader.name])] = tensor
                elif reader.op_type in through:
                    stack.extend(reader.output)
    shapes = tensor_shapes(model_bytes, set(edges.values()), example[:1])
    return {e: float(np.prod(shapes[t][1:])) * rmodel.batch_size for e, t in edges.items()}


def _keys(timed, configs):
    """The labels of the configurations in ``timed`` (keyed by gene values)."""
    return [k for k, c in configs.items() if tuple(c.values()) in timed]


def _profile(path, batch, runs=10):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.enable_profiling, options.intra_op_num_threads = True, 2
    options.profile_file_prefix = str(Path(path).with_suffix(""))
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    for _ in range(runs):
        session.run(None, {"input": batch})
    totals, counts = collections.Counter(), collections.Counter()
    for event in json.loads(Path(session.end_profiling()).read_text()):
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            totals[event["args"]["op_name"]] += event["dur"] / runs / 1e3
            counts[event["args"]["op_name"]] += 1
    return totals, {k: v // runs for k, v in counts.items()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="resnet18")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--mixes", type=int, default=20)
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    import onnxruntime as ort
    import timm
    import torch

    from quantsearch.deploy.targets import latency as lat
    from quantsearch.deploy.targets.onnxruntime import FORMATS, FP32, STATIC, RuntimeFormatModel, export_runtime_onnx
    from quantsearch.deploy.targets.static import runtime_session

    print(f"# bench_latency_mixed {time.strftime('%Y-%m-%d %H:%M')}, {args.model} (random weights), batch "
          f"{args.batch}, onnxruntime {ort.__version__}, 2 threads")
    torch.manual_seed(0)
    rmodel = RuntimeFormatModel(timm.create_model(args.model, pretrained=False).eval(), args.batch, threads=2)
    example = torch.randn(2, 3, 224, 224)
    rmodel.calibrate([torch.randn(4, 3, 224, 224)])
    table = lat.measure_latency(rmodel, example, threads=2)
    stored = lat._read_cache(lat.cache_path())[lat._machine_key(lat.machine(2))]
    isolated = {n: {f: stored[k] for f, k, _, _ in per} for n, per in lat._layer_ops(rmodel, example).items()}
    edges = _edges(rmodel, example)
    layers = list(rmodel.layers)
    print(f"{len(layers)} layers, {len(edges)} edges between them")

    rng = np.random.default_rng(1)
    configs = {"fp32": dict.fromkeys(layers, FP32), "static": dict.fromkeys(layers, STATIC),
               "alternating": {n: (STATIC if i % 2 else FP32) for i, n in enumerate(layers)}}
    for k in range(args.mixes):
        share = rng.uniform(0.2, 0.8)
        configs[f"mix {k}"] = {n: (STATIC if rng.random() < share else FP32) for n in layers}
    # as a search times them: each configuration that mixes layouts whole, one at a time, before the check below
    whole = lat.WholeModelLatency(table, rmodel, example, threads=2)
    start = time.perf_counter()
    timed = {k: whole(c) for k, c in configs.items()}
    per_timing = (time.perf_counter() - start) / max(1, len(whole.timed))
    again = lat.WholeModelLatency(table, rmodel, example, threads=2)  # the same timings once more: their noise
    repeat = {k: again(c) / timed[k] - 1 for k, c in configs.items() if k in {*_keys(whole.timed, configs)}}
    batch = example[:1].expand(args.batch, *example.shape[1:]).contiguous().numpy()
    with tempfile.TemporaryDirectory() as tmp:
        paths = {}
        for key, config in configs.items():
            rmodel.bit_widths = config
            paths[key] = export_runtime_onnx(rmodel, Path(tmp) / f"{key.replace(' ', '_')}.onnx", example[:1])["path"]
        measured = lat._time_interleaved({k: (runtime_session(str(p), 2), {"input": batch})
                                          for k, p in paths.items()}, 15)
        profiles = {k: _profile(paths[k], batch) for k in ("fp32", "static", "alternating")}

    def features(config):
        unary = sum(isolated[n][FORMATS[config[n]]] for n in layers)
        same = [sum(w for (a, b), w in edges.items() if (config[a] == STATIC) == fam and (config[b] == STATIC) == fam)
                for fam in (True, False)]
        return unary, [1.0, *same]

    keys = list(configs)
    X = np.array([features(configs[k])[1] for k in keys])
    y = np.array([measured[k] - features(configs[k])[0] for k in keys])
    anchored = np.linalg.solve(X[:3], y[:3])
    loo = {}
    for i, key in enumerate(keys):
        keep = np.arange(len(keys)) != i
        beta = np.linalg.lstsq(X[keep], y[keep], rcond=None)[0]
        loo[key] = X[i] @ beta + features(configs[key])[0]
    print(f"pairwise fit on the three anchors: fixed {anchored[0] * 1e3:.2f} ms, alpha static "
          f"{anchored[1] * 1e9:.3f} ns/element, alpha float {anchored[2] * 1e9:.3f} ns/element\n")
    print(f"{len(whole.timed)} configurations timed whole (mixed layouts), {per_timing:.1f} s each; timed whole "
          f"again, the second timing against the first: rms {100 * np.sqrt(np.mean(np.square(list(repeat.values())))):.1f}"
          f" %, max {100 * np.max(np.abs(list(repeat.values()))):.1f} % (the timing's own noise)\n")
    print(f"{'configuration':>13}  static convs  measured ms  unary error  pairwise error  pairwise, least squares "
          f"(leave one out)  timed whole  timed whole, re-anchored on FP32")
    errors = collections.defaultdict(list)
    for i, key in enumerate(keys):
        m = measured[key]
        row = {"unary": table.predict(configs[key]) / m - 1, "pairwise": (X[i] @ anchored + features(configs[key])[0])
               / m - 1, "loo": loo[key] / m - 1, "whole": timed[key] / 1e3 / m - 1,
               "whole re-anchored": timed[key] * measured["fp32"] / whole.fp32 / m - 1}
        if i >= 3:
            for k, v in row.items():
                errors[k].append(100 * v)
        static = sum(v == STATIC for v in configs[key].values())
        print(f"{key:>13}  {static:5d} of {len(layers):<3d}  {1e3 * m:11.2f}  {100 * row['unary']:+10.1f}%  "
              f"{100 * row['pairwise']:+13.1f}%  {100 * row['loo']:+10.1f}%  {' ' * 20}{100 * row['whole']:+10.1f}%"
              f"  {100 * row['whole re-anchored']:+10.1f}%")
    print("\nover the random mixes: " + ", ".join(
        f"{k} rms {np.sqrt(np.mean(np.square(v))):.1f} %, max {np.max(np.abs(v)):.1f} %, within 10 %: "
        f"{sum(abs(e) <= 10 for e in v)} of {len(v)}" for k, v in errors.items()))
    print("\nONNX Runtime's profile, kernel ms per call by operator type (count per call):")
    kinds = sorted({k for totals, _ in profiles.values() for k in totals},
                   key=lambda k: -max(t.get(k, 0) for t, _ in profiles.values()))
    print(f"{'operator':>20}" + "".join(f"  {k:>17}" for k in profiles))
    for kind in kinds[:14]:
        print(f"{kind:>20}" + "".join(f"  {t.get(kind, 0):9.2f} ms (x{c.get(kind, 0):2d})" for t, c in profiles.values()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
