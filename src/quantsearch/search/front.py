"""The Pareto front: the feasible, non-dominated evaluations, cheapest first."""
from __future__ import annotations

from typing import Sequence

import numpy as np
from pymoo.util.nds.non_dominated_sorting import NonDominatedSorting

from .problem import Evaluation

__all__ = ["pareto_front"]


def pareto_front(evaluations: Sequence[Evaluation], min_accuracy: float,
                 cost_names: Sequence[str] | None = None, higher_is_better: bool = True) -> list[Evaluation]:
    """Feasible, non-dominated evaluations (best metric, min every cost), cheapest first.

    ``higher_is_better=False`` (a metric such as KL divergence) makes ``min_accuracy`` a ceiling.
    """
    sign = -1.0 if higher_is_better else 1.0
    feasible = {e.bits: e for e in evaluations if e.status == "ok" and sign * (e.accuracy - min_accuracy) <= 0}
    points = list(feasible.values())
    if not points:
        return []
    cost_names = list(cost_names or points[0].costs)
    F = np.array([[sign * e.accuracy] + [e.costs[c] for c in cost_names] for e in points])
    front = [points[i] for i in NonDominatedSorting().do(F, only_non_dominated_front=True)]
    # equal objective vectors (different bits, same scores) are kept once
    unique = {}
    for e in sorted(front, key=lambda e: ([e.costs[c] for c in cost_names], sign * e.accuracy, e.bits)):
        unique.setdefault((e.accuracy, *[e.costs[c] for c in cost_names]), e)
    return list(unique.values())
