"""Calibration: the amax of every quantizer for every bit-width, its signedness, and calibration files.

One pass over the calibration batches, quantization off, records per quantizer the running absmax, a moving
average of per-batch absmax, the minimum and (histogram methods) a histogram of |x|. From those, every quantizer
gets an amax for every bit-width of the search range:

- ``max``: max |x| over all batches (the same for every width);
- ``moving-max``: ``m * amax + (1 - m) * batch_absmax`` per batch (momentum ``m``, 0.95 by default);
- ``percentile``: the histogram edge below which ``percentile`` % of |x| lies (the same for every width);
- ``entropy``: the amax minimising the KL divergence between the histogram and its quantized copy (TensorRT);
- ``mse``: the amax minimising the histogram-weighted squared quantization error.

Entropy and mse depend on the bit-width, so a search judges each candidate with its own widths' amax. A quantizer
whose calibration data is never negative takes the unsigned range [0, amax] (twice the resolution).

Asymmetric and per-head quantizers have no single amax of |x|: ``mse`` fits their ranges by least squared error on
sampled values, ``max`` takes the whole range seen (per head); the other methods are refused for them in one line.

Modules: :mod:`.methods` (names, :class:`MethodSpec`, overrides), :mod:`.statistics` (the one-pass calibrator),
:mod:`.histogram` (percentile, entropy and mse searches), :mod:`.result` (:class:`Calibration` and its file),
:mod:`.runner` (:func:`calibrate`, the pass). Fingerprints come from :mod:`quantsearch.fingerprints`.
"""
from __future__ import annotations

from ...fingerprints import fingerprint_model as weights_fingerprint
from .histogram import entropy_amax, mse_amax, percentile_amax
from .methods import (HISTOGRAM_METHODS, METHODS, RANGE_FIT_METHODS, CalibrationError, MethodSpec, check_form_methods,
                      override_spec, resolve_methods)
from .result import Calibration, QuantizerCalibration
from .runner import batch_inputs, calibrate, calibrate_max, data_fingerprint
from .statistics import TensorStatistics

__all__ = [
    "METHODS", "HISTOGRAM_METHODS", "RANGE_FIT_METHODS", "CalibrationError", "MethodSpec", "QuantizerCalibration",
    "Calibration", "check_form_methods",
    "TensorStatistics", "calibrate", "calibrate_max", "resolve_methods", "override_spec", "entropy_amax", "mse_amax",
    "percentile_amax", "weights_fingerprint", "data_fingerprint", "batch_inputs",
]
