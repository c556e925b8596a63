"""The result of calibration: :class:`Calibration`, every quantizer's amax per bit-width and signedness.

It applies itself to a ``QuantizedActivationsModel``, checks that it fits one (same quantizers, same weights and
calibration data by fingerprint, a wide enough bit range), and is saved as JSON (data, never code) checked
against ``schemas/calibration.schema.json`` on load, so a file is never applied to another model or other data
by mistake.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from ... import files
from ...files import write_atomic
from ...fingerprints import fingerprint_model
from ..fold import ChannelFold, FoldError
from .methods import CalibrationError

__all__ = ["CALIBRATION_FORMAT", "CALIBRATION_VERSION", "QuantizerCalibration", "Calibration"]

CALIBRATION_FORMAT = "quantsearch-calibration"
CALIBRATION_VERSION = 1


@dataclass(frozen=True)
class QuantizerCalibration:
    """One quantizer's calibration: its method, amax per bit-width, signedness, and the range it saw."""

    method: str
    unsigned: bool
    amax: Mapping[int, float | list[float]]  # per-head: one list (an amax per group) per width
    min: float
    absmax: float
    options: Mapping[str, float] = field(default_factory=dict)
    form: str = "uniform"
    low: Mapping[int, float] | None = None  # an asymmetric quantizer's lower end per width (amax: the upper)
    fold: ChannelFold | None = None  # a per-channel quantizer's fold into its LayerNorm and the Linears after it


@dataclass(frozen=True)
class Calibration:
    """Every quantizer's calibration, the bit range it covers, and what it was computed from (fingerprints)."""

    quantizers: Mapping[str, QuantizerCalibration]
    bits: tuple[int, int]
    fingerprint: Mapping[str, str]
    settings: Mapping[str, Any] = field(default_factory=dict)
    integer: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)  # integer operators: impl and range

    @property
    def amax_table(self) -> dict[str, dict[int, float]]:
        return {n: dict(q.amax) for n, q in self.quantizers.items()}

    @property
    def low_table(self) -> dict[str, dict[int, float]]:
        return {n: dict(q.low) for n, q in self.quantizers.items() if q.low is not None}

    @property
    def unsigned(self) -> dict[str, bool]:
        return {n: q.unsigned for n, q in self.quantizers.items()}

    @property
    def folds(self) -> dict[str, ChannelFold]:
        return {n: q.fold for n, q in self.quantizers.items() if q.fold is not None}

    @property
    def forms(self) -> dict[str, str]:
        return {n: q.form for n, q in self.quantizers.items()}

    @property
    def methods(self) -> dict[str, str]:
        return {n: q.method for n, q in self.quantizers.items()}

    def apply(self, qmodel) -> None:
        """Give ``qmodel`` these folds, this table and signedness; each quantizer takes its current bit-width's
        amax."""
        qmodel.folds = self.folds
        qmodel.unsigned = self.unsigned
        qmodel.amax_table = self.amax_table
        qmodel.low_table = self.low_table
        qmodel.bit_widths = qmodel.bits_dict()  # sets amax (and asymmetric lower ends) from the tables
        qmodel.integer_state = self.integer

    def check_fits(self, qmodel, data: str | None = None, bits: tuple[int, int] | None = None,
                   source: str = "calibration file") -> None:
        """Refuse (one line) a calibration made for other quantizers, weights or data, or too narrow a bit range."""
        names, ours = qmodel.activation_names, list(self.quantizers)
        if names != ours:
            i = next((k for k, (a, b) in enumerate(zip(ours, names)) if a != b), min(len(ours), len(names)))
            a = ours[i] if i < len(ours) else "nothing"
            b = names[i] if i < len(names) else "nothing"
            raise CalibrationError(f"{source} does not fit the model's quantizers: #{i} is {a!r} in the file but "
                                   f"{b!r} in the model")
        forms = qmodel.forms
        other = next((n for n in names if forms[n] != self.forms[n]), None)
        if other is not None:
            raise CalibrationError(f"{source} calibrated quantizer {other!r} for the {self.forms[other]} form, the "
                                   f"run gives it the {forms[other]} form: recalibrate with the run's quant-forms")
        theirs = {n: op.impl for n, op in qmodel.integer.operators.items()}
        ours = {n: op["impl"] for n, op in self.integer.items()}
        if theirs != ours:
            other = next(n for n in sorted(set(theirs) | set(ours)) if theirs.get(n) != ours.get(n))
            raise CalibrationError(f"{source} calibrated integer operator {other!r} as "
                                   f"{ours.get(other, 'float')}, the run makes it {theirs.get(other, 'float')}: "
                                   "recalibrate with the run's integer-ops")
        with qmodel.unfolded():
            weights = fingerprint_model(qmodel.model)
        if weights != self.fingerprint.get("weights"):
            raise CalibrationError(f"{source} was made for other model weights (fingerprint "
                                   f"{str(self.fingerprint.get('weights'))[:12]}, this model {weights[:12]}): "
                                   "recalibrate with python -m quantsearch.calibrate")
        if data is not None and data != self.fingerprint.get("data"):
            raise CalibrationError(f"{source} was made on other calibration data (fingerprint "
                                   f"{str(self.fingerprint.get('data'))[:12]}, this run's {data[:12]}): "
                                   "recalibrate with python -m quantsearch.calibrate")
        if bits is not None and not (self.bits[0] <= bits[0] and bits[1] <= self.bits[1]):
            raise CalibrationError(f"{source} holds amax for bits {self.bits[0]}:{self.bits[1]}, the run searches "
                                   f"{bits[0]}:{bits[1]}: recalibrate with --bits {bits[0]}:{bits[1]}")

    # -- files
    def to_dict(self) -> dict:
        return {
            "format": CALIBRATION_FORMAT, "version": CALIBRATION_VERSION,
            "fingerprint": dict(self.fingerprint), "bits": list(self.bits), "settings": dict(self.settings),
            "quantizers": {n: {"method": q.method, **dict(q.options), "form": q.form, "unsigned": q.unsigned,
                               "min": q.min, "absmax": q.absmax,
                               "amax": {str(b): v for b, v in sorted(q.amax.items())},
                               **({"low": {str(b): v for b, v in sorted(q.low.items())}} if q.low else {}),
                               **({"fold": q.fold.to_dict()} if q.fold is not None else {})}
                           for n, q in self.quantizers.items()},
            **({"integer": {n: dict(op) for n, op in self.integer.items()}} if self.integer else {}),
        }

    @classmethod
    def from_dict(cls, payload: Any, source: str = "calibration file") -> "Calibration":
        problem = files.schema_problem(payload, "calibration")
        if problem:
            raise CalibrationError(f"{source} is not a quantsearch calibration file ({problem})")
        lo, hi = payload["bits"]
        quantizers = {}
        for name, q in payload["quantizers"].items():
            amax = {int(b): [float(x) for x in v] if isinstance(v, list) else float(v) for b, v in q["amax"].items()}
            lists = [isinstance(v, list) for v in amax.values()]
            if not (all(lists) if q.get("form") == "per-head" else not any(lists)):
                raise CalibrationError(f"{source}: quantizer {name!r} needs a list of amax per width exactly when "
                                       "its form is per-head")
            if set(amax) != set(range(lo, hi + 1)):
                raise CalibrationError(f"{source}: quantizer {name!r} has amax for bits {sorted(amax)}, "
                                       f"not {lo}..{hi}")
            options = {k: q[k] for k in ("percentile", "momentum") if k in q}
            form = q.get("form", "uniform")
            low = {int(b): float(v) for b, v in q["low"].items()} if "low" in q else None
            if (form == "asymmetric") != (low is not None) or low is not None and set(low) != set(amax):
                raise CalibrationError(f"{source}: quantizer {name!r} of the {form} form "
                                       f"{'needs' if form == 'asymmetric' else 'takes no'} a low end per width")
            try:
                fold = ChannelFold.from_dict(q["fold"]) if "fold" in q else None
            except FoldError as exc:
                raise CalibrationError(f"{source}: quantizer {name!r}: {exc}") from None
            if (form == "per-channel") != (fold is not None):
                raise CalibrationError(f"{source}: quantizer {name!r} of the {form} form "
                                       f"{'needs' if form == 'per-channel' else 'takes no'} a fold")
            quantizers[name] = QuantizerCalibration(q["method"], q["unsigned"], amax, q["min"], q["absmax"], options,
                                                    form, low, fold)
        return cls(quantizers, (lo, hi), payload["fingerprint"], payload.get("settings", {}),
                   payload.get("integer", {}))

    def save(self, path: str | Path) -> Path:
        write_atomic(path, json.dumps(self.to_dict(), indent=1) + "\n")
        return Path(path)

    @classmethod
    def load(cls, path: str | Path) -> "Calibration":
        payload = files.read_json(path, "calibration file", CalibrationError)
        return cls.from_dict(payload, source=f"calibration file {path}")



