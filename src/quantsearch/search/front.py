"""The Pareto front: the feasible, non-dominated evaluations, cheapest first."""
from __future__ import annotations

from typing import Sequence

import numpy as np
from pymoo.util.nds.non_dominated_sorting import NonDominatedSorting

from .bound import Bound
from .problem import Evaluation

__all__ = ["pareto_front"]


def pareto_front(evaluations: Sequence[Evaluation], bound: Bound | float,
                 cost_names: Sequence[str] | None = None) -> list[Evaluation]:
    """Feasible, non-dominated evaluations (best metric, min every cost), cheapest first.

    ``bound`` is a :class:`Bound` (a number is a top-1-style floor).
    """
    bound = Bound.of(bound)
    sign = -bound.sign
    feasible = {e.bits: e for e in evaluations if e.status == "ok" and bound.holds(e.accuracy)}
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
