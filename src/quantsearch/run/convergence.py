"""Convergence of a search: hypervolume and feasible fraction per generation, from the run store's evaluations.

**Hypervolume, and its fixed reference point.** Each feasible evaluation is the point
``(-100 * accuracy, cost_1 / fp32_1, ..., cost_k / fp32_k)``, to minimise: accuracy in percentage points, each
cost as a fraction of the FP32 model's. The reference point is ``(-100 * floor, 1, ..., 1)``: the
accuracy floor and the FP32 cost. It is fixed for a run (it never moves with the population), so the numbers of
different generations compare. With one cost, the hypervolume is an area in *accuracy points above the floor
x fraction of the FP32 cost saved*: a single point at 2 points above the floor and a quarter of the FP32 cost
scores 2 x 0.75 = 1.5. Infeasible and failed evaluations add nothing.

**Per generation.** The run store records the generation in which each configuration was first evaluated
(0: the uniform baselines before the search; 1: the initial population; then one per NSGA-II generation). The
hypervolume of generation g is that of every evaluation up to and including g (the front the run would return
if it stopped there); the feasible fraction of g is over the evaluations new in g (NaN when g had none).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Sequence

from ..search.bound import Bound
from ..search.front import hypervolume, is_feasible as _feasible
from ..search.problem import Evaluation

__all__ = ["Convergence", "hypervolume", "convergence", "REFERENCE_POINT"]

REFERENCE_POINT = ("(accuracy floor, FP32 cost): objectives are (-100 x accuracy, cost / FP32 cost) per cost, "
                   "reference (-100 x floor, 1, ...); units: accuracy points above the floor x fraction of the "
                   "FP32 cost saved")


@dataclass(frozen=True)
class Convergence:
    """Per generation (every generation from the first to the last recorded, in order)."""

    generations: list[int]
    evaluations: list[int]  # configurations first evaluated in that generation
    feasible: list[int]  # of those, how many met the floor
    hypervolume: list[float]  # of everything evaluated up to and including that generation

    @property
    def feasible_fraction(self) -> list[float]:
        return [f / n if n else math.nan for f, n in zip(self.feasible, self.evaluations)]

    def rows(self) -> list[list]:
        return [[g, n, f, "" if math.isnan(r) else f"{r:.4f}", f"{h:.6g}"]
                for g, n, f, r, h in zip(self.generations, self.evaluations, self.feasible,
                                         self.feasible_fraction, self.hypervolume)]

    HEADER = ("generation", "evaluations", "feasible", "feasible_fraction", "hypervolume")


def convergence(evaluations: Sequence[tuple[Evaluation, int]], bound: Bound | float,
                fp32_costs: Mapping[str, float], cost_names: Sequence[str] | None = None) -> Convergence:
    """Per-generation hypervolume and feasibility of ``(evaluation, generation)`` pairs (a run store's)."""
    if not evaluations:
        return Convergence([], [], [], [])
    by_generation: dict[int, list[Evaluation]] = {}
    for e, g in evaluations:
        by_generation.setdefault(int(g), []).append(e)
    generations = list(range(min(by_generation), max(by_generation) + 1))
    seen: list[Evaluation] = []
    counts, feasible, volumes = [], [], []
    for g in generations:
        new = by_generation.get(g, [])
        seen.extend(new)
        counts.append(len(new))
        feasible.append(sum(_feasible(e, Bound.of(bound)) for e in new))
        volumes.append(hypervolume(seen, bound, fp32_costs, cost_names))
    return Convergence(generations, counts, feasible, volumes)
