"""HAWQ / ModelOpt-style integer program: least summed sensitivity under a cost budget, solved exactly.

Variables: one binary ``x[g, b]`` per gene and width of its range, exactly one per gene. Objective: the summed
modelled drop ``sum d_g(b) x[g, b]`` (:class:`~quantsearch.surrogate.AdditiveModel`), plus ``1e-7`` x the cost as a
fraction of the all-top cost, so that among equally accurate solutions the cheapest is returned. Constraint: the
cost, exactly as :class:`~quantsearch.surrogate.GeneCosts` writes it, at most the budget. Its pairwise terms
``c * b_g * b_h`` (BOPs of a weight and its input, or of two activations) are exact in one of two forms. A pair whose
genes are in no other pair (every pair of the demo ViT's 22) is one binary per joint choice ``x[(g, h), a, b]``,
replacing both genes' one-hot slots. Any other pair gets one continuous ``y[a, b] in [0, 1]`` per pair of widths,
whose row and column sums are the one-hot choices ``x[g, a]`` and ``x[h, b]``: for binary ``x`` the only solution
is ``y[a, b] = x[g, a] x[h, b]``. Both relaxations are the pair's convex hull, the tightest linear one (a big-M form
made HiGHS branch for its whole time limit on the demo ViT); the joint form has no continuous variables or marginal
rows and solves about 4x faster (benchmarks/bench_time_split.py). Solved by HiGHS through ``scipy.optimize.milp``.

:func:`ilp_sweep` solves it for a sweep of budgets between the cheapest one whose optimum keeps the modelled drop
within ``span`` times the allowed drop and the cheapest one with no modelled drop at all; :func:`ilp_search`
evaluates the solutions, coarse to fine, within an evaluation budget.
"""
from __future__ import annotations

import math
import os
import sys
from contextlib import contextmanager
from typing import Iterator

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp

from .surrogate import AdditiveModel

__all__ = ["solve_ilp", "min_cost_for_drop", "sweep_budgets", "ilp_solutions", "ilp_sweep", "coarse_to_fine",
           "ilp_search"]

_TIE = 1e-7
MIP_GAP = 0.0  # solved to optimality (0.2 to 0.6 s per solve on the demo's 58 genes)


@contextmanager
def _quiet_stdout():
    """HiGHS prints debug lines (``transformNewIntegerFeasibleSolution``) from C++ straight to file descriptor 1."""
    sys.stdout.flush()
    saved, devnull = os.dup(1), os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    try:
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)
        os.close(devnull)


class _Program:
    """The variables and rows shared by both forms of the program.

    A pair whose two genes are in no other pair (a weight and the one activation that feeds it, under BOPs) is
    one binary per joint choice ``x[(i, j), a, b]``, one of them set: the convex hull of the pair, as the product
    form's relaxation is, with no continuous variables or marginal rows (on the demo ViT every pair is such, and a
    solve takes about a quarter of the time). Other pairs keep the product form over their genes' one-hot slots.
    """

    def __init__(self, model: AdditiveModel):
        costs = model.costs
        self.model = model
        self.lo, self.hi = costs.lo.astype(int), costs.hi.astype(int)
        pairs = costs.pairs
        degree = np.zeros(len(self.lo), dtype=int)
        for i, j, _ in pairs:
            degree[i] += 1
            degree[j] += 1
        joint = [k for k, (i, j, _) in enumerate(pairs) if i != j and degree[i] == 1 and degree[j] == 1]
        joined = {g for k in joint for g in pairs[k][:2]}
        widths = lambda g: range(self.lo[g], self.hi[g] + 1)  # noqa: E731
        # a slot: ((gene, width), ...) it sets: one gene's width, or a joined pair's two
        self.slots = [((i, b),) for i in range(len(self.lo)) if i not in joined for b in widths(i)]
        self.slots += [((pairs[k][0], a), (pairs[k][1], b)) for k in joint
                       for a in widths(pairs[k][0]) for b in widths(pairs[k][1])]
        slot = {s[0]: n for n, s in enumerate(self.slots) if len(s) == 1}
        self.n_x = len(self.slots)
        # one continuous y[k, a, b] per other pair k = (i, j) and widths a of gene i, b of gene j: x[i,a] x[j,b]
        self.products = [(k, a, b) for k, (i, j, _) in enumerate(pairs) if k not in joint
                         for a in widths(i) for b in widths(j)]
        self.n_z = len(self.products)
        n = self.n_x + self.n_z
        drop = lambda g, b: model.drops[g, b] if b != self.hi[g] or np.isfinite(model.drops[g, b]) else 0.0  # noqa: E731
        drops = np.array([sum(drop(g, b) for g, b in s) for s in self.slots])
        self.allowed = np.isfinite(drops)  # an unmodelled gene stays at its top
        self.drop = np.where(self.allowed, drops, 0.0)
        self.cost_row = np.zeros(n)
        pair_cost = {(pairs[k][0], pairs[k][1]): pairs[k][2] for k in joint}
        self.cost_row[: self.n_x] = [sum(costs.unary[g, b] for g, b in s) + (
            pair_cost[(s[0][0], s[1][0])] * s[0][1] * s[1][1] if len(s) == 2 else 0.0) for s in self.slots]
        self.cost_row[self.n_x:] = [pairs[k][2] * a * b for k, a, b in self.products]
        rows, lb, ub = [], [], []
        choices: dict[int, list[int]] = {}  # a choice by its first gene: a gene's widths, or a pair's joint ones
        for m, s in enumerate(self.slots):
            choices.setdefault(s[0][0], []).append(m)
        for i in sorted(choices):  # exactly one slot per choice
            row = np.zeros(n)
            row[choices[i]] = 1
            rows.append(row), lb.append(1), ub.append(1)
        # the products' marginals are the one-hot choices: sum_b y[k,a,b] = x[i,a] and sum_a y[k,a,b] = x[j,b]
        # (exact for binary x, and the tightest linear form, so HiGHS needs no big-M branching)
        marginals: dict[tuple, np.ndarray] = {}
        for z, (k, a, b) in enumerate(self.products):
            i, j, _ = pairs[k]
            for key, x_slot in (((k, "a", a), slot[(i, a)]), ((k, "b", b), slot[(j, b)])):
                if key not in marginals:
                    marginals[key] = np.zeros(n)
                    marginals[key][x_slot] = -1
                marginals[key][self.n_x + z] = 1
        for row in marginals.values():
            rows.append(row), lb.append(0), ub.append(0)
        self.rows, self.lb, self.ub = rows, lb, ub
        self.integrality = np.r_[np.ones(self.n_x), np.zeros(self.n_z)]
        self.bounds = Bounds(np.zeros(n), np.r_[np.where(self.allowed, 1.0, 0.0), np.ones(self.n_z)])
        self.top_cost = float(costs.values(np.array([self.hi]))[0])

    def solve(self, objective: np.ndarray, extra_row: np.ndarray, extra_ub: float, time_limit: float):
        constraints = LinearConstraint(np.array(self.rows + [extra_row]), np.array(self.lb + [-np.inf]),
                                       np.array(self.ub + [extra_ub]))
        with _quiet_stdout():
            result = milp(objective, integrality=self.integrality, bounds=self.bounds, constraints=constraints,
                          options={"time_limit": time_limit, "mip_rel_gap": MIP_GAP})
        if result.x is None:
            return None
        genome = np.array(self.hi)
        for k, s in enumerate(self.slots):
            if result.x[k] > 0.5:
                for i, b in s:
                    genome[i] = b
        return genome

    def tie_break(self) -> np.ndarray:
        return _TIE * self.cost_row / max(self.top_cost, 1e-300)


def solve_ilp(model: AdditiveModel, budget: float, time_limit: float = 30.0) -> np.ndarray | None:
    """The genome of least summed modelled drop whose cost is at most ``budget`` (None: no genome fits)."""
    program = _Program(model)
    objective = np.r_[program.drop, np.zeros(program.n_z)] + program.tie_break()
    return program.solve(objective, program.cost_row, budget - model.costs.constant, time_limit)


def min_cost_for_drop(model: AdditiveModel, max_drop: float, time_limit: float = 30.0) -> np.ndarray | None:
    """The cheapest genome whose summed modelled drop is at most ``max_drop``."""
    program = _Program(model)
    row = np.r_[program.drop, np.zeros(program.n_z)]
    return program.solve(program.cost_row.copy(), row, max_drop, time_limit)


def coarse_to_fine(n: int) -> list[int]:
    """Indices ``0..n-1`` in bisection order (middle, then quarters, ...), so that any prefix spreads out."""
    order, seen = [], set()
    if n <= 0:
        return order
    level = 1
    while len(order) < n:
        for k in range(1, 2 * level, 2):
            i = min(n - 1, int(k * n / (2 * level)))
            if i not in seen:
                seen.add(i)
                order.append(i)
        level *= 2
        if level > 4 * n:
            order.extend(i for i in range(n) if i not in seen)
            break
    return order


def sweep_budgets(model: AdditiveModel, count: int, allowed_drop: float, span: float = 2.0,
                  time_limit: float = 30.0) -> list[float]:
    """``count`` cost budgets spaced evenly in log cost, in coarse-to-fine order: from the cheapest cost whose
    optimum stays within ``span * allowed_drop`` of modelled drop (``allowed_drop``: the reference minus the floor)
    up to the cheapest cost with no modelled drop (two solves; empty when either has no solution)."""
    costs = model.costs
    cheap = min_cost_for_drop(model, span * max(allowed_drop, 0.0) + 1e-12, time_limit)
    free = min_cost_for_drop(model, 1e-12, time_limit)
    if cheap is None or free is None:
        return []
    low, high = costs.value(cheap), costs.value(free)
    if count <= 1 or high <= low * (1 + 1e-9):
        return [low]
    budgets = list(np.exp(np.linspace(math.log(low), math.log(high), count)))
    return [budgets[k] for k in coarse_to_fine(len(budgets))]


def ilp_solutions(model: AdditiveModel, budgets, time_limit: float = 30.0) -> Iterator[np.ndarray]:
    """The distinct ILP solutions for ``budgets``, in order, each solved only when it is asked for."""
    seen = set()
    for budget in budgets:
        genome = solve_ilp(model, budget * (1 + 1e-9), time_limit)
        if genome is not None and tuple(genome) not in seen:
            seen.add(tuple(genome))
            yield genome


def ilp_sweep(model: AdditiveModel, count: int, allowed_drop: float, span: float = 2.0,
              time_limit: float = 30.0) -> list[np.ndarray]:
    """Distinct ILP solutions for the ``count`` budgets of :func:`sweep_budgets`, in coarse-to-fine order."""
    return list(ilp_solutions(model, sweep_budgets(model, count, allowed_drop, span, time_limit), time_limit))


def ilp_search(problem, model: AdditiveModel, budget, allowed_drop: float, span: float = 2.0,
               sweep: int | None = None, max_sweep: int = 32, rounds: int = 2) -> list[np.ndarray]:
    """Evaluate ILP solutions for a sweep of budgets (coarse to fine) until the evaluation ``budget`` is spent.

    ``sweep`` budgets (default: as many as whole evaluations are left, at most ``max_sweep``, at least 2); while
    evaluations are left and a finer sweep still finds new solutions, the sweep is doubled (``rounds`` sweeps at
    most: each solve takes a fraction of a second, and neighbouring budgets mostly give the same solution).
    Returns the solutions in the order evaluated.
    """
    count = sweep if sweep is not None else max(2, min(max_sweep, int(math.floor(budget.left))))
    evaluated, seen = [], set()
    for _ in range(rounds):
        new = [g for g in ilp_sweep(model, count, allowed_drop, span) if tuple(g) not in seen]
        if not new:
            break
        seen.update(tuple(g) for g in new)
        evaluated.extend(new[:len(budget.evaluate(new))])
        if budget.exhausted or sweep is not None:
            break
        count *= 2
    return evaluated
