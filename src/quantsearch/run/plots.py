"""Figures of a run (matplotlib, PNG). The notebook calls the same functions, so there is one implementation.

Every function draws into ``ax`` when given one; otherwise it makes its own figure: a plain
``matplotlib.figure.Figure`` when writing to ``path`` (no pyplot, so no GUI backend and no figure left open), a
pyplot figure when ``path`` is None (shown inline in a notebook). Files are written atomically.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from ..search.bound import Bound
from ..search.problem import Evaluation
from ..files import write_atomic

__all__ = ["plot_front", "plot_bits_heatmap", "plot_convergence", "plot_sensitivity", "plot_sensitivity_table",
           "plot_holdout"]


def _axes(ax, path, figsize):
    if ax is not None:
        return ax
    if path is not None:
        from matplotlib.figure import Figure

        return Figure(figsize=figsize).subplots()
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=figsize)[1]


COST_LABELS = {"latency": "latency (ms per call at the deployment batch; predicted)",
               "size": "weights as the runtime stores them (bytes)"}


def plot_front(evaluations: Sequence[Evaluation], front: Sequence[Evaluation], cost: str,
               baselines: Mapping[str, Evaluation] | None = None, fp32_accuracy: float | None = None,
               bound: Bound | None = None, path: str | Path | None = None, ax=None,
               measured: Mapping[str, tuple[float, float]] | None = None):
    """The metric against ``cost``: every evaluation, the front, uniform baselines, FP32 and the bound.

    Fractions (top-1, agreement) are shown as percentages; a lower-is-better metric (KL) is drawn with its axis
    inverted, so that better is up in every plot. ``measured`` (``{label: (cost, metric)}``) adds what the runtime
    itself gave (a target run: measured latency, the runtime's own accuracy) as crosses.
    """
    ax = _axes(ax, path, (7, 4.5))
    metric = bound.metric if bound is not None else "accuracy"
    percent = bound.fraction if bound is not None else True
    higher_is_better = bound.higher_is_better if bound is not None else True
    min_accuracy = bound.limit if bound is not None else None
    k = 100.0 if percent else 1.0
    unit = "%" if percent else ""
    ok = [e for e in evaluations if e.status == "ok"]
    ax.scatter([e.costs[cost] for e in ok], [k * e.accuracy for e in ok], s=10, c="0.75", label="evaluated")
    f = sorted(front, key=lambda e: e.costs[cost])
    ax.plot([e.costs[cost] for e in f], [k * e.accuracy for e in f], "o-", c="C0", ms=5,
            label="Pareto front" if f else "Pareto front (empty)")
    if fp32_accuracy is not None:
        ax.axhline(k * fp32_accuracy, ls="--", c="k", lw=0.8, label=f"FP32 {k * fp32_accuracy:.4g}{unit}")
    if min_accuracy is not None:
        ax.axhline(k * min_accuracy, ls=":", c="C2", lw=1,
                   label=f"{bound.kind} {k * min_accuracy:.4g}{unit}")
    sign = 1.0 if higher_is_better else -1.0  # limits worked out on sign * value, where higher is better
    scores = [sign * k * e.accuracy for e in ok] + ([sign * k * fp32_accuracy] if fp32_accuracy is not None else [])
    if min_accuracy is not None:
        scores.append(sign * k * min_accuracy)
    if not scores:  # nothing to scale by: the baselines, else a unit range
        scores = [sign * k * e.accuracy for e in (baselines or {}).values() if math.isfinite(e.accuracy)] or [0.0]
    best = max(scores)
    edge = sign * k * min_accuracy if min_accuracy is not None else min(scores)
    span = max(best - edge, 1.0 if percent else 1e-9)
    low, high = edge - 3 * span, best + (0.5 if percent else 0.05 * span)
    low = max(0.0, low) if percent else low
    ax.set_ylim((low, high) if higher_is_better else (-low, -high))
    stacked = {True: 0, False: 0}  # labels at each edge, stacked so that neighbours do not overlap
    for label, e in sorted((baselines or {}).items(), key=lambda item: item[1].costs[cost]):
        value, score = k * e.accuracy, sign * k * e.accuracy
        if low <= score <= high:
            ax.scatter([e.costs[cost]], [value], marker="s", s=40, c="C3", zorder=3)
            ax.annotate(label, (e.costs[cost], value), textcoords="offset points", xytext=(4, -10),
                        fontsize=8, color="C3")
            continue  # otherwise marked at the edge it lies beyond, with its value
        below = not score > high  # NaN counts as below; "below" is the bottom edge whichever way the axis runs
        at, step = sign * (low if below else high), 11 * stacked[below]
        stacked[below] += 1
        ax.scatter([e.costs[cost]], [at], marker="v" if below else "^", s=40, c="C3", zorder=4, clip_on=False)
        ax.annotate(f"{label} {value:.4g}{unit} ({'below' if below else 'above'} the range)", (e.costs[cost], at),
                    textcoords="offset points", xytext=(4, 4 + step) if below else (4, -12 - step), fontsize=8,
                    color="C3", annotation_clip=False)
    if not f:
        kind = bound.kind if bound is not None else "floor"
        ax.text(0.5, 0.5, f"empty front: no configuration met the {kind}\n({len(evaluations)} evaluated)",
                transform=ax.transAxes, ha="center", va="center", fontsize=11, color="C3",
                bbox=dict(facecolor="white", alpha=0.8, edgecolor="none"))
    for i, (label, (x, y)) in enumerate((measured or {}).items()):
        ax.scatter([x], [k * y], marker="x", s=30, c="C1", zorder=5, label="measured in the runtime" if i == 0
                   else None)
        ax.annotate(label, (x, k * y), textcoords="offset points", xytext=(4, 3), fontsize=7, color="C1")
    ax.set_xlabel(COST_LABELS.get(cost, cost))
    ax.set_ylabel(f"{metric} ({unit})" if percent else f"{metric} (lower is better)" if not higher_is_better
                  else metric)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    return _finish(ax, path)


def plot_bits_heatmap(front: Sequence[Evaluation], quantizer_names: Sequence[str], cost: str,
                      path: str | Path | None = None, ax=None, metric: str = "accuracy", percent: bool = True):
    """Bits per quantizer (rows, network order) for each Pareto point (columns, cheapest first)."""
    f = sorted(front, key=lambda e: e.costs[cost])
    ax = _axes(ax, path, (max(5, 0.5 * len(f) + 3), max(4, 0.22 * len(quantizer_names) + 1)))
    ax.set_xlabel(f"Pareto points ({metric}; cheapest {cost} first)")
    ax.set_yticks(range(len(quantizer_names)))
    ax.set_yticklabels(quantizer_names, fontsize=6)
    if not f:  # an image of no columns would have identical x limits: say what is (not) there instead
        ax.set_xlim(-0.5, 0.5)
        ax.set_ylim(len(quantizer_names) - 0.5, -0.5)
        ax.set_xticks([])
        ax.text(0.5, 0.5, "empty front: no Pareto point to show", transform=ax.transAxes, ha="center",
                va="center", fontsize=11, color="C3")
        return _finish(ax, path)
    image = ax.imshow(np.array([e.bits for e in f]).T, aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set_xticks(range(len(f)))
    ax.set_xticklabels([f"{100 * e.accuracy:.1f}%" if percent else f"{e.accuracy:.3g}" for e in f], rotation=90,
                       fontsize=7)
    ax.figure.colorbar(image, ax=ax, label="bits")
    return _finish(ax, path)


def plot_convergence(generations: Sequence[int], hypervolume: Sequence[float], feasible: Sequence[float],
                     path: str | Path | None = None, ax=None):
    """Hypervolume of the feasible front and the feasible fraction (NaN: no new evaluation), per generation.

    Generation 0 holds the uniform baselines evaluated before the search; see :mod:`quantsearch.convergence`
    for the reference point.
    """
    ax = _axes(ax, path, (6.5, 3.8))
    ax.plot(generations, hypervolume, "o-", c="C0", label="hypervolume")
    ax.set_xlabel("generation (0: uniform baselines)")
    ax.set_ylabel("hypervolume\n(acc. points above floor x FP32 cost saved)", color="C0", fontsize=8)
    ax.set_xticks(list(generations))
    twin = ax.twinx()
    twin.plot(generations, [100 * f for f in feasible], "s--", c="C1", label="feasible %")
    twin.set_ylabel("feasible new evaluations (%)", color="C1")
    twin.set_ylim(-5, 105)
    ax.grid(alpha=0.3)
    return _finish(ax, path)


def plot_sensitivity(quantizer_names: Sequence[str], drops: Mapping[int, Sequence[float]],
                     reference_bits: int | str | None = None, path: str | Path | None = None, ax=None,
                     labels: Mapping[int, str] | None = None):
    """Accuracy drop (points) when only one quantizer is lowered to each bit-width, the rest kept high.

    ``drops[b][i]`` is the drop of quantizer ``i`` (network order, top to bottom) at ``b`` bits, as a fraction;
    ``labels`` names the widths otherwise (a target's formats).
    """
    labels = dict(labels or {})
    ax = _axes(ax, path, (7, max(4, 0.22 * len(quantizer_names) + 1)))
    widths = sorted(drops, reverse=True)
    height = 0.8 / max(1, len(widths))
    rows = np.arange(len(quantizer_names))
    for k, b in enumerate(widths):
        ax.barh(rows + (k - (len(widths) - 1) / 2) * height, [100 * d for d in drops[b]], height=height,
                label=labels.get(b, f"{b} bits"), color=f"C{k}")
    ax.set_yticks(rows)
    ax.set_yticklabels(quantizer_names, fontsize=6)
    ax.invert_yaxis()
    ax.axvline(0, c="k", lw=0.6)
    unit = "" if isinstance(reference_bits, str) else " bits"
    others = f" (others at {reference_bits}{unit})" if reference_bits is not None else ""
    ax.set_xlabel(f"accuracy drop (points) when only this quantizer is lowered{others}")
    ax.grid(alpha=0.3, axis="x")
    if widths:
        ax.legend(fontsize=8, loc="lower right")
    return _finish(ax, path)


def plot_sensitivity_table(sensitivity, path: str | Path | None = None, ax=None):
    """:func:`plot_sensitivity` of a :class:`~quantsearch.sensitivity.Sensitivity` table, against the reference with
    every gene at its top: the measured drops (no bar where a gene was not measured at a width), or for gradient
    estimates the modelled drops at three widths (two below the top, the middle, the bottom of the range)."""
    if sensitivity.method == "gradient":
        modelled = sensitivity.drops()
        lo, hi = min(r[0] for r in sensitivity.ranges), max(r[1] for r in sensitivity.ranges)
        widths = sorted({max(lo, hi - 2), (lo + hi) // 2, lo}, reverse=True)
        drops = {b: [modelled[g].get(b, math.nan) for g in sensitivity.genes] for b in widths}
    else:
        widths = sorted({b for m in sensitivity.measured.values() for b in m}, reverse=True)
        drops = {b: [sensitivity.raw_drop(g, b) if b in sensitivity.measured.get(g, {}) else math.nan
                     for g in sensitivity.genes] for b in widths}
    tops = {hi for _, hi in sensitivity.ranges}
    ax = _axes(ax, path, (7, max(4, 0.22 * len(sensitivity.genes) + 1)))
    plot_sensitivity(list(sensitivity.genes), drops, reference_bits=tops.pop() if len(tops) == 1 else None, ax=ax)
    if sensitivity.method == "gradient":
        ax.set_xlabel(ax.get_xlabel().replace("accuracy drop", "estimated drop"))
    return _finish(ax, path)


def plot_holdout(front: Sequence[Evaluation], holdout: Mapping[tuple[int, ...], float | None],
                 fp32_accuracy: Mapping[str, float] | None = None, path: str | Path | None = None, ax=None):
    """Hold-out against search accuracy of each Pareto point; FP32's own shift between the splits dashed."""
    ax = _axes(ax, path, (5, 4.5))
    points = [(100 * e.accuracy, 100 * holdout[e.bits]) for e in front
              if holdout.get(e.bits) is not None and not math.isnan(holdout[e.bits])]
    if points:
        xs, ys = zip(*points)
        ax.scatter(xs, ys, c="C0", s=18, label="Pareto points", zorder=3)
        lo, hi = min(xs + ys) - 0.5, max(xs + ys) + 0.5
        ax.plot([lo, hi], [lo, hi], c="0.5", lw=0.8, label="hold-out = search")
        if fp32_accuracy and "holdout" in fp32_accuracy:
            shift = 100 * (fp32_accuracy["holdout"] - fp32_accuracy["search"])
            ax.plot([lo, hi], [lo + shift, hi + shift], "--", c="k", lw=0.8, label=f"FP32 shift {shift:+.2f}")
        ax.set_xlim(lo, hi)
        ax.set_ylim(lo, hi)
        ax.legend(fontsize=8, loc="upper left")
    else:  # nothing to draw, so no legend either
        ax.text(0.5, 0.5, "no Pareto point with a hold-out accuracy\n(empty front)" if not front
                else "no Pareto point with a hold-out accuracy", transform=ax.transAxes, ha="center",
                va="center", fontsize=11, color="C3")
    ax.set_xlabel("search-split accuracy (%)")
    ax.set_ylabel("hold-out accuracy (%)")
    ax.grid(alpha=0.3)
    return _finish(ax, path)


def _finish(ax, path):
    if path is not None:  # rendered in memory, then written atomically
        import io

        buffer = io.BytesIO()
        ax.figure.tight_layout()
        ax.figure.savefig(buffer, format="png", dpi=120)
        write_atomic(path, buffer.getvalue())
    return ax
