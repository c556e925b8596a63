"""Calibration: the amax of every quantizer for every bit-width, its signedness, and calibration files.

One pass over the calibration batches, quantization off (FQ-ViT's calibrate -> feed -> quant flow), records per
quantizer the running absmax, an exponential moving average of per-batch absmax, the minimum, and (for the
histogram methods) pytorch-quantization's ``HistogramCalibrator`` histogram of |x|. From those, without another
forward pass, every quantizer gets an amax for every bit-width of the search range:

- ``max``: max |x| over all batches (the same for every width);
- ``moving-max``: ``m * amax + (1 - m) * batch_absmax`` per batch (momentum ``m``, 0.95 by default);
- ``percentile``: the histogram edge below which ``percentile`` % of |x| lies (the same for every width);
- ``entropy``: the amax minimising the KL divergence between the histogram and its quantized copy (TensorRT);
- ``mse``: the amax minimising the histogram-weighted squared quantization error.

Entropy and mse depend on the bit-width, so a search judges each candidate with its own widths' amax
(``QuantizedActivationsModel.amax_table``). A quantizer whose calibration data is never negative (softmax
probabilities, ReLU outputs) takes the unsigned range [0, amax], which doubles its resolution at the same width.

The entropy and mse searches are pytorch-quantization's algorithms (``calib/histogram.py``) computed for all
candidate ranges at once: its entropy loops over bins in Python (seconds per quantizer and width, tens of minutes
for the demo's table) and its mse runs only on CUDA. The tests check both give the reference's answers.

A :class:`Calibration` is saved as JSON (data, never code) with sha256 fingerprints of the model weights and of the
calibration data, so a file is never applied to another model or other data by mistake.
"""
from __future__ import annotations

import fnmatch
import hashlib
import itertools
import json
import math
import warnings
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np
import torch
from torch import nn

from ..fakequant import TensorQuantizer, quiet_quantizers
from ..limits import MAX_BITS, MIN_BITS
from ...files import write_atomic

with warnings.catch_warnings():
    warnings.simplefilter("ignore", FutureWarning)
    from pytorch_quantization.calib import HistogramCalibrator

__all__ = [
    "METHODS", "HISTOGRAM_METHODS", "CalibrationError", "MethodSpec", "QuantizerCalibration", "Calibration",
    "TensorStatistics", "calibrate", "calibrate_max", "resolve_methods", "override_spec", "entropy_amax", "mse_amax",
    "percentile_amax", "weights_fingerprint", "data_fingerprint", "save_amax", "load_amax", "batch_inputs",
]

METHODS = ("max", "percentile", "entropy", "mse", "moving-max")
HISTOGRAM_METHODS = ("percentile", "entropy", "mse")
PER_BIT_METHODS = ("entropy", "mse")
NUM_BINS = 2048
START_BIN = 128  # pytorch-quantization's default: amax is never below 1/16 of the absmax
DEFAULT_BITS = (MIN_BITS, 8)

AMAX_FORMAT = "quantsearch-amax"
AMAX_VERSION = 1
CALIBRATION_FORMAT = "quantsearch-calibration"
CALIBRATION_VERSION = 1


class CalibrationError(ValueError):
    """Calibration that saw no data, an amax that cannot quantize, or a calibration file that does not fit."""


def batch_inputs(batch) -> torch.Tensor:
    """The model input of a loader batch: the tensor itself, or the first element of ``(x, y, ...)``."""
    return batch[0] if isinstance(batch, (tuple, list)) else batch


# -- methods -----------------------------------------------------------------------------------------------------
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


# -- one pass of statistics ----------------------------------------------------------------------------------------
class TensorStatistics:
    """Everything one calibration pass records for one quantizer; it stands in as the quantizer's calibrator.

    ``TensorQuantizer`` calls ``collect(x)`` on every tensor while calibration is on (once per batch for a module
    used once per forward).
    """

    def __init__(self, histogram: bool = False, momentum: float = 0.95, num_bins: int = NUM_BINS):
        self.momentum = float(momentum)
        self.num_bins = num_bins
        self.histogram = HistogramCalibrator(8, None, False, num_bins=num_bins) if histogram else None
        self.reset()

    def reset(self) -> None:
        self.batches = 0
        self.nonfinite = 0  # batches holding NaN or Inf (left out of every statistic)
        self.absmax = 0.0
        self.moving_max: float | None = None
        self.min = math.inf
        if self.histogram is not None:
            self.histogram.reset()

    def collect(self, x: torch.Tensor) -> None:
        x = x.detach()
        if x.numel() == 0:
            return
        lo, hi = (float(v) for v in torch.aminmax(x))
        if not (math.isfinite(lo) and math.isfinite(hi)):
            self.nonfinite += 1
            return
        absmax = max(-lo, hi)
        self.min = min(self.min, lo)
        self.absmax = max(self.absmax, absmax)
        self.moving_max = absmax if self.moving_max is None else (
            self.momentum * self.moving_max + (1 - self.momentum) * absmax)
        self.batches += 1
        if self.histogram is not None:
            self.histogram.collect(x)

    def hist(self) -> tuple[np.ndarray, np.ndarray]:
        """Counts and bin edges of |x| (as pytorch-quantization hands them to its amax searches)."""
        counts = self.histogram._calib_hist.int().cpu().numpy()
        edges = self.histogram._calib_bin_edges.cpu().numpy()
        return counts, edges[: len(counts) + 1]

    def amax(self, spec: MethodSpec, num_bits: int, unsigned: bool) -> float:
        if spec.method == "max":
            return self.absmax
        if spec.method == "moving-max":
            return float(self.moving_max)
        counts, edges = self.hist()
        if spec.method == "percentile":
            return percentile_amax(counts, edges, spec.percentile)
        if spec.method == "entropy":
            return entropy_amax(counts, edges, num_bits, unsigned)
        return mse_amax(counts, edges, num_bits, unsigned)


# -- amax from a histogram ------------------------------------------------------------------------------------------
def percentile_amax(counts: np.ndarray, edges: np.ndarray, percentile: float) -> float:
    """The left edge of the bin where the cumulative fraction of |x| first reaches ``percentile`` %."""
    counts = np.asarray(counts, dtype=np.float64)
    cdf = np.cumsum(counts / counts.sum())
    return float(edges[np.searchsorted(cdf, percentile / 100)])


def entropy_amax(counts: np.ndarray, edges: np.ndarray, num_bits: int, unsigned: bool = False,
                 start_bin: int = START_BIN) -> float:
    """The amax (a bin edge ``edges[i]``, ``i >= start_bin``) minimising KL(P_i || Q_i), the last on a tie.

    P_i is the histogram cut at bin i with the tail folded into its last bin; Q_i spreads each of the
    ``2^(b-1)`` (unsigned ``2^b``) quantization levels' mass evenly over its non-empty bins. Bin 0 takes bin 1's
    count (zeros after ReLU would dominate). With S_k, C_k the count and non-empty bins of level k, T the total:
    KL = (sum_j p_j log p_j - sum_k S_k log(S_k / C_k) - tail * log q_last) / T - log T + log sum_{j<i} n_j,
    which prices every i at once; near-ties are settled with the reference's own formula (scipy's entropy).
    """
    bins = np.asarray(counts, dtype=np.int64).copy()
    bins[0] = bins[1]
    n, total = len(bins), int(bins.sum())
    levels = 1 << (num_bits - 1 + int(unsigned))
    cum = np.concatenate([[0], np.cumsum(bins)]).astype(np.float64)
    nonempty = np.concatenate([[0], np.cumsum(bins != 0)])
    with np.errstate(divide="ignore", invalid="ignore"):
        xlogx = np.where(bins > 0, bins * np.log(np.maximum(bins, 1)), 0.0)
    cum_xlogx = np.concatenate([[0.0], np.cumsum(xlogx)])
    stops = np.arange(start_bin, n + 1)
    # sum_k S_k log(S_k / C_k) over the levels of cut i, and the mean count of the level holding bin i - 1; a cut
    # into no more bins than levels puts every bin in its own level (levels are narrower than a bin)
    within = cum_xlogx[stops].copy()
    q_last = bins[stops - 1].astype(np.float64)
    wide = np.flatnonzero(stops > levels)
    rows = max(1, (1 << 21) // (levels + 1))
    for first in range(0, len(wide), rows):
        k = wide[first: first + rows]
        i = stops[k]
        lo = np.ceil(np.linspace(0, i, levels + 1, axis=1)).astype(np.int64)  # first bin of each level
        s = cum[lo[:, 1:]] - cum[lo[:, :-1]]
        c = nonempty[lo[:, 1:]] - nonempty[lo[:, :-1]]
        with np.errstate(divide="ignore", invalid="ignore"):
            within[k] = np.where(c > 0, s * np.log(np.where(s > 0, s, 1) / np.maximum(c, 1)), 0.0).sum(1)
        last_level = (lo[:, :-1] <= (i - 1)[:, None]).sum(1) - 1
        r = np.arange(len(i))
        q_last[k] = s[r, last_level] / np.maximum(c[r, last_level], 1)
    last = bins[stops - 1].astype(np.float64)
    tail = total - cum[stops]
    ref_last = last + tail
    with np.errstate(divide="ignore", invalid="ignore"):
        a = cum_xlogx[stops - 1] + np.where(ref_last > 0, ref_last * np.log(np.maximum(ref_last, 1)), 0.0)
        b = within + np.where((last > 0) & (tail > 0), tail * np.log(np.where(q_last > 0, q_last, 1)), 0.0)
        divergences = (a - b) / total - math.log(total) + np.log(cum[stops])
    divergences[((last == 0) & (tail > 0)) | (cum[stops] == 0)] = np.inf
    best = np.min(divergences)
    near = np.flatnonzero(divergences <= best + 1e-9 * max(1.0, abs(best)))
    if len(near) > 1:
        exact = [_entropy_reference_divergence(bins, int(stops[k]), levels) for k in near]
        pick = near[len(exact) - 1 - int(np.argmin(exact[::-1]))]
    else:
        pick = near[0]
    return float(edges[stops[pick]])


def _entropy_reference_divergence(bins: np.ndarray, i: int, levels: int) -> float:
    """KL divergence of cut ``i`` exactly as pytorch-quantization's ``_compute_amax_entropy`` computes it."""
    from scipy.stats import entropy

    digitized = np.digitize(np.arange(i), np.linspace(0, i, num=levels + 1)) - 1
    nz = bins[:i] != 0
    d = digitized[nz]
    sums = np.bincount(d, weights=bins[:i][nz].astype(np.float64), minlength=levels)
    sizes = np.bincount(d, minlength=levels)
    quantized = np.zeros(i)
    quantized[nz] = sums[d] / sizes[d]
    reference = bins[:i].astype(np.float64)
    reference[-1] += bins[i:].sum()
    return float(entropy(reference, quantized))


def mse_amax(counts: np.ndarray, edges: np.ndarray, num_bits: int, unsigned: bool = False,
             start_bin: int = START_BIN) -> float:
    """The bin centre (index >= ``start_bin``) that, as amax, minimises sum_j n_j (Q(c_j) - c_j)^2; first on a tie.

    Q is the quantizer's grid as pytorch-quantization computes it (``round(c * s)`` clamped to the narrow signed
    or the unsigned range, divided by ``s = (2^(b-1+unsigned) - 1) / amax``). Empty bins add nothing, so only
    the occupied ones are priced.
    """
    counts_t = torch.as_tensor(np.asarray(counts), dtype=torch.float32)
    edges_t = torch.as_tensor(np.asarray(edges), dtype=torch.float32)
    centers = (edges_t[1:] + edges_t[:-1]) / 2
    occupied = counts_t > 0
    values, weights = centers[occupied], counts_t[occupied]
    candidates = centers[start_bin:]
    bound = 2.0 ** (num_bits - 1 + int(unsigned)) - 1.0
    floor = 0.0 if unsigned else -bound
    errors = torch.empty(len(candidates))
    rows = max(1, (1 << 20) // max(1, len(values)))
    with torch.no_grad():
        for first in range(0, len(candidates), rows):
            scale = bound / candidates[first: first + rows].unsqueeze(1)
            error = (values * scale).round_().clamp_(floor, bound).div_(scale).sub_(values).square_().mul_(weights)
            errors[first: first + rows] = error.sum(1) / len(centers)
    return float(candidates[int(errors.argmin())])


# -- fingerprints ---------------------------------------------------------------------------------------------------
def _tensor_bytes(t: torch.Tensor) -> bytes:
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def weights_fingerprint(model: nn.Module) -> str:
    """sha256 of every parameter and buffer of ``model`` (names, dtypes, shapes, bytes), quantizers excluded."""
    h = hashlib.sha256()
    skip = {id(m) for q in model.modules() if isinstance(q, TensorQuantizer) for m in q.modules()}
    for module_name, module in model.named_modules():
        if id(module) in skip:
            continue
        for name, t in itertools.chain(module.named_parameters(recurse=False), module.named_buffers(recurse=False)):
            if t is None:
                continue
            h.update(f"{module_name}.{name}|{t.dtype}|{tuple(t.shape)}|".encode())
            h.update(_tensor_bytes(t))
    return h.hexdigest()


class _DataHash:
    """sha256 of the calibration inputs in order; the batch size does not change it."""

    def __init__(self):
        self._h = hashlib.sha256()
        self.samples = 0
        self.shapes: set[tuple] = set()

    def update(self, x: torch.Tensor) -> None:
        self._h.update(_tensor_bytes(x.float()))
        self.samples += len(x)
        self.shapes.add(tuple(x.shape[1:]))

    def hexdigest(self) -> str:
        h = self._h.copy()
        h.update(f"|{self.samples}|{sorted(self.shapes)}".encode())
        return h.hexdigest()


def data_fingerprint(batches: Iterable, num_batches: int | None = None) -> str:
    """sha256 of the inputs of the first ``num_batches`` batches, as :func:`calibrate` records it."""
    digest = _DataHash()
    for batch in itertools.islice(batches, num_batches):
        digest.update(batch_inputs(batch))
    return digest.hexdigest()


# -- the result ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class QuantizerCalibration:
    """One quantizer's calibration: its method, amax per bit-width, signedness, and the range it saw."""

    method: str
    unsigned: bool
    amax: Mapping[int, float]
    min: float
    absmax: float
    options: Mapping[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Calibration:
    """Every quantizer's calibration, the bit range it covers, and what it was computed from (fingerprints)."""

    quantizers: Mapping[str, QuantizerCalibration]
    bits: tuple[int, int]
    fingerprint: Mapping[str, str]
    settings: Mapping[str, Any] = field(default_factory=dict)

    @property
    def amax_table(self) -> dict[str, dict[int, float]]:
        return {n: dict(q.amax) for n, q in self.quantizers.items()}

    @property
    def unsigned(self) -> dict[str, bool]:
        return {n: q.unsigned for n, q in self.quantizers.items()}

    @property
    def methods(self) -> dict[str, str]:
        return {n: q.method for n, q in self.quantizers.items()}

    def apply(self, qmodel) -> None:
        """Give ``qmodel`` this table and signedness; each quantizer takes its current bit-width's amax."""
        qmodel.unsigned = self.unsigned
        qmodel.amax_table = self.amax_table
        qmodel.bit_widths = qmodel.bits_dict()  # sets amax from the table

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
        weights = weights_fingerprint(qmodel.model)
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
            "quantizers": {n: {"method": q.method, **dict(q.options), "unsigned": q.unsigned,
                               "min": q.min, "absmax": q.absmax,
                               "amax": {str(b): v for b, v in sorted(q.amax.items())}}
                           for n, q in self.quantizers.items()},
        }

    @classmethod
    def from_dict(cls, payload: Any, source: str = "calibration file") -> "Calibration":
        import jsonschema

        try:
            jsonschema.validate(payload, _schema())
        except jsonschema.ValidationError as exc:
            where = "/".join(str(p) for p in exc.absolute_path) or "(top level)"
            raise CalibrationError(f"{source} is not a quantsearch calibration file (at {where}: "
                                   f"{exc.message})") from None
        lo, hi = payload["bits"]
        quantizers = {}
        for name, q in payload["quantizers"].items():
            amax = {int(b): float(v) for b, v in q["amax"].items()}
            if set(amax) != set(range(lo, hi + 1)):
                raise CalibrationError(f"{source}: quantizer {name!r} has amax for bits {sorted(amax)}, "
                                       f"not {lo}..{hi}")
            options = {k: q[k] for k in ("percentile", "momentum") if k in q}
            quantizers[name] = QuantizerCalibration(q["method"], q["unsigned"], amax, q["min"], q["absmax"], options)
        return cls(quantizers, (lo, hi), payload["fingerprint"], payload.get("settings", {}))

    def save(self, path: str | Path) -> Path:
        write_atomic(path, json.dumps(self.to_dict(), indent=1) + "\n")
        return Path(path)

    @classmethod
    def load(cls, path: str | Path) -> "Calibration":
        try:
            payload = json.loads(Path(path).read_text())
        except OSError as exc:
            raise CalibrationError(f"cannot read calibration file {path}: {exc.strerror}") from None
        except ValueError as exc:
            raise CalibrationError(f"calibration file {path} is not valid JSON: {exc}") from None
        return cls.from_dict(payload, source=f"calibration file {path}")


@lru_cache(maxsize=1)
def _schema() -> dict:
    return json.loads((resources.files("quantsearch") / "schemas" / "calibration.schema.json").read_text())


# -- calibrating ------------------------------------------------------------------------------------------------------
def calibrate(qmodel, batches: Iterable, num_batches: int | None = None, method: str = "max", *,
              bits: tuple[int, int] = DEFAULT_BITS, overrides: Mapping[str, Any] | None = None,
              percentile: float = 99.99, momentum: float = 0.95, detect_unsigned: bool = True,
              num_bins: int = NUM_BINS) -> Calibration:
    """Calibrate every quantizer of ``qmodel`` in one pass over ``num_batches`` batches (all if None) and apply it.

    Args:
        method: the default method (see the module docstring); ``overrides`` maps quantizer-name globs to other
            methods (:func:`resolve_methods`).
        bits: inclusive bit-width range of the amax table (a width outside it takes the nearest width's amax).
        detect_unsigned: give quantizers whose calibration data is never negative the unsigned range.
    """
    activations = qmodel.activation_names
    specs = resolve_methods(activations, MethodSpec(method, percentile, momentum).validated(), overrides)
    lo, hi = int(bits[0]), int(bits[1])
    if not MIN_BITS <= lo <= hi <= MAX_BITS:
        raise CalibrationError(f"calibration bits {lo}:{hi} must satisfy {MIN_BITS} <= LO <= HI <= {MAX_BITS}")
    # weight quantizers keep their per-channel max|w| and are off meanwhile: the pass sees the FP32 model
    quantizers = [(n, qmodel.quantizer(n)) for n in activations]
    weight_quantizers = [qmodel.quantizer(n) for n in qmodel.weight_names]
    weights_were_disabled = [q._disabled for q in weight_quantizers]
    for q in weight_quantizers:
        q.disable()
    stats = {n: TensorStatistics(specs[n].method in HISTOGRAM_METHODS, specs[n].momentum, num_bins)
             for n, _ in quantizers}
    weights = weights_fingerprint(qmodel.model)
    data = _DataHash()
    saved = [(q._calibrator, q._disabled) for _, q in quantizers]
    with quiet_quantizers():
        for name, q in quantizers:
            q._calibrator = stats[name]
            q._disabled = False
            q.disable_quant()
            q.enable_calib()
    device = qmodel._device()
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
        for q, was in zip(weight_quantizers, weights_were_disabled):
            q._disabled = was
    if data.samples == 0:
        raise CalibrationError("calibration saw no batch: the calibration data is empty")

    result = {}
    for name, _ in quantizers:
        s, spec = stats[name], specs[name]
        if s.nonfinite:
            raise CalibrationError(f"quantizer {name!r} saw NaN or Inf in {s.nonfinite} calibration batch(es): it "
                                   "cannot quantize (non-finite calibration data, made by the model before it)")
        if s.batches == 0:
            raise CalibrationError(f"quantizer {name!r} saw no tensor during calibration (is its module used?)")
        if not math.isfinite(s.absmax) or s.absmax <= 0:
            raise CalibrationError(f"quantizer {name!r} has amax {s.absmax}: it cannot quantize (zero or "
                                   "non-finite calibration data)")
        unsigned = bool(detect_unsigned and s.min >= 0)
        if spec.method in PER_BIT_METHODS:
            amax = {b: s.amax(spec, b, unsigned) for b in range(lo, hi + 1)}
        else:
            value = s.amax(spec, hi, unsigned)
            amax = {b: value for b in range(lo, hi + 1)}
        for b, v in amax.items():
            if not math.isfinite(v) or v <= 0:
                raise CalibrationError(f"quantizer {name!r} got amax {v} at {b} bits from {spec.method}: "
                                       "it cannot quantize")
        options = {k: v for k, v in spec.to_dict().items() if k != "method"}
        result[name] = QuantizerCalibration(spec.method, unsigned, amax, s.min, s.absmax, options)
    settings = {"method": method, "percentile": percentile, "momentum": momentum,
                "overrides": {str(k): v for k, v in (overrides or {}).items()}, "detect_unsigned": detect_unsigned,
                "num_bins": num_bins, "samples": data.samples}
    calibration = Calibration(result, (lo, hi), {"weights": weights, "data": data.hexdigest()}, settings)
    calibration.apply(qmodel)
    return calibration


def calibrate_max(qmodel, batches: Iterable, num_batches: int | None = None) -> dict[str, float]:
    """Max calibration with the signed range everywhere (the original behaviour); returns amax per quantizer."""
    calibrate(qmodel, batches, num_batches, "max", detect_unsigned=False)
    amax = qmodel.amax
    return {n: amax[n] for n in qmodel.activation_names}


def check_amax(amax: Mapping[str, float]) -> None:
    for name, value in amax.items():
        if not math.isfinite(value) or value <= 0:
            raise CalibrationError(f"quantizer {name!r} has amax {value}: it cannot quantize (zero or non-finite)")


# -- the plain amax file (one amax per quantizer) ------------------------------------------------------------------
def save_amax(qmodel, path: str | Path) -> None:
    """Write every activation quantizer's amax as JSON (atomically); weight amax follows from the weights."""
    amax = qmodel.amax
    payload = {"format": AMAX_FORMAT, "version": AMAX_VERSION,
               "amax": {n: amax[n] for n in qmodel.activation_names}}
    write_atomic(path, json.dumps(payload, indent=2))


def load_amax(qmodel, path: str | Path) -> dict[str, float]:
    """Read an amax JSON written by :func:`save_amax` and apply it; names must match the model's quantizers."""
    try:
        payload = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise CalibrationError(f"cannot read amax file {path}: {exc}") from None
    if not isinstance(payload, dict) or payload.get("format") != AMAX_FORMAT:
        raise CalibrationError(f"{path} is not a quantsearch amax file")
    amax = {str(k): float(v) for k, v in payload["amax"].items()}
    missing = [n for n in qmodel.activation_names if n not in amax]
    extra = [n for n in amax if n not in qmodel.activation_names]
    if missing or extra:
        raise CalibrationError(f"amax file {path} does not fit the model: missing {missing[:3]}, unknown {extra[:3]}")
    check_amax(amax)
    qmodel.amax_table = {}
    qmodel.amax = amax
    return amax
