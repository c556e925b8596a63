"""Figures of a run (matplotlib, PNG). The notebook calls the same functions, so there is one implementation."""
from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from .problem import Evaluation  # noqa: E402
from .store import write_atomic  # noqa: E402

__all__ = ["plot_front", "plot_bits_heatmap", "plot_convergence"]


def plot_front(evaluations: Sequence[Evaluation], front: Sequence[Evaluation], cost: str,
               baselines: Mapping[str, Evaluation] | None = None, fp32_accuracy: float | None = None,
               min_accuracy: float | None = None, path: str | Path | None = None, ax=None,
               metric: str = "accuracy", percent: bool = True, higher_is_better: bool = True):
    """Accuracy (or ``metric``) against ``cost``: every evaluation, the front, uniform baselines, FP32 and the bound.

    ``percent`` shows fractions as percentages; a lower-is-better metric (KL) is drawn with its axis inverted, so
    that better is up in every plot.
    """
    own = ax is None
    if own:
        fig, ax = plt.subplots(figsize=(7, 4.5))
    k = 100.0 if percent else 1.0
    unit = "%" if percent else ""
    ok = [e for e in evaluations if e.status == "ok"]
    ax.scatter([e.costs[cost] for e in ok], [k * e.accuracy for e in ok], s=10, c="0.75", label="evaluated")
    f = sorted(front, key=lambda e: e.costs[cost])
    ax.plot([e.costs[cost] for e in f], [k * e.accuracy for e in f], "o-", c="C0", ms=5, label="Pareto front")
    for label, e in (baselines or {}).items():
        ax.scatter([e.costs[cost]], [k * e.accuracy], marker="s", s=40, c="C3", zorder=3)
        ax.annotate(label, (e.costs[cost], k * e.accuracy), textcoords="offset points", xytext=(4, -10),
                    fontsize=8, color="C3")
    if fp32_accuracy is not None:
        ax.axhline(k * fp32_accuracy, ls="--", c="k", lw=0.8, label=f"FP32 {k * fp32_accuracy:.4g}{unit}")
    if min_accuracy is not None:
        ax.axhline(k * min_accuracy, ls=":", c="C2", lw=1,
                   label=f"{'floor' if higher_is_better else 'ceiling'} {k * min_accuracy:.4g}{unit}")
    sign = 1.0 if higher_is_better else -1.0  # limits worked out on sign * value, where higher is better
    scores = [sign * k * e.accuracy for e in ok] + ([sign * k * fp32_accuracy] if fp32_accuracy is not None else [])
    best = max(scores)
    bound = sign * k * min_accuracy if min_accuracy is not None else min(scores)
    span = max(best - bound, 1.0 if percent else 1e-9)
    low, high = bound - 3 * span, best + (0.5 if percent else 0.05 * span)
    low = max(0.0, low) if percent else low
    ax.set_ylim((low, high) if higher_is_better else (-low, -high))
    ax.set_xlabel(cost)
    ax.set_ylabel(f"{metric} ({unit})" if percent else f"{metric} (lower is better)" if not higher_is_better
                  else metric)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    return _finish(ax, own, path)


def plot_bits_heatmap(front: Sequence[Evaluation], quantizer_names: Sequence[str], cost: str,
                      path: str | Path | None = None, ax=None, metric: str = "accuracy", percent: bool = True):
    """Bits per quantizer (rows, network order) for each Pareto point (columns, cheapest first)."""
    own = ax is None
    f = sorted(front, key=lambda e: e.costs[cost])
    if own:
        fig, ax = plt.subplots(figsize=(max(5, 0.5 * len(f) + 3), max(4, 0.22 * len(quantizer_names) + 1)))
    grid = np.array([e.bits for e in f]).T if f else np.zeros((len(quantizer_names), 0))
    image = ax.imshow(grid, aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set_yticks(range(len(quantizer_names)))
    ax.set_yticklabels(quantizer_names, fontsize=6)
    ax.set_xticks(range(len(f)))
    ax.set_xticklabels([f"{100 * e.accuracy:.1f}%" if percent else f"{e.accuracy:.3g}" for e in f], rotation=90,
                       fontsize=7)
    ax.set_xlabel(f"Pareto points ({metric}; cheapest {cost} first)")
    ax.figure.colorbar(image, ax=ax, label="bits")
    return _finish(ax, own, path)


def plot_convergence(generations: Sequence[int], hypervolume: Sequence[float], feasible: Sequence[float],
                     path: str | Path | None = None, ax=None):
    """Hypervolume of the feasible front and the feasible fraction, per generation."""
    own = ax is None
    if own:
        fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(generations, hypervolume, "o-", c="C0", label="hypervolume")
    ax.set_xlabel("generation")
    ax.set_ylabel("hypervolume", color="C0")
    twin = ax.twinx()
    twin.plot(generations, [100 * f for f in feasible], "s--", c="C1", label="feasible %")
    twin.set_ylabel("feasible evaluations (%)", color="C1")
    ax.grid(alpha=0.3)
    return _finish(ax, own, path)


def _finish(ax, own: bool, path):
    if path is not None:  # rendered in memory, then written atomically
        import io

        buffer = io.BytesIO()
        ax.figure.tight_layout()
        ax.figure.savefig(buffer, format="png", dpi=120)
        write_atomic(path, buffer.getvalue())
    if own and path is not None:
        plt.close(ax.figure)
    return ax
