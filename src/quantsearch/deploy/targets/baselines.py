"""ONNX Runtime's own uniform int8, the baselines a target's front must beat or include, and an ONNX file as a
model that an :class:`~quantsearch.search.evaluator.Evaluator` can score.

``quantize_dynamic`` (int8 weights, uint8 activations quantized at run time) and ``quantize_static`` (QDQ after
ORT's ``quant_pre_process``, uint8 activations by MinMax on calibration batches, int8 per-channel weights) run on
the FP32 export, as ORT's documentation tells a user to.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable

import torch
from torch import nn

from ..errors import ExportError
from .static import run_batches, runtime_session

__all__ = ["ort_quantized", "OnnxModel", "ORT_BASELINES"]

ORT_BASELINES = ("ORT dynamic int8", "ORT static int8")


def ort_quantized(fp32: str | Path, folder: str | Path, batches: Iterable[torch.Tensor]) -> dict[str, Path]:
    """ORT's ``quantize_dynamic`` and ``quantize_static`` of the FP32 file ``fp32`` (static: calibrated on
    ``batches``), written into ``folder``: ``{name: path}``. One line naming ORT's reason when it cannot."""
    import logging

    from onnxruntime.quantization import (CalibrationDataReader, QuantFormat, QuantType, quantize_dynamic,
                                          quantize_static)
    from onnxruntime.quantization.shape_inference import quant_pre_process

    folder = Path(folder)
    feeds = [{"input": b.detach().cpu().float().contiguous().numpy()} for b in batches]

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter(feeds)

        def get_next(self):
            return next(self.batches, None)

    out = {name: folder / f"{name.replace(' ', '_')}.onnx" for name in ORT_BASELINES}
    logging.disable(logging.WARNING)  # ORT's quantizer warns once per node it leaves alone (every LayerNorm)
    try:
        quantize_dynamic(str(fp32), str(out["ORT dynamic int8"]), weight_type=QuantType.QInt8)
        quant_pre_process(str(fp32), str(folder / "pre.onnx"), skip_symbolic_shape=True)
        quantize_static(str(folder / "pre.onnx"), str(out["ORT static int8"]), Reader(),
                        quant_format=QuantFormat.QDQ, per_channel=True, activation_type=QuantType.QUInt8,
                        weight_type=QuantType.QInt8)
    except Exception as exc:  # noqa: BLE001 - ORT's quantizer raises many kinds
        raise ExportError(f"ONNX Runtime's quantizer fails on the FP32 export: {str(exc).splitlines()[0]}") from None
    finally:
        logging.disable(logging.NOTSET)
    return out


class OnnxModel(nn.Module):
    """An ONNX file in a default ORT session as a model: fed ``batch_size`` samples at a time (what a server at
    that batch size computes: a dynamic grid depends on it)."""

    def __init__(self, path: str | Path, batch_size: int = 1, threads: int | None = None):
        super().__init__()
        self.path, self.batch_size = Path(path), int(batch_size)
        self.session = runtime_session(str(path), threads)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return run_batches(self.session, x, self.batch_size)
