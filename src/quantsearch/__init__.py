"""quantsearch: multi-objective mixed-precision quantization search for PyTorch.

The flow is one way: model -> :class:`QuantizedActivationsModel` -> :class:`LayerwiseQuantizationProblem` ->
search (``pymoo.optimize.minimize`` with :func:`nsga2`) -> results (Pareto front, bit-config JSON).

Names are imported on first use (PEP 562), so that the command line can refuse a mistyped setting before torch
is loaded.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

# public name -> the module that defines it
_EXPORTS = {
    "BitConfig": "bitconfig", "apply_bitconfig": "bitconfig",
    "Calibration": "calibration", "calibrate": "calibration", "calibrate_max": "calibration",
    "load_amax": "calibration", "save_amax": "calibration",
    "ExploreConfig": "config",
    "hypervolume": "convergence",
    "BOPs": "costs", "ActivationMemory": "costs", "ModelSize": "costs", "TotalBits": "costs", "get_costs": "costs",
    "profile_model": "costs",
    "Preprocessing": "data", "load_dataset": "data", "load_fashion_mnist": "data", "split_dataset": "data",
    "AccuracyEvaluator": "evaluation", "Evaluator": "evaluation", "get_metric": "evaluation",
    "explore": "exploration",
    "export_quantized": "export", "load_exported": "export",
    "create_model": "models", "model_preprocessing": "models",
    "PRESETS": "predicates", "Predicate": "predicates", "Target": "predicates", "by_name": "predicates",
    "by_type": "predicates",
    "Evaluation": "problem", "LayerwiseQuantizationProblem": "problem",
    "QuantizedActivationsModel": "quantized_model",
    "load_run": "report",
    "pareto_front": "results",
    "Sensitivity": "sensitivity", "measure_sensitivity": "sensitivity",
    "Budget": "budget",
    "algorithm_for": "search", "nsga2": "search", "nsga3": "search", "run_search": "search",
    "run_algorithm": "search", "ALGORITHMS": "search",
}

__all__ = [
    "QuantizedActivationsModel", "LayerwiseQuantizationProblem", "Evaluation",
    "calibrate", "Calibration", "calibrate_max", "save_amax", "load_amax",
    "nsga2", "run_search", "run_algorithm", "ALGORITHMS", "Budget", "Sensitivity", "measure_sensitivity",
    "explore", "ExploreConfig", "pareto_front",
    "BitConfig", "apply_bitconfig", "export_quantized", "load_exported", "load_run", "hypervolume",
    "Predicate", "Target", "PRESETS", "by_type", "by_name",
    "AccuracyEvaluator", "TotalBits", "get_costs",
    "BOPs", "ActivationMemory", "ModelSize", "profile_model", "nsga3", "algorithm_for",
    "create_model", "load_dataset", "load_fashion_mnist", "split_dataset",
    "Evaluator", "get_metric", "model_preprocessing", "Preprocessing",
    "__version__",
]


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'quantsearch' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
