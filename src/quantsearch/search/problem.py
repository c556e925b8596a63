"""``LayerwiseQuantizationProblem``: per-quantizer bit-widths as a plain pymoo problem.

Genes are integers in ``[lo, hi]``, one per searched quantizer (by default every quantizer, in the model's order;
``genes`` may name a subset, such as the weight quantizers only); every other quantizer keeps a fixed width.
Objectives: the metric (as ``bound.loss``: ``-accuracy`` where higher is better) and each cost. One inequality
constraint: the :class:`~quantsearch.search.bound.Bound` holds (``limit - accuracy <= 0`` for a floor, ``accuracy -
limit <= 0`` for a ceiling such as KL divergence to FP32); "accuracy" below means the metric's value. The problem knows no files and prints nothing; it remembers every configuration it
evaluated (never paying twice for one) and tells listeners about new ones.

An evaluator with early rejection (:meth:`Evaluator.reject_below`) may stop part-way: the configuration is recorded
with status ``rejected`` (below the floor), its accuracy on the images seen, and ``extra["samples"]``, the number
of images it cost (every evaluation records it when the evaluator knows its split size). With ``racing`` on, each
new configuration is also raced against the best evaluated point of the space that costs no more in any cost
(:meth:`LayerwiseQuantizationProblem.race_bar`); one that clearly cannot beat it is recorded as ``dominated``.
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator, Mapping, Sequence

import numpy as np
from pymoo.core.problem import ElementwiseEvaluationFunction, ElementwiseProblem

from .bound import Bound
from .costs import CostModel, TotalBits
from .evaluator import EarlyRejected, NumericalError

__all__ = ["Evaluation", "Measurement", "LayerwiseQuantizationProblem", "measure"]


@dataclass(frozen=True)
class Evaluation:
    """One evaluated configuration; ``status`` is ``ok``, ``failed`` (NaN/Inf output, accuracy 0), ``rejected``
    (stopped early, below the floor with high confidence; accuracy on the images seen) or ``dominated`` (stopped
    early, below a cheaper point's accuracy with high confidence: it cannot enter the front).

    ``bits`` holds the width of every quantizer of the model (genes and fixed ones), in the model's order;
    ``extra["samples"]`` the images the evaluation ran (when known).
    """

    bits: tuple[int, ...]
    accuracy: float
    costs: Mapping[str, float]
    seconds: float
    status: str = "ok"
    message: str = ""
    extra: Mapping[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Measurement:
    """What running the metric on one configuration gives: the value, ``ok``/``failed``/``rejected``, why, how
    long, and on how many images (``None``: the evaluator does not say)."""

    accuracy: float
    status: str = "ok"
    message: str = ""
    seconds: float = 0.0
    samples: int | None = None


def measure(qmodel, metric: Callable, key: Sequence[int], bar: float | None = None) -> Measurement:
    """Set the widths ``key`` (every quantizer, in order) on ``qmodel`` and run ``metric`` on it (raced against
    ``bar`` when given: see :meth:`LayerwiseQuantizationProblem.race_bar`).

    A NaN/Inf output is a failed configuration (accuracy 0), not an error: the search goes on. An early-rejected
    one (see :meth:`~quantsearch.evaluation.Evaluator.reject_below`) keeps the accuracy of the images it ran.
    """
    qmodel.bit_widths = tuple(key)
    start = time.perf_counter()
    samples = getattr(metric, "num_samples", None)
    try:
        accuracy, status, message = float(metric(qmodel) if bar is None else metric(qmodel, bar=bar)), "ok", ""
    except NumericalError as exc:
        accuracy, status, message = 0.0, "failed", str(exc)
    except EarlyRejected as exc:
        accuracy, message, samples = float(exc.accuracy), str(exc), int(exc.samples)
        status = "rejected" if exc.bar is None else "dominated"
    return Measurement(accuracy, status, message, time.perf_counter() - start,
                       None if samples is None else int(samples))


class LayerwiseQuantizationProblem(ElementwiseProblem):
    """Mixed-precision search over the quantizers of a :class:`QuantizedActivationsModel`.

    Args:
        qmodel: a calibrated ``QuantizedActivationsModel``.
        evaluate: ``model -> accuracy`` in [0, 1] (for example an ``AccuracyEvaluator``).
        bound: a :class:`Bound`; a number is a limit in ``evaluate``'s direction (a floor for accuracy, a ceiling
            for a lower-is-better metric such as KL). Configurations that violate it are infeasible.
        bits: inclusive ``(lo, hi)`` range of every gene, or a mapping ``gene name -> (lo, hi)``.
        costs: cost models to minimise (default: total bits).
        cache: a mapping ``bits tuple -> Evaluation`` of configurations already known (a run store's, on resume).
        genes: the quantizers searched, one gene each (default: all, in the model's order).
        fixed_bits: the width of every quantizer that is not a gene: one number, or a mapping by name.
        memoize: remember evaluated configurations (``False`` only to measure the naive way in benchmarks).
        racing: race each new configuration against :meth:`race_bar` (needs an evaluator with early rejection).
    """

    def __init__(self, qmodel, evaluate: Callable, bound: Bound | float,
                 bits: tuple[int, int] | Mapping[str, tuple[int, int]] = (2, 8),
                 costs: Sequence[CostModel] | None = None,
                 cache: Mapping[tuple[int, ...], Evaluation] | None = None,
                 genes: Sequence[str] | None = None, fixed_bits: int | Mapping[str, int] = 8,
                 memoize: bool = True, racing: bool = False, **kwargs):
        names = qmodel.quantizer_names
        self.gene_names = list(names if genes is None else genes)
        unknown = [g for g in self.gene_names if g not in names]
        if unknown:
            raise KeyError(f"no quantizer named {unknown[0]!r}")
        if not self.gene_names:
            raise ValueError("the search space has no gene: no quantizer to search")
        ranges = bits if isinstance(bits, Mapping) else {g: bits for g in self.gene_names}
        missing = [g for g in self.gene_names if g not in ranges]
        if missing:
            raise ValueError(f"no bit range for gene {missing[0]!r}")
        self.bit_ranges = {g: (int(ranges[g][0]), int(ranges[g][1])) for g in self.gene_names}
        empty = [g for g, (lo, hi) in self.bit_ranges.items() if lo > hi]
        if empty:
            lo, hi = self.bit_ranges[empty[0]]
            raise ValueError(f"bit range {lo}:{hi} of {empty[0]!r} is empty")
        genes_set = set(self.gene_names)
        self.fixed = {n: int(fixed_bits[n] if isinstance(fixed_bits, Mapping) else fixed_bits)
                      for n in names if n not in genes_set}
        self.qmodel = qmodel
        self.metric = evaluate
        self.bound = Bound.of(bound, evaluate)
        self.costs = list(costs) if costs else [TotalBits(names)]
        self.cache: dict[tuple[int, ...], Evaluation] = dict(cache or {})
        self.memoize = memoize
        self.racing = bool(racing)
        self._entries: list[Evaluation] = []  # visited points of the space that hold the bound (race bars)
        self._batch_entries: int | None = None  # how many of them a batch in progress races against
        self.listeners: list[Callable[[Evaluation], None]] = []
        self.evaluations: list[Evaluation] = []
        self.visited: list[Evaluation] = []  # every configuration asked for, once, known or new (budgets count it)
        self.visitors: list[Callable[[Evaluation], None]] = []  # told of each, before listeners hear of new ones
        self._visited: set[tuple[int, ...]] = set()
        xl = np.array([self.bit_ranges[g][0] for g in self.gene_names])
        xu = np.array([self.bit_ranges[g][1] for g in self.gene_names])
        super().__init__(n_var=len(self.gene_names), n_obj=1 + len(self.costs), n_ieq_constr=1,
                         xl=xl, xu=xu, vtype=int, **kwargs)

    @property
    def bit_range(self) -> tuple[int, int]:
        """The widest ``(lo, hi)`` over all genes."""
        return int(self.xl.min()), int(self.xu.max())

    @property
    def objective_names(self) -> list[str]:
        name = getattr(self.metric, "name", "accuracy")
        return ([f"-{name}"] if self.bound.higher_is_better else [name]) + [c.name for c in self.costs]

    def is_feasible(self, result: Evaluation) -> bool:
        """Whether ``result`` satisfies the bound (what the constraint says, for listeners and reports)."""
        return result.status == "ok" and self.objectives(result)[1][0] <= 0

    def configuration(self, bits: Sequence[int] | Mapping[str, int]) -> tuple[int, ...]:
        """The widths of all quantizers, in the model's order, from a genome (one value per gene) or a mapping.

        A mapping must name every gene; quantizers it leaves out keep their fixed width, and it may also set
        those (the uniform baselines of a weights-only search, say), giving a configuration outside the space.
        """
        if isinstance(bits, Mapping):
            unknown = [n for n in bits if n not in self.fixed and n not in self.bit_ranges]
            if unknown:
                raise KeyError(f"no quantizer named {unknown[0]!r}")
            missing = [g for g in self.gene_names if g not in bits]
            if missing:
                raise ValueError(f"no width for gene {missing[0]!r}")
            named = {**self.fixed, **{n: int(b) for n, b in bits.items()}}
        else:
            genome = [int(b) for b in bits]
            if len(genome) != self.n_var:
                raise ValueError(f"expected {self.n_var} genes, got {len(genome)}")
            named = {**self.fixed, **dict(zip(self.gene_names, genome))}
        return tuple(named[n] for n in self.qmodel.quantizer_names)

    def genome(self, bits: Sequence[int]) -> tuple[int, ...]:
        """The genes of a full configuration (as in :attr:`Evaluation.bits`)."""
        named = dict(zip(self.qmodel.quantizer_names, bits))
        return tuple(int(named[g]) for g in self.gene_names)

    def in_space(self, bits: Sequence[int]) -> bool:
        """Whether a full configuration is one the search can reach: fixed widths kept, genes in range."""
        named = dict(zip(self.qmodel.quantizer_names, bits))
        return (all(named[n] == b for n, b in self.fixed.items())
                and all(lo <= named[g] <= hi for g, (lo, hi) in self.bit_ranges.items()))

    def evaluate_bits(self, bits: Sequence[int] | Mapping[str, int]) -> Evaluation:
        """Evaluate one configuration, a genome or a mapping by name (or return it from the cache)."""
        key = self.configuration(bits)
        known = self.cache.get(key)
        if known is not None:
            self._visit(key, known)
            return known
        costs = self.costs_of(key)
        return self.record(key, measure(self.qmodel, self.metric, key, self.race_bar(key, costs)), costs)

    def race_bar(self, key: tuple[int, ...], costs: Mapping[str, float] | None = None) -> float | None:
        """What configuration ``key`` must beat to enter the front: the best metric among the points of the space
        visited so far that hold the bound and cost no more in any cost (None: racing off, or no such point).

        Visited points only, so a resumed run (which replays the same order) races each candidate as before; within
        a batch (a population, :meth:`evaluate_genomes`) those known when it began, so a parallel pool, which
        measures a batch side by side, races exactly as a serial run does."""
        entries = self._entries if self._batch_entries is None else self._entries[:self._batch_entries]
        if not self.racing or not entries:
            return None
        costs = costs if costs is not None else self.costs_of(key)
        rivals = [e.accuracy for e in entries if all(e.costs[c] <= v for c, v in costs.items())]
        if not rivals:
            return None
        return max(rivals) if self.bound.higher_is_better else min(rivals)

    def costs_of(self, key: Sequence[int]) -> dict[str, float]:
        """Every cost of the full configuration ``key``."""
        named = dict(zip(self.qmodel.quantizer_names, key))
        return {c.name: float(c(named)) for c in self.costs}

    def was_visited(self, genome: Sequence[int]) -> bool:
        """Whether this run has asked for ``genome`` already (a resumed run's store holds more: this replays the
        original run's order, so that a search that avoids known configurations takes the same path)."""
        return self.configuration(genome) in self._visited

    def evaluate_genomes(self, genomes) -> list[Evaluation]:
        """Evaluate several genomes, in order, through the problem's elementwise runner: serially by default, side
        by side on a parallel pool (``problem.elementwise_runner``), recorded in the order given either way."""
        rows = np.asarray(genomes, dtype=int).reshape(-1, self.n_var)
        with self.batch():
            if len(rows):
                self.elementwise_runner(ElementwiseEvaluationFunction(self, [], {}), rows)
            return [self.evaluate_bits(row) for row in rows]

    @contextmanager
    def batch(self) -> Iterator[None]:
        """Race the configurations evaluated inside against the points known when the (outermost) batch began."""
        if self._batch_entries is not None:
            yield
            return
        self._batch_entries = len(self._entries)
        try:
            yield
        finally:
            self._batch_entries = None

    def _evaluate_elementwise(self, X, out, *args, **kwargs):  # pymoo's population step: one batch
        with self.batch():
            super()._evaluate_elementwise(X, out, *args, **kwargs)

    def record(self, key: tuple[int, ...], measured: "Measurement",
               costs: Mapping[str, float] | None = None) -> Evaluation:
        """Turn a measurement of the full configuration ``key`` into an :class:`Evaluation`: costs, cache, listeners.

        :meth:`evaluate_bits` measures on this process's model; a parallel runner measures elsewhere and records
        here, so that the driver alone holds the cache and tells the listeners (the run store). ``costs``: the
        configuration's costs when the caller computed them already (racing did).
        """
        result = Evaluation(key, measured.accuracy, dict(costs) if costs is not None else self.costs_of(key),
                            measured.seconds, measured.status, measured.message,
                            {} if measured.samples is None else {"samples": measured.samples})
        if self.memoize:
            self.cache[key] = result
        self.evaluations.append(result)
        self._visit(key, result)
        for listener in self.listeners:
            listener(result)
        return result

    def _visit(self, key: tuple[int, ...], result: Evaluation) -> None:
        if key not in self._visited:
            self._visited.add(key)
            self.visited.append(result)
            if self.is_feasible(result) and self.in_space(key):
                self._entries.append(result)
            for visitor in self.visitors:
                visitor(result)

    def objectives(self, result: Evaluation) -> tuple[list[float], list[float]]:
        """``(F, G)`` of an evaluation, as pymoo minimises them."""
        violation = -self.bound.margin(result.accuracy)
        if result.status == "failed":  # infeasible whatever its placeholder value says
            violation = max(violation, 1.0 + abs(self.bound.limit))
        elif result.status == "rejected":  # below the floor, by its partial accuracy
            violation = max(violation, 1e-9)
        # dominated: scored by its partial accuracy, which puts it behind the cheaper point that beat it
        return ([self.bound.loss(result.accuracy)] + [result.costs[c.name] for c in self.costs], [violation])

    def _evaluate(self, x, out, *args, **kwargs):
        genes = np.rint(np.asarray(x, dtype=float)).astype(int)
        out["F"], out["G"] = self.objectives(self.evaluate_bits(genes))
