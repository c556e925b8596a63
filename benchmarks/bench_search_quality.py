"""Search quality per evaluation budget: every algorithm on the same W+A problem, budgets and seeds.

    python benchmarks/bench_search_quality.py [--quick] [--budgets 50,100,200,400] [--seeds 0,1,2] [--anytime-to 800]

The embedded demo ViT, activation and weight bits both searched in 2:8 (58 genes), cost BOPs counting every
matmul input (the attention matmuls and the input of the attention projection included), floor FP32 - 1 point on
the search split (3000 images; ``--quick``: 1000), calibration as ``explore`` does it (mse), early rejection on.
Each run starts as ``explore`` does: the uniform baselines and uniform configurations are evaluated first and
count against the budget; ``greedy``, ``ilp`` and ``guided`` then spend part of what is left on single-gene
sensitivities, which count too. Budgets are in full-evaluation equivalents: an early-rejected candidate costs the
fraction of the split it ran.

- ``random`` and ``nsga2`` do not plan with the budget, so one run per seed at the largest budget is read at every
  budget (the evaluations whose cumulative cost fits it). ``--anytime-to N`` runs them on to ``N`` so that their
  budget to 99 % can be read beyond the table (the table's columns are still read at the table's budgets).
- ``greedy``, ``ilp`` and ``guided`` plan with the budget, so they run once per budget (``greedy`` and ``ilp``
  are deterministic: one run per budget serves every seed).

**Hypervolume.** Feasible points ``(-100 x accuracy, BOPs / W8A8 BOPs)``, reference ``(-100 x floor, 1)``: accuracy
points above the floor x fraction of the W8A8 BOPs saved. W8A8 is the reference cost because it already saves
94 % of FP32's BOPs and stays within noise of FP32: everything a mixed-precision search adds lies below it (the
same figure against FP32's BOPs, ``quantsearch.run.convergence``'s, is printed too). **Hold-out HV** is that of each
run's front (its feasible non-dominated points on the search split) re-evaluated on the hold-out split (6000
images, floor FP32 hold-out - 1): what a user would get, with the luck of the search split taken out.
"Budget to 99 %" is the smallest budget at which the mean over seeds reaches 99 % of the best mean HV seen (the
table's, or the random and nsga2 curves' up to ``--anytime-to``), read off every evaluation for random and nsga2,
at the table's budgets for the others.

**Early rejection.** For nsga2 and guided at the largest budget, every configuration early rejection stopped is
evaluated in full once more: a rejected configuration that meets the floor in full would be a point the front lost
(the bound says at most 0.1 % of them). The fraction of images saved is printed per algorithm.

The same configuration always gets the same result (fixed split, deterministic evaluation), so results are shared
between runs through a table in memory: each run is charged for every configuration as if it were the first to
evaluate it; only this script's wall time is saved. ``uptime`` is printed at the start and the end.
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

from quantsearch.search.budget import Budget, evaluation_cost  # noqa: E402
from quantsearch.run.settings import ExploreConfig  # noqa: E402
from quantsearch.run.convergence import hypervolume  # noqa: E402
from quantsearch.search.evaluator import EarlyRejected, Evaluator, NumericalError  # noqa: E402
from quantsearch.run.pipeline import evaluate_baselines  # noqa: E402
from quantsearch.run.session import build_session  # noqa: E402
from quantsearch.search.problem import Evaluation, LayerwiseQuantizationProblem  # noqa: E402
from quantsearch.run.tables import format_table  # noqa: E402
from quantsearch.search.front import pareto_front  # noqa: E402
from quantsearch.search.algorithms import ALGORITHMS, run_algorithm  # noqa: E402

ANYTIME = ("random", "nsga2")


class SharedResults:
    """An evaluator behind a table of results by configuration: same answers, each computed once."""

    def __init__(self, evaluator: Evaluator):
        self.evaluator = evaluator
        self.results: dict[tuple, tuple[str, object]] = {}
        self.computed = 0

    def __getattr__(self, name):
        return getattr(self.evaluator, name)

    def __call__(self, qmodel):
        key = tuple(qmodel.bit_widths)
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


def setup(quick: bool):
    config = ExploreConfig(search_space="both", cost="bops", bits="2:8", weight_bits="2:8",
                           eval_samples=1000 if quick else 3000, seed=0)
    session = build_session(config)
    fp32 = {"search": session.fp32("search"), "holdout": session.fp32("holdout")}
    return (session.qmodel, session.evaluator("search"), session.evaluator("holdout"), fp32, session.costs("bops"),
            session.genes)


def run_one(name, budget, seed, qmodel, evaluate, floor, costs, genes, pop_size):
    """One run from scratch, as explore does it: baselines, then the algorithm; returns the problem."""
    problem = LayerwiseQuantizationProblem(qmodel, evaluate, floor, (2, 8), costs, genes=genes, fixed_bits=8)
    _, seeds = evaluate_baselines(problem)
    run_algorithm(name, problem, Budget(problem, budget), pop_size=pop_size, seed=seed, extra_seeds=seeds)
    return problem


def prefix(problem, budget: float) -> list[Evaluation]:
    """The configurations a run had visited when its cumulative cost reached ``budget``."""
    total, spent, out = problem.metric.num_samples, 0.0, []
    for e in problem.visited:
        spent += evaluation_cost(e, total)
        if spent > budget + 1e-9:
            break
        out.append(e)
    return out


class HoldoutTable:
    """Hold-out accuracy of configurations, each computed once (quantization as the search set it)."""

    def __init__(self, qmodel, evaluator: Evaluator):
        self.qmodel, self.evaluator, self.values = qmodel, evaluator, {}

    def __call__(self, e: Evaluation) -> Evaluation:
        if e.bits not in self.values:
            self.qmodel.bit_widths = e.bits
            try:
                self.values[e.bits] = self.evaluator(self.qmodel)
            except NumericalError:
                self.values[e.bits] = 0.0
        return Evaluation(e.bits, self.values[e.bits], e.costs, 0.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1000-image search split instead of 3000")
    parser.add_argument("--budgets", default="50,100,200,400")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--algorithms", default=",".join(ALGORITHMS))
    parser.add_argument("--pop-size", type=int, default=20)
    parser.add_argument("--anytime-to", type=float, default=None,
                        help="run random and nsga2 on to this budget (default: the largest of --budgets)")
    args = parser.parse_args()
    budgets = [float(b) for b in args.budgets.split(",")]
    anytime_to = max(max(budgets), args.anytime_to or 0.0)
    seeds = [int(s) for s in args.seeds.split(",")]
    algorithms = args.algorithms.split(",")
    print(f"start: {uptime()}; torch threads {torch.get_num_threads()}, OMP_NUM_THREADS="
          f"{os.environ.get('OMP_NUM_THREADS', 'unset')}", flush=True)
    clock = time.perf_counter()
    qmodel, search, holdout_eval, fp32, costs, genes = setup(args.quick)
    floor, holdout_floor = fp32["search"] - 0.01, fp32["holdout"] - 0.01
    search.reject_below(floor)
    shared = SharedResults(search)
    holdout = HoldoutTable(qmodel, holdout_eval)
    bops = costs[0]
    w8a8 = bops({n: 8 for n in qmodel.quantizer_names})
    ref8, ref32 = {"bops": w8a8}, {"bops": bops.fp32}
    print(f"fashion-vit, {len(genes)} genes (W+A, 2:8), cost bops; search split {search.num_samples} images, FP32 "
          f"{100 * fp32['search']:.2f} %, floor {100 * floor:.2f} %; hold-out {holdout_eval.num_samples} images, "
          f"FP32 {100 * fp32['holdout']:.2f} %; early rejection on (99.9 %)", flush=True)

    hv = {a: {b: [] for b in budgets} for a in algorithms}  # against W8A8
    hv32 = {a: {b: [] for b in budgets} for a in algorithms}  # against FP32 (convergence.py)
    hvh = {a: {b: [] for b in budgets} for a in algorithms}  # the front on the hold-out split, against W8A8
    cheapest = {a: [] for a in algorithms}  # at the largest budget: cheapest point within 1 point of FP32
    fine = {a: [] for a in algorithms if a in ANYTIME}
    grid = np.arange(1, int(anytime_to) + 1, dtype=float)
    last_runs: dict[str, list] = {a: [] for a in algorithms}
    for name in algorithms:
        start = time.perf_counter()
        for seed in seeds:
            if name in ANYTIME:  # one run on to anytime_to, read at each budget through prefix()
                runs = {max(budgets): run_one(name, anytime_to, seed, qmodel, shared, floor, costs, genes,
                                              args.pop_size)}
            elif name == "guided" or seed == seeds[0]:
                runs = {b: run_one(name, b, seed, qmodel, shared, floor, costs, genes, args.pop_size)
                        for b in budgets}
            for b in budgets:
                seen = prefix(runs[b] if b in runs else runs[max(budgets)], b)
                front = pareto_front([e for e in seen], floor, ["bops"])
                hv[name][b].append(hypervolume(seen, floor, ref8, ["bops"]))
                hv32[name][b].append(hypervolume(seen, floor, ref32, ["bops"]))
                hvh[name][b].append(hypervolume([holdout(e) for e in front], holdout_floor, ref8, ["bops"]))
            if name in ANYTIME:
                seen_all = runs[max(budgets)]
                fine[name].append([hypervolume(prefix(seen_all, g), floor, ref8, ["bops"]) for g in grid])
            final = prefix(runs[max(budgets)], max(budgets))
            last_runs[name].append(final)
            within = [e for e in pareto_front(final, floor, ["bops"])]
            if within:
                best = within[0]  # cheapest first
                cheapest[name].append((best.costs["bops"] / w8a8, best.accuracy, holdout(best).accuracy))
        print(f"  {name}: {time.perf_counter() - start:.0f} s, {shared.computed} configurations computed so far; "
              "mean HV " + ", ".join(f"@{b:.0f} {np.mean(hv[name][b]):.4f}" for b in budgets) + "; hold-out "
              + ", ".join(f"@{b:.0f} {np.mean(hvh[name][b]):.4f}" for b in budgets), flush=True)

    mean = {a: {b: float(np.mean(v)) for b, v in hv[a].items()} for a in algorithms}
    best = max([v for a in algorithms for v in mean[a].values()]
               + [float(np.max(np.mean(fine[a], axis=0))) for a in fine])

    def needed(name):
        if name in fine:
            means = np.mean(fine[name], axis=0)
            hit = np.flatnonzero(means >= 0.99 * best)
            return f"{grid[hit[0]]:.0f}" if len(hit) else f"> {anytime_to:.0f}"
        hit = [b for b in budgets if mean[name][b] >= 0.99 * best]
        return f"{hit[0]:.0f}" if hit else f"> {max(budgets):.0f}"

    def cells(table, a, fmt):
        return [fmt.format(np.mean(table[a][b])) for b in budgets]

    header = ["algorithm", *[f"HV @ {b:.0f}" for b in budgets], "budget to 99 %",
              *[f"hold-out HV @ {b:.0f}" for b in budgets], *[f"HV/FP32 @ {b:.0f}" for b in budgets]]
    rows = [[a, *cells(hv, a, "{:.4f}"), needed(a), *cells(hvh, a, "{:.4f}"), *cells(hv32, a, "{:.4f}")]
            for a in algorithms]
    print(f"\nMean over seeds {seeds} (HV: reference (floor, W8A8 BOPs); hold-out HV: each front on the hold-out "
          f"split; HV/FP32: reference (floor, FP32 BOPs)); best mean HV {best:.4f}\n" + format_table(header, rows))
    for a in algorithms:
        spread = "  ".join(f"{b:.0f}: " + ",".join(f"{v:.4f}" for v in hv[a][b]) for b in budgets)
        print(f"  {a:7} HV per seed  {spread}")

    if anytime_to > max(budgets):
        marks = sorted({*[max(budgets) * 2 ** k for k in range(1, 8) if max(budgets) * 2 ** k < anytime_to],
                        anytime_to})
        for a in fine:
            curve = np.mean(fine[a], axis=0)
            print(f"  {a:7} mean HV run on: " + ", ".join(f"@{g:.0f} {curve[int(g) - 1]:.4f}" for g in marks)
                  + f" (99 % of the best: {0.99 * best:.4f})")

    print(f"\nCheapest front point at budget {max(budgets):.0f} (BOPs / W8A8, search %, hold-out %), per seed:")
    for a in algorithms:
        print(f"  {a:7} " + "  ".join(f"{c:.3f} ({100 * s:.2f}, {100 * h:.2f})" for c, s, h in cheapest[a]))

    print("\nEarly rejection at the largest budget (images saved; rejected configurations that meet the floor in "
          "full):")
    full = Evaluator([(x, y) for x, y in search.batches], batch_size=search.batches[0][0].shape[0])
    for a in [a for a in ("nsga2", "guided") if a in algorithms]:
        saved, total, rejected, wrong = 0.0, 0.0, 0, 0
        for visited in last_runs[a]:
            for e in visited:
                n = (e.extra or {}).get("samples", search.num_samples)
                saved += search.num_samples - n
                total += search.num_samples
                if e.status == "rejected":
                    rejected += 1
                    qmodel.bit_widths = e.bits
                    wrong += full(qmodel) >= floor
        print(f"  {a:7} {100 * saved / total:.1f} % of images saved; {rejected} rejected, {wrong} of them feasible "
              "in full")
    print(f"\nend: {uptime()}; wall time {time.perf_counter() - clock:.0f} s")


if __name__ == "__main__":
    main()
