"""The Pareto front: the feasible, non-dominated evaluations, cheapest first; and its hypervolume.

The hypervolume is measured against a fixed reference point, the bound and the FP32 costs (see
:mod:`quantsearch.run.convergence`), so the numbers of different generations compare."""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
from pymoo.util.nds.non_dominated_sorting import NonDominatedSorting

from .bound import Bound
from .problem import Evaluation

__all__ = ["pareto_front", "hypervolume", "is_feasible"]


def pareto_front(evaluations: Sequence[Evaluation], bound: Bound | float,
                 cost_names: Sequence[str] | None = None) -> list[Evaluation]:
    """Feasible, non-dominated evaluations (best metric, min every cost), cheapest first.

    ``bound`` is a :class:`Bound` (a number is a top-1-style floor).
    """
    bound = Bound.of(bound)
    sign = -bound.sign
    feasible = {e.bits: e for e in evaluations if is_feasible(e, bound)}
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


def is_feasible(e: Evaluation, bound: Bound) -> bool:
    return e.status == "ok" and bound.holds(e.accuracy)


def hypervolume(evaluations: Sequence[Evaluation], bound: Bound | float, fp32_costs: Mapping[str, float],
                cost_names: Sequence[str] | None = None) -> float:
    """Hypervolume of the feasible ``evaluations``: objectives ``(-100 x accuracy, cost / FP32 cost, ...)``
    against the reference ``(-100 x limit, 1, ...)``; for a lower-is-better metric (KL) the first objective is
    ``+100 x metric`` and the reference the ceiling."""
    from pymoo.indicators.hv import HV

    bound = Bound.of(bound)
    feasible = [e for e in evaluations if is_feasible(e, bound)]
    if not feasible:
        return 0.0
    sign = -100.0 * bound.sign
    cost_names = list(cost_names or feasible[0].costs)
    points = np.array([[sign * e.accuracy] + [e.costs[c] / fp32_costs[c] for c in cost_names]
                       for e in feasible])
    reference = np.array([sign * bound.limit] + [1.0] * len(cost_names))
    inside = points[np.all(points < reference, axis=1)]
    return float(HV(ref_point=reference)(inside)) if len(inside) else 0.0
