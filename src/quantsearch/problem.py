"""``LayerwiseQuantizationProblem``: per-quantizer bit-widths as a plain pymoo problem.

Genes are integers in ``[lo, hi]``, one per quantizer in network order. Objectives: ``-accuracy`` and each cost.
One inequality constraint: ``min_accuracy - accuracy <= 0``. For a metric where lower is better (an evaluator with
``higher_is_better = False``, such as KL divergence to FP32) both flip: the objective is ``metric`` itself and
``min_accuracy`` is a ceiling, ``metric - min_accuracy <= 0``; "accuracy" below means the metric's value. The
problem knows no files and prints nothing; it remembers every configuration it evaluated (never paying twice for
one) and tells listeners about new ones.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import numpy as np
from pymoo.core.problem import ElementwiseProblem

from .costs import CostModel, TotalBits
from .evaluation import NumericalError

__all__ = ["Evaluation", "LayerwiseQuantizationProblem"]


@dataclass(frozen=True)
class Evaluation:
    """One evaluated configuration; ``status`` is ``ok`` or ``failed`` (NaN/Inf output, accuracy 0)."""

    bits: tuple[int, ...]
    accuracy: float
    costs: Mapping[str, float]
    seconds: float
    status: str = "ok"
    message: str = ""
    extra: Mapping[str, float] = field(default_factory=dict)


class LayerwiseQuantizationProblem(ElementwiseProblem):
    """Mixed-precision search over the quantizers of a :class:`QuantizedActivationsModel`.

    Args:
        qmodel: a calibrated ``QuantizedActivationsModel``.
        evaluate: ``model -> accuracy`` in [0, 1] (for example an ``AccuracyEvaluator``).
        min_accuracy: the floor; configurations below it are infeasible (the ceiling, above which they are, when
            ``evaluate.higher_is_better`` is False).
        bits: inclusive ``(lo, hi)`` range of every gene.
        costs: cost models to minimise (default: total bits).
        cache: a mapping ``bits tuple -> Evaluation`` of configurations already known (a run store's, on resume).
    """

    def __init__(self, qmodel, evaluate: Callable, min_accuracy: float, bits: tuple[int, int] = (2, 8),
                 costs: Sequence[CostModel] | None = None,
                 cache: Mapping[tuple[int, ...], Evaluation] | None = None, **kwargs):
        lo, hi = int(bits[0]), int(bits[1])
        if lo > hi:
            raise ValueError(f"bit range {lo}:{hi} is empty")
        self.qmodel = qmodel
        self.metric = evaluate
        self.higher_is_better = bool(getattr(evaluate, "higher_is_better", True))
        self.min_accuracy = float(min_accuracy)
        self.bit_range = (lo, hi)
        self.costs = list(costs) if costs else [TotalBits(qmodel.quantizer_names)]
        self.cache: dict[tuple[int, ...], Evaluation] = dict(cache or {})
        self.listeners: list[Callable[[Evaluation], None]] = []
        self.evaluations: list[Evaluation] = []
        super().__init__(n_var=len(qmodel.quantizer_names), n_obj=1 + len(self.costs), n_ieq_constr=1,
                         xl=lo, xu=hi, vtype=int, **kwargs)

    @property
    def objective_names(self) -> list[str]:
        name = getattr(self.metric, "name", "accuracy")
        return ([f"-{name}"] if self.higher_is_better else [name]) + [c.name for c in self.costs]

    def is_feasible(self, result: Evaluation) -> bool:
        """Whether ``result`` satisfies the bound (what the constraint says, for listeners and reports)."""
        return result.status == "ok" and self.objectives(result)[1][0] <= 0

    def evaluate_bits(self, bits: Sequence[int]) -> Evaluation:
        """Evaluate one configuration (or return it from the cache)."""
        key = tuple(int(b) for b in bits)
        known = self.cache.get(key)
        if known is not None:
            return known
        self.qmodel.bit_widths = key
        named = dict(zip(self.qmodel.quantizer_names, key))
        start = time.perf_counter()
        try:
            accuracy, status, message = float(self.metric(self.qmodel)), "ok", ""
        except NumericalError as exc:
            accuracy, status, message = 0.0, "failed", str(exc)
        result = Evaluation(key, accuracy, {c.name: float(c(named)) for c in self.costs},
                            time.perf_counter() - start, status, message)
        self.cache[key] = result
        self.evaluations.append(result)
        for listener in self.listeners:
            listener(result)
        return result

    def objectives(self, result: Evaluation) -> tuple[list[float], list[float]]:
        """``(F, G)`` of an evaluation, as pymoo minimises them."""
        sign = -1.0 if self.higher_is_better else 1.0  # pymoo minimises
        violation = sign * (result.accuracy - self.min_accuracy)
        if result.status != "ok":  # a failed configuration is infeasible whatever its placeholder value says
            violation = max(violation, 1.0 + abs(self.min_accuracy))
        return ([sign * result.accuracy] + [result.costs[c.name] for c in self.costs], [violation])

    def _evaluate(self, x, out, *args, **kwargs):
        genes = np.rint(np.asarray(x, dtype=float)).astype(int)
        out["F"], out["G"] = self.objectives(self.evaluate_bits(genes))
