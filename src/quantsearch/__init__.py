"""quantsearch: multi-objective mixed-precision quantization search for PyTorch.

The flow is one way: model -> :class:`QuantizedActivationsModel` -> :class:`LayerwiseQuantizationProblem` ->
search (``pymoo.optimize.minimize`` with :func:`nsga2`) -> results (Pareto front, bit-config JSON).
"""
__version__ = "0.1.0"

from .bitconfig import BitConfig, apply_bitconfig
from .calibration import Calibration, calibrate, calibrate_max, load_amax, save_amax
from .config import ExploreConfig
from .convergence import hypervolume
from .costs import BOPs, ActivationMemory, ModelSize, TotalBits, get_costs, profile_model
from .data import Preprocessing, load_dataset, load_fashion_mnist, split_dataset
from .evaluation import AccuracyEvaluator, Evaluator, get_metric
from .exploration import explore
from .export import export_quantized, load_exported
from .models import create_model, model_preprocessing
from .predicates import PRESETS, Predicate, Target, by_name, by_type
from .problem import Evaluation, LayerwiseQuantizationProblem
from .quantized_model import QuantizedActivationsModel
from .report import load_run
from .results import pareto_front
from .search import algorithm_for, nsga2, nsga3, run_search

__all__ = [
    "QuantizedActivationsModel", "LayerwiseQuantizationProblem", "Evaluation",
    "calibrate", "Calibration", "calibrate_max", "save_amax", "load_amax",
    "nsga2", "run_search", "explore", "ExploreConfig", "pareto_front",
    "BitConfig", "apply_bitconfig", "export_quantized", "load_exported", "load_run", "hypervolume",
    "Predicate", "Target", "PRESETS", "by_type", "by_name",
    "AccuracyEvaluator", "TotalBits", "get_costs",
    "BOPs", "ActivationMemory", "ModelSize", "profile_model", "nsga3", "algorithm_for",
    "create_model", "load_dataset", "load_fashion_mnist", "split_dataset",
    "Evaluator", "get_metric", "model_preprocessing", "Preprocessing",
    "__version__",
]
