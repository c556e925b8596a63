"""The same NSGA-II search done the plain way and the quantsearch way, side by side in one process.

    python benchmarks/bench_search.py [--generations 8] [--pop-size 20] [--compile]

Plain: pytorch-quantization TensorQuantizer hooks, a DataLoader pass over the search split per candidate, every
candidate evaluated in full (a configuration met twice is evaluated twice), as the original tool did.
quantsearch: the fast fake-quant path, the search split held in memory, each configuration evaluated once
(optionally torch.compile-d). Same model, calibration, split and seed. Printed: wall time of each search, the
ratio, the number of forward passes over the split, and the hypervolume of each feasible front (objectives
accuracy and total bits / (8 x quantizers), reference point (floor accuracy, 1.0)).
"""
from __future__ import annotations

import argparse
import time
import warnings

import numpy as np
import torch
from torch.utils.data import DataLoader

warnings.simplefilter("ignore", FutureWarning)

from pymoo.indicators.hv import HV  # noqa: E402

from quantsearch import (AccuracyEvaluator, LayerwiseQuantizationProblem, QuantizedActivationsModel,  # noqa: E402
                         create_model, load_fashion_mnist, nsga2, pareto_front, run_search, split_dataset)


class DataLoaderAccuracy:
    """The plain way: iterate a DataLoader over the split for every candidate."""

    def __init__(self, dataset, batch_size):
        self.loader = DataLoader(dataset, batch_size=batch_size)

    def __call__(self, model):
        correct = total = 0
        with torch.no_grad():
            for x, y in self.loader:
                correct += int((model(x).argmax(1) == y).sum())
                total += len(y)
        return correct / total


def hypervolume(evaluations, floor, n_quantizers):
    front = pareto_front(evaluations, floor)
    if not front:
        return 0.0
    F = np.array([[-e.accuracy, e.costs["bits"] / (8 * n_quantizers)] for e in front])
    return float(HV(ref_point=np.array([-floor, 1.0]))(F))


def search(way, splits, args):
    fast = way == "quantsearch"
    qmodel = QuantizedActivationsModel(create_model("fashion-vit"), "vit", fast=fast)
    qmodel.calibrate(DataLoader(splits.calibration, batch_size=250), 4)
    metric = (AccuracyEvaluator(splits.search, 250, compile=args.compile) if fast
              else DataLoaderAccuracy(splits.search, 250))
    with qmodel.quantization_disabled():
        fp32 = metric(qmodel)
    floor = fp32 - 0.01
    problem = LayerwiseQuantizationProblem(qmodel, metric, floor, (2, 8), memoize=fast)
    start = time.perf_counter()
    run_search(problem, nsga2(args.pop_size), args.generations, seed=args.seed)
    seconds = time.perf_counter() - start
    return seconds, problem, floor, len(qmodel)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--generations", type=int, default=8)
    parser.add_argument("--pop-size", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--compile", action="store_true")
    args = parser.parse_args()
    splits = split_dataset(load_fashion_mnist(), 1000, 3000, seed=0)
    results = {}
    for way in ("plain", "quantsearch"):
        seconds, problem, floor, n = search(way, splits, args)
        evaluated = len(problem.evaluations)
        results[way] = (seconds, evaluated, hypervolume(problem.evaluations, floor, n))
        print(f"{way:12} {seconds:7.1f} s  {evaluated:4d} full evaluations  "
              f"hypervolume {results[way][2]:.6f}", flush=True)
    (tp, ep, hp), (tq, eq, hq) = results["plain"], results["quantsearch"]
    print(f"quantsearch / plain wall time: {tq / tp:.2f}x (speed-up {tp / tq:.2f}x); evaluations {eq}/{ep}; "
          f"hypervolume {hq:.6f} vs {hp:.6f} ({'equal' if abs(hq - hp) < 1e-12 else 'different'})")


if __name__ == "__main__":
    main()
