"""Sensitivity-guided NSGA-II: seeded from ILP solutions and the greedy path, bred with a mutation that favours
insensitive genes, and fed each generation with ILP solutions of the additive model refitted on every measurement.

:func:`guided_nsga2` builds a pymoo ``NSGA2`` (so ``run_search`` / ``pymoo.optimize.minimize`` run it as any
other algorithm) from an :class:`~quantsearch.surrogate.AdditiveModel`:

- **Seeds** (:func:`guided_seeds`): the first population holds ILP solutions for a sweep of cost budgets and the
  greedy path's steps around its predicted floor crossing, plus every uniform configuration and extra seed (the
  run's baselines); it may be larger than later populations.
- **Infill** (:class:`GuidedMating`): each generation the model is refitted on every evaluation so far (one weight
  per gene, ridge towards the estimate) and half the offspring are its ILP solutions across the cost range of the
  front found: where the measurements now say the best configuration of each cost lies.
- **Mutation** (:class:`SensitivityMutation`): each bred offspring moves about one gene by one or two bits, the
  gene drawn with probability proportional to ``0.2 / n + 0.8 * w_g``, where ``w_g`` (normalised) is the cost one
  bit saves on gene ``g`` divided by the modelled drop that bit costs: cheap-to-lower genes move most, genes that
  save nothing (an activation no multiply reads, under BOPs) hardly move.
- **Pre-screen**: a bred offspring the refitted model predicts to lose more than ``screen`` times the allowed drop
  (the reference minus the floor) is discarded before evaluation, and so is any configuration already evaluated.
"""
from __future__ import annotations

from typing import Iterator

import numpy as np
from pymoo.algorithms.moo.nsga2 import NSGA2
from pymoo.core.mating import Mating
from pymoo.core.mutation import Mutation
from pymoo.core.population import Population
from pymoo.operators.crossover.sbx import SBX
from pymoo.operators.repair.rounding import RoundingRepair

from .random_greedy import greedy_path
from .ilp import coarse_to_fine, ilp_solutions, solve_ilp, sweep_budgets
from .sampling import UniformSeededSampling, uniform_genomes
from .surrogate import AdditiveModel

__all__ = ["guided_seed_stream", "guided_seeds", "insensitivity_weights", "SensitivityMutation", "GuidedMating", "guided_nsga2"]


def guided_seed_stream(model: AdditiveModel, count: int, allowed_drop: float, span: float = 2.0,
                       ilp_share: float = 0.75) -> Iterator[np.ndarray]:
    """Up to ``count`` distinct genomes, drawn lazily from two families: ILP solutions for a sweep of ``count`` cost
    budgets and greedy-path steps around the step where the modelled drop crosses ``allowed_drop`` (both coarse to
    fine). Of the first ``n`` drawn, ``round(ilp_share * n)`` are ILP solutions while both last; then whichever
    family has more to give. An ILP is solved only when its seed is drawn, so a search that stops on its first
    seeds pays for those alone."""
    if count <= 0:
        return
    ilp = ilp_solutions(model, sweep_budgets(model, max(2, count), allowed_drop, span))
    path = greedy_path(model)
    drops = model.total_drop(np.array(path))
    window = [i for i, d in enumerate(drops) if d <= span * allowed_drop]
    steps = iter([path[window[k]] for k in coarse_to_fine(len(window))] if window else [])
    seen, drawn, from_ilp = set(), 0, 0
    while drawn < count:
        wants_ilp = from_ilp < round(ilp_share * (drawn + 1))
        genome = None
        for family, is_ilp in ((ilp, True), (steps, False)) if wants_ilp else ((steps, False), (ilp, True)):
            genome = next((g for g in family if tuple(g) not in seen), None)  # skips (consumes) duplicates
            if genome is not None:
                from_ilp += is_ilp
                break
        if genome is None:
            return
        seen.add(tuple(genome))
        drawn += 1
        yield np.asarray(genome, dtype=int)


def guided_seeds(model: AdditiveModel, count: int, allowed_drop: float, span: float = 2.0,
                 ilp_share: float = 0.75) -> np.ndarray:
    """The whole :func:`guided_seed_stream`, as a ``(seeds, genes)`` array."""
    seeds = list(guided_seed_stream(model, count, allowed_drop, span, ilp_share))
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


class GuidedMating(Mating):
    """The offspring of guided NSGA-II, each generation: model infill, then bred offspring, all new and screened.

    The additive model is refitted on every evaluation so far (:meth:`AdditiveModel.refit`: one weight per gene).
    **Infill**: up to ``infill`` x the offspring are ILP solutions of the refitted model for budgets spread over the
    cost range of the feasible front found so far (from 0.85 x its cheapest point to its most accurate one), the
    configurations the measurements now say are best at each cost. **Bred**: the rest come from tournament
    selection, crossover and the sensitivity-biased mutation; one the refitted model predicts to lose more than
    ``screen`` x the allowed drop is discarded before evaluation (the pre-screen). Configurations already
    evaluated are never offered again.
    """

    def __init__(self, selection, crossover, mutation, model: AdditiveModel, problem, allowed_drop: float,
                 screen: float | None = 3.0, infill: float = 0.5, **kwargs):
        super().__init__(selection, crossover, mutation, **kwargs)
        self.model, self.problem, self.allowed = model, problem, max(allowed_drop, 1e-12)
        self.screen, self.infill = screen, float(infill)
        self.screened = self.infilled = 0
        self.infill_solved = 0  # distinct infill solutions, known ones included (infilled: the new ones)
        self.fitted, self._seen, self._generation = model, -1, None

    def _refit(self) -> AdditiveModel:
        if len(self.problem.visited) != self._seen:  # new evaluations (a resumed run replays the same ones)
            self._seen = len(self.problem.visited)
            self.fitted = self.model.refit(self.problem.visited, self.problem, cap=10 * self.allowed)
        return self.fitted

    def _new(self, X: np.ndarray, pop) -> np.ndarray:
        """Which rows are configurations never evaluated and not in the population."""
        known = {tuple(int(v) for v in x) for x in np.rint(np.asarray(pop.get("X"), dtype=float))}
        return np.array([not self.problem.was_visited(x) and tuple(x) not in known for x in X.tolist()], dtype=bool)

    def _infill(self, model: AdditiveModel, pop, count: int) -> np.ndarray:
        front = [e for e in self.problem.visited if self.problem.is_feasible(e) and self.problem.in_space(e.bits)]
        width = self.problem.n_var
        if count <= 0 or not front:
            return np.zeros((0, width), dtype=int)
        cost = model.costs.name
        low = 0.85 * min(e.costs[cost] for e in front)
        best = max(front, key=lambda e: self.problem.bound.sign * e.accuracy)
        high = max(best.costs[cost], low * 1.01)
        rows, seen = [], set()
        for budget in np.exp(np.linspace(np.log(low), np.log(high), count)):
            genome = solve_ilp(model, float(budget))
            if genome is not None and tuple(genome) not in seen:
                seen.add(tuple(genome))
                rows.append(genome)
        X = np.array(rows, dtype=int).reshape(-1, width)
        self.infill_solved += len(X)
        return X[self._new(X, pop)] if len(X) else X

    def _do(self, problem, pop, n_offsprings, **kwargs):
        model = self._refit()
        algorithm = kwargs.get("algorithm")
        generation = getattr(algorithm, "n_gen", None)
        parts = []
        if generation != self._generation:  # the first call of a generation: the infill
            self._generation = generation
            X = self._infill(model, pop, int(round(self.infill * n_offsprings)))
            self.infilled += len(X)
            if len(X):
                parts.append(Population.new(X=X.astype(float)))
        bred = super()._do(problem, pop, n_offsprings, **kwargs)
        X = np.rint(np.asarray(bred.get("X"), dtype=float)).astype(int)
        keep = self._new(X, pop)
        if self.screen is not None:
            ok = model.total_drop(X, known_only=True) <= self.screen * self.allowed
            self.screened += int((keep & ~ok).sum())
            keep &= ok
        parts.append(bred[keep])
        return Population.merge(*parts) if len(parts) > 1 else parts[0]


def guided_nsga2(problem, model: AdditiveModel, pop_size: int = 20, allowed_drop: float = 0.01,
                 extra_seeds: np.ndarray | None = None, screen: float | None = 3.0, span: float = 2.0,
                 seeds: int | None = None, infill: float = 0.5, model_seeds: np.ndarray | None = None) -> NSGA2:
    """NSGA-II with sensitivity seeds, biased mutation and (``screen`` not None) the surrogate pre-screen.

    The first population holds ``seeds`` model seeds (default: what the population leaves after the uniform
    configurations and extras, at least half of it) and every uniform configuration and extra seed: with more
    seeds than ``pop_size`` it is larger than later ones (survival trims it after the first offspring)."""
    fixed_rows = [uniform_genomes(problem)]
    if extra_seeds is not None and len(extra_seeds):
        fixed_rows.append(np.asarray(extra_seeds, dtype=int).reshape(-1, problem.n_var))
    fixed = len({tuple(r) for r in np.concatenate(fixed_rows).tolist()})
    count = seeds if seeds is not None else max(pop_size - fixed, (pop_size + 1) // 2)
    if model_seeds is None:  # given: seeds drawn (and evaluated) already, from guided_seed_stream
        model_seeds = guided_seeds(model, count, allowed_drop, span)
    # the model's seeds first, so that a small population keeps them; then the uniform configurations and extras
    sampling = UniformSeededSampling(extra_seeds, first=model_seeds, keep_all=seeds is not None)
    crossover = SBX(prob=0.9, eta=15, vtype=float, repair=RoundingRepair())
    mutation = SensitivityMutation(insensitivity_weights(model))
    algorithm = NSGA2(pop_size=pop_size, sampling=sampling, crossover=crossover,
                      mutation=mutation, eliminate_duplicates=True)
    algorithm.seeds = model_seeds
    mating = algorithm.mating
    algorithm.mating = GuidedMating(mating.selection, crossover, mutation, model, problem, allowed_drop, screen,
                                    infill, repair=mating.repair, eliminate_duplicates=mating.eliminate_duplicates,
                                    n_max_iterations=mating.n_max_iterations)
    return algorithm
