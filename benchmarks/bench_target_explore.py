"""explore --target onnxruntime-cpu as a user runs it: the front deployed in ONNX Runtime against FP32 and ORT's own
uniform int8, every figure measured in the run's own process.

    python benchmarks/bench_target_explore.py [--models deit_small_patch16_224,resnet18] [--batches 1,8]
                                              [--threads 2] [--skip-demo]

Part 1, latency on models of real size: timm models with **random weights** (only latency is judged on them:
their "agreement" with FP32 on Fashion-MNIST images resized to 224 px means nothing, so the bound is off,
``--max-accuracy-drop 1``), costs latency and size, 64 search and 64 hold-out images, a small search (population 8,
3 generations, with the uniform formats as its baselines). Part 2, the demo ViT with its shipped weights on Fashion-MNIST with the default settings (3000 search
images, 6000 hold-out, floor FP32 - 1 point), deployment batch 1.

Each run prints its deployed table: FP32, the uniform formats, every front point and ORT's ``quantize_dynamic`` and
``quantize_static``, each exported, scored by a default session and timed end to end, interleaved, in that one
process; predicted against measured latency; the integer kernels a default session runs.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
import warnings

from quantsearch.cli import explore


def run(label: str, flags: list[str]) -> None:
    print(f"\n## {label}\n$ python -m quantsearch.explore {' '.join(flags)}", flush=True)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        code = explore.main([*flags, "--out", f"{tmp}/run", "--no-progress", "--log-level", "WARNING"])
    print(f"(exit {code}, {time.perf_counter() - start:.0f} s wall)", flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="deit_small_patch16_224,resnet18")
    p.add_argument("--batches", default="1,8")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--skip-demo", action="store_true")
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    import onnxruntime as ort
    import torch

    print(f"# bench_target_explore {time.strftime('%Y-%m-%d %H:%M')}, onnxruntime {ort.__version__}, torch "
          f"{torch.__version__}, {os.cpu_count()} CPUs, latency cache {os.environ.get('XDG_CACHE_HOME', '~/.cache')}")
    for model in filter(None, args.models.split(",")):
        for batch in args.batches.split(","):
            run(f"{model}, random weights (latency only), deployment batch {batch}",
                ["--model", model, "--no-pretrained", "--metric", "agreement", "--max-accuracy-drop", "1",
                 "--target", "onnxruntime-cpu", "--threads", str(args.threads), "--deploy-batch", batch,
                 "--cost", "latency,size", "--eval-samples", "64", "--holdout-samples", "64", "--batch-size", "32",
                 "--calib-batches", "1", "--pop-size", "8", "--generations", "3"])
    if not args.skip_demo:
        run("demo ViT (shipped weights), Fashion-MNIST, default settings, deployment batch 1",
            ["--target", "onnxruntime-cpu", "--threads", str(args.threads)])
    return 0


if __name__ == "__main__":
    sys.exit(main())
