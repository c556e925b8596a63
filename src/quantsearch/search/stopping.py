"""Stop a search when its front stops moving: a convergence test on the search split's hypervolume.

The budget is the upper bound; this ends a search earlier once more evaluations stop paying. After each
generation (and each population-sized slice of a guided search's seeds) :class:`FrontStop` takes the
hypervolume of every feasible configuration visited so far (:func:`~quantsearch.search.front.hypervolume`,
against the bound and the FP32 costs, so it is the ``convergence.csv`` figure). The search stops once
``patience`` checks in a row each gained less than ``min_gain`` of the hypervolume before them (relative gain;
no feasible point yet never counts as converged).

It reads only the problem's visited configurations, in the order they were asked for, so a resumed run and a run
on a parallel pool stop exactly where the uninterrupted serial run stops.
"""
from __future__ import annotations

from pymoo.core.termination import Termination

from .front import hypervolume

__all__ = ["FrontStop", "FrontStopTermination"]


class FrontStop:
    """``patience`` checks in a row with a relative hypervolume gain below ``min_gain`` (0 patience: never)."""

    def __init__(self, problem, patience: int = 2, min_gain: float = 1e-3):
        if int(patience) < 0 or float(min_gain) < 0:
            raise ValueError(f"patience and min_gain must be >= 0, got {patience} and {min_gain}")
        self.problem, self.patience, self.min_gain = problem, int(patience), float(min_gain)
        self.history: list[float] = []  # hypervolume at each check
        self.calm = 0  # checks in a row below min_gain
        self.converged_at: int | None = None  # the check (1-based) that ended the search
        self._seen = -1  # visited configurations at the last check

    def hypervolume(self) -> float:
        problem = self.problem
        fp32 = {c.name: c.fp32 for c in problem.costs}
        points = [e for e in problem.visited if problem.in_space(e.bits)]
        return hypervolume(points, problem.bound, fp32, list(fp32))

    def check(self) -> bool:
        """Take the hypervolume now; whether the search has converged (it stays converged once it has). A check
        with nothing new visited since the last one does not count (a generation of known configurations)."""
        if self.converged_at is not None or len(self.problem.visited) == self._seen:
            return self.converged_at is not None
        self._seen = len(self.problem.visited)
        now = self.hypervolume()
        before = self.history[-1] if self.history else None
        self.history.append(now)
        if before is not None and before > 0 and now - before < self.min_gain * before:
            self.calm += 1
        else:
            self.calm = 0
        if self.patience and self.calm >= self.patience:
            self.converged_at = len(self.history)
        return self.converged_at is not None

    def summary(self) -> dict:
        return {"patience": self.patience, "min_gain": self.min_gain, "checks": len(self.history),
                "converged_at_check": self.converged_at, "hypervolumes": [round(h, 6) for h in self.history]}


class FrontStopTermination(Termination):
    """pymoo's view of a :class:`FrontStop`: checked once per generation (pymoo updates a termination after each)."""

    def __init__(self, stop: FrontStop):
        super().__init__()
        self.stop = stop

    def _update(self, algorithm) -> float:
        return 1.0 if self.stop.check() else 0.0
