"""Block reconstruction (BRECQ, Li et al., 2021) with learned activation steps (LSQ) and QDrop's random drop.

Unit by unit in forward order (:mod:`.blocks`: a transformer or residual block, or a lone weight layer), the
quantized unit's output is fitted to the FP32 model's: squared error summed over channels, averaged over samples
and positions. Learned jointly:

- every weight's rounding, up or down, as AdaRound's soft variables with their annealed regulariser (the
  per-channel weight scale fixed, so refined weights stay on their quantizer's grid);
- with ``lsq``, the step of every per-tensor uniform activation quantizer in the unit (:mod:`.lsq`); its
  learned step times the grid's top becomes the quantizer's amax. Other forms (log2, asymmetric, per-head) keep
  their calibrated ranges and pass gradients straight through.

The unit's input is the quantized model's (earlier units already refined), as BRECQ takes it. With ``drop`` > 0
(QDrop, Wei et al., 2022), each element of every activation quantizer's output in the unit, and of the unit's
input, is its unquantized (FP32-input) value with that probability during learning, which flattens what is
learned and generalises better at 2-4 bits.

A quarter of the calibration images is held back: every tenth of the iterations the unit's hard-rounded output
error is measured there, and the unit keeps the best checkpoint, rounding to nearest with calibrated ranges
included (so a unit never ends worse on data it did not learn from than it started).
"""
from __future__ import annotations

import logging
import math
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Iterator

import torch

from ..forms import form_of
from .adaround import GAMMA, WARMUP, ZETA, _scale, _soft
from .blocks import Unit, find_units, unit_data
from .lsq import lsq_fake_quant, step_and_range

__all__ = ["brecq", "brecq_lsq", "qdrop", "reconstruct", "reconstruct_unit"]

log = logging.getLogger("quantsearch")
LEARNED_FORMS = ("uniform", "per-channel")  # per-tensor uniform grids: their step is learned with lsq


@dataclass
class _Mode:
    """What the unit's replay does now: hard rounding (checks) or soft (learning), and the drop probability."""

    hard: bool = False
    drop: float = 0.0
    generator: torch.Generator | None = None


@dataclass
class _Rounding:
    """One weight layer's AdaRound variables: ``weight = clamp(floor + h(v), -qmax, qmax) / scale``."""

    key: str
    module: torch.nn.Module
    floor: torch.Tensor
    scale: torch.Tensor
    qmax: float
    v: torch.Tensor

    @classmethod
    def of(cls, qmodel, name: str) -> "_Rounding":
        module, quantizer = qmodel.weight_module(name), qmodel.quantizer(name)
        weight = module.weight.detach().float()
        scale, qmax = _scale(quantizer.amax, quantizer.num_bits, tuple(weight.shape))
        safe = torch.where(scale > 0, scale, torch.ones_like(scale))
        floor = torch.floor(weight * safe)
        rest = (weight * safe - floor).clamp(0.01, 0.99)  # h(v) starts at the fractional part: nearest when hard
        v = (-torch.log((ZETA - GAMMA) / (rest - GAMMA) - 1.0)).requires_grad_(True)
        return cls(name.rsplit(":", 1)[0] + ".weight", module, floor, torch.where(scale > 0, scale, 0 * scale), qmax, v)

    def weight(self, hard: bool) -> torch.Tensor:
        h = (self.v >= 0).float() if hard else _soft(self.v)
        safe = torch.where(self.scale > 0, self.scale, torch.ones_like(self.scale))
        return torch.where(self.scale > 0, torch.clamp(self.floor + h, -self.qmax, self.qmax) / safe,
                           torch.zeros_like(self.floor))

    def regulariser(self, beta: float) -> torch.Tensor:
        return (1.0 - (2.0 * _soft(self.v) - 1.0).abs().pow(beta)).sum()


@dataclass
class _Step:
    """One activation quantizer in the unit: a learned step (None: its own grid, gradients straight through)."""

    name: str
    quantizer: torch.nn.Module
    step: torch.Tensor | None = None
    low: float = 0.0
    high: float = 0.0
    sizes: dict = field(default_factory=dict)  # grad scale per tensor size

    def __call__(self, x: torch.Tensor, mode: _Mode) -> torch.Tensor:
        if self.step is not None:
            scale = self.sizes.setdefault(x.numel(), 1.0 / math.sqrt(x.numel() * self.high))
            out = lsq_fake_quant(x, self.step, self.low, self.high, scale)
        else:
            with torch.no_grad():
                fixed = type(self.quantizer).forward(self.quantizer, x.detach())
            out = x + (fixed - x).detach()
        return _dropped(x, out, mode)


def _dropped(fp: torch.Tensor, quantized: torch.Tensor, mode: _Mode) -> torch.Tensor:
    """QDrop: each element is ``fp``'s with probability ``mode.drop`` (while learning), else ``quantized``'s."""
    if mode.hard or mode.drop <= 0:
        return quantized
    keep = torch.rand(quantized.shape, generator=mode.generator, device=mode.generator.device) >= mode.drop
    return torch.where(keep.to(quantized.device), quantized, fp)


@contextmanager
def _replayed(qmodel, unit: Unit, roundings: list[_Rounding], steps: list[_Step], mode: _Mode) -> Iterator[None]:
    """Inside the block the unit's weight layers take their rounding's weight and its activation quantizers run
    ``steps`` (the inference swap of its weight quantizers is off); everything is put back after."""
    with ExitStack() as stack:
        for rounding in roundings:
            quantizer = qmodel.quantizer(rounding.key[: -len(".weight")] + ":weight")
            quantizer.disable()
            stack.callback(quantizer.enable)

            def before(module, _args, r=rounding):
                module._parameters["weight"] = r.weight(mode.hard)

            def after(module, _args, _out, original=rounding.module._parameters["weight"]):
                module._parameters["weight"] = original

            stack.callback(rounding.module.register_forward_pre_hook(before).remove)
            stack.callback(rounding.module.register_forward_hook(after, always_call=True).remove)
        for step in steps:
            step.quantizer.forward = lambda x, s=step: s(x, mode)
            stack.callback(delattr, step.quantizer, "forward")
        yield


def _loss(out: torch.Tensor, target: torch.Tensor, axis: int) -> torch.Tensor:
    """Squared error summed over channels (``axis``), averaged over everything else (BRECQ's)."""
    return (out - target).square().sum(axis).mean()


def reconstruct_unit(qmodel, unit: Unit, data: tuple[torch.Tensor, ...], iterations: int = 1000,
                     batch: int = 32, lsq: bool = True, drop: float = 0.0, weight_decay: float = 0.01,
                     lr: float = 1e-2, step_lr: float = 1e-3, seed: int = 0) -> dict:
    """Reconstruct one unit in place (weights refined through ``qmodel.add_refined``, learned steps as amax);
    ``data`` is :func:`~.blocks.unit_data`'s. Returns the held-back error before and after, the iteration kept
    (0: rounding to nearest and the calibrated steps) and the refined weights.

    Learning rates: the study's 1e-2 for the rounding; for steps, BRECQ's 4e-5 over its 20k iterations moves a
    step about as far as 1e-3 (cosine-annealed) over 1k."""
    device = data[0].device
    generator = torch.Generator(device=device).manual_seed(seed)
    quantized, fp_in, target = data
    held = len(target) // 4 if len(target) > 3 else 0
    order = torch.randperm(len(target), generator=generator, device=device)
    check, train = order[:held], order[held:]
    if not held:
        check = train
    roundings = [_Rounding.of(qmodel, name) for name in unit.weights]
    steps = []
    for name in unit.activations:
        quantizer = qmodel.quantizer(name)
        entry = _Step(name, quantizer)
        if lsq and form_of(quantizer) in LEARNED_FORMS and quantizer.amax is not None and quantizer.amax.numel() == 1:
            value, entry.low, entry.high = step_and_range(quantizer)
            entry.step = torch.tensor(value, device=device, requires_grad=True)
        steps.append(entry)
    learned = [s.step for s in steps if s.step is not None]
    convolutional = any(isinstance(r.module, torch.nn.modules.conv._ConvNd) for r in roundings)
    axis = 1 if convolutional else -1
    mode = _Mode(generator=generator)

    def held_back_error() -> float:
        mode.hard = True
        with torch.no_grad():
            error = sum(float(_loss(unit.module(quantized[part]), target[part], axis)) * len(part)
                        for part in check.split(max(batch, 256))) / len(check)
        mode.hard = False
        return error

    def snapshot() -> tuple:
        return [r.v.detach().clone() for r in roundings], [s.detach().clone() for s in learned]

    optimisers = [torch.optim.Adam([r.v for r in roundings], lr=lr)] if roundings else []
    if learned:
        step_optimiser = torch.optim.Adam(learned, lr=step_lr)
        optimisers.append(step_optimiser)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(step_optimiser, T_max=max(1, iterations), eta_min=0.0)
    warm, every = int(WARMUP * iterations), max(1, iterations // 10)
    mode.drop = drop
    with _replayed(qmodel, unit, roundings, steps, mode), torch.enable_grad():
        before = best = held_back_error()
        kept, state = 0, snapshot()
        for step in range(1, iterations + 1):
            pick = train[torch.randint(len(train), (min(batch, len(train)),), generator=generator, device=device)]
            x = _dropped(fp_in[pick], quantized[pick], mode)
            loss = _loss(unit.module(x), target[pick], axis)
            if step > warm and roundings:
                beta = 20.0 + (2.0 - 20.0) * (step - warm) / max(1, iterations - warm)
                loss = loss + weight_decay * sum(r.regulariser(beta) for r in roundings)
            for optimiser in optimisers:
                optimiser.zero_grad()
            loss.backward()
            for optimiser in optimisers:
                optimiser.step()
            if learned:
                schedule.step()
                with torch.no_grad():
                    for s in learned:
                        s.clamp_(min=1e-8)
            if step % every == 0 or step == iterations:
                error = held_back_error()
                if error < best:
                    best, kept, state = error, step, snapshot()
    with torch.no_grad():
        for r, v in zip(roundings, state[0]):
            r.v.copy_(v)
        for s, value in zip(learned, state[1]):
            s.copy_(value)
    changed = {r.key: r.weight(hard=True).detach().to(r.module.weight.dtype) for r in roundings}
    qmodel.add_refined(changed)
    qmodel.amax = {s.name: float(s.step.detach()) * s.high for s in steps if s.step is not None}
    return {"before": before, "after": best, "kept": kept, "changed": changed}


def reconstruct(qmodel, batches: list[torch.Tensor], iterations: int = 1000, batch: int = 32, lsq: bool = True,
                drop: float = 0.0, progress=None, seed: int = 0) -> dict[str, torch.Tensor]:
    """Reconstruct every unit of ``qmodel`` in forward order, in place; returns ``{<module>.weight: refined
    weight}`` (each on its quantizer's grid). Learned steps are set as the quantizers' amax."""
    units = find_units(qmodel, batches[0])
    changed: dict[str, torch.Tensor] = {}
    for index, unit in enumerate(progress(units) if progress is not None else units):
        data = unit_data(qmodel, unit, batches)
        report = reconstruct_unit(qmodel, unit, data, iterations=iterations, batch=batch, lsq=lsq, drop=drop,
                                  seed=seed + index)
        changed |= report.pop("changed")
        log.info("reconstruct %s (%d weight, %d activation quantizers): held-back error %.4g -> %.4g (kept "
                 "iteration %d)", unit.name, len(unit.weights), len(unit.activations), report["before"],
                 report["after"], report["kept"])
    return changed


def brecq(qmodel, batches: list[torch.Tensor], iterations: int = 1000, progress=None) -> dict[str, torch.Tensor]:
    """Block reconstruction of the weights' rounding alone (BRECQ), activation ranges as calibrated."""
    return reconstruct(qmodel, batches, iterations=iterations, lsq=False, progress=progress)


def brecq_lsq(qmodel, batches: list[torch.Tensor], iterations: int = 1000, progress=None) -> dict[str, torch.Tensor]:
    """Block reconstruction of the weights' rounding and the activation steps (LSQ) together."""
    return reconstruct(qmodel, batches, iterations=iterations, lsq=True, progress=progress)


def qdrop(qmodel, batches: list[torch.Tensor], iterations: int = 1000, drop: float = 0.5,
          progress=None) -> dict[str, torch.Tensor]:
    """Block reconstruction with LSQ steps and QDrop's random drop of activation quantization (probability
    ``drop``, QDrop's 0.5 by default)."""
    if not 0.0 <= drop < 1.0:
        raise ValueError(f"drop probability {drop} must be in [0, 1)")
    return reconstruct(qmodel, batches, iterations=iterations, lsq=True, drop=drop, progress=progress)
