"""The units block reconstruction refines together, in the order the forward pass runs them, and their data.

A unit is the smallest module that is an item of a container (a name ending in a number: ``blocks.3``,
``layer2.1``, ``stages.1.0``) or a ``Sequential`` (a deep stem), and holds at least two quantized weight layers:
a transformer block, a residual block, an inverted-bottleneck block, a stem. That is BRECQ's block granularity,
found without knowing the architecture.
A quantized weight layer inside no such unit (a stem, a patch embedding, a classifier) is a unit of its own. A
unit runs its own hooks, so the activation quantizers on its modules (and on its own input and output) are part
of what it learns.

:func:`unit_data` takes a unit's input in the quantized model (earlier units refined and their steps learned),
and its input and output in the FP32 model, one pass each, stopped once the unit has run.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .layers import _Stop, run_until_stopped

__all__ = ["Unit", "find_units", "block_modules", "output_fisher", "unit_data"]


@dataclass(frozen=True)
class Unit:
    """A module refined as one: its weight quantizers and activation quantizers (names in the quantized model)."""

    name: str
    module: nn.Module
    weights: tuple[str, ...]
    activations: tuple[str, ...]


def _contains(parent: nn.Module, module: nn.Module) -> bool:
    return any(m is module for m in parent.modules())


def _candidates(model: nn.Module, layers: set[int]) -> list[tuple[str, nn.Module]]:
    """The smallest numbered items and Sequentials holding two or more of ``layers`` (module ids)."""
    counts = {name: sum(id(m) in layers for m in module.modules()) for name, module in model.named_modules()}
    found = [(n, m) for n, m in model.named_modules()
             if n and (n.rsplit(".", 1)[-1].isdigit() or isinstance(m, nn.Sequential)) and counts[n] >= 2]
    return [(n, m) for n, m in found if not any(o.startswith(n + ".") for o, _ in found)]


def _call_order(qmodel, modules: list[nn.Module], example: torch.Tensor) -> dict[nn.Module, int]:
    """How many times each of ``modules`` runs in one FP32 forward pass, keyed in the order they first run; a
    module that takes anything but one tensor, or returns anything but one, counts as running twice (it cannot
    be replayed on its captured input alone)."""
    calls: dict[nn.Module, int] = {}

    def before(module, args, kwargs):
        plain = len(args) == 1 and not kwargs and isinstance(args[0], torch.Tensor)
        calls[module] = calls.get(module, 0) + (1 if plain else 2)

    def after(module, _args, output):
        if not isinstance(output, torch.Tensor):
            calls[module] += 2

    handles = [m.register_forward_pre_hook(before, with_kwargs=True) for m in modules]
    handles += [m.register_forward_hook(after) for m in modules]
    try:
        with torch.no_grad(), qmodel.quantization_disabled():
            qmodel(example)
    finally:
        for handle in handles:
            handle.remove()
    return calls


def find_units(qmodel, example: torch.Tensor) -> list[Unit]:
    """The units of ``qmodel`` that hold an enabled weight quantizer, in the order one forward pass on
    ``example`` runs them. A module that runs more than once per pass (shared weights) cannot be reconstructed
    against one output: its weight layers become units of their own, and one that itself runs twice is left out."""
    weights = [n for n in qmodel.weight_names if not qmodel.quantizer(n)._disabled]
    layer_of = {qmodel.weight_module(n): n for n in weights}
    blocks = _candidates(qmodel.model, {id(m) for m in layer_of})
    calls = _call_order(qmodel, [m for _, m in blocks] + list(layer_of), example[:1])
    blocks = [(n, m) for n, m in blocks if calls.get(m) == 1]
    units: list[tuple[str, nn.Module]] = list(blocks)
    for module, name in layer_of.items():
        if calls.get(module) == 1 and not any(_contains(b, module) for _, b in blocks):
            units.append((name.rsplit(":", 1)[0], module))
    order = list(calls)
    units.sort(key=lambda unit: order.index(unit[1]))
    activations = [(n, qmodel.quantized_module(n)) for n in qmodel.activation_names
                   if not qmodel.quantizer(n)._disabled]
    return [Unit(name, module, tuple(w for w in weights if _contains(module, qmodel.weight_module(w))),
                 tuple(a for a, m in activations if _contains(module, m))) for name, module in units]


def block_modules(qmodel, example: torch.Tensor) -> list[tuple[str, nn.Module]]:
    """The blocks of ``qmodel``'s model whatever is quantized: the smallest numbered items and Sequentials holding
    two or more Linear or Conv layers, each run once (on one tensor, returning one) per pass, in forward order."""
    layers = {id(m) for m in qmodel.model.modules() if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd))}
    blocks = _candidates(qmodel.model, layers)
    calls = _call_order(qmodel, [m for _, m in blocks], example[:1])
    order = list(calls)
    return sorted([(n, m) for n, m in blocks if calls.get(m) == 1], key=lambda block: order.index(block[1]))


def _pass(qmodel, module: nn.Module, batches: list[torch.Tensor], output: bool) -> list[tuple]:
    """``(input, output or None)`` of ``module`` per batch, in the model as it is (hooks first, so the input
    is what reaches the module before its own input quantizer, the output what leaves it before its own output
    quantizer); each pass stops once the module has run."""
    seen: list[tuple] = []

    def before(_module, args):
        seen.append((args[0].detach().clone(), None))
        if not output:
            raise _Stop

    def after(_module, _args, out):
        seen[-1] = (seen[-1][0], out.detach().clone())
        raise _Stop

    handles = [module.register_forward_pre_hook(before, prepend=True)]
    if output:
        handles.append(module.register_forward_hook(after, prepend=True))
    try:
        run_until_stopped(qmodel, batches, "a reconstruction unit")
    finally:
        for handle in handles:
            handle.remove()
    return seen


def unit_data(qmodel, unit: Unit, batches: list[torch.Tensor], fisher: bool = False) -> tuple[torch.Tensor, ...]:
    """``(quantized input, FP32 input, FP32 output)`` of ``unit`` over all ``batches``, concatenated; with
    ``fisher``, also each output element's weight (:func:`output_fisher`)."""
    quantized = [x for x, _ in _pass(qmodel, unit.module, batches, output=False)]
    with qmodel.unrefined(), qmodel.quantization_disabled():
        fp32 = _pass(qmodel, unit.module, batches, output=True)
        weights = (output_fisher(qmodel, unit.module, batches),) if fisher else ()
    return (torch.cat(quantized), torch.cat([x for x, _ in fp32]), torch.cat([y for _, y in fp32])) + weights


def output_fisher(qmodel, module: nn.Module, batches: list[torch.Tensor]) -> torch.Tensor:
    """The squared gradient of the model's cross-entropy against its own top-1 class with respect to each element
    of ``module``'s output, in the model as it is (an empirical diagonal Fisher, BRECQ's weighting), scaled to
    mean 1. A model whose output is not a batch of logits is refused in one line."""
    grads: list[torch.Tensor] = []

    def hook(_module, _args, out):
        out.retain_grad()
        held.append(out)

    handle = module.register_forward_hook(hook, prepend=True)
    try:
        with torch.enable_grad():
            for x in batches:
                held: list[torch.Tensor] = []
                logits = qmodel(x)
                if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
                    raise ValueError("fisher weighting needs a model that returns a batch of logits")
                torch.nn.functional.cross_entropy(logits, logits.argmax(1), reduction="sum").backward()
                grads.append(held[0].grad.detach().square())
    finally:
        handle.remove()
        qmodel.model.zero_grad(set_to_none=True)
    weights = torch.cat(grads)
    return weights / weights.mean().clamp_min(1e-30)
