"""Sensitivity-guided NSGA-II: seeded from the greedy path and ILP solutions, mutating insensitive genes more,
and (optionally) skipping offspring that the additive model predicts far below the floor.

:func:`guided_nsga2` builds a pymoo ``NSGA2`` (so ``run_search`` / ``pymoo.optimize.minimize`` run it as any
other algorithm) from an :class:`~quantsearch.surrogate.AdditiveModel`:

- **Seeds** (:func:`guided_seeds`): the first population holds every uniform configuration, any extra seeds (the
  run's baselines), ILP solutions for a sweep of cost budgets and the greedy path's steps around its predicted floor
  crossing; random genomes fill what is left.
- **Mutation** (:class:`SensitivityMutation`): each offspring moves about one gene by one or two bits, the gene
  drawn with probability proportional to ``0.2 / n + 0.8 * w_g``, where ``w_g`` (normalised) is the cost one bit
  saves on gene ``g`` divided by the modelled drop that bit costs: cheap-to-lower genes move most, genes that save
  nothing (an activation no multiply reads, under BOPs) hardly move.
- **Pre-screen** (:class:`ScreenedMating`): an offspring whose predicted drop, scaled by the ratio of measured to
  predicted drop fitted on everything evaluated so far, exceeds ``screen`` times the allowed drop (the reference
  minus the floor) is discarded before evaluation and another is bred in its place.
"""
from __future__ import annotations

import numpy as np
from pymoo.algorithms.moo.nsga2 import NSGA2
from pymoo.core.mating import Mating
from pymoo.core.mutation import Mutation
from pymoo.operators.crossover.sbx import SBX
from pymoo.operators.repair.rounding import RoundingRepair

from .baselines import greedy_path
from .ilp import coarse_to_fine, ilp_sweep
from .sampling import UniformSeededSampling, uniform_genomes
from .surrogate import AdditiveModel

__all__ = ["guided_seeds", "insensitivity_weights", "SensitivityMutation", "ScreenedMating", "guided_nsga2",
           "fit_drop_scale"]


def guided_seeds(model: AdditiveModel, count: int, allowed_drop: float, span: float = 2.0) -> np.ndarray:
    """Up to ``count`` distinct genomes: ILP solutions for a budget sweep, alternating with greedy-path steps
    around the step where the modelled drop crosses ``allowed_drop`` (both coarse to fine)."""
    if count <= 0:
        return np.zeros((0, model.drops.shape[0]), dtype=int)
    ilp = ilp_sweep(model, max(2, count), allowed_drop, span)
    path = greedy_path(model)
    drops = model.total_drop(np.array(path))
    window = [i for i, d in enumerate(drops) if d <= span * allowed_drop]
    steps = [path[window[k]] for k in coarse_to_fine(len(window))] if window else []
    seeds, seen = [], set()
    for pair in zip(ilp + [None] * len(steps), steps + [None] * len(ilp)):
        for genome in pair:
            if genome is not None and tuple(genome) not in seen and len(seeds) < count:
                seen.add(tuple(genome))
                seeds.append(np.asarray(genome, dtype=int))
    return np.array(seeds, dtype=int).reshape(-1, model.drops.shape[0])


def insensitivity_weights(model: AdditiveModel) -> np.ndarray:
    """Per gene, cost saved per modelled drop two bits below the top, normalised to sum to 1.

    A gene that saves no cost gets 0; one that saves cost but was not measured gets the median of the measured."""
    costs = model.costs
    hi, lo = costs.hi.astype(int), costs.lo.astype(int)
    n = len(hi)
    saved = costs.savings(hi)
    weights = np.zeros(n)
    finite = model.drops[np.isfinite(model.drops)]
    scale_drop = max(float(finite.max()) if finite.size else 0.0, 1e-6)
    unmeasured = []
    for i in range(n):
        if hi[i] <= lo[i]:
            continue
        b = max(lo[i], hi[i] - 2)  # two bits down: above the noise of one
        per_bit_saving = max(saved[i, b], 0.0) / (hi[i] - b)
        if per_bit_saving <= 0:
            continue
        if not np.isfinite(model.drops[i, b]):
            unmeasured.append(i)
            continue
        weights[i] = per_bit_saving / (model.drops[i, b] / (hi[i] - b) + 1e-3 * scale_drop)
    if unmeasured:
        known = weights[weights > 0]
        weights[unmeasured] = float(np.median(known)) if known.size else 1.0
    total = weights.sum()
    return weights / total if total > 0 else np.full(n, 1.0 / n)


class SensitivityMutation(Mutation):
    """Moves about ``genes_per_offspring`` genes by +-1 (or +-2, one time in four) bits, chosen by ``weights``."""

    def __init__(self, weights: np.ndarray, genes_per_offspring: float = 1.0, uniform_share: float = 0.2):
        super().__init__(prob=1.0)
        w = np.asarray(weights, dtype=float)
        self.p = uniform_share / len(w) + (1 - uniform_share) * w / max(w.sum(), 1e-300)
        self.rate = float(genes_per_offspring)

    def _do(self, problem, X, *args, random_state=None, **kwargs):
        X = np.rint(np.asarray(X, dtype=float)).astype(int)
        lo, hi = np.asarray(problem.xl, dtype=int), np.asarray(problem.xu, dtype=int)
        prob = np.minimum(1.0, self.rate * self.p)
        for row in X:
            chosen = np.flatnonzero(random_state.random(len(row)) < prob)
            if len(chosen) == 0:  # at least one gene moves
                chosen = [random_state.choice(len(row), p=self.p)]
            for i in chosen:
                step = random_state.choice([1, 2], p=[0.75, 0.25]) * random_state.choice([-1, 1])
                row[i] = np.clip(row[i] + step, lo[i], hi[i])
        return X


def fit_drop_scale(model: AdditiveModel, evaluations, problem) -> float:
    """Least-squares ratio of measured to modelled drop over ``ok`` evaluations in the space (in [0.25, 4])."""
    predicted, measured = [], []
    for e in evaluations:
        if e.status != "ok" or not problem.in_space(e.bits):
            continue
        genome = np.array([problem.genome(e.bits)])
        d = float(model.total_drop(genome)[0])
        if np.isfinite(d) and d > 0:
            predicted.append(d)
            measured.append(model.sign * (model.reference - e.accuracy))
        # genes never measured are left out of the fit's predictions: only fully modelled genomes count
    if not predicted:
        return 1.0
    p, m = np.array(predicted), np.array(measured)
    return float(np.clip((p * m).sum() / (p * p).sum(), 0.25, 4.0))


class ScreenedMating(Mating):
    """Mating that discards offspring predicted (drop x fitted scale) beyond ``screen`` x the allowed drop."""

    def __init__(self, selection, crossover, mutation, model: AdditiveModel, problem, allowed_drop: float,
                 screen: float = 3.0, **kwargs):
        super().__init__(selection, crossover, mutation, **kwargs)
        self.model, self.problem = model, problem
        self.limit = screen * max(allowed_drop, 1e-12)
        self.screened = 0
        self._scale, self._seen = 1.0, -1

    def _do(self, problem, pop, n_offsprings, **kwargs):
        off = super()._do(problem, pop, n_offsprings, **kwargs)
        if len(self.problem.visited) != self._seen:  # refit when configurations were added (resumed runs match)
            self._seen = len(self.problem.visited)
            self._scale = fit_drop_scale(self.model, self.problem.visited, self.problem)
        X = np.rint(np.asarray(off.get("X"), dtype=float)).astype(int)
        keep = self._scale * self.model.total_drop(X, known_only=True) <= self.limit
        self.screened += int((~keep).sum())
        return off[keep]


def guided_nsga2(problem, model: AdditiveModel, pop_size: int = 20, allowed_drop: float = 0.01,
                 extra_seeds: np.ndarray | None = None, screen: float | None = 3.0, span: float = 2.0) -> NSGA2:
    """NSGA-II with sensitivity seeds, biased mutation and (``screen`` not None) the surrogate pre-screen."""
    fixed_rows = [uniform_genomes(problem)]
    if extra_seeds is not None and len(extra_seeds):
        fixed_rows.append(np.asarray(extra_seeds, dtype=int).reshape(-1, problem.n_var))
    fixed = len({tuple(r) for r in np.concatenate(fixed_rows).tolist()})
    seeds = guided_seeds(model, max(pop_size - fixed, (pop_size + 1) // 2), allowed_drop, span)
    # the model's seeds first, so that a small population keeps them; then the uniform configurations and extras
    sampling = UniformSeededSampling(extra_seeds, first=seeds)
    crossover = SBX(prob=0.9, eta=15, vtype=float, repair=RoundingRepair())
    mutation = SensitivityMutation(insensitivity_weights(model))
    algorithm = NSGA2(pop_size=pop_size, sampling=sampling, crossover=crossover,
                      mutation=mutation, eliminate_duplicates=True)
    algorithm.seeds = seeds
    if screen is not None:
        mating = algorithm.mating
        algorithm.mating = ScreenedMating(mating.selection, crossover, mutation, model, problem, allowed_drop,
                                          screen, repair=mating.repair,
                                          eliminate_duplicates=mating.eliminate_duplicates,
                                          n_max_iterations=mating.n_max_iterations)
    return algorithm
