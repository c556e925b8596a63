"""Search: NSGA-II (NSGA-III beyond two objectives) configured for integer bit-widths, run through pymoo.

``minimize(problem, algorithm, termination)`` stays the one verb; this module only builds the algorithm
(uniform-seeded integer sampling, SBX and polynomial mutation with rounding repair, duplicate elimination).
NSGA-II's crowding distance thins out with three or more objectives (accuracy and two costs); NSGA-III keeps
the front spread along Das-Dennis reference directions instead.
"""
from __future__ import annotations

import numpy as np
from pymoo.algorithms.moo.nsga2 import NSGA2
from pymoo.algorithms.moo.nsga3 import NSGA3
from pymoo.core.callback import Callback
from pymoo.operators.crossover.sbx import SBX
from pymoo.operators.mutation.pm import PM
from pymoo.operators.repair.rounding import RoundingRepair
from pymoo.optimize import minimize
from pymoo.util.ref_dirs import get_reference_directions

from .sampling import UniformSeededSampling

__all__ = ["nsga2", "nsga3", "algorithm_for", "run_search", "GenerationCallback"]


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


def run_search(problem, algorithm=None, generations: int = 10, seed: int = 0, on_generation=None):
    """Run ``algorithm`` (default: :func:`nsga2`) on ``problem`` for ``generations`` generations."""
    algorithm = algorithm if algorithm is not None else nsga2()
    options = {"callback": GenerationCallback(on_generation)} if on_generation else {}
    return minimize(problem, algorithm, ("n_gen", generations), seed=seed, verbose=False, **options)
