"""Calibration: the amax of every quantizer, measured with quantization off, then quantization on.

This follows FQ-ViT's flow (open calibrate -> feed batches -> close calibrate -> quant). amax tables are stored as
JSON, never pickle.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Iterable

import torch

from .quantized_model import quiet_quantizers
from .store import write_atomic

__all__ = ["CalibrationError", "calibrate_max", "save_amax", "load_amax", "batch_inputs"]

AMAX_FORMAT = "quantsearch-amax"
AMAX_VERSION = 1


class CalibrationError(ValueError):
    """Calibration that saw no data, or produced an amax that cannot quantize (zero or non-finite)."""


def batch_inputs(batch) -> torch.Tensor:
    """The model input of a loader batch: the tensor itself, or the first element of ``(x, y, ...)``."""
    return batch[0] if isinstance(batch, (tuple, list)) else batch


def calibrate_max(qmodel, batches: Iterable, num_batches: int | None = None) -> dict[str, float]:
    """Set each activation quantizer's amax to max|x| over the first ``num_batches`` batches (all if None).

    The model runs in FP32 meanwhile: activation quantizers only observe, weight quantizers are switched off
    (their amax is max|w| per channel, set when they are created).
    """
    activations = set(qmodel.activation_names)
    quantizers = [(n, q) for n, q in qmodel.named_quantizers() if n in activations]
    weights = [q for n, q in qmodel.named_quantizers() if n not in activations]
    weights_were_disabled = [q._disabled for q in weights]
    for q in weights:
        q.disable()
    with quiet_quantizers():
        for _, q in quantizers:
            q._calibrator.reset()
            q.disable_quant()
            q.enable_calib()
    device = qmodel._device()
    seen = 0
    try:
        qmodel.eval()
        with torch.no_grad():
            for batch in batches:
                if num_batches is not None and seen >= num_batches:
                    break
                qmodel(batch_inputs(batch).to(device))
                seen += 1
    finally:
        with quiet_quantizers():
            for _, q in quantizers:
                q.disable_calib()
                q.enable_quant()
        for q, was in zip(weights, weights_were_disabled):
            q._disabled = was
    if seen == 0:
        raise CalibrationError("calibration saw no batch: the calibration data is empty")
    amax = {}
    for name, q in quantizers:
        value = q._calibrator.compute_amax()
        if value is None:
            raise CalibrationError(f"quantizer {name!r} saw no tensor during calibration (is its module used?)")
        amax[name] = float(value)
    check_amax(amax)
    qmodel.amax = amax
    return amax


def check_amax(amax: dict[str, float]) -> None:
    for name, value in amax.items():
        if not math.isfinite(value) or value <= 0:
            raise CalibrationError(f"quantizer {name!r} has amax {value}: it cannot quantize (zero or non-finite)")


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
    qmodel.amax = amax
    return amax
