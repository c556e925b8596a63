"""Search: NSGA-II (NSGA-III beyond two objectives) configured for integer bit-widths, run through pymoo, and
:func:`run_algorithm`, which runs any of :data:`ALGORITHMS` on a problem within an evaluation budget.

``minimize(problem, algorithm, termination)`` stays the one verb for the evolutionary searches; this module builds
the algorithm (uniform-seeded integer sampling, SBX and polynomial mutation with rounding repair, duplicate
elimination). NSGA-II's crowding distance thins out with three or more objectives (accuracy and two costs);
NSGA-III keeps the front spread along Das-Dennis reference directions instead.

The algorithms (``--algorithm``):

- ``random``: uniformly random configurations (:func:`~quantsearch.baselines.random_search`);
- ``greedy``: AIMET AMP's greedy path over single-gene sensitivities (:func:`~quantsearch.baselines.greedy_search`);
- ``ilp``: HAWQ's integer program for a sweep of cost budgets (:func:`~quantsearch.ilp.ilp_search`);
- ``nsga2``: NSGA-II (NSGA-III with several costs) as above;
- ``guided`` (the default): NSGA-II seeded from the greedy and ILP solutions, with sensitivity-biased mutation and
  the surrogate pre-screen (:func:`~quantsearch.guided.guided_nsga2`; several costs: plain NSGA-III seeded
  likewise).

``greedy``, ``ilp`` and ``guided`` first build a per-gene sensitivity table (:mod:`quantsearch.sensitivity`) and
model the first cost. ``sensitivity="measured"`` evaluates single-gene configurations (AMP's way; at most
``sensitivity_share`` of the budget left); ``"gradient"`` estimates every gene at every width from one forward and
backward pass over 500 search images (HAWQ's and ModelOpt's way; about 1.7 full evaluations on the demo). The
defaults follow the peers: measured for ``greedy``, gradient for ``ilp`` and ``guided``.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import numpy as np
from pymoo.algorithms.moo.nsga2 import NSGA2
from pymoo.algorithms.moo.nsga3 import NSGA3
from pymoo.core.callback import Callback
from pymoo.operators.crossover.sbx import SBX
from pymoo.operators.mutation.pm import PM
from pymoo.operators.repair.rounding import RoundingRepair
from pymoo.optimize import minimize
from pymoo.util.ref_dirs import get_reference_directions

from pymoo.core.termination import TerminateIfAny
from pymoo.termination.max_gen import MaximumGenerationTermination

from .random_greedy import greedy_search, random_search
from .budget import Budget, BudgetTermination
from .names import ALGORITHM_NAMES, SENSITIVITY_NAMES
from .guided import guided_nsga2, guided_seed_stream, guided_seeds
from .ilp import ilp_search
from .sampling import BudgetedSampling, UniformSeededSampling
from .stopping import FrontStop, FrontStopTermination
from .sensitivity import Sensitivity, budgeted_plan, gradient_cost, gradient_sensitivity, measure_sensitivity
from .surrogate import AdditiveModel, GeneCosts

__all__ = ["nsga2", "nsga3", "algorithm_for", "run_search", "GenerationCallback", "ALGORITHMS", "SearchOutcome",
           "run_algorithm", "SENSITIVITIES", "SENSITIVITY_DEFAULTS"]

ALGORITHMS = ALGORITHM_NAMES
SENSITIVITIES = SENSITIVITY_NAMES
# as the peers do it: AMP measures each layer, HAWQ and ModelOpt estimate from second-order / gradient information
SENSITIVITY_DEFAULTS = {"greedy": "measured", "ilp": "gradient", "guided": "gradient"}


def _operators(extra_seeds: np.ndarray | None) -> dict:
    return dict(sampling=UniformSeededSampling(extra_seeds),
                crossover=SBX(prob=0.9, eta=15, vtype=float, repair=RoundingRepair()),
                mutation=PM(eta=20, vtype=float, repair=RoundingRepair()),
                eliminate_duplicates=True)


def nsga2(pop_size: int = 20, extra_seeds: np.ndarray | None = None) -> NSGA2:
    """NSGA-II for integer genes; the first population holds every uniform configuration (and ``extra_seeds``)."""
    return NSGA2(pop_size=pop_size, **_operators(extra_seeds))


def nsga3(n_obj: int, pop_size: int = 20, extra_seeds: np.ndarray | None = None) -> NSGA3:
    """NSGA-III for integer genes, with the most Das-Dennis reference directions that fit in ``pop_size``."""
    partitions = 1
    while _das_dennis_count(n_obj, partitions + 1) <= pop_size:
        partitions += 1
    ref_dirs = get_reference_directions("das-dennis", n_obj, n_partitions=partitions)
    return NSGA3(ref_dirs=ref_dirs, pop_size=max(pop_size, len(ref_dirs)), **_operators(extra_seeds))


def _das_dennis_count(n_obj: int, partitions: int) -> int:
    from math import comb

    return comb(n_obj + partitions - 1, partitions)


def algorithm_for(n_obj: int, pop_size: int = 20, extra_seeds: np.ndarray | None = None):
    """NSGA-II for two objectives (accuracy and one cost), NSGA-III for more."""
    return nsga2(pop_size, extra_seeds) if n_obj <= 2 else nsga3(n_obj, pop_size, extra_seeds)


class GenerationCallback(Callback):
    """Calls ``on_generation(n_gen, algorithm)`` after each generation (progress, store flushes)."""

    def __init__(self, on_generation):
        super().__init__()
        self.on_generation = on_generation

    def notify(self, algorithm):
        self.on_generation(algorithm.n_gen, algorithm)


def run_search(problem, algorithm=None, generations: int = 10, seed: int = 0, on_generation=None,
               termination=None):
    """Run ``algorithm`` (default: :func:`nsga2`) on ``problem`` for ``generations`` generations (or until
    ``termination``, a pymoo termination, says so).

    The algorithm and termination run in place, not on pymoo's deep copies: they may hold the problem (the guided
    search's pre-screen reads its evaluations, a budget counts them), and a copy would watch a stale problem.
    """
    algorithm = algorithm if algorithm is not None else nsga2()
    options = {"callback": GenerationCallback(on_generation)} if on_generation else {}
    return minimize(problem, algorithm, termination if termination is not None else ("n_gen", generations),
                    seed=seed, verbose=False, copy_algorithm=False, copy_termination=False, **options)


@dataclass
class SearchOutcome:
    """What :func:`run_algorithm` did besides evaluating: the sensitivity table it measured (if any) and details
    (greedy path length, seeds, offspring screened out, ...)."""

    algorithm: str
    sensitivity: Sensitivity | None = None
    details: dict = field(default_factory=dict)


def _allowed_drop(problem, sensitivity: Sensitivity) -> float:
    return max(problem.bound.margin(sensitivity.effective_reference), 1e-9)


def run_algorithm(name: str, problem, budget: Budget, pop_size: int = 20, generations: int | None = None,
                  seed: int = 0, extra_seeds: np.ndarray | None = None, on_generation=None,
                  sensitivity_share: float = 0.4, screen: float | None = 3.0,
                  sensitivity: str | None = None, seed_share: float = 0.8,
                  stop: FrontStop | None = None) -> SearchOutcome:
    """Run algorithm ``name`` on ``problem`` until ``budget`` is spent (``generations``: also stop NSGA-II there;
    ``stop``: also stop ``nsga2`` and ``guided`` once the front stops moving, checked after each generation and,
    for ``guided``, after each population-sized slice of its seeds).

    ``on_generation(n)`` is called after each generation, and for the algorithms without generations after every
    ``pop_size`` new evaluations, with ``n`` counting on across phases (sensitivity, then search).
    """
    if name not in ALGORITHMS:
        raise ValueError(f"unknown algorithm {name!r}; choose from {', '.join(ALGORITHMS)}")
    outcome = SearchOutcome(name)
    step = {"n": 0, "count": 0}

    def tick(_evaluation=None) -> None:  # a visitor: counts known configurations too, so resumed runs match
        step["count"] += 1
        if step["count"] >= pop_size:
            close()

    def close() -> None:
        step["count"] = 0
        step["n"] += 1
        if on_generation:
            on_generation(step["n"])

    def steps(phase):  # report every pop_size visited configurations of a phase that has no generations
        problem.visitors.append(tick)
        try:
            return phase()
        finally:
            problem.visitors.remove(tick)
            if step["count"]:
                close()

    def evolve(algorithm) -> None:
        if budget.whole_left < 1:  # not one more evaluation to pay for: no population to start from
            return
        algorithm.initialization.sampling = BudgetedSampling(algorithm.initialization.sampling, budget)
        offset = step["n"]
        termination = BudgetTermination(budget)
        if generations is not None:
            termination = TerminateIfAny(MaximumGenerationTermination(generations), termination)
        if stop is not None:
            termination = TerminateIfAny(termination, FrontStopTermination(stop))
        callback = (lambda n_gen, _algorithm: on_generation(offset + n_gen)) if on_generation else None
        run_search(problem, algorithm, seed=seed, on_generation=callback, termination=termination)

    if name == "random":
        steps(lambda: random_search(problem, budget, seed))
        return outcome
    if name == "nsga2":
        evolve(algorithm_for(problem.n_obj, pop_size, extra_seeds))
        if stop is not None:
            outcome.details["stop"] = stop.summary()
        return outcome
    costs = GeneCosts(problem, 0)
    method = sensitivity or SENSITIVITY_DEFAULTS[name]
    if method == "gradient" and not hasattr(problem.metric, "batches"):
        method = "measured"  # a metric without data of its own (a plain callable) has no gradients to offer
    if method == "gradient" and not hasattr(problem.qmodel, "weight_names"):
        method = "measured"  # a runtime's formats (a target) are no fake quantizers to differentiate through
    if method == "gradient" and gradient_cost(problem) > max(0.0, budget.left) * sensitivity_share:
        method = "measured"  # the backward pass would take more of the budget than sensitivities may
    if method == "gradient":
        table = steps(lambda: gradient_sensitivity(problem, budget))
    else:
        plan = budgeted_plan(problem, costs, int(max(0.0, budget.left) * sensitivity_share))
        table = steps(lambda: measure_sensitivity(problem, plan=plan, budget=budget))
    model = AdditiveModel(table, costs)
    allowed = _allowed_drop(problem, table)
    outcome.sensitivity = table
    outcome.details.update(sensitivity=table.method, sensitivity_measurements=table.num_measurements,
                           cost_model_exact=costs.exact, sensitivity_noise=table.noise, sensitivity_scale=table.scale,
                           budget_charged=budget.charged)
    if name == "greedy":
        path, evaluated = steps(lambda: greedy_search(problem, model, budget))
        outcome.details.update(path_length=len(path), path_evaluated=len(evaluated))
    elif name == "ilp":
        solutions = steps(lambda: ilp_search(problem, model, budget, allowed))
        outcome.details.update(ilp_solutions=len(solutions))
    elif problem.n_obj <= 2:
        _guided(problem, model, budget, allowed, outcome, steps, evolve, pop_size=pop_size, extra_seeds=extra_seeds,
                screen=screen, seed_share=seed_share, stop=stop)
    else:  # several costs: NSGA-III from the same seeds (the model covers the first cost)
        seeds = guided_seeds(model, pop_size, allowed)
        extra = seeds if extra_seeds is None else np.concatenate([np.asarray(extra_seeds, dtype=int), seeds])
        evolve(algorithm_for(problem.n_obj, pop_size, extra))
        outcome.details.update(seeds=len(seeds))
    if stop is not None:
        outcome.details["stop"] = stop.summary()
    return outcome


def _guided(problem, model: AdditiveModel, budget: Budget, allowed: float, outcome: SearchOutcome, steps, evolve, *,
            pop_size: int, extra_seeds, screen, seed_share: float, stop: FrontStop | None) -> None:
    """Guided NSGA-II on one cost: its seeds (a population at a time, drawn lazily, when ``stop`` is given), then
    generations unless the stop fired on the seeds. ``steps`` and ``evolve`` are :func:`run_algorithm`'s."""
    # the model's seeds take ``seed_share`` of what is left, between one and four populations: on a small budget
    # NSGA-II has only a generation or two to breed, and the seeds (ILP solutions first) are the better use of
    # the evaluations (at 50, a share of 0.5 fell 0.005 below the ILP baseline's HV; 0.8 is 0.037 above it)
    count = max(pop_size, min(4 * pop_size, int(seed_share * max(0.0, budget.left))))
    drawn, converged = None, False
    if stop is not None:
        stream = guided_seed_stream(model, count, allowed)
        converged, drawn = steps(lambda: _seed_slices(stream, budget, pop_size, stop))
    algorithm = guided_nsga2(problem, model, pop_size, allowed, extra_seeds, screen, seeds=count, model_seeds=drawn)
    if not converged:
        evolve(algorithm)  # sliced seeds are known by now: its first population costs nothing
    outcome.details.update(seeds=len(algorithm.seeds), screened=algorithm.mating.screened,
                           infilled=algorithm.mating.infilled, infill_solved=algorithm.mating.infill_solved)


def _seed_slices(stream, budget: Budget, size: int, stop: FrontStop) -> tuple[bool, np.ndarray]:
    """Evaluate the seeds of ``stream`` ``size`` at a time (each slice races against the ones before), with the
    convergence test after each slice: whether the search converged on them, and the seeds drawn."""
    drawn = []
    while budget.whole_left >= 1:
        chunk = list(itertools.islice(stream, size))
        if not chunk:
            break
        drawn.extend(chunk)
        budget.evaluate(chunk)
        if stop.check():
            break
    return stop.converged_at is not None, np.array(drawn, dtype=int).reshape(len(drawn), budget.problem.n_var)
