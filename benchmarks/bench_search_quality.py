"""Search quality per evaluation budget: every algorithm on the same W+A problem, budgets and seeds.

    python benchmarks/bench_search_quality.py [--quick] [--budgets 50,100,200] [--seeds 0,1,2] [--no-early-reject]

The embedded demo ViT, activation and weight bits both searched in 2:8 (58 genes), cost BOPs, floor FP32 - 1 point
on the search split (3000 images; ``--quick``: 1000), calibration as ``explore`` does it (mse). Each run starts as
``explore`` does: the six uniform baselines (W8A8 ... W4A4) are evaluated first and count against the budget;
``greedy``, ``ilp`` and ``guided`` then spend up to 40 % of what is left on single-gene sensitivities, which count
too. Budgets are in full-evaluation equivalents: an early-rejected candidate costs the fraction of the split it ran.

- ``random`` and ``nsga2`` do not depend on the budget, so one run per seed at the largest budget is read at every
  budget (the evaluations whose cumulative cost fits it).
- ``greedy``, ``ilp`` and ``guided`` plan with the budget (how many sensitivities, how many sweep points), so they run
  once per budget (and per seed for ``guided``; ``greedy`` and ``ilp`` are deterministic: one run per budget,
  the same for every seed). Any overshoot of a run's last generation is cut off the same way.

Hypervolume as in ``quantsearch.convergence``: feasible points ``(-100 x accuracy, BOPs / FP32 BOPs)``, reference
``(-100 x floor, 1)``; units: accuracy points above the floor x fraction of the FP32 BOPs saved. Since W8A8 already
saves 93.75 % of FP32's BOPs, the same figure with BOPs relative to W8A8 (reference ``(floor, W8A8 BOPs)``) is printed
too: it tells apart fronts that differ below W8A8. "Budget to 99 %" is the smallest budget at which the mean over
seeds reaches 99 % of the best mean hypervolume in the table (for random and nsga2 read off their runs at every
evaluation; otherwise at the budgets of the table).

The same configuration always gets the same result (fixed split, deterministic evaluation), so results are shared
between runs through one table in memory: each run is charged for every configuration as if it were the first to
evaluate it; only the wall time of this script is saved. ``uptime`` is printed at the start and the end.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import time
import warnings

import numpy as np
import torch

warnings.simplefilter("ignore", FutureWarning)

from quantsearch.budget import Budget, evaluation_cost  # noqa: E402
from quantsearch.config import ExploreConfig  # noqa: E402
from quantsearch.convergence import hypervolume  # noqa: E402
from quantsearch.costs import get_costs, profile_model  # noqa: E402
from quantsearch.data import split_dataset  # noqa: E402
from quantsearch.evaluation import EarlyRejected, Evaluator, NumericalError  # noqa: E402
from quantsearch.exploration import calibrate_run, evaluate_baselines, load_model_and_data, search_genes  # noqa: E402
from quantsearch.problem import LayerwiseQuantizationProblem  # noqa: E402
from quantsearch.quantized_model import QuantizedActivationsModel  # noqa: E402
from quantsearch.results import format_table  # noqa: E402
from quantsearch.search import ALGORITHMS, run_algorithm  # noqa: E402

ANYTIME = ("random", "nsga2")


class SharedResults:
    """The search evaluator behind a table of results by configuration: same answers, computed once."""

    def __init__(self, evaluator: Evaluator):
        self.evaluator = evaluator
        self.results: dict[tuple, tuple[str, object]] = {}
        self.computed = 0

    def __getattr__(self, name):
        return getattr(self.evaluator, name)

    def __call__(self, qmodel):
        key = (tuple(qmodel.bit_widths), self.evaluator.early_rejection is not None)
        if key not in self.results:
            self.computed += 1
            try:
                self.results[key] = ("ok", self.evaluator(qmodel))
            except (EarlyRejected, NumericalError) as exc:
                self.results[key] = ("raise", exc)
        kind, value = self.results[key]
        if kind == "raise":
            raise value
        return value


def uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return "uptime unavailable"


def setup(args):
    config = ExploreConfig(search_space="both", cost="bops", bits="2:8", weight_bits="2:8",
                           eval_samples=1000 if args.quick else 3000, seed=0)
    torch.manual_seed(config.seed)
    model, dataset, _ = load_model_and_data(config)
    splits = split_dataset(dataset, config.calibration_samples, config.eval_samples, config.holdout_samples,
                           seed=config.seed)
    qmodel = QuantizedActivationsModel(model, "vit", weight_quantizers=True)
    start = time.perf_counter()
    calibrate_run(config, qmodel, splits.calibration)
    calibration_s = time.perf_counter() - start
    evaluator = Evaluator(splits.search, batch_size=config.batch_size)
    with qmodel.quantization_disabled():
        fp32 = evaluator(qmodel)
    costs = get_costs("bops", qmodel, profile=profile_model(qmodel, splits.calibration[0][0].unsqueeze(0)))
    genes = search_genes(qmodel, "both")
    return config, qmodel, evaluator, fp32, costs, genes, calibration_s


def new_problem(qmodel, shared, floor, costs, genes):
    return LayerwiseQuantizationProblem(qmodel, shared, floor, (2, 8), costs, genes=genes, fixed_bits=8)


def run_one(name, budget, seed, qmodel, shared, floor, costs, genes, pop_size):
    """One run from scratch: baselines, then the algorithm; returns the problem (its visited configurations)."""
    problem = new_problem(qmodel, shared, floor, costs, genes)
    _, seeds = evaluate_baselines(problem)
    run_algorithm(name, problem, Budget(problem, budget), pop_size=pop_size, seed=seed, extra_seeds=seeds)
    return problem


def curve(problem, budgets, floor, normaliser):
    """Hypervolume of the visited configurations whose cumulative cost fits each budget."""
    total = problem.metric.num_samples
    spent, prefix, out = 0.0, [], {}
    costs = [evaluation_cost(e, total) for e in problem.visited]
    for budget in budgets:
        while len(prefix) < len(costs) and spent + costs[len(prefix)] <= budget + 1e-9:
            spent += costs[len(prefix)]
            prefix.append(problem.visited[len(prefix)])
        out[budget] = hypervolume(prefix, floor, normaliser, ["bops"])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1000-image search split instead of 3000")
    parser.add_argument("--budgets", default="50,100,200")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--algorithms", default=",".join(ALGORITHMS))
    parser.add_argument("--pop-size", type=int, default=20)
    parser.add_argument("--no-early-reject", action="store_true", help="evaluate every candidate in full")
    args = parser.parse_args()
    budgets = [float(b) for b in args.budgets.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    algorithms = args.algorithms.split(",")
    print(f"start: {uptime()}; torch threads {torch.get_num_threads()}, OMP_NUM_THREADS="
          f"{os.environ.get('OMP_NUM_THREADS', 'unset')}", flush=True)
    clock = time.perf_counter()
    config, qmodel, evaluator, fp32, costs, genes, calibration_s = setup(args)
    floor = fp32 - 0.01
    if not args.no_early_reject:
        evaluator.reject_below(floor)
    shared = SharedResults(evaluator)
    bops = costs[0]
    w8a8 = bops({n: 8 for n in qmodel.quantizer_names})
    print(f"fashion-vit, {len(genes)} genes (W+A, 2:8), cost bops; search split {evaluator.num_samples} images; "
          f"FP32 {100 * fp32:.2f} %, floor {100 * floor:.2f} %; early rejection "
          f"{'off' if args.no_early_reject else 'on (99.9 %)'}; calibration {calibration_s:.0f} s", flush=True)

    fp32_norm, w8a8_norm = {"bops": bops.fp32}, {"bops": w8a8}
    hv = {a: {b: [] for b in budgets} for a in algorithms}
    hv8 = {a: {b: [] for b in budgets} for a in algorithms}
    fine = {a: [] for a in algorithms if a in ANYTIME}
    grid = np.arange(1, int(max(budgets)) + 1, dtype=float)
    union, best_cheap = {}, None
    for name in algorithms:
        start = time.perf_counter()
        for seed in seeds:
            if name in ANYTIME:
                runs = {max(budgets): run_one(name, max(budgets), seed, qmodel, shared, floor, costs, genes,
                                              args.pop_size)}
            elif name == "guided" or seed == seeds[0]:
                runs = {b: run_one(name, b, seed, qmodel, shared, floor, costs, genes, args.pop_size)
                        for b in budgets}
            for b in budgets:
                problem = runs[b] if b in runs else runs[max(budgets)]
                hv[name][b].append(curve(problem, [b], floor, fp32_norm)[b])
                hv8[name][b].append(curve(problem, [b], floor, w8a8_norm)[b])
            if name in ANYTIME:
                fine[name].append(curve(runs[max(budgets)], grid, floor, fp32_norm))
            for problem in runs.values():
                for e in problem.visited:
                    union[e.bits] = e
        print(f"  {name}: {time.perf_counter() - start:.0f} s, {shared.computed} configurations computed so far",
              flush=True)

    mean = {a: {b: float(np.mean(v)) for b, v in hv[a].items()} for a in algorithms}
    mean8 = {a: {b: float(np.mean(v)) for b, v in hv8[a].items()} for a in algorithms}
    best = max(v for a in algorithms for v in mean[a].values())

    def needed(name):
        if name in fine:
            means = np.mean([[c[g] for g in grid] for c in fine[name]], axis=0)
            hit = np.flatnonzero(means >= 0.99 * best)
            return f"{grid[hit[0]]:.0f}" if len(hit) else f"> {max(budgets):.0f}"
        hit = [b for b in budgets if mean[name][b] >= 0.99 * best]
        return f"{hit[0]:.0f}" if hit else f"> {max(budgets):.0f}"

    header = ["algorithm", *[f"HV @ {b:.0f}" for b in budgets], "budget to 99 %",
              *[f"HV/W8A8 @ {b:.0f}" for b in budgets]]
    rows = [[a, *[f"{mean[a][b]:.4f}" for b in budgets], needed(a), *[f"{mean8[a][b]:.3f}" for b in budgets]]
            for a in algorithms]
    print(f"\nMean hypervolume over seeds {seeds} (HV: reference (floor, FP32 BOPs), convergence.py; HV/W8A8: "
          f"reference (floor, W8A8 BOPs)); best mean HV {best:.4f}\n" + format_table(header, rows))
    for a in algorithms:
        spread = "  ".join(f"{b:.0f}: " + ",".join(f"{v:.4f}" for v in hv[a][b]) for b in budgets)
        print(f"  {a:7} per seed  {spread}")
    feasible = [e for e in union.values() if e.status == "ok" and e.accuracy >= floor]
    union_hv = hypervolume(feasible, floor, fp32_norm, ["bops"])
    cheap = [e for e in feasible if e.accuracy >= fp32 - 0.01]
    best_cheap = min(cheap, key=lambda e: e.costs["bops"]) if cheap else None
    print(f"\nUnion of every run's evaluations: HV {union_hv:.4f}; {len(union)} configurations, "
          f"{shared.computed} computed")
    if best_cheap is not None:
        print(f"cheapest configuration within 1 point of FP32 on the search split: {100 * best_cheap.accuracy:.2f} % "
              f"at {best_cheap.costs['bops'] / w8a8:.3f} of W8A8 BOPs")
    print(f"\nend: {uptime()}; wall time {time.perf_counter() - clock:.0f} s")


if __name__ == "__main__":
    main()
