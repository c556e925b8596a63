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

import numpy as np

__all__ = ["Sensitivity", "measure_sensitivity", "sensitivity_plan", "budgeted_plan", "gradient_scores",
           "gradient_sensitivity", "gradient_cost", "fit_scale", "GRADIENT_PASSES"]


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
    method: str = "measured"
    scores: Mapping[str, Mapping[int, float]] = field(default_factory=dict)
    scale: float = 1.0

    @property
    def sign(self) -> float:
        return 1.0 if self.higher_is_better else -1.0

    def raw_drop(self, gene: str, bits: int) -> float:
        """Measured drop (positive = worse) of ``gene`` alone at ``bits``."""
        return self.sign * (self.reference - self.measured[gene][bits])

    @property
    def noise(self) -> float:
        """The reference's luck: the median drop one bit below the top (0 with fewer than 3 such measurements, and
        for gradient estimates, which are not noisy measurements)."""
        if self.method == "gradient":
            return 0.0
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
        """The modelled drop of every gene at every width of its range (``inf`` below the top if not measured).

        Gradient estimates are ``scale`` x (score at the width - score at the top), never decreasing downwards."""
        if self.method == "gradient":
            table = {}
            for gene, (lo, hi) in zip(self.genes, self.ranges):
                scores, drop, table[gene] = self.scores[gene], 0.0, {}
                for b in range(hi, lo - 1, -1):
                    drop = max(drop, self.scale * (scores[b] - scores[hi]))
                    table[gene][b] = drop
            return table
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

    ROW_HEADER = ("quantizer", "bits", "accuracy", "drop", "score", "modelled_drop", "status")

    def rows(self) -> list[list]:
        """One row per measurement (:attr:`ROW_HEADER`): measured accuracy and drop, or the gradient score, and the
        modelled drop; a gradient table has a row for every gene at every width below its top."""
        drops = self.drops()
        if self.method == "gradient":
            return [[g, b, "", "", self.scores[g][b], drops[g][b], "estimated"]
                    for g, (lo, hi) in zip(self.genes, self.ranges) for b in range(hi - 1, lo - 1, -1)]
        return [[g, b, self.measured[g][b], self.raw_drop(g, b), "", drops[g][b],
                 self.statuses.get(g, {}).get(b, "ok")]
                for g in self.genes for b in sorted(self.measured.get(g, {}), reverse=True)]

    def to_dict(self) -> dict:
        return {"genes": list(self.genes), "ranges": [list(r) for r in self.ranges], "reference": self.reference,
                "higher_is_better": self.higher_is_better, "fraction": self.fraction, "noise": self.noise,
                "method": self.method, "scale": self.scale,
                "measured": {g: {str(b): v for b, v in m.items()} for g, m in self.measured.items()},
                "statuses": {g: {str(b): v for b, v in m.items()} for g, m in self.statuses.items()},
                "scores": {g: {str(b): v for b, v in m.items()} for g, m in self.scores.items()}}

    @classmethod
    def from_dict(cls, data: Mapping) -> "Sensitivity":
        def table(key, kind):
            return {g: {int(b): kind(v) for b, v in m.items()} for g, m in data.get(key, {}).items()}

        return cls(tuple(data["genes"]), tuple(tuple(r) for r in data["ranges"]), float(data["reference"]),
                   table("measured", float), bool(data.get("higher_is_better", True)),
                   bool(data.get("fraction", True)), table("statuses", str), str(data.get("method", "measured")),
                   table("scores", float), float(data.get("scale", 1.0)))


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
                       reference.accuracy, measured, problem.bound.higher_is_better,
                       bool(getattr(metric, "fraction", True)), statuses)


def budgeted_plan(problem, costs, evaluations: int, noise_genes: int = 4) -> list[tuple[str, int]]:
    """At most ``evaluations`` measurements, most useful first, for a search on a budget.

    Only widths that save cost are measured (a model-guided search never picks the others: a runtime format
    below fp32 can be slower than fp32, where bits always save), and only genes that have one, in order of the
    most cost a width of theirs saves. First every such gene one bit above its lowest width (enough signal above
    the noise, and near where cheap configurations live), preceded by ``noise_genes`` of them one bit below the top
    (the reference's luck, see :attr:`Sensitivity.noise`); then the lowest width, then the remaining widths from
    the bottom up.
    """
    top = costs.hi.astype(int)
    saved = costs.savings(top)
    genes = [(g, i) for i, g in enumerate(problem.gene_names)
             if top[i] > costs.lo[i] and saved[i, int(costs.lo[i]):top[i]].max() > 0]
    genes.sort(key=lambda t: -saved[t[1], int(costs.lo[t[1]]):top[t[1]]].max())
    plan: list[tuple[str, int]] = []

    def add(gene, i, b):
        if costs.lo[i] <= b < top[i] and saved[i, b] > 0 and (gene, b) not in seen:
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


# -- gradient estimates ------------------------------------------------------------------------------------------
GRADIENT_PASSES = 3  # a forward and a backward pass cost about three forward passes


def _fake_quant(x, amax, bits: int, unsigned: bool):
    """Uniform fake quantization (see :func:`quantsearch.quantize.forms.uniform_fake_quant`)."""
    from ..quantize.forms import uniform_fake_quant

    return uniform_fake_quant(x, amax, bits, unsigned)


def gradient_scores(qmodel, batches, genes, ranges) -> dict[str, dict[int, float]]:
    """Estimated loss increase of each gene alone at each width of its range, from gradients of the FP32 model.

    Second-order Taylor with the diagonal empirical Fisher (as FIT and HAWQ-style estimates do): lowering one
    quantizer perturbs a tensor ``y`` by ``dy`` (its quantization error; for a weight, the layer output's change
    ``F(x, Q(W) - W)``), and the cross-entropy loss ``L`` grows by about ``1/2 sum_i (dL/dy_i dy_i)^2`` per sample.
    One forward and backward pass per batch (labels: the batch's own, or the FP32 top-1 where there are none), then
    one pass of each weight layer per width; activations use each width's calibrated amax, signedness and form.
    """
    import torch
    import torch.nn.functional as F

    from ..quantize.forms import fake_quantize
    from ..quantize.quantized_model import amax_for_bits

    genes, weights, forms = list(genes), set(qmodel.weight_names), qmodel.forms
    scores = {g: {b: 0.0 for b in range(lo, hi + 1)} for g, (lo, hi) in zip(genes, ranges)}
    amax, unsigned = qmodel.amax, qmodel.unsigned
    captured: dict[str, tuple] = {}
    handles = []
    for g in genes:
        if g in weights:
            def keep_layer(module, args, output, g=g):
                captured[g] = (module, args[0].detach(), output)
            handles.append(qmodel.weight_module(g).register_forward_hook(keep_layer))
        else:
            def keep(_q, _args, output, g=g):
                captured[g] = (None, None, output)
            handles.append(qmodel.quantizer(g).register_forward_hook(keep))
    samples = 0
    try:
        with qmodel.quantization_disabled(), torch.enable_grad():
            for x, y in batches:
                captured.clear()
                x = x.detach().requires_grad_(True)
                out = qmodel(x)
                labels = y if bool((y >= 0).all()) else out.detach().argmax(1)
                loss = F.cross_entropy(out.float(), labels, reduction="sum")  # per-sample gradients, exactly
                names = [g for g in genes if g in captured and captured[g][2].requires_grad]
                grads = torch.autograd.grad(loss, [captured[g][2] for g in names], allow_unused=True)
                with torch.no_grad():
                    for g, grad in zip(names, grads):
                        if grad is None:
                            continue
                        module, inputs, output = captured[g]
                        for b in scores[g]:
                            if module is not None:  # the layer's output change from its weight's error
                                w = module.weight.detach()
                                shape = (-1,) + (1,) * (w.dim() - 1)
                                error = _fake_quant(w, torch.tensor(amax[g]).reshape(shape), b, False) - w
                                change = (F.linear(inputs, error) if isinstance(module, torch.nn.Linear)
                                          else module._conv_forward(inputs, error, None))
                            else:
                                a = output.detach()
                                table = qmodel.amax_table.get(g) or {b: amax[g]}
                                lows = qmodel.low_table.get(g)
                                change = fake_quantize(forms[g], a, amax_for_bits(table, b), b, unsigned[g],
                                                       amax_for_bits(lows, b) if lows else None) - a
                            scores[g][b] += 0.5 * float(((grad * change) ** 2).sum())
                samples += len(x)
    finally:
        for handle in handles:
            handle.remove()
    return {g: {b: v / max(1, samples) for b, v in t.items()} for g, t in scores.items()}


def fit_scale(sensitivity: Sensitivity, evaluations, problem, allowed: float) -> float:
    """Accuracy drop per unit of estimated loss increase: the geometric mean of measured / estimated drop over the
    ``ok`` evaluations in the search space whose drop lies within [0.25, 5] x ``allowed`` (near the floor, where
    the search decides: far smaller drops are noise, far larger ones are where the second-order estimate no longer
    holds); any positive drop up to 10 x ``allowed`` if none does; 1 if none at all."""
    unit = Sensitivity(**{**sensitivity.__dict__, "scale": 1.0}).drops()
    pairs = []
    for e in evaluations:
        if e.status != "ok" or not problem.in_space(e.bits):
            continue
        drop = sensitivity.sign * (sensitivity.reference - e.accuracy)
        estimate = sum(unit[g][int(b)] for g, b in zip(sensitivity.genes, problem.genome(e.bits)))
        if drop > 0 and estimate > 0:
            pairs.append((drop, estimate))
    for low, high in ((0.25, 5.0), (0.0, 10.0)):
        ratios = [d / p for d, p in pairs if low * allowed <= d <= high * allowed]
        if ratios:
            return float(np.exp(np.mean(np.log(ratios))))
    return 1.0


def _gradient_batches(metric, images: int) -> list:
    """The first batches of the search split that hold at least ``images`` images (all, for a smaller split)."""
    batches, seen = [], 0
    for x, y in metric.batches:
        if seen >= images:
            break
        batches.append((x, y))
        seen += len(x)
    return batches


def gradient_cost(problem, images: int = 500) -> float:
    """What :func:`gradient_sensitivity` charges, in full evaluations: ``images / split x (GRADIENT_PASSES +
    widths)``."""
    seen = sum(len(x) for x, _ in _gradient_batches(problem.metric, images))
    widths = max(hi - lo + 1 for lo, hi in problem.bit_ranges.values())
    return seen / int(problem.metric.num_samples) * (GRADIENT_PASSES + widths)


def gradient_sensitivity(problem, budget=None, images: int = 500) -> Sensitivity:
    """Gradient estimates (:func:`gradient_scores`) of every gene at every width, on the first ``images`` of the
    problem's search split, scaled to accuracy by the evaluations made so far (the uniform baselines; see
    :func:`fit_scale`). ``budget`` is charged
    ``images / split x (GRADIENT_PASSES + widths)`` full evaluations: the backward pass and one pass of the weight
    layers per width."""
    metric = problem.metric
    batches = _gradient_batches(metric, images)
    top = [problem.bit_ranges[g][1] for g in problem.gene_names]
    reference = problem.evaluate_bits(top)
    ranges = tuple(problem.bit_ranges[g] for g in problem.gene_names)
    scores = gradient_scores(problem.qmodel, batches, problem.gene_names, ranges)
    if budget is not None:
        budget.charge(gradient_cost(problem, images))
    table = Sensitivity(tuple(problem.gene_names), ranges, reference.accuracy, {}, problem.bound.higher_is_better,
                        bool(getattr(metric, "fraction", True)), {}, "gradient", scores, 1.0)
    allowed = max(problem.bound.margin(reference.accuracy), 1e-9)
    scale = fit_scale(table, problem.visited, problem, allowed)
    return Sensitivity(**{**table.__dict__, "scale": scale})
