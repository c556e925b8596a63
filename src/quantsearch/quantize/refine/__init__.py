"""Refinement after the search: weights and biases changed so that a chosen configuration loses less.

Too slow to run per candidate, so it runs on chosen points (``apply --refine METHOD``). Every method has one
signature, ``method(qmodel, batches, **options) -> {state-dict key: tensor}`` (steps chain with commas), and
returns the parameters it
changed (already in place on ``qmodel``, through :attr:`QuantizedActivationsModel.refined`, so that removing or
re-folding the model keeps them apart from its own weights):

- ``bias-correction`` (:mod:`.bias_correction`): each layer's bias absorbs the mean error of its quantized output;
- ``adaround`` (:mod:`.adaround`): each weight's rounding (up or down) is learned layer by layer (Nagel et al.,
  2020), with its per-channel scale unchanged, so the refined weights sit on the same grid.
- ``brecq``, ``brecq-lsq``, ``qdrop`` (:mod:`.reconstruction`): the rounding learned per block against the
  block's FP32 output (BRECQ); ``brecq-lsq`` also learns the activation grids (LSQ, :mod:`.lsq`; they become the
  quantizers' amax and low ends) and the biases; ``qdrop`` is ``brecq-lsq`` with activation quantization dropped
  at random while learning (QDrop). Blocks are found by :mod:`.blocks`.

:mod:`.layers` captures a weight layer's input and output in the quantized model, and the FP32 model's for all
layers in one pass (the reference does not change while a method refines layer after layer), and runs a layer's
own forward with other weights.
"""
from __future__ import annotations

import inspect
from typing import Callable, Iterable

import torch

from ..limits import REFINEMENTS, check_refinement
from .adaround import adaround
from .bias_correction import correct_biases
from .reconstruction import brecq, brecq_lsq, qdrop

__all__ = ["REFINERS", "refine"]

REFINERS: dict[str, Callable[..., dict[str, torch.Tensor]]] = {"bias-correction": correct_biases,
                                                                "adaround": adaround, "brecq": brecq,
                                                                "brecq-lsq": brecq_lsq, "qdrop": qdrop}
assert tuple(REFINERS) == REFINEMENTS


def refine(qmodel, batches: Iterable[torch.Tensor], method: str, **options) -> dict[str, torch.Tensor]:
    """Refine ``qmodel`` at its current bits with ``method`` on calibration inputs ``batches``; returns (and
    keeps on ``qmodel``) the parameters changed. ``method`` may chain steps with commas
    (``adaround,bias-correction``: the biases then absorb what the learned rounding left); ``options`` go to
    every step that takes them."""
    steps = check_refinement(method)
    batches = list(batches)
    if not batches:
        raise ValueError("refinement needs calibration batches; the calibration split is empty")
    changed: dict[str, torch.Tensor] = {}
    for step in steps:
        accepted = inspect.signature(REFINERS[step]).parameters
        changed |= REFINERS[step](qmodel, batches, **{k: v for k, v in options.items() if k in accepted})
    return changed
