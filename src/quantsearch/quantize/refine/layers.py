"""One weight layer's data for refinement: its input and output in the FP32 or the quantized model, its forward.

In the quantized model (activation quantizers on, earlier layers already refined) a layer sees the error that
reaches it, which changes as earlier layers are refined: :func:`capture` takes it per layer, and a pass stops as
soon as the layer has run. The FP32 model (folds kept, refinements left out) never changes during a refinement:
:class:`Reference` takes it for many layers in one pass and enters :meth:`unrefined` once per pass, not once per
layer and batch (which undid and redid every fold each time).

:func:`layer_forward` runs the layer's own ``forward`` with other weights, so a subclass's own padding or weight
handling (timm's ``Conv2dSame`` pads in its forward, TensorFlow style) is part of what a refinement learns against.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

__all__ = ["Reference", "capture", "layer_forward", "run_until_stopped"]

BUDGET = 1 << 30  # bytes of FP32 reference held at once; past it the layers are captured in several passes


class _Stop(Exception):
    """Raised by a capture hook once the layers wanted have run: the rest of the forward pass is not needed."""


@contextmanager
def _parameters_replaced(module: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None) -> Iterator[None]:
    """``module.weight`` and ``module.bias`` are ``weight`` and ``bias`` inside the block. Plain tensors go in
    ``_parameters`` (assigning them as attributes is refused), so gradients reach whatever ``weight`` came from."""
    params = module._parameters
    saved = {key: params[key] for key in ("weight", "bias") if key in params}
    params["weight"] = weight
    if "bias" in params:
        params["bias"] = bias
    try:
        yield
    finally:
        params.update(saved)


def layer_forward(module: nn.Module, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
                  ) -> torch.Tensor:
    """``module``'s own forward on ``x`` with ``weight`` and ``bias`` in place of its own; its hooks (the
    quantizers) do not run."""
    with _parameters_replaced(module, weight, bias):
        return module.forward(x)


def capture(qmodel, name: str, batches: list[torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``(input, output)`` of weight layer ``name`` (``<module>:weight``) in the quantized model, per batch (its
    weight quantized, its own output quantizer not applied)."""
    module = qmodel.weight_module(name)
    out: list[tuple[torch.Tensor, torch.Tensor]] = []

    def hook(_module, args, output):
        out.append((args[0].detach(), output.detach()))
        raise _Stop

    # registered first, so it sees the output before the layer's own output quantizer replaces it
    handle = module.register_forward_hook(hook, prepend=True)
    try:
        run_until_stopped(qmodel, batches, f"weight layer {name!r}")
    finally:
        handle.remove()
    return out


def run_until_stopped(qmodel, batches: list[torch.Tensor], what: str) -> None:
    """One forward pass per batch, each ended by a hook raising :class:`_Stop` once it has what it needs; a pass
    that ends without one means ``what`` never ran."""
    with torch.no_grad():
        for x in batches:
            try:
                qmodel(x)
            except _Stop:
                continue
            raise RuntimeError(f"{what} did not run in a forward pass")


class Reference:
    """The FP32 model's output (with ``inputs``, also its input) of each weight layer in ``names``, per batch.

    Taken in as few passes as :data:`BUDGET` allows (one for a small model), each inside one :meth:`unrefined`,
    and handed out once per layer by :meth:`pop`, so that a layer's data is freed once it is refined."""

    def __init__(self, qmodel, names: list[str], batches: list[torch.Tensor], inputs: bool = True):
        self.qmodel, self.batches, self.inputs = qmodel, batches, inputs
        self._pending = list(names)  # not taken yet, in network order
        self._held: dict[str, list[tuple[torch.Tensor | None, torch.Tensor]]] = {}
        self._sizes: dict[str, int] | None = None

    def pop(self, name: str) -> list[tuple[torch.Tensor | None, torch.Tensor]]:
        """``(input or None, output)`` of ``name`` per batch, taken with the layers after it if not held yet."""
        if name not in self._held:
            if name not in self._pending:
                raise KeyError(f"{name!r} is not a layer of this reference, or was handed out already")
            self._take(self._group(name))
        return self._held.pop(name)

    def _group(self, name: str) -> list[str]:
        """``name`` and the pending layers after it, as many as fit in :data:`BUDGET` together."""
        sizes = self._sizes if self._sizes is not None else self._measure()
        group, total = [], 0
        for other in self._pending[self._pending.index(name):]:
            total += sizes[other]
            if group and total > BUDGET:
                break
            group.append(other)
        return group

    def _measure(self) -> dict[str, int]:
        """Bytes each pending layer's data takes for all batches, from a forward pass on one sample."""
        samples = sum(len(x) for x in self.batches)
        self._sizes = {}

        def hook(module, args, output):
            name = modules[module]
            if name not in self._sizes:
                tensors = (args[0], output) if self.inputs else (output,)
                self._sizes[name] = samples * sum(t.numel() * t.element_size() for t in tensors)

        modules = {self.qmodel.weight_module(n): n for n in self._pending}
        handles = [m.register_forward_hook(hook) for m in modules]
        try:
            with torch.no_grad(), self.qmodel.quantization_disabled():
                self.qmodel(self.batches[0][:1])
        finally:
            for handle in handles:
                handle.remove()
        return self._sizes

    def _take(self, group: list[str]) -> None:
        """One pass over the batches (each stopped once every layer of ``group`` has run) for ``group``'s data.
        Copies, since the pass goes on past a layer and a later in-place operation could change what it saw."""
        modules = {self.qmodel.weight_module(n): n for n in group}
        seen: dict[str, tuple[torch.Tensor | None, torch.Tensor]] = {}

        def hook(module, args, output):
            name = modules[module]
            if name not in seen:
                seen[name] = (args[0].detach().clone() if self.inputs else None, output.detach().clone())
                if len(seen) == len(group):
                    raise _Stop

        # registered first, so they see outputs before the layers' own output quantizers (off here) replace them
        handles = [m.register_forward_hook(hook, prepend=True) for m in modules]
        try:  # the FP32 model: folds kept (they keep the function), refinements so far left out
            with torch.no_grad(), self.qmodel.unrefined(), self.qmodel.quantization_disabled():
                for x in self.batches:
                    seen.clear()
                    try:
                        self.qmodel(x)
                    except _Stop:
                        pass
                    else:
                        missing = next(n for n in group if n not in seen)
                        raise RuntimeError(f"weight layer {missing!r} did not run in a forward pass")
                    for name, pair in seen.items():
                        self._held.setdefault(name, []).append(pair)
        finally:
            for handle in handles:
                handle.remove()
        self._pending = [n for n in self._pending if n not in modules.values()]
