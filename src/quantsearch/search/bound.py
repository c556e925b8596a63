"""The bound: the metric a configuration must satisfy, its direction, and the limit.

This is the one place that decides what "better" means. A metric where higher is better (top-1, agreement) gets
a floor; one where lower is better (KL divergence to FP32) gets a ceiling. The problem, the front, the store, the
convergence, the plots and the search ask the bound instead of re-deriving the direction.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Iterable, Mapping

__all__ = ["Bound"]


@dataclass(frozen=True)
class Bound:
    """``limit`` on ``metric``: a floor when ``higher_is_better``, else a ceiling.

    ``fraction`` metrics (top-k, agreement) are shown as percentages.
    """

    limit: float
    higher_is_better: bool = True
    metric: str = "top1"
    fraction: bool = True

    @classmethod
    def relative_to(cls, reference: float, drop: float, higher_is_better: bool = True, metric: str = "top1",
                    fraction: bool = True) -> "Bound":
        """``drop`` worse than ``reference`` (FP32 on the same images): below it for a floor, above for a ceiling."""
        sign = 1.0 if higher_is_better else -1.0
        return cls(float(reference) - sign * float(drop), bool(higher_is_better), metric, fraction)

    @classmethod
    def of(cls, value: "Bound | float", evaluate: Any = None) -> "Bound":
        """``value`` itself, or a limit whose direction and name come from ``evaluate`` (an evaluator; default a
        top-1 floor)."""
        if isinstance(value, Bound):
            return value
        return cls(float(value), bool(getattr(evaluate, "higher_is_better", True)),
                   str(getattr(evaluate, "name", "top1")), bool(getattr(evaluate, "fraction", True)))

    @property
    def sign(self) -> float:
        """+1 where higher is better, -1 where lower is: ``sign * value`` is always "higher is better"."""
        return 1.0 if self.higher_is_better else -1.0

    @property
    def kind(self) -> str:
        return "floor" if self.higher_is_better else "ceiling"

    def margin(self, value: float) -> float:
        """How far ``value`` is on the good side of the limit (negative: it violates the bound)."""
        return self.sign * (float(value) - self.limit)

    def shifted(self, by: float) -> "Bound":
        """The same bound moved by ``by`` (the FP32 model's own shift from the search to the hold-out split, so a
        bound relative to FP32 asks the same of every split)."""
        return Bound(self.limit + float(by), self.higher_is_better, self.metric, self.fraction)

    def holds(self, value: float) -> bool:
        return self.margin(value) >= 0

    def loss(self, value: float) -> float:
        """What a minimiser (pymoo) minimises: ``-value`` where higher is better, ``value`` where lower is."""
        return -self.sign * float(value)

    def better(self, a: float, b: float) -> bool:
        """Whether ``a`` is strictly better than ``b``."""
        return self.sign * (float(a) - float(b)) > 0

    def best(self, values: Iterable[float]) -> float:
        return max(values, key=lambda v: self.sign * v)

    def show(self, value: float | None, unit: bool = True) -> str:
        """``89.73 %`` for a fraction, ``0.0123`` otherwise; ``-`` for None."""
        if value is None:
            return "-"
        return f"{100 * value:.2f}{' %' if unit else ''}" if self.fraction else f"{value:.4g}"

    def __str__(self) -> str:
        return f"{self.metric} {self.kind} {self.show(self.limit)}"

    def to_dict(self) -> dict:
        return asdict(self) | {"kind": self.kind}

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "Bound":
        return cls(float(values["limit"]), bool(values.get("higher_is_better", True)),
                   str(values.get("metric", "top1")), bool(values.get("fraction", True)))
