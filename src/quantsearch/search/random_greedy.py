"""Baseline searches: uniform random configurations, and the AMP-style greedy path.

Both are plain functions of a problem and a :class:`~quantsearch.budget.Budget`; every configuration goes through
the problem (cached, recorded by its listeners; side by side where it has a parallel runner).

**Greedy** (AIMET AMP's phase 3): start with every gene at the top of its range and repeatedly take the move (one
gene to a lower width) whose modelled accuracy loss per unit of cost saved is smallest, until no move saves cost;
the path depends only on the additive model (:class:`~quantsearch.surrogate.AdditiveModel`), so it is computed
first. Evaluating it: with a budget of at least the path's length every step is evaluated; otherwise, as AMP's
binary search does, a bisection finds the last step that meets the floor, and the steps around it are evaluated
next (two on the feasible side for one beyond), nearest first.
"""
from __future__ import annotations

from typing import Iterator

import numpy as np

from .surrogate import AdditiveModel

__all__ = ["random_search", "greedy_path", "greedy_order", "greedy_search"]


def random_search(problem, budget, seed: int = 0, max_tries: int = 100_000) -> list[np.ndarray]:
    """Evaluate uniformly random genomes until ``budget`` is spent; returns the genomes evaluated, in order."""
    rng = np.random.default_rng(seed)
    lo, hi = np.asarray(problem.xl, dtype=int), np.asarray(problem.xu, dtype=int)
    draws = (rng.integers(lo, hi + 1) for _ in range(max_tries))
    return [np.asarray(problem.genome(e.bits)) for e in budget.evaluate(draws)]


def greedy_path(model: AdditiveModel) -> list[np.ndarray]:
    """Genomes from all-top down, one move per step (smallest modelled drop per cost saved; ties: more saved)."""
    costs = model.costs
    lo, hi = costs.lo.astype(int), costs.hi.astype(int)
    genome = hi.copy()
    path = [genome.copy()]
    n, width = model.drops.shape
    bits = np.arange(width)
    while True:
        saved = costs.savings(genome)
        current = model.drops[np.arange(n), genome]
        with np.errstate(invalid="ignore"):
            loss = model.drops - current[:, None]
        valid = (bits[None, :] < genome[:, None]) & (bits[None, :] >= lo[:, None]) & (saved > 0) & np.isfinite(loss)
        if not valid.any():
            break
        ratio = np.where(valid, np.maximum(loss, 0.0) / np.where(valid, saved, 1.0), np.inf)
        best = ratio.min()
        ties = np.argwhere(ratio <= best * (1 + 1e-12) + 1e-300)
        i, b = max(ties.tolist(), key=lambda t: (saved[t[0], t[1]], -t[0]))
        genome[i] = b
        path.append(genome.copy())
    return path


def greedy_order(length: int, is_feasible) -> Iterator[int]:
    """Indices of a path of ``length`` steps to evaluate, in order: a bisection for the last step that meets the
    floor (``is_feasible(i)`` evaluates step ``i``; step 0 is assumed to), then the steps around it."""
    done = {0}
    yield 0
    good, bad = 0, length
    while bad - good > 1:
        mid = (good + bad) // 2
        done.add(mid)
        yield mid
        if is_feasible(mid):
            good = mid
        else:
            bad = mid
    below, above = good - 1, good + 1
    while below >= 0 or above < length:
        for _ in range(2):
            while below >= 0 and below in done:
                below -= 1
            if below >= 0:
                done.add(below)
                yield below
        while above < length and above in done:
            above += 1
        if above < length:
            done.add(above)
            yield above


def greedy_search(problem, model: AdditiveModel, budget) -> tuple[list[np.ndarray], list[int]]:
    """Evaluate the greedy path within ``budget``; returns the path and the indices evaluated, in order."""
    path = greedy_path(model)
    evaluated = []

    class Spent(Exception):
        """No whole evaluation left for a step the path has not visited yet."""

    def evaluate(i: int):
        if budget.whole_left < 1 and not problem.was_visited(path[i]):
            raise Spent
        return problem.evaluate_bits(path[i])

    if budget.left >= len(path):  # every step, side by side where the problem has a parallel runner
        return path, list(range(len(budget.evaluate(path))))
    try:
        for i in greedy_order(len(path), lambda i: problem.is_feasible(evaluate(i))):
            evaluate(i)
            evaluated.append(i)
    except Spent:
        pass
    return path, evaluated
