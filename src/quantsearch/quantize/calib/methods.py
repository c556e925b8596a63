"""Calibration methods: their names, a method and its parameters (:class:`MethodSpec`), which quantizer gets which.

The vocabulary the rest of the package shares: the method names, the histogram and per-bit families, the error
every calibration failure raises, and the resolution of ``calib-overrides`` name globs to a method per quantizer.
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

__all__ = ["METHODS", "HISTOGRAM_METHODS", "PER_BIT_METHODS", "RANGE_FIT_METHODS", "CalibrationError", "MethodSpec",
           "check_form_methods", "form_method_problem", "override_spec", "resolve_methods"]

METHODS = ("max", "percentile", "entropy", "mse", "moving-max")
HISTOGRAM_METHODS = ("percentile", "entropy", "mse")
PER_BIT_METHODS = ("entropy", "mse")
# forms whose range is not one amax of |x| (a zero point, one range per head): fitted by least squared error on
# sampled values (mse) or taken whole (max); a histogram or a moving average of |x| has no meaning for them
RANGE_FIT_METHODS = {"asymmetric": ("mse", "max"), "per-head": ("mse", "max")}


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


def form_method_problem(what: str, form: str, given: str) -> str:
    """One line: ``what`` of ``form`` cannot be calibrated by ``given`` (say ``calib-method entropy``)."""
    return (f"{what} has the {form} form, whose ranges are fitted by least squared error (mse) or taken whole "
            f"(max), not by {given}: calibrate it with {' or '.join(RANGE_FIT_METHODS[form])} (--calib-method, or "
            "calib-overrides {GLOB: mse}) or give it another form")


def check_form_methods(forms: Mapping[str, str] | None, default: MethodSpec,
                       overrides: Mapping[str, Any] | None = None) -> None:
    """Refuse, before any model is loaded, a ``quant-forms`` glob whose form no method given can calibrate.

    The quantizers a glob matches are not known yet: each gets the default method or some override's, so a glob is
    refused here only when none of those methods fits its form; :func:`~.runner.calibrate` checks each quantizer's
    own method once the names are known."""
    given = {"calib-method": default.method}
    given.update({f"calib-overrides[{str(g)!r}]": override_spec(str(g), v, default).method
                  for g, v in (overrides or {}).items()})
    for glob, form in (forms or {}).items():
        if form in RANGE_FIT_METHODS and not any(m in RANGE_FIT_METHODS[form] for m in given.values()):
            raise CalibrationError(form_method_problem(f"quant-forms[{glob!r}]", form,
                                                       " or ".join(f"{k} {m}" for k, m in given.items())))
