"""Block reconstruction (BRECQ, Li et al., 2021) with learned activation steps (LSQ) and QDrop's random drop.

Unit by unit in forward order (:mod:`.blocks`: a transformer or residual block, or a lone weight layer), the
quantized unit's output is fitted to the FP32 model's: squared error summed over channels, averaged over samples
and positions. Learned jointly:

- every weight's rounding, up or down, as AdaRound's soft variables with their annealed regulariser (the
  per-channel weight scale fixed, so refined weights stay on their quantizer's grid; with ``scales`` each output
  channel's step is learned too, as ``exp(gain)`` times the calibrated one, and becomes the weight quantizer's
  amax, so the refined weights sit on that grid instead);
- with ``lsq``, the grid of every activation quantizer in the unit (:mod:`.lsq`): the step of a uniform one
  (its learned step times the grid's top becomes its amax), a step per group of a per-head one, both ends of an
  asymmetric one. A log2 grid keeps its calibrated top and passes gradients straight through.
- with ``biases``, the weight layers' biases too (continuous: they absorb the mean error that rounding leaves).

The unit's input is the quantized model's (earlier units already refined), as BRECQ takes it. With ``drop`` > 0
(QDrop, Wei et al., 2022), each element of every activation quantizer's output in the unit, and of the unit's
input, is its unquantized (FP32-input) value with that probability during learning; QDrop found that this
generalises better at 2-4 bits (on the demo it paid only at 3-bit activations, see the README). With ``fisher``
each element of the loss is weighted by BRECQ's empirical diagonal Fisher (:func:`~.blocks.output_fisher`).

A quarter of the calibration images is held back: every tenth of the iterations the unit's hard-rounded output
error is measured there, and the unit keeps the best checkpoint, rounding to nearest with calibrated ranges
included (so no unit ends worse on its held-back images than it started).
"""
from __future__ import annotations

import logging
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch

from ..fakequant import integer_range
from ..forms import form_of
from ..limits import LOG_FORMS, log_grid_at
from .adaround import GAMMA, WARMUP, ZETA, _scale, _soft
from .blocks import Unit, find_units, unit_data
from .lsq import lsq_asymmetric, lsq_fake_quant, lsq_grouped

__all__ = ["brecq", "brecq_lsq", "qdrop", "reconstruct", "reconstruct_unit"]

log = logging.getLogger("quantsearch")
UNIFORM_FORMS = ("uniform", "per-channel")  # per-tensor uniform grids (per-channel's fold is in the weights)


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
    bias: torch.Tensor | None = None  # learned with the rounding (``biases``), else the module's own
    gain: torch.Tensor | None = None  # log of each output channel's step against its calibrated one (``scales``)
    name: str = ""  # the weight quantizer

    @classmethod
    def of(cls, qmodel, name: str, learn_bias: bool = False, learn_scale: bool = False) -> "_Rounding":
        module, quantizer = qmodel.weight_module(name), qmodel.quantizer(name)
        weight = module.weight.detach().float()
        scale, qmax = _scale(quantizer.amax, quantizer.num_bits, tuple(weight.shape))
        safe = torch.where(scale > 0, scale, torch.ones_like(scale))
        floor = torch.floor(weight * safe)
        rest = (weight * safe - floor).clamp(0.01, 0.99)  # h(v) starts at the fractional part: nearest when hard
        v = (-torch.log((ZETA - GAMMA) / (rest - GAMMA) - 1.0)).requires_grad_(True)
        bias = getattr(module, "bias", None)
        bias = bias.detach().clone().requires_grad_(True) if learn_bias and bias is not None else None
        gain = torch.zeros_like(scale).requires_grad_(True) if learn_scale else None
        return cls(name.rsplit(":", 1)[0] + ".weight", module, floor, scale, qmax, v, bias, gain, name)

    def weight(self, hard: bool) -> torch.Tensor:
        h = (self.v >= 0).float() if hard else _soft(self.v)
        safe = torch.where(self.scale > 0, self.scale, torch.ones_like(self.scale))
        if self.gain is not None:  # a learned step: the calibrated one times exp(gain)
            safe = safe * torch.exp(-self.gain)
        return torch.where(self.scale > 0, torch.clamp(self.floor + h, -self.qmax, self.qmax) / safe,
                           torch.zeros_like(self.floor))

    def amax(self) -> list[float] | None:
        """The weight quantizer's amax per output channel with the learned steps (None: steps not learned)."""
        if self.gain is None:
            return None
        amax = torch.where(self.scale > 0, self.qmax * torch.exp(self.gain) / torch.where(
            self.scale > 0, self.scale, torch.ones_like(self.scale)), torch.zeros_like(self.scale))
        return amax.detach().flatten().tolist()

    def regulariser(self, beta: float) -> torch.Tensor:
        return (1.0 - (2.0 * _soft(self.v) - 1.0).abs().pow(beta)).sum()


@dataclass
class _Step:
    """One activation quantizer in the unit and what of its grid is learned: ``kind`` uniform (a step), per-head
    (a step per group) or asymmetric (both ends); None keeps its own grid, gradients straight through."""

    name: str
    quantizer: torch.nn.Module
    kind: str | None = None
    params: tuple = ()
    low: float = 0.0
    high: float = 0.0

    @classmethod
    def of(cls, qmodel, name: str, learn: bool, device) -> "_Step":
        quantizer = qmodel.quantizer(name)
        form, amax = form_of(quantizer), quantizer.amax
        uniform = form in UNIFORM_FORMS or (form in LOG_FORMS and not log_grid_at(form, quantizer.num_bits))
        if not learn or amax is None or not (uniform or form in ("per-head", "asymmetric")):
            return cls(name, quantizer)
        high, low = integer_range(quantizer.num_bits, quantizer.unsigned, quantizer.narrow_range)
        if form == "asymmetric":
            ends = (torch.tensor(quantizer.low, device=device), amax.detach().float().reshape(()).clone())
            return cls(name, quantizer, "asymmetric", tuple(t.requires_grad_(True) for t in ends), 0.0, high)
        steps = (amax.detach().float().flatten() / high).to(device)
        steps = (steps if form == "per-head" else steps.reshape(())).clone().requires_grad_(True)
        return cls(name, quantizer, "per-head" if form == "per-head" else "uniform", (steps,), low, high)

    def __call__(self, x: torch.Tensor, mode: _Mode) -> torch.Tensor:
        if self.kind == "uniform":
            out = lsq_fake_quant(x, self.params[0], self.low, self.high)
        elif self.kind == "per-head":
            out = lsq_grouped(x, self.params[0], self.low, self.high)
        elif self.kind == "asymmetric":
            out = lsq_asymmetric(x, *self.params, self.high)
        else:
            with torch.no_grad():
                fixed = type(self.quantizer).forward(self.quantizer, x.detach())
            out = x + (fixed - x).detach()
        return _dropped(x, out, mode)

    def clamp_(self) -> None:
        """Keep the learned grid valid: steps positive, an asymmetric range around 0."""
        with torch.no_grad():
            if self.kind in ("uniform", "per-head"):
                self.params[0].clamp_(min=1e-8)
            elif self.kind == "asymmetric":
                self.params[0].clamp_(max=0.0)
                self.params[1].clamp_(min=1e-6)

    def commit(self, qmodel) -> None:
        """The learned grid as the quantizer's amax (and low end): inference runs the quantizer unchanged."""
        if self.kind == "uniform":
            qmodel.amax = {self.name: float(self.params[0].detach()) * self.high}
        elif self.kind == "per-head":
            qmodel.amax = {self.name: [float(v) * self.high for v in self.params[0].detach().tolist()]}
        elif self.kind == "asymmetric":
            qmodel.amax = {self.name: float(self.params[1].detach())}
            qmodel.lows = {self.name: float(self.params[0].detach())}


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
                if r.bias is not None:
                    module._parameters["bias"] = r.bias

            def after(module, _args, _out, original=dict(rounding.module._parameters)):
                module._parameters.update((k, original[k]) for k in ("weight", "bias") if k in original)

            stack.callback(rounding.module.register_forward_pre_hook(before).remove)
            stack.callback(rounding.module.register_forward_hook(after, always_call=True).remove)
        for step in steps:
            step.quantizer.forward = lambda x, s=step: s(x, mode)
            stack.callback(delattr, step.quantizer, "forward")
        yield


def _loss(out: torch.Tensor, target: torch.Tensor, axis: int, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Squared error summed over channels (``axis``), averaged over everything else (BRECQ's); ``weight``: each
    element's diagonal Fisher weight (BRECQ's option)."""
    error = (out - target).square()
    return (error if weight is None else error * weight).sum(axis).mean()


def reconstruct_unit(qmodel, unit: Unit, data: tuple[torch.Tensor, ...], iterations: int = 1000,
                     batch: int = 32, lsq: bool = True, drop: float = 0.0, weight_decay: float = 0.01,
                     lr: float = 1e-2, step_lr: float = 1e-3, biases: bool = False, bias_lr: float = 1e-3,
                     scales: bool = False, seed: int = 0) -> dict:
    """Reconstruct one unit in place (weights refined through ``qmodel.add_refined``, learned steps as amax);
    ``data`` is :func:`~.blocks.unit_data`'s. Returns the held-back error before and after, the iteration kept
    (0: rounding to nearest and the calibrated steps) and the refined weights.

    Learning rates: the study's 1e-2 for the rounding; for steps, BRECQ's 4e-5 over its 20k iterations moves a
    step about as far as 1e-3 (cosine-annealed) over 1k."""
    device = data[0].device
    generator = torch.Generator(device=device).manual_seed(seed)
    quantized, fp_in, target = data[:3]
    fisher = data[3] if len(data) > 3 else None  # per-element weights (unit_data's fisher=True)
    held = len(target) // 4 if len(target) > 3 else 0
    order = torch.randperm(len(target), generator=generator, device=device)
    check, train = order[:held], order[held:]
    if not held:
        check = train
    roundings = [_Rounding.of(qmodel, name, biases, scales) for name in unit.weights]
    steps = [_Step.of(qmodel, name, lsq, device) for name in unit.activations]
    ranges = [p for s in steps for p in s.params] + [r.gain for r in roundings if r.gain is not None]
    learned = ranges + [r.bias for r in roundings if r.bias is not None]
    convolutional = any(isinstance(r.module, torch.nn.modules.conv._ConvNd) for r in roundings)
    axis = 1 if convolutional else -1
    mode = _Mode(generator=generator)

    def held_back_error() -> float:
        mode.hard = True
        with torch.no_grad():
            error = sum(float(_loss(unit.module(quantized[part]), target[part], axis,
                                    None if fisher is None else fisher[part])) * len(part)
                        for part in check.split(max(batch, 256))) / len(check)
        mode.hard = False
        return error

    def snapshot() -> tuple:
        return [r.v.detach().clone() for r in roundings], [s.detach().clone() for s in learned]

    optimisers, schedule = _optimisers(roundings, ranges, iterations, lr, step_lr, bias_lr)
    warm, every = int(WARMUP * iterations), max(1, iterations // 10)
    mode.drop = drop
    with _replayed(qmodel, unit, roundings, steps, mode), torch.enable_grad():
        before = best = held_back_error()
        kept, state = 0, snapshot()
        for step in range(1, iterations + 1):
            pick = train[torch.randint(len(train), (min(batch, len(train)),), generator=generator, device=device)]
            x = _dropped(fp_in[pick], quantized[pick], mode)
            loss = _loss(unit.module(x), target[pick], axis, None if fisher is None else fisher[pick])
            if step > warm and roundings:
                beta = 20.0 + (2.0 - 20.0) * (step - warm) / max(1, iterations - warm)
                loss = loss + weight_decay * sum(r.regulariser(beta) for r in roundings)
            for optimiser in optimisers:
                optimiser.zero_grad()
            loss.backward()
            for optimiser in optimisers:
                optimiser.step()
            if schedule is not None:
                schedule.step()
                for s in steps:
                    s.clamp_()
            if step % every == 0 or step == iterations:
                error = held_back_error()
                if error < best:
                    best, kept, state = error, step, snapshot()
    return {"before": before, "after": best, "kept": kept,
            "changed": _commit(qmodel, roundings, steps, learned, state)}


def _optimisers(roundings: list[_Rounding], ranges: list[torch.Tensor], iterations: int, lr: float, step_lr: float,
                bias_lr: float) -> tuple[list, object]:
    """Adam for the rounding; Adam with a cosine-annealed rate for the grids and biases (None if neither)."""
    optimisers = [torch.optim.Adam([r.v for r in roundings], lr=lr)] if roundings else []
    groups = [{"params": ranges, "lr": step_lr},
              {"params": [r.bias for r in roundings if r.bias is not None], "lr": bias_lr}]
    groups = [g for g in groups if g["params"]]
    if not groups:
        return optimisers, None
    optimisers.append(torch.optim.Adam(groups))
    return optimisers, torch.optim.lr_scheduler.CosineAnnealingLR(optimisers[-1], T_max=max(1, iterations))


def _commit(qmodel, roundings: list[_Rounding], steps: list[_Step], learned: list[torch.Tensor],
            state: tuple) -> dict[str, torch.Tensor]:
    """Put the kept checkpoint ``state`` in place on ``qmodel``: hard-rounded weights and biases as refinements,
    learned grids as amax; returns the parameters changed."""
    with torch.no_grad():
        for r, v in zip(roundings, state[0]):
            r.v.copy_(v)
        for tensor, value in zip(learned, state[1]):
            tensor.copy_(value)
    changed = {r.key: r.weight(hard=True).detach().to(r.module.weight.dtype) for r in roundings}
    steps_learned = {r.name: r.amax() for r in roundings if r.gain is not None}
    if steps_learned:  # the weights as their quantizer computes them at the learned amax: its own float grid
        qmodel.amax = steps_learned
        with torch.no_grad():
            changed |= {r.key: qmodel.quantizer(r.name)(changed[r.key]) for r in roundings if r.gain is not None}
    changed |= {r.key[: -len("weight")] + "bias": r.bias.detach().to(r.module.bias.dtype) for r in roundings
                if r.bias is not None}
    qmodel.add_refined(changed)
    for step in steps:
        step.commit(qmodel)
    return changed


def reconstruct(qmodel, batches: list[torch.Tensor], iterations: int = 1000, batch: int = 32, lsq: bool = True,
                biases: bool = False, drop: float = 0.0, fisher: bool = False, scales: bool = False, progress=None,
                seed: int = 0) -> dict[str, torch.Tensor]:
    """Reconstruct every unit of ``qmodel`` in forward order, in place; returns the parameters changed
    (``<module>.weight`` on its quantizer's grid, and with ``biases`` ``<module>.bias``). Learned grids are set as
    the quantizers' amax (and low ends)."""
    units = find_units(qmodel, batches[0])
    changed: dict[str, torch.Tensor] = {}
    for index, unit in enumerate(progress(units) if progress is not None else units):
        data = unit_data(qmodel, unit, batches, fisher=fisher)
        report = reconstruct_unit(qmodel, unit, data, iterations=iterations, batch=batch, lsq=lsq, drop=drop,
                                  biases=biases, scales=scales, seed=seed + index)
        changed |= report.pop("changed")
        log.info("reconstruct %s (%d weight, %d activation quantizers): held-back error %.4g -> %.4g (kept "
                 "iteration %d)", unit.name, len(unit.weights), len(unit.activations), report["before"],
                 report["after"], report["kept"])
    return changed


def brecq(qmodel, batches: list[torch.Tensor], iterations: int = 1000, progress=None,
          seed: int = 0) -> dict[str, torch.Tensor]:
    """Block reconstruction of the weights' rounding alone (BRECQ), activation ranges as calibrated."""
    return reconstruct(qmodel, batches, iterations=iterations, lsq=False, progress=progress, seed=seed)


def brecq_lsq(qmodel, batches: list[torch.Tensor], iterations: int = 1000, progress=None,
              seed: int = 0) -> dict[str, torch.Tensor]:
    """Block reconstruction of the weights' rounding, the activation grids (LSQ) and the biases together."""
    return reconstruct(qmodel, batches, iterations=iterations, lsq=True, biases=True, progress=progress, seed=seed)


def qdrop(qmodel, batches: list[torch.Tensor], iterations: int = 1000, drop: float = 0.5, progress=None,
          seed: int = 0) -> dict[str, torch.Tensor]:
    """``brecq-lsq`` with QDrop's random drop of activation quantization (probability ``drop``, QDrop's 0.5 by
    default)."""
    if not 0.0 <= drop < 1.0:
        raise ValueError(f"drop probability {drop} must be in [0, 1)")
    return reconstruct(qmodel, batches, iterations=iterations, lsq=True, biases=True, drop=drop, progress=progress,
                       seed=seed)
