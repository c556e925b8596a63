"""Calibration methods: their names, a method and its parameters (:class:`MethodSpec`), which quantizer gets which.

The vocabulary the rest of the package shares: the method names, the histogram and per-bit families, the error
every calibration failure raises, and the resolution of ``calib-overrides`` name globs to a method per quantizer.
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

__all__ = ["METHODS", "HISTOGRAM_METHODS", "PER_BIT_METHODS", "CalibrationError", "MethodSpec", "override_spec",
           "resolve_methods"]

METHODS = ("max", "percentile", "entropy", "mse", "moving-max")
HISTOGRAM_METHODS = ("percentile", "entropy", "mse")
PER_BIT_METHODS = ("entropy", "mse")


class CalibrationError(ValueError):
    """Calibration that saw no data, an amax that cannot quantize, or a calibration file that does not fit."""


@dataclass(frozen=True)
class MethodSpec:
    """A calibration method and its parameters."""

    method: str = "max"
    percentile: float = 99.99
    momentum: float = 0.95

    def validated(self, where: str = "calib-method") -> "MethodSpec":
        if self.method not in METHODS:
            raise CalibrationError(f"{where}: unknown calibration method {self.method!r}; "
                                   f"choose from {', '.join(METHODS)}")
        if isinstance(self.percentile, bool) or not isinstance(self.percentile, (int, float)) \
                or not 0 < self.percentile <= 100:
            raise CalibrationError(f"{where}: percentile must lie in (0, 100], got {self.percentile!r}")
        if isinstance(self.momentum, bool) or not isinstance(self.momentum, (int, float)) \
                or not 0 <= self.momentum < 1:
            raise CalibrationError(f"{where}: momentum must lie in [0, 1), got {self.momentum!r}")
        return self

    def to_dict(self) -> dict:
        out: dict[str, Any] = {"method": self.method}
        if self.method == "percentile":
            out["percentile"] = self.percentile
        if self.method == "moving-max":
            out["momentum"] = self.momentum
        return out


def override_spec(glob: str, value: Any, default: MethodSpec) -> MethodSpec:
    """The method of one override, ``method`` or ``{method: ..., percentile: ..., momentum: ...}``, validated."""
    where = f"calib-overrides[{glob!r}]"
    if isinstance(value, str):
        value = {"method": value}
    if not isinstance(value, Mapping):
        raise CalibrationError(f"{where} must be a method name or a mapping, got {type(value).__name__}")
    unknown = [k for k in value if k not in ("method", "percentile", "momentum")]
    if unknown:
        raise CalibrationError(f"{where}: unknown key {unknown[0]!r} (use method, percentile, momentum)")
    return MethodSpec(value.get("method", default.method), value.get("percentile", default.percentile),
                      value.get("momentum", default.momentum)).validated(where)


def resolve_methods(names: Iterable[str], default: MethodSpec,
                    overrides: Mapping[str, Any] | None = None) -> dict[str, MethodSpec]:
    """The method of every quantizer: the first override whose name glob matches it, else ``default``.

    An override is ``{glob: method}`` or ``{glob: {method: ..., percentile: ..., momentum: ...}}`` (unset
    parameters come from ``default``). A glob that matches no quantizer is refused: it is almost surely a typo.
    """
    names = list(names)
    rules = []
    for glob, value in (overrides or {}).items():
        spec = override_spec(str(glob), value, default)
        if not any(fnmatch.fnmatchcase(n, str(glob)) for n in names):
            raise CalibrationError(f"calib-overrides[{str(glob)!r}] matches no quantizer (quantizers look like "
                                   f"{names[-1]!r})")
        rules.append((str(glob), spec))
    return {n: next((s for g, s in rules if fnmatch.fnmatchcase(n, g)), default) for n in names}
