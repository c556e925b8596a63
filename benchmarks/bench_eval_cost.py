"""What one candidate evaluation costs against an FP32 pass, before and after issues 18 and 27 (demo, CPU).

    python benchmarks/bench_eval_cost.py [--config configs/fashion_vit_demo.yaml] [--candidates 30]

Each variant runs in its own process (the allocator setting is per process), on the session ``explore`` builds:
the search split, the same calibrated model, ``--candidates`` seeded random configurations (widths drawn from the
search range), each timed as a quantized evaluation and as an FP32 pass (quantization off, hooks in place: what
``explore`` reports as "FP32") in turn. Printed: median seconds and the ratio quantized / FP32.

Variants:
- ``before``: the fast fake quantizer as it was (scale and integer range as 0-dim tensor operands), glibc's
  default (adaptive) allocator thresholds;
- ``scalars``: scale and range as Python numbers (the float32 values, bit-identical), default thresholds;
- ``copy``: scalars and :func:`quantsearch.run.allocator.keep_freed_memory` (issue 18's result), each quantizer
  writing a new tensor;
- ``after``: the same, with a quantizer overwriting its module's output where no one else holds it (issue 27;
  what ``explore`` does now).
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
import warnings

VARIANTS = ("before", "scalars", "copy", "after")


def _tensor_operand_forward(self, inputs):
    """The fast path as it was before issue 18: 0-dim tensor operands (same float32 results)."""
    import torch

    amax = getattr(self, "_amax", None)
    if amax is None or amax.numel() != 1 or inputs.dtype != torch.float32:
        return super(type(self), self)._quant_forward(inputs)
    bound, low = self._range[0], self._range[1]
    scale = bound / amax
    out = inputs * scale
    out.round_()
    out.clamp_(low, bound)
    return out.div_(scale)


def measure(variant: str, config_path: str | None, candidates: int) -> dict:
    warnings.simplefilter("ignore", FutureWarning)
    import numpy as np

    from quantsearch.quantize.fakequant import FastTensorQuantizer
    from quantsearch.run.allocator import keep_freed_memory
    from quantsearch.run.session import build_session
    from quantsearch.run.settings import ExploreConfig, load_yaml

    if variant == "before":
        FastTensorQuantizer._quant_forward = _tensor_operand_forward
    from quantsearch.quantize import quantized_model

    in_place = quantized_model._owns_output
    if variant != "after":  # every quantizer writes a new tensor
        quantized_model._owns_output = lambda *args: False
    if variant in ("copy", "after"):
        keep_freed_memory()
    config = ExploreConfig.from_mapping(load_yaml(config_path)) if config_path else ExploreConfig()
    session = build_session(config)
    qmodel, evaluate = session.qmodel, session.evaluator("search")
    ranges = session.bit_ranges
    rng = np.random.default_rng(0)
    quantized, fp32, outputs, paired = [], [], [], []
    for _ in range(candidates):
        qmodel.bit_widths = {n: int(rng.integers(lo, hi + 1)) for n, (lo, hi) in ranges.items()}
        start = time.perf_counter()
        outputs.append(evaluate(qmodel))
        quantized.append(time.perf_counter() - start)
        if variant == "after":  # the same configuration again, in place and copying, in the order A B B A
            seconds = {}
            for mode in ("in place", "copy", "copy", "in place"):
                quantized_model._owns_output = in_place if mode == "in place" else (lambda *args: False)
                start = time.perf_counter()
                assert evaluate(qmodel) == outputs[-1]
                seconds[mode] = seconds.get(mode, 0.0) + time.perf_counter() - start
            quantized_model._owns_output = in_place
            paired.append(seconds["in place"] / seconds["copy"])
        with qmodel.quantization_disabled():
            start = time.perf_counter()
            evaluate(qmodel)
            fp32.append(time.perf_counter() - start)
    return {"quantized": statistics.median(quantized), "fp32": statistics.median(fp32), "accuracies": outputs,
            "images": evaluate.num_samples, "quantizers": len(qmodel),
            "in_place_vs_copy": statistics.median(paired) if paired else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="an explore YAML (default: the embedded demo)")
    parser.add_argument("--candidates", type=int, default=30)
    parser.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)  # a child process
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(measure(args.variant, args.config, args.candidates)))
        return
    clock = time.perf_counter()
    results = {}
    for variant in VARIANTS:
        command = [sys.executable, __file__, "--variant", variant, "--candidates", str(args.candidates)]
        command += ["--config", args.config] if args.config else []
        results[variant] = json.loads(subprocess.run(command, check=True, capture_output=True,
                                                     text=True).stdout.strip().splitlines()[-1])
    first = results["before"]
    same = all(r["accuracies"] == first["accuracies"] for r in results.values())
    print(f"{args.config or 'embedded demo'}: {first['quantizers']} quantizers, {first['images']} images, "
          f"median of {args.candidates} random configurations each; one process per variant")
    print(f"{'variant':10} {'quantized s':>12} {'FP32 s':>8} {'quantized / FP32':>17}")
    for variant, r in results.items():
        print(f"{variant:10} {r['quantized']:12.3f} {r['fp32']:8.3f} {r['quantized'] / r['fp32']:16.2f}x")
    print(f"accuracies identical across variants: {same}")
    print(f"in place against copying, each configuration timed again both ways in one process, in the order "
          f"in place, copy, copy, in place (median of {args.candidates} ratios): "
          f"{results['after']['in_place_vs_copy']:.3f}x")
    print(f"wall time {time.perf_counter() - clock:.0f} s")


if __name__ == "__main__":
    main()
