"""The names of the search algorithms and sensitivity estimators, importable without torch or pymoo.

Settings are checked against them before anything heavy loads; :mod:`quantsearch.search.algorithms` implements them.
"""
__all__ = ["ALGORITHM_NAMES", "SENSITIVITY_NAMES"]

ALGORITHM_NAMES = ("random", "greedy", "ilp", "nsga2", "guided")
SENSITIVITY_NAMES = ("measured", "gradient")
