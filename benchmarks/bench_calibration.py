"""Calibration methods side by side: the embedded ViT's accuracy on the search split at uniform activation widths.

Every method calibrates once (one pass over the explore default's 1,000 calibration images) and fills its amax
table for 4..8 bits; each uniform width then takes its own amax from the table, as a search candidate does.
``max (signed)`` is the calibration before issue 4 (max |x|, signed range everywhere); every other row uses the
unsigned range where calibration saw no negative value. Run: ``PYTHONPATH=src python benchmarks/bench_calibration.py``.
"""
from __future__ import annotations

import argparse
import time

import torch
from torch.utils.data import DataLoader

from quantsearch.quantize.calib import calibrate
from quantsearch.sources.data import load_fashion_mnist, split_dataset
from quantsearch.search.evaluator import AccuracyEvaluator
from quantsearch.sources.models import create_model
from quantsearch.quantize.quantized_model import QuantizedActivationsModel
from quantsearch.run.tables import format_table

WIDTHS = (8, 6, 5, 4)
ROWS = [  # label, method, options
    ("max (signed)", "max", {"detect_unsigned": False}),
    ("max", "max", {}),
    ("moving-max 0.95", "moving-max", {"momentum": 0.95}),
    ("percentile 99.99", "percentile", {"percentile": 99.99}),
    ("percentile 99.9", "percentile", {"percentile": 99.9}),
    ("entropy", "entropy", {}),
    ("mse", "mse", {}),
]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--calib-batches", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=250)
    p.add_argument("--eval-samples", type=int, default=3000)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    torch.manual_seed(args.seed)
    splits = split_dataset(load_fashion_mnist(), args.calib_batches * args.batch_size, args.eval_samples,
                           seed=args.seed)
    qmodel = QuantizedActivationsModel(create_model("fashion-vit"), "vit")
    evaluate = AccuracyEvaluator(splits.search, args.batch_size)
    with qmodel.quantization_disabled():
        fp32 = evaluate(qmodel)
    print(f"fashion-vit, {len(qmodel)} activation quantizers (vit preset), calibration {len(splits.calibration)} "
          f"images, search split {evaluate.num_samples} images; FP32 {100 * fp32:.2f} %  "
          f"(torch threads {torch.get_num_threads()})")
    rows, a4 = [], {}
    for label, method, options in ROWS:
        start = time.perf_counter()
        calibration = calibrate(qmodel, DataLoader(splits.calibration, batch_size=args.batch_size),
                                args.calib_batches, method, bits=(min(WIDTHS), max(WIDTHS)), **options)
        seconds = time.perf_counter() - start
        accuracy = {}
        for bits in WIDTHS:
            qmodel.bit_widths = [bits] * len(qmodel)
            accuracy[bits] = evaluate(qmodel)
        a4[label] = accuracy[4]
        unsigned = sum(calibration.unsigned.values())
        rows.append([label, unsigned, f"{seconds:.1f}", *[f"{100 * accuracy[b]:.2f}" for b in WIDTHS]])
    print(format_table(["method", "unsigned", "calib s", *[f"A{b} %" for b in WIDTHS]], rows))
    best = max(a4, key=a4.get)
    print(f"uniform A4: best {best} {100 * a4[best]:.2f} % vs max (signed) {100 * a4['max (signed)']:.2f} % "
          f"(+{100 * (a4[best] - a4['max (signed)']):.2f} points), vs max {100 * a4['max']:.2f} % "
          f"(+{100 * (a4[best] - a4['max']):.2f} points)")


if __name__ == "__main__":
    main()
