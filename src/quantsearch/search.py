"""Search: NSGA-II configured for integer bit-widths, run through ``pymoo.optimize.minimize``.

``minimize(problem, algorithm, termination)`` stays the one verb; this module only builds the algorithm
(uniform-seeded integer sampling, SBX and polynomial mutation with rounding repair, duplicate elimination).
"""
from __future__ import annotations

import numpy as np
from pymoo.algorithms.moo.nsga2 import NSGA2
from pymoo.core.callback import Callback
from pymoo.operators.crossover.sbx import SBX
from pymoo.operators.mutation.pm import PM
from pymoo.operators.repair.rounding import RoundingRepair
from pymoo.optimize import minimize

from .sampling import UniformSeededSampling

__all__ = ["nsga2", "run_search", "GenerationCallback"]


def nsga2(pop_size: int = 20, extra_seeds: np.ndarray | None = None) -> NSGA2:
    """NSGA-II for integer genes; the first population holds every uniform configuration."""
    return NSGA2(
        pop_size=pop_size,
        sampling=UniformSeededSampling(extra_seeds),
        crossover=SBX(prob=0.9, eta=15, vtype=float, repair=RoundingRepair()),
        mutation=PM(eta=20, vtype=float, repair=RoundingRepair()),
        eliminate_duplicates=True,
    )


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
