"""quantsearch: multi-objective mixed-precision quantization search for PyTorch.

The flow is one way: model -> :class:`QuantizedActivationsModel` -> :class:`LayerwiseQuantizationProblem` ->
search (``pymoo.optimize.minimize`` with :func:`nsga2`) -> results (Pareto front, bit-config JSON).
"""
__version__ = "0.1.0"

from .bitconfig import BitConfig, apply_bitconfig
from .calibration import calibrate_max, load_amax, save_amax
from .config import ExploreConfig
from .costs import TotalBits, get_costs
from .data import Preprocessing, load_dataset, load_fashion_mnist, split_dataset
from .evaluation import AccuracyEvaluator, Evaluator, get_metric
from .exploration import explore
from .models import create_model, model_preprocessing
from .predicates import PRESETS, Predicate, Target, by_name, by_type
from .problem import Evaluation, LayerwiseQuantizationProblem
from .quantized_model import QuantizedActivationsModel
from .results import pareto_front
from .search import nsga2, run_search

__all__ = [
    "QuantizedActivationsModel", "LayerwiseQuantizationProblem", "Evaluation",
    "calibrate_max", "save_amax", "load_amax",
    "nsga2", "run_search", "explore", "ExploreConfig", "pareto_front",
    "BitConfig", "apply_bitconfig",
    "Predicate", "Target", "PRESETS", "by_type", "by_name",
    "AccuracyEvaluator", "TotalBits", "get_costs",
    "create_model", "load_dataset", "load_fashion_mnist", "split_dataset",
    "Evaluator", "get_metric", "model_preprocessing", "Preprocessing",
    "__version__",
]
