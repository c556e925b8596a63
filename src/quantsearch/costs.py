"""Cost models: what a configuration of bit-widths costs, as a number to minimise.

A cost model is a callable ``bits: Mapping[str, int] -> float`` with a ``name`` and the cost of the FP32 model
(``fp32``), so that every cost can also be reported normalised (0.25 = a quarter of FP32).
"""
from __future__ import annotations

from typing import Mapping, Protocol, Sequence

__all__ = ["CostModel", "TotalBits", "COSTS", "get_costs"]


class CostModel(Protocol):
    name: str
    fp32: float

    def __call__(self, bits: Mapping[str, int]) -> float: ...


class TotalBits:
    """The sum of num_bits over all quantizers: the original tool's objective."""

    name = "bits"

    def __init__(self, quantizer_names: Sequence[str]):
        self.fp32 = 32.0 * len(quantizer_names)

    def __call__(self, bits: Mapping[str, int]) -> float:
        return float(sum(bits.values()))


COSTS = {"bits": TotalBits}


def get_costs(names: str | Sequence[str], qmodel) -> list[CostModel]:
    """Cost models by name (``"bits"`` or ``["bits", ...]``) for a quantized model."""
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    unknown = [n for n in names if n not in COSTS]
    if unknown or not names:
        raise ValueError(f"unknown cost {unknown[0] if unknown else '(none)'!r}; choose from {', '.join(COSTS)}")
    return [COSTS[n](qmodel.quantizer_names) for n in names]
