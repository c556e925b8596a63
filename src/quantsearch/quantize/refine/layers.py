"""One weight layer's data for refinement: its input and output in the FP32 or the quantized model, its forward.

In the quantized model (activation quantizers on, earlier layers already refined) a layer sees the error that
reaches it; in the FP32 model it sees what it was trained on. Bias correction compares the two outputs; AdaRound
learns on the FP32 ones by default. A pass stops as soon as the layer has run, so capturing layer ``k``
costs the first ``k`` layers' share of a forward pass, not a whole one.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["capture", "layer_forward"]


class _Stop(Exception):
    """Raised by a capture hook once the layer has run: the rest of the forward pass is not needed."""


def layer_forward(module: nn.Module, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
                  ) -> torch.Tensor:
    """``module``'s forward on ``x`` with ``weight`` and ``bias`` in place of its own (Linear or ConvNd)."""
    if isinstance(module, nn.Linear):
        return F.linear(x, weight, bias)
    return module._conv_forward(x, weight, bias)


def capture(qmodel, name: str, batches: list[torch.Tensor], quantized: bool) -> list[tuple[torch.Tensor, ...]]:
    """``(input, output)`` of weight layer ``name`` (``<module>:weight``) per batch: with ``quantized``, the input
    of the quantized model (and the layer's output there, weight quantized, output quantizer not applied); else
    the FP32 model's (its own weights, folded, without the refinements made so far)."""
    module = qmodel.weight_module(name)
    out: list[tuple[torch.Tensor, ...]] = []

    def hook(_module, args, output):
        out.append((args[0].detach(), output.detach()))
        raise _Stop

    # registered first, so it sees the output before the layer's own output quantizer replaces it
    handle = module.register_forward_hook(hook, prepend=True)
    try:
        with torch.no_grad():
            for x in batches:
                try:
                    if quantized:
                        qmodel(x)
                    else:  # the FP32 model: folds kept (they keep the function), refinements so far left out
                        with qmodel.unrefined(), qmodel.quantization_disabled():
                            qmodel(x)
                except _Stop:
                    continue
                raise RuntimeError(f"weight layer {name!r} did not run in a forward pass")
    finally:
        handle.remove()
    return out
