"""Per-quantizer sensitivity: the accuracy drop when one gene alone is lowered, every other gene at the top.

:func:`measure_sensitivity` evaluates, through the problem (so every configuration lands in its cache and, through
its listeners, in the run store), the reference configuration (every gene at the top of its range) and each
``(gene, width)`` asked for with that gene alone lowered. The result is a :class:`Sensitivity` table: the measured
accuracies, and a modelled drop for every gene at every width of its range, which the greedy, ILP and guided
searches add up (the additive model, :mod:`quantsearch.surrogate`).

**The modelled drop** ``d_g(b)`` (in metric units, positive = worse) is built from the measured drops so that it is
usable at every width:

1. *Noise.* The reference configuration's accuracy is itself one noisy measurement; on the demo ViT W8A8 scores
   0.24 points above FP32 and nearly every single-gene change "loses" that luck again. When some genes were
   measured one bit below their top, the median of those drops is taken as the reference's luck and subtracted
   from every measured drop (so that adding 30 genes' drops does not charge the luck 30 times). Drops are clipped
   at 0.
2. *Monotone.* Going down from the top, the drop never decreases (a running maximum).
3. *Widths not measured* follow the quantization-noise law: noise power grows as ``4^-b``, so ``d_g(b)`` is
   interpolated linearly in ``4^-b`` between the measured widths (and the top, where the drop is 0), and extrapolated
   below the lowest measured width the same way, capped at the reference value for fraction metrics.

A gene with no measured width is not modelled: its drop below the top is infinite (the model never lowers it).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterable, Mapping, Sequence

__all__ = ["Sensitivity", "measure_sensitivity", "sensitivity_plan", "budgeted_plan"]


@dataclass(frozen=True)
class Sensitivity:
    """Measured single-gene accuracies and the modelled drop of every gene at every width of its range.

    ``measured[gene][bits]`` is the metric with that gene alone at ``bits``; ``reference`` with every gene at the
    top of its range (``ranges[i][1]``). ``statuses`` holds the evaluation status of each measurement (``ok``,
    ``rejected``: early-rejected, measured on part of the split).
    """

    genes: tuple[str, ...]
    ranges: tuple[tuple[int, int], ...]
    reference: float
    measured: Mapping[str, Mapping[int, float]]
    higher_is_better: bool = True
    fraction: bool = True
    statuses: Mapping[str, Mapping[int, str]] = field(default_factory=dict)

    @property
    def sign(self) -> float:
        return 1.0 if self.higher_is_better else -1.0

    def raw_drop(self, gene: str, bits: int) -> float:
        """Measured drop (positive = worse) of ``gene`` alone at ``bits``."""
        return self.sign * (self.reference - self.measured[gene][bits])

    @property
    def noise(self) -> float:
        """The reference's luck: the median drop one bit below the top (0 with fewer than 3 such measurements)."""
        top_minus_one = [self.raw_drop(g, hi - 1) for g, (lo, hi) in zip(self.genes, self.ranges)
                         if hi - 1 >= lo and hi - 1 in self.measured.get(g, {})]
        if len(top_minus_one) < 3:
            return 0.0
        top_minus_one.sort()
        n = len(top_minus_one)
        median = top_minus_one[n // 2] if n % 2 else 0.5 * (top_minus_one[n // 2 - 1] + top_minus_one[n // 2])
        return max(0.0, median)

    @property
    def effective_reference(self) -> float:
        """The reference value with its luck removed: what the additive model starts from."""
        return self.reference - self.sign * self.noise

    def drops(self) -> dict[str, dict[int, float]]:
        """The modelled drop of every gene at every width of its range (``inf`` below the top if not measured)."""
        noise, cap = self.noise, (abs(self.effective_reference) if self.fraction else math.inf)
        table = {}
        for gene, (lo, hi) in zip(self.genes, self.ranges):
            known = sorted(((b, max(0.0, self.raw_drop(gene, b) - noise)) for b in self.measured.get(gene, {})
                            if lo <= b < hi), reverse=True)
            points = [(hi, 0.0)]
            for b, d in known:  # running maximum going down: never less than a higher width's drop
                points.append((b, max(d, points[-1][1])))
            table[gene] = {b: _interpolate(points, b, hi, cap) for b in range(lo, hi + 1)}
        return table

    def predicted(self, genome: Sequence[int], drops: Mapping[str, Mapping[int, float]] | None = None) -> float:
        """The additive model's value of a genome: effective reference minus the sum of modelled drops."""
        drops = drops or self.drops()
        return self.effective_reference - self.sign * sum(drops[g][int(b)] for g, b in zip(self.genes, genome))

    @property
    def num_measurements(self) -> int:
        return sum(len(v) for v in self.measured.values())

    def rows(self) -> list[list]:
        """One row per measurement: gene, bits, measured value, raw drop, modelled drop, status."""
        drops = self.drops()
        return [[g, b, self.measured[g][b], self.raw_drop(g, b), drops[g][b],
                 self.statuses.get(g, {}).get(b, "ok")]
                for g in self.genes for b in sorted(self.measured.get(g, {}), reverse=True)]

    def to_dict(self) -> dict:
        return {"genes": list(self.genes), "ranges": [list(r) for r in self.ranges], "reference": self.reference,
                "higher_is_better": self.higher_is_better, "fraction": self.fraction, "noise": self.noise,
                "measured": {g: {str(b): v for b, v in m.items()} for g, m in self.measured.items()},
                "statuses": {g: {str(b): v for b, v in m.items()} for g, m in self.statuses.items()}}

    @classmethod
    def from_dict(cls, data: Mapping) -> "Sensitivity":
        return cls(tuple(data["genes"]), tuple(tuple(r) for r in data["ranges"]), float(data["reference"]),
                   {g: {int(b): float(v) for b, v in m.items()} for g, m in data["measured"].items()},
                   bool(data.get("higher_is_better", True)), bool(data.get("fraction", True)),
                   {g: {int(b): str(v) for b, v in m.items()} for g, m in data.get("statuses", {}).items()})


def _power(bits: float) -> float:
    return 4.0 ** -bits  # quantization noise power, up to a constant


def _interpolate(points: Sequence[tuple[int, float]], bits: int, top: int, cap: float) -> float:
    """Drop at ``bits`` from known ``(width, drop)`` points (widths descending, the top first), linear in 4^-b."""
    if len(points) == 1:
        return 0.0 if bits >= top else math.inf
    for (b_hi, d_hi), (b_lo, d_lo) in zip(points, points[1:]):
        if bits == b_hi:
            return d_hi
        if b_lo <= bits < b_hi:
            t = (_power(bits) - _power(b_hi)) / (_power(b_lo) - _power(b_hi))
            return d_hi + t * (d_lo - d_hi)
    b_lo, d_lo = points[-1]  # below the lowest measured width: the same law, scaled from the top
    scale = (_power(bits) - _power(top)) / (_power(b_lo) - _power(top))
    return min(cap, d_lo * scale) if d_lo > 0 else 0.0


def sensitivity_plan(problem, widths: Iterable[int] | None = None,
                     genes: Sequence[str] | None = None) -> list[tuple[str, int]]:
    """The ``(gene, width)`` measurements: each width in turn (given order) for every gene whose range holds it
    below its top; ``widths=None``: every width of each gene's range, highest first."""
    genes = list(problem.gene_names if genes is None else genes)
    if widths is None:
        lo_all, hi_all = problem.bit_range
        widths = range(hi_all - 1, lo_all - 1, -1)
    plan = []
    for b in widths:
        plan.extend((g, int(b)) for g in genes if problem.bit_ranges[g][0] <= b < problem.bit_ranges[g][1])
    return plan


def measure_sensitivity(problem, widths: Iterable[int] | None = None, genes: Sequence[str] | None = None,
                        plan: Sequence[tuple[str, int]] | None = None, budget=None) -> Sensitivity:
    """Measure single-gene sensitivities through the problem (cached; seen by its listeners; side by side on a
    parallel runner).

    ``plan`` (a list of ``(gene, width)``) overrides ``widths`` and ``genes`` (see :func:`sensitivity_plan`).
    ``budget`` (a :class:`~quantsearch.budget.Budget`) stops the measurements once it is spent.
    """
    plan = list(plan) if plan is not None else sensitivity_plan(problem, widths, genes)
    top = [problem.bit_ranges[g][1] for g in problem.gene_names]
    index = {g: i for i, g in enumerate(problem.gene_names)}
    reference = problem.evaluate_bits(top)
    genomes = []
    for gene, bits in plan:
        genome = list(top)
        genome[index[gene]] = int(bits)
        genomes.append(genome)
    results = budget.evaluate(genomes) if budget is not None else problem.evaluate_genomes(genomes)
    measured: dict[str, dict[int, float]] = {}
    statuses: dict[str, dict[int, str]] = {}
    for (gene, bits), result in zip(plan, results):
        measured.setdefault(gene, {})[int(bits)] = result.accuracy
        statuses.setdefault(gene, {})[int(bits)] = result.status
    metric = problem.metric
    return Sensitivity(tuple(problem.gene_names), tuple(problem.bit_ranges[g] for g in problem.gene_names),
                       reference.accuracy, measured, problem.higher_is_better,
                       bool(getattr(metric, "fraction", True)), statuses)


def budgeted_plan(problem, costs, evaluations: int, noise_genes: int = 4) -> list[tuple[str, int]]:
    """At most ``evaluations`` measurements, most useful first, for a search on a budget.

    Only genes whose lowering saves cost are measured (the others are kept at the top by every model-guided
    search), in order of the cost they save at the bottom of their range. First every such gene one bit above
    its lowest width (enough signal above the noise, and near where cheap configurations live), preceded by
    ``noise_genes`` of them one bit below the top (the reference's luck, see :attr:`Sensitivity.noise`); then the
    lowest width, then the remaining widths from the bottom up.
    """
    top = costs.hi.astype(int)
    saved = costs.savings(top)
    genes = [(g, i) for i, g in enumerate(problem.gene_names)
             if top[i] > costs.lo[i] and saved[i, int(costs.lo[i])] > 0]
    genes.sort(key=lambda t: -saved[t[1], int(costs.lo[t[1]])])
    plan: list[tuple[str, int]] = []

    def add(gene, i, b):
        if costs.lo[i] <= b < top[i] and (gene, b) not in seen:
            seen.add((gene, b))
            plan.append((gene, int(b)))

    seen: set = set()
    for g, i in genes[:noise_genes]:
        add(g, i, top[i] - 1)
    for g, i in genes:
        add(g, i, int(costs.lo[i]) + 1)
    for g, i in genes:
        add(g, i, int(costs.lo[i]))
    for offset in range(2, int((top - costs.lo).max()) + 1):
        for g, i in genes:
            add(g, i, int(costs.lo[i]) + offset)
    return plan[:max(0, int(evaluations))]
