"""Refinement after the search: weights and biases changed so that a chosen configuration loses less.

Too slow to run per candidate, so it runs on chosen points (``apply --refine METHOD``). Every method has one
signature, ``method(qmodel, batches, **options) -> {state-dict key: tensor}``, and returns the parameters it
changed (already in place on ``qmodel``, through :attr:`QuantizedActivationsModel.refined`, so that removing or
re-folding the model keeps them apart from its own weights):

- ``bias-correction`` (:mod:`.bias_correction`): each layer's bias absorbs the mean error of its quantized output;
- ``adaround`` (:mod:`.adaround`): each weight's rounding (up or down) is learned layer by layer (Nagel et al.,
  2020), with its per-channel scale unchanged, so the refined weights sit on the same grid.

:mod:`.layers` captures, for one weight layer, its input in the quantized model and its FP32 output.
"""
from __future__ import annotations

from typing import Callable, Iterable

import torch

from .adaround import adaround
from .bias_correction import correct_biases

__all__ = ["REFINERS", "refine"]

REFINERS: dict[str, Callable[..., dict[str, torch.Tensor]]] = {"bias-correction": correct_biases,
                                                                "adaround": adaround}


def refine(qmodel, batches: Iterable[torch.Tensor], method: str, **options) -> dict[str, torch.Tensor]:
    """Refine ``qmodel`` at its current bits with ``method`` on calibration inputs ``batches``; returns (and
    keeps on ``qmodel``) the parameters changed."""
    if method not in REFINERS:
        raise ValueError(f"unknown refinement {method!r}; choose from {', '.join(REFINERS)}")
    batches = list(batches)
    if not batches:
        raise ValueError("refinement needs calibration batches; the calibration split is empty")
    return REFINERS[method](qmodel, batches, **options)
