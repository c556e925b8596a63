"""Initial populations: uniform configurations first, then random integers.

Seeding every uniform configuration (all quantizers at b bits, for each b in range, each gene clipped to its own
range) means the front can never be worse than plain uniform quantization.
"""
from __future__ import annotations

import numpy as np
from pymoo.core.sampling import Sampling

__all__ = ["uniform_configurations", "uniform_genomes", "UniformSeededSampling", "BudgetedSampling"]


def uniform_configurations(n_var: int, lo: int, hi: int) -> np.ndarray:
    """One row per bit-width in ``[lo, hi]``, highest first, every gene at that width."""
    return np.array([[b] * n_var for b in range(hi, lo - 1, -1)], dtype=int)


def uniform_genomes(problem) -> np.ndarray:
    """The uniform configurations of ``problem``: each width of its widest range, clipped to every gene's own
    range, highest first, each once."""
    lo, hi = np.asarray(problem.xl, dtype=int), np.asarray(problem.xu, dtype=int)
    rows = np.clip(uniform_configurations(problem.n_var, int(lo.min()), int(hi.max())), lo, hi)
    return np.array(list(dict.fromkeys(map(tuple, rows.tolist()))), dtype=int).reshape(-1, problem.n_var)


class UniformSeededSampling(Sampling):
    """Uniform configurations (and any ``extra`` rows) followed by uniformly random integer genes; ``first`` rows
    (a guided search's seeds) go before the uniform ones.

    ``keep_all`` returns every seed even beyond the population size: pymoo keeps a whole first population, and
    survival trims it to the population size after the first offspring."""

    def __init__(self, extra: np.ndarray | None = None, first: np.ndarray | None = None, keep_all: bool = False):
        super().__init__()
        self.extra, self.first, self.keep_all = extra, first, keep_all

    def _do(self, problem, n_samples, random_state=None, **kwargs):
        lo, hi = np.asarray(problem.xl, dtype=int), np.asarray(problem.xu, dtype=int)
        seeds = [] if self.first is None or not len(self.first) else [
            np.asarray(self.first, dtype=int).reshape(-1, problem.n_var)]
        seeds.append(uniform_genomes(problem))
        if self.extra is not None and len(self.extra):
            seeds.append(np.asarray(self.extra, dtype=int).reshape(-1, problem.n_var))
        rows = list(dict.fromkeys(map(tuple, np.concatenate(seeds).tolist())))
        rows = rows if self.keep_all else rows[:n_samples]
        rows = np.array(rows, dtype=int).reshape(-1, problem.n_var)
        rest = random_state.integers(lo, hi + 1, size=(max(0, n_samples - len(rows)), problem.n_var))
        return np.concatenate([rows, rest]).astype(int)


class BudgetedSampling(Sampling):
    """Another sampling's first population, cut to what a :class:`~quantsearch.search.budget.Budget` pays for (a
    first population is evaluated whole, whatever the budget says)."""

    def __init__(self, inner: Sampling, budget):
        super().__init__()
        self.inner, self.budget = inner, budget

    def _do(self, problem, n_samples, random_state=None, **kwargs):
        rows = self.inner._do(problem, n_samples, random_state=random_state, **kwargs)
        kept = self.budget.affordable(np.rint(np.asarray(rows, dtype=float)).astype(int).tolist(), problem)
        return np.asarray(kept, dtype=int).reshape(-1, problem.n_var)
