"""Empirical bias correction: each layer's bias absorbs the mean error of its quantized output.

Layer by layer in network order, the layer's output in the quantized model (quantized input, quantized weight)
is compared with the FP32 model's on the calibration inputs; the mean difference per output channel is
subtracted from the bias. The error's systematic part (a shifted mean, which rounding weights and clipping
activations both cause) goes; the noise stays. Layers without a bias are left alone (named in the log).
"""
from __future__ import annotations

import logging

import torch

from .layers import Reference, capture

__all__ = ["correct_biases"]

log = logging.getLogger("quantsearch")


def correct_biases(qmodel, batches: list[torch.Tensor], progress=None) -> dict[str, torch.Tensor]:
    """Correct every quantized weight layer's bias in place; returns ``{<module>.bias: new bias}``."""
    changed: dict[str, torch.Tensor] = {}
    names = [n for n in qmodel.weight_names if not qmodel.quantizer(n)._disabled]
    reference = Reference(qmodel, [n for n in names if qmodel.weight_module(n).bias is not None], batches,
                          inputs=False)  # the FP32 outputs, taken once for all layers
    for name in (progress(names) if progress is not None else names):
        module = qmodel.weight_module(name)
        if module.bias is None:
            log.info("bias correction: %s has no bias, left as is", name)
            continue
        quantized, fp32 = capture(qmodel, name, batches), reference.pop(name)
        channel_axis = -1 if isinstance(module, torch.nn.Linear) else 1
        total, count = torch.zeros_like(module.bias, dtype=torch.float64), 0
        for (_, yq), (_, y) in zip(quantized, fp32):
            error = (yq - y).double().movedim(channel_axis, -1).reshape(-1, module.bias.numel())
            total += error.sum(0)
            count += error.shape[0]
        key = name.rsplit(":", 1)[0] + ".bias"
        changed[key] = (module.bias.detach().double() - total / max(count, 1)).to(module.bias.dtype)
        qmodel.add_refined({key: changed[key]})
    return changed
