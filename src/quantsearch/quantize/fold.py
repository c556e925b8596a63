"""Per-channel LayerNorm ranges folded into the model (RepQ-ViT's reparameterisation), for the ``per-channel`` form.

A LayerNorm's output channels span very different ranges, so one per-tensor range wastes most of a 4-bit grid on
the few wide channels. RepQ-ViT gives each channel its own range during calibration and then moves those ranges
into the weights, so that inference stays per tensor. With each channel's centre ``m_c`` and half-range ``h_c``
(from its calibration minimum and maximum) and ``r_c = h_c / mean(h)``:

- the LayerNorm's affine becomes ``gamma / r`` and ``(beta - m) / r``: every channel now spans about
  ``[-mean(h), mean(h)]``, centred on 0;
- each Linear that reads it gets ``W * r`` (per input column) and ``b + W m``, so its output is unchanged.

The FP32 model computes the same function (checked on a calibration batch: a LayerNorm whose output also feeds
something other than those Linears is refused by name); the quantizer on the LayerNorm output is then an ordinary
per-tensor quantizer of the folded tensor, calibrated per width as usual, and the folded Linears' weights are
quantized per output channel as they are. Exports carry the folded weights: nothing per channel remains at
inference. The fold does not depend on the bit-width, so one fold serves every candidate of a search.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Iterable, Mapping

import torch
from torch import nn

__all__ = ["ChannelFold", "FoldError", "check_foldable", "fit_folds", "fold_into", "FOLD_TOLERANCE"]

FOLD_TOLERANCE = 1e-3  # largest change of the FP32 output the fold may make, relative to the output's scale


class FoldError(ValueError):
    """A per-channel fold that cannot be made exactly (one line)."""


@dataclass(frozen=True)
class ChannelFold:
    """One LayerNorm's fold: per-channel ``scale`` (r) and ``shift`` (m), and the Linear layers it moves into."""

    scale: tuple[float, ...]
    shift: tuple[float, ...]
    into: tuple[str, ...]

    def to_dict(self) -> dict:
        return {"scale": list(self.scale), "shift": list(self.shift), "into": list(self.into)}

    @classmethod
    def from_dict(cls, payload: Mapping) -> "ChannelFold":
        fold = cls(tuple(float(v) for v in payload["scale"]), tuple(float(v) for v in payload["shift"]),
                   tuple(str(n) for n in payload["into"]))
        if len(fold.scale) != len(fold.shift) or not fold.into or min(fold.scale) <= 0:
            raise FoldError("a per-channel fold needs one positive scale and one shift per channel and at least "
                            "one Linear to move into")
        return fold


def check_foldable(name: str, module: nn.Module, reads: bool) -> None:
    """Refuse (one line) a per-channel quantizer that is not on the output of an affine LayerNorm-like module."""
    where = f"quant-forms: quantizer {name!r} has the per-channel form but"
    if reads:
        raise FoldError(f"{where} quantizes a module's input; per-channel folds a LayerNorm's output")
    weight, bias = getattr(module, "weight", None), getattr(module, "bias", None)
    if not (isinstance(weight, torch.Tensor) and isinstance(bias, torch.Tensor) and weight.dim() == 1
            and bias.shape == weight.shape) or isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        raise FoldError(f"{where} {type(module).__name__} has no per-channel affine (weight and bias of one "
                        "dimension, as LayerNorm has) to fold its ranges into")


def fold_into(norm: nn.Module, linears: Iterable[nn.Linear], fold: ChannelFold) -> None:
    """Rescale ``norm``'s affine and the ``linears`` that read it, in place (see the module docstring)."""
    with torch.no_grad():
        scale = torch.tensor(fold.scale, dtype=norm.weight.dtype, device=norm.weight.device)
        shift = torch.tensor(fold.shift, dtype=norm.weight.dtype, device=norm.weight.device)
        for linear in linears:
            if linear.bias is None:
                raise FoldError(f"a per-channel fold moves a shift into the bias of {type(linear).__name__}, "
                                "which has none")
            linear.bias.add_(linear.weight @ shift)
            linear.weight.mul_(scale)
        norm.bias.sub_(shift).div_(scale)
        norm.weight.div_(scale)


def _channel_ranges(qmodel, norms: Mapping[str, nn.Module], batches: list) -> tuple[dict, dict]:
    """Per-channel minimum and maximum of each LayerNorm output over ``batches``, and the Linear layers whose
    input is that output (a view of its storage) in every pass. Quantization is off meanwhile."""
    lows, highs, readers = {}, {}, {n: None for n in norms}
    live: dict[str, torch.Tensor] = {}
    linears = {n: m for n, m in qmodel.model.named_modules() if isinstance(m, nn.Linear)}

    def record(name):
        def hook(_module, _args, output):
            flat = output.detach().reshape(-1, output.shape[-1])
            lo, hi = flat.amin(0), flat.amax(0)
            lows[name] = lo if name not in lows else torch.minimum(lows[name], lo)
            highs[name] = hi if name not in highs else torch.maximum(highs[name], hi)
            live[name] = output
        return hook

    def reads(linear_name):
        def hook(_module, args):
            if args and isinstance(args[0], torch.Tensor):
                storage = args[0].untyped_storage().data_ptr()
                for name, out in live.items():
                    if out.untyped_storage().data_ptr() == storage:
                        seen.setdefault(name, set()).add(linear_name)
        return hook

    handles = [m.register_forward_hook(record(n)) for n, m in norms.items()]
    handles += [m.register_forward_pre_hook(reads(n)) for n, m in linears.items()]
    try:
        with torch.no_grad(), qmodel.quantization_disabled():
            for x in batches:
                seen: dict[str, set] = {}
                live.clear()
                qmodel(x)
                for name in norms:
                    found = seen.get(name, set())
                    readers[name] = found if readers[name] is None else readers[name] & found
    finally:
        live.clear()
        for handle in handles:
            handle.remove()
    return {n: (lows[n], highs[n]) for n in lows}, readers


def fit_folds(qmodel, batches: Iterable, names: list[str], num_batches: int | None = None
              ) -> dict[str, ChannelFold]:
    """The fold of each per-channel quantizer in ``names`` from the calibration batches (inputs), applied to
    ``qmodel``; refused by name where the fold would change the FP32 output."""
    device = qmodel._device()
    batches = [x.to(device) for x in itertools.islice(batches, num_batches)]
    norms = {n: qmodel.quantized_module(n) for n in names}
    ranges, readers = _channel_ranges(qmodel, norms, batches)
    folds = {}
    for name in names:
        if name not in ranges:
            raise FoldError(f"per-channel quantizer {name!r} saw no tensor during calibration")
        into = sorted(readers[name] or ())
        width = norms[name].weight.numel()
        if not into or any(qmodel.model.get_submodule(n).in_features != width for n in into):
            raise FoldError(f"per-channel quantizer {name!r}: no Linear layer reads its {width} channels directly, "
                            "so its ranges have nowhere to fold; give it another form")
        lo, hi = ranges[name]
        half = ((hi - lo) / 2).double()
        half = torch.where(half > 0, half, half[half > 0].mean() if bool((half > 0).any()) else torch.ones_like(half))
        scale = (half / half.mean()).clamp(1e-4, 1e4)
        folds[name] = ChannelFold(tuple(scale.tolist()), tuple(((hi + lo) / 2).double().tolist()), tuple(into))
    with torch.no_grad(), qmodel.quantization_disabled():
        before = qmodel(batches[0])
        qmodel.folds = folds
        after = qmodel(batches[0])
    change = float((after - before).abs().max()) / max(float(before.abs().max()), 1e-12)
    if not change <= FOLD_TOLERANCE:
        qmodel.folds = {}
        raise FoldError(f"folding the per-channel ranges of {', '.join(names)} changes the FP32 output by "
                        f"{change:.2g} (relative): a LayerNorm output there also feeds something other than "
                        "the Linear layers it folds into; give those quantizers another form")
    return folds
