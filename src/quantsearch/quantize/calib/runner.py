"""The calibration pass: :func:`calibrate` runs the batches once and turns the statistics into a :class:`Calibration`.

Quantization is off during the pass (FQ-ViT's calibrate -> feed -> quant flow) and weight quantizers are
disabled, so every activation quantizer's :class:`TensorStatistics` sees the FP32 model; the weights and the
calibration inputs are fingerprinted on the way, and the result is applied to the model.
"""
from __future__ import annotations

import fnmatch
import itertools
import math
from dataclasses import replace
from typing import Any, Iterable, Mapping

import torch

from ...fingerprints import DataDigest, fingerprint_model
from ..fakequant import quiet_quantizers
from ..fold import FoldError, fit_folds
from ..forms import fit_asymmetric, fit_symmetric
from ..limits import LOG_FORMS, MAX_BITS, MIN_BITS, NARROW_LOG_FORMS, log_grid_at
from .methods import (HISTOGRAM_METHODS, PER_BIT_METHODS, RANGE_FIT_METHODS, CalibrationError, MethodSpec,
                      form_method_problem, resolve_methods)
from .result import Calibration, QuantizerCalibration
from .statistics import NUM_BINS, TensorStatistics

__all__ = ["DEFAULT_BITS", "batch_inputs", "data_fingerprint", "calibrate", "calibrate_max"]

DEFAULT_BITS = (MIN_BITS, 8)


def batch_inputs(batch) -> torch.Tensor:
    """The model input of a loader batch: the tensor itself, or the first element of ``(x, y, ...)``."""
    return batch[0] if isinstance(batch, (tuple, list)) else batch


def data_fingerprint(batches: Iterable, num_batches: int | None = None) -> str:
    """sha256 of the inputs of the first ``num_batches`` batches, as :func:`calibrate` records it."""
    digest = DataDigest()
    for batch in itertools.islice(batches, num_batches):
        digest.update(batch_inputs(batch))
    return digest.hexdigest()


def calibrate(qmodel, batches: Iterable, num_batches: int | None = None, method: str = "max", *,
              bits: tuple[int, int] = DEFAULT_BITS, overrides: Mapping[str, Any] | None = None,
              percentile: float = 99.99, momentum: float = 0.95, detect_unsigned: bool = True,
              num_bins: int = NUM_BINS) -> Calibration:
    """Calibrate every quantizer of ``qmodel`` in one pass over ``num_batches`` batches (all if None) and apply it.

    Args:
        method: the default method (see :mod:`quantsearch.quantize.calib`); ``overrides`` maps quantizer-name
            globs to other methods (:func:`resolve_methods`).
        bits: inclusive bit-width range of the amax table (a width outside it takes the nearest width's amax).
        detect_unsigned: give quantizers whose calibration data is never negative the unsigned range.

    Per-channel quantizers' LayerNorm ranges are folded into the model first (:func:`~..fold.fit_folds`, one
    extra pass), and their folded tensors calibrated like uniform ones. A log2 or log-sqrt2 quantizer takes the
    calibration maximum at every width (method ``max``) whatever the method says; a -narrow one at its log widths,
    and the method's amax (unsigned) above. Asymmetric and per-head quantizers take ``mse`` (ranges fitted by least
    squared error on sampled values) or ``max`` (the whole range seen); any other method for them is refused,
    before the pass.
    """
    activations = qmodel.activation_names
    specs = resolve_methods(activations, MethodSpec(method, percentile, momentum).validated(), overrides)
    forms = qmodel.forms
    _check_form_methods(specs, forms, method, overrides)
    lo, hi = int(bits[0]), int(bits[1])
    if not MIN_BITS <= lo <= hi <= MAX_BITS:
        raise CalibrationError(f"calibration bits {lo}:{hi} must satisfy {MIN_BITS} <= LO <= HI <= {MAX_BITS}")
    # weight quantizers keep their per-channel max|w| and are off meanwhile: the pass sees the FP32 model
    quantizers = [(n, qmodel.quantizer(n)) for n in activations]
    weight_quantizers = [qmodel.quantizer(n) for n in qmodel.weight_names]
    weights_were_disabled = [q._disabled for q in weight_quantizers]
    for q in weight_quantizers:
        q.disable()
    qmodel.folds = {}  # the fingerprint, and the folds' ranges, are of the model's own weights
    weights = fingerprint_model(qmodel.model)
    folds, per_channel = {}, [n for n in activations if forms[n] == "per-channel"]
    stats = {n: TensorStatistics(specs[n].method in HISTOGRAM_METHODS, specs[n].momentum, num_bins,
                                 sample=forms[n] == "asymmetric", rows=forms[n] == "per-head")
             for n, _ in quantizers}
    try:
        if per_channel:  # RepQ-ViT: fold the LayerNorms' channel ranges first, then calibrate the folded tensors
            batches, num_batches = [batch_inputs(b) for b in itertools.islice(batches, num_batches)], None
            try:
                folds = fit_folds(qmodel, batches, per_channel)
            except FoldError as exc:
                raise CalibrationError(str(exc)) from None
        data = _observe(qmodel, quantizers, stats, batches, num_batches)
    finally:
        for q, was in zip(weight_quantizers, weights_were_disabled):
            q._disabled = was
    if data.samples == 0:
        raise CalibrationError("calibration saw no batch: the calibration data is empty")
    for op in qmodel.integer:
        op.end_calibration()
    integer = {op.name: {"impl": op.impl, **op.state()} for op in qmodel.integer}

    result = {name: _quantizer_calibration(name, stats[name], specs[name], forms[name], (lo, hi), detect_unsigned,
                                           getattr(q, "groups", 1)) for name, q in quantizers}
    result = {n: replace(c, fold=folds[n]) if n in folds else c for n, c in result.items()}
    settings = {"method": method, "percentile": percentile, "momentum": momentum,
                "overrides": {str(k): v for k, v in (overrides or {}).items()}, "detect_unsigned": detect_unsigned,
                "num_bins": num_bins, "samples": data.samples}
    calibration = Calibration(result, (lo, hi), {"weights": weights, "data": data.hexdigest()}, settings, integer)
    calibration.apply(qmodel)
    return calibration


def _observe(qmodel, quantizers, stats, batches: Iterable, num_batches: int | None) -> DataDigest:
    """The pass: each activation quantizer's statistics, and each integer operator's input range, on the FP32
    model (the caller turns the weight quantizers off); returns the digest of the inputs seen."""
    data = DataDigest()
    saved = [(q._calibrator, q._disabled) for _, q in quantizers]
    with quiet_quantizers():
        for name, q in quantizers:
            q._calibrator = stats[name]
            q._disabled = False
            q.disable_quant()
            q.enable_calib()
    device = qmodel._device()
    for op in qmodel.integer:  # integer operators run in float meanwhile and record their input ranges
        op.begin_calibration()
    try:
        qmodel.eval()
        with torch.no_grad(), quiet_quantizers():
            for batch in itertools.islice(batches, num_batches):
                x = batch_inputs(batch)
                data.update(x)
                qmodel(x.to(device))
    finally:
        with quiet_quantizers():
            for (_, q), (calibrator, disabled) in zip(quantizers, saved):
                q.disable_calib()
                q.enable_quant()
                q._calibrator, q._disabled = calibrator, disabled
        for op in qmodel.integer:
            op.observing = False
    return data


def _check_form_methods(specs: Mapping[str, MethodSpec], forms: Mapping[str, str], method: str,
                        overrides: Mapping[str, Any] | None) -> None:
    """Refuse (one line) a method that an asymmetric or per-head quantizer cannot take, naming where it came from."""
    for name, spec in specs.items():
        glob = next((str(g) for g in (overrides or {}) if fnmatch.fnmatchcase(name, str(g))), None)
        given = f"calib-method {method}" if glob is None else f"calib-overrides[{glob!r}] {spec.method}"
        if spec.method not in RANGE_FIT_METHODS.get(forms[name], (spec.method,)):
            raise CalibrationError(form_method_problem(f"quantizer {name!r}", forms[name], given))


def _quantizer_calibration(name: str, s: TensorStatistics, spec: MethodSpec, form: str, bits: tuple[int, int],
                           detect_unsigned: bool, groups: int = 1) -> QuantizerCalibration:
    """One quantizer's calibration from its statistics, or one line saying why it cannot quantize."""
    lo, hi = bits
    if s.nonfinite:
        raise CalibrationError(f"quantizer {name!r} saw NaN or Inf in {s.nonfinite} calibration batch(es): it "
                               "cannot quantize (non-finite calibration data, made by the model before it)")
    if s.batches == 0:
        raise CalibrationError(f"quantizer {name!r} saw no tensor during calibration (is its module used?)")
    if not math.isfinite(s.absmax) or s.absmax <= 0:
        raise CalibrationError(f"quantizer {name!r} has amax {s.absmax}: it cannot quantize (zero or "
                               "non-finite calibration data)")
    if form in LOG_FORMS and s.min < 0:
        raise CalibrationError(f"quantizer {name!r} has the {form} form but saw negative values (min "
                               f"{s.min:.4g}): a log grid suits non-negative tensors such as attention "
                               "probabilities; give it the uniform form")
    if form in LOG_FORMS and form not in NARROW_LOG_FORMS:  # a log grid at every width
        spec = MethodSpec("max")
    if form == "asymmetric":
        return _asymmetric_calibration(s, bits, spec.method)
    unsigned = bool(detect_unsigned and s.min >= 0) or form in LOG_FORMS
    if form == "per-head":
        return _per_head_calibration(s, bits, unsigned, groups, spec.method)
    if spec.method in PER_BIT_METHODS:
        amax = {b: s.amax(spec, b, unsigned) for b in range(lo, hi + 1)}
    else:
        value = s.amax(spec, hi, unsigned)
        amax = {b: value for b in range(lo, hi + 1)}
    # on the log grid the top power is the largest value seen: clipping the largest costs most
    amax.update({b: s.absmax for b in amax if log_grid_at(form, b)})
    for b, v in amax.items():
        if not math.isfinite(v) or v <= 0:
            raise CalibrationError(f"quantizer {name!r} got amax {v} at {b} bits from {spec.method}: "
                                   "it cannot quantize")
    options = {k: v for k, v in spec.to_dict().items() if k != "method"}
    return QuantizerCalibration(spec.method, unsigned, amax, s.min, s.absmax, options, form)


def _asymmetric_calibration(s: TensorStatistics, bits: tuple[int, int], method: str) -> QuantizerCalibration:
    """An asymmetric quantizer's range per width: ``mse`` fits it on the sampled values by least squared error,
    ``max`` takes ``[min, max]`` of all values seen (widened to hold 0). amax holds the upper end, kept positive."""
    if method == "max":  # float32, as the quantizer's buffers hold them
        whole = tuple(float(v) for v in torch.tensor([min(s.min, 0.0), max(s.max, 0.0)], dtype=torch.float32))
    values = s.sample() if method == "mse" else None
    amax, low = {}, {}
    for b in range(bits[0], bits[1] + 1):
        lo, hi = fit_asymmetric(values, b) if method == "mse" else whole
        low[b], amax[b] = lo, max(hi, 1e-6 * max(1.0, -lo))
    return QuantizerCalibration(method, False, amax, s.min, s.absmax, {}, "asymmetric", low)


def _per_head_calibration(s: TensorStatistics, bits: tuple[int, int], unsigned: bool, groups: int, method: str
                          ) -> QuantizerCalibration:
    """A per-head quantizer's amax per group and width: ``mse`` fits each on its group's sampled features by least
    squared error, ``max`` takes each group's max |x| over all values seen (an all-zero group gets 1, as a fit
    does). The histogram is of the whole tensor, so no other method has a per-group meaning."""
    if method == "max":
        whole = s.feature_absmax.reshape(groups, -1).amax(1)
        whole = [float(v) for v in torch.where(whole > 0, whole, torch.ones_like(whole))]
        return QuantizerCalibration(method, unsigned, {b: whole for b in range(bits[0], bits[1] + 1)}, s.min,
                                    s.absmax, {}, "per-head")
    rows = s.sample()
    values = rows.reshape(len(rows), groups, -1).transpose(0, 1).reshape(groups, -1)
    amax = {b: fit_symmetric(values, b, unsigned) for b in range(bits[0], bits[1] + 1)}
    return QuantizerCalibration(method, unsigned, amax, s.min, s.absmax, {}, "per-head")


def calibrate_max(qmodel, batches: Iterable, num_batches: int | None = None) -> dict[str, float]:
    """Max calibration with the signed range everywhere (the original behaviour); returns amax per quantizer."""
    calibrate(qmodel, batches, num_batches, "max", detect_unsigned=False)
    amax = qmodel.amax
    return {n: amax[n] for n in qmodel.activation_names}
