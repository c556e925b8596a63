"""quantsearch: multi-objective mixed-precision quantization search for PyTorch.

The flow is one way: settings -> :func:`build_session` (model, data, :class:`QuantizedActivationsModel`,
calibration, evaluators, :class:`Bound`) -> :class:`LayerwiseQuantizationProblem` -> search (``pymoo.optimize.minimize``
with :func:`nsga2`, or :func:`run_algorithm`) -> :class:`RunRecord` (front, bit-configs) -> :func:`apply_bitconfig`,
:func:`refine` (bias correction, AdaRound on a chosen point), :func:`export_onnx`. :func:`explore` runs all of it from an :class:`ExploreConfig`.
For ONNX Runtime on a CPU, :class:`RuntimeFormatModel` makes each Linear's ORT format a gene, :func:`measure_latency`
gives the :class:`Latency` cost, and :func:`export_runtime_onnx` writes ORT's own graph.

Names are imported on first use (PEP 562), so that the command line can refuse a mistyped setting before torch
is loaded.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

# public name -> the module that defines it
_EXPORTS = {
    "BitConfig": "deploy.bitconfig", "apply_bitconfig": "deploy.bitconfig",
    "Calibration": "quantize.calib", "calibrate": "quantize.calib", "calibrate_max": "quantize.calib",
    "ExploreConfig": "run.settings",
    "hypervolume": "run.convergence",
    "BOPs": "search.costs", "ActivationMemory": "search.costs", "ModelSize": "search.costs", "TotalBits": "search.costs", "get_costs": "search.costs",
    "profile_model": "search.costs",
    "Preprocessing": "sources.data", "load_dataset": "sources.data", "load_fashion_mnist": "sources.data", "split_dataset": "sources.data",
    "AccuracyEvaluator": "search.evaluator", "Evaluator": "search.evaluator", "get_metric": "sources.metrics",
    "explore": "run.pipeline",
    "export_quantized": "deploy.export", "export_onnx": "deploy.onnx_export", "load_exported": "deploy.export",
    "create_model": "sources.models", "model_preprocessing": "sources.models",
    "PRESETS": "quantize.predicates", "Predicate": "quantize.predicates", "Target": "quantize.predicates", "by_name": "quantize.predicates",
    "by_type": "quantize.predicates",
    "Evaluation": "search.problem", "LayerwiseQuantizationProblem": "search.problem",
    "QuantizedActivationsModel": "quantize.quantized_model",
    "load_run": "run.record", "RunRecord": "run.record", "Bound": "search.bound",
    "build_session": "run.session", "Session": "run.session",
    "pareto_front": "search.front",
    "Sensitivity": "search.sensitivity", "measure_sensitivity": "search.sensitivity",
    "Budget": "search.budget", "refine": "quantize.refine",
    "algorithm_for": "search.algorithms", "nsga2": "search.algorithms", "nsga3": "search.algorithms", "run_search": "search.algorithms",
    "run_algorithm": "search.algorithms", "ALGORITHMS": "search.algorithms",
    "RuntimeFormatModel": "deploy.targets.onnxruntime", "export_runtime_onnx": "deploy.targets.onnxruntime",
    "measure_latency": "deploy.targets.latency", "LatencyTable": "deploy.targets.latency", "Latency": "search.costs",
}

__all__ = [
    "QuantizedActivationsModel", "LayerwiseQuantizationProblem", "Evaluation",
    "calibrate", "Calibration", "calibrate_max",
    "nsga2", "run_search", "run_algorithm", "ALGORITHMS", "Budget", "Sensitivity", "measure_sensitivity",
    "explore", "ExploreConfig", "pareto_front", "Bound", "build_session", "Session", "RunRecord",
    "BitConfig", "apply_bitconfig", "refine", "export_quantized", "export_onnx", "load_exported", "load_run", "hypervolume",
    "Predicate", "Target", "PRESETS", "by_type", "by_name",
    "AccuracyEvaluator", "TotalBits", "get_costs",
    "BOPs", "ActivationMemory", "ModelSize", "profile_model", "nsga3", "algorithm_for",
    "create_model", "load_dataset", "load_fashion_mnist", "split_dataset",
    "Evaluator", "get_metric", "model_preprocessing", "Preprocessing",
    "RuntimeFormatModel", "export_runtime_onnx", "measure_latency", "LatencyTable", "Latency",
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
