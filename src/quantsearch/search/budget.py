"""Evaluation budgets, counted in full-evaluation equivalents.

One full evaluation (every image of the search split) costs 1; an early-rejected one costs the fraction of the
split it ran. A budget counts every distinct configuration the problem was asked for (its ``visited`` list: the
uniform baselines and sensitivity measurements included, so algorithms that spend evaluations on preparation pay
for it from the same budget as the search), whether it was evaluated now or read from the cache of a run being
resumed: a resumed run then stops exactly where the uninterrupted one would have. Asking again for a configuration
already visited costs nothing.
"""
from __future__ import annotations

import itertools
import math
from typing import Iterable

from pymoo.core.termination import Termination

__all__ = ["evaluation_cost", "spent", "Budget", "BudgetTermination"]


def evaluation_cost(evaluation, total: int | None) -> float:
    """Full-evaluation equivalents of one evaluation: images run / split size (1 when either is unknown)."""
    samples = evaluation.extra.get("samples") if evaluation.extra else None
    return 1.0 if not total or samples is None else float(samples) / float(total)


def spent(problem) -> float:
    """Full-evaluation equivalents of every configuration ``problem`` visited."""
    total = getattr(problem.metric, "num_samples", None)
    return sum(evaluation_cost(e, total) for e in problem.visited)


class Budget:
    """``limit`` full-evaluation equivalents of ``problem`` (counted over all its evaluations)."""

    def __init__(self, problem, limit: float):
        self.problem, self.limit = problem, float(limit)
        self.charged = 0.0  # work that is not an evaluation of the problem (gradient sensitivities)

    def charge(self, amount: float) -> None:
        """Count ``amount`` full-evaluation equivalents of other work against the budget."""
        self.charged += float(amount)

    @property
    def spent(self) -> float:
        return spent(self.problem) + self.charged

    @property
    def left(self) -> float:
        return self.limit - self.spent

    @property
    def exhausted(self) -> bool:
        return self.left <= 1e-9

    @property
    def whole_left(self) -> int:
        """Whole evaluations that can still be paid for (an evaluation costs at most one)."""
        return max(0, math.floor(self.left + 1e-9))

    def affordable(self, rows, problem=None) -> list:
        """The first ``rows`` (genomes) that the budget pays for: known configurations are free, new ones cost
        one each."""
        problem, kept, new = problem or self.problem, [], 0
        for row in rows:
            known = problem.was_visited(row)
            if not known and new >= self.whole_left:
                break
            new += not known
            kept.append(row)
        return kept

    def evaluate(self, genomes: Iterable) -> list:
        """Evaluate ``genomes`` in order until the budget is spent; returns their evaluations.

        Each evaluation costs at most one, so as many as whole evaluations are left go at once through
        ``problem.evaluate_genomes`` (side by side on a parallel pool), then the rest of the budget is looked at
        again (early-rejected ones cost less, and configurations already known nothing). Less than one whole
        evaluation left ends it: the budget is never overspent.
        """
        pending, done = iter(genomes), []
        while self.whole_left >= 1:
            chunk = list(itertools.islice(pending, self.whole_left))
            if not chunk:
                break
            done.extend(self.problem.evaluate_genomes(chunk))
        return done


class BudgetTermination(Termination):
    """pymoo termination once a :class:`Budget` is spent, or after ``stall`` generations in a row that evaluated
    nothing new (every offspring already known: a converged search would otherwise never spend its budget).

    After each generation it also caps the next generation's offspring (``algorithm.n_offsprings``) at the whole
    evaluations left, and it stops once less than one is left, so the last generation never overshoots."""

    def __init__(self, budget: Budget, stall: int = 10):
        super().__init__()
        self.budget, self.stall = budget, int(stall)
        self._count, self._still = -1, 0
        self._offsprings = None

    def _update(self, algorithm) -> float:
        count = len(self.budget.problem.visited)
        self._still = self._still + 1 if count == self._count else 0
        self._count = count
        whole = self.budget.whole_left
        if getattr(algorithm, "n_offsprings", None):
            self._offsprings = self._offsprings or int(algorithm.n_offsprings)
            algorithm.n_offsprings = max(1, min(self._offsprings, whole))
        if self._still >= self.stall or self.budget.limit <= 0 or whole < 1:
            return 1.0
        return min(1.0, self.budget.spent / self.budget.limit)
