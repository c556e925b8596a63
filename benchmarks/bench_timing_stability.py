"""How far apart identical ONNX Runtime sessions time on this machine, with two ways of timing them interleaved.

    python benchmarks/bench_timing_stability.py [--model tf_efficientnet_lite0] [--rounds 10] [--trials 2]

Four sessions of the same FP32 graph (timm model, random weights, batch 1, 2 threads) are timed in interleaved
rounds, each visit after a 50 ms pause and one warm call: "one call" keeps one timed call a round (the latency
table's first method), "fastest of 3" the fastest of three consecutive calls (its method now). The spread is the
slowest session's median over the fastest's: what one latency check can trust on this shared machine.
"""
from __future__ import annotations

import argparse
import sys
import warnings

import torch


def main(argv=None) -> int:
    from quantsearch.deploy.targets.latency import _session, _time_interleaved
    from quantsearch.deploy.targets.onnxruntime import RuntimeFormatModel, export_runtime_onnx

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="tf_efficientnet_lite0")
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--trials", type=int, default=2)
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore")
    import tempfile
    from pathlib import Path

    import timm

    torch.manual_seed(0)
    x = torch.randn(1, 3, 224, 224)
    with tempfile.TemporaryDirectory() as tmp:
        path = export_runtime_onnx(RuntimeFormatModel(timm.create_model(args.model).eval()), Path(tmp) / "m.onnx",
                                   x)["path"]
        runs = {i: (_session(str(path), 2), {"input": x.numpy()}) for i in range(4)}
        print(f"{args.model}, 4 identical sessions, batch 1, 2 threads, {args.rounds} rounds")
        for trial in range(args.trials):
            for label, calls in (("one call", 1), ("fastest of 3", 3)):
                t = _time_interleaved(runs, args.rounds, calls=calls)
                ms = " ".join(f"{1e3 * v:6.2f}" for v in t.values())
                print(f"trial {trial}  {label:13s} ms: {ms}   spread {max(t.values()) / min(t.values()) - 1:6.1%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
