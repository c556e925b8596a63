"""AdaRound (Nagel et al., 2020): learn whether each weight rounds up or down, layer by layer.

Rounding to nearest is optimal per weight but not per layer output. For each quantized weight layer, in network
order, with its per-channel scale ``s`` fixed (the weight quantizer's), the weight becomes
``s * clamp(floor(W / s) + h(V), -qmax, qmax)`` with ``h`` a rectified sigmoid of a learned ``V`` (started at
the fractional part, i.e. at round-to-nearest's neighbourhood). Adam minimises the squared error of the layer's
output against the FP32 model's output, on the FP32 model's inputs to the layer, plus a regulariser that
pushes every ``h`` to 0 or 1 as its exponent anneals from 20 to 2. A quarter of the calibration images is held
back, and a layer whose learned rounding does not beat rounding to nearest on them keeps rounding to nearest. The
result rounds ``V >= 0`` up: the codes are integers on the same grid, so the weight quantizer reproduces them
exactly, and export and size are unchanged. The FP32 reference is taken once for all layers
(:class:`~.layers.Reference`).

FP32 inputs (the paper's first form) rather than the quantized model's (its "asymmetric reconstruction"): with
inputs quantized at 3-4 bits the rounding learns to make up for the activations' error on the calibration images
and loses on data it did not see (measured in the README: a mixed W+A point of the BOPs search lost 1.9 points on
hold-out that way, and 0.25 with FP32 inputs); ``quantized_inputs=True`` is there to compare.
"""
from __future__ import annotations

import logging

import torch

from .layers import Reference, capture, layer_forward

__all__ = ["adaround", "round_layer"]

log = logging.getLogger("quantsearch")
ZETA, GAMMA = 1.1, -0.1  # the rectified sigmoid's stretch
WARMUP = 0.2  # share of iterations before the regulariser starts


def _soft(v: torch.Tensor) -> torch.Tensor:
    return torch.clamp(torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)


def _scale(amax: torch.Tensor, bits: int, shape: tuple) -> tuple[torch.Tensor, float]:
    """The quantizer's own float32 ``qmax / amax`` per channel (0 where amax is 0), broadcast to ``shape``."""
    qmax = 2.0 ** (bits - 1) - 1.0
    amax = amax.detach().float().reshape((-1,) + (1,) * (len(shape) - 1))
    return torch.where(amax > 1.0 / (1 << 24), torch.tensor(qmax) / amax, torch.zeros_like(amax)), qmax


def round_layer(module, weight: torch.Tensor, amax: torch.Tensor, bits: int, inputs: list[torch.Tensor],
                targets: list[torch.Tensor], iterations: int = 1000, rows: int = 1024, weight_decay: float = 0.01,
                lr: float = 1e-2, seed: int = 0) -> tuple[torch.Tensor, dict]:
    """The AdaRound weight of one layer and ``{"before": mse, "after": mse}`` of its output on the held-back quarter
    of ``inputs`` (round-to-nearest's weight where the learned rounding does not beat it there).

    Linear inputs are pooled into rows and ``rows`` are drawn per step; convolution inputs by ``max(1, rows //
    positions)`` images per step."""
    generator = torch.Generator().manual_seed(seed)
    scale, qmax = _scale(amax, bits, tuple(weight.shape))
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    floor = torch.floor(weight * safe)
    rest = (weight * safe - floor).clamp(0.01, 0.99)
    v = (-torch.log((ZETA - GAMMA) / (rest - GAMMA) - 1.0)).requires_grad_(True)
    bias = getattr(module, "bias", None)
    bias = bias.detach() if bias is not None else None
    # a quarter of the samples (whole images) is held back: the rounding is learned on the rest and kept only if
    # it beats rounding to nearest on the held-back ones, so an overfitted layer falls back to nearest
    samples = torch.cat(inputs), torch.cat(targets)
    held = max(1, len(samples[0]) // 4) if len(samples[0]) > 1 else 0
    order = torch.randperm(len(samples[0]), generator=generator)
    (x_all, y_all), (x_check, y_check) = ([t[order[held:]] for t in samples],
                                          [t[order[:held]] if held else t for t in samples])
    if isinstance(module, torch.nn.Linear):
        x_all, y_all, x_check, y_check = (t.reshape(-1, t.shape[-1]) for t in (x_all, y_all, x_check, y_check))
        per_step = min(rows, len(x_all))
    else:
        per_step = min(len(x_all), max(1, rows // max(1, y_all[0, 0].numel())))

    def weights(h: torch.Tensor) -> torch.Tensor:
        return torch.where(scale > 0, torch.clamp(floor + h, -qmax, qmax) / safe, torch.zeros_like(weight))

    def error(w: torch.Tensor) -> float:  # mean squared output error on the held-back samples
        with torch.no_grad():
            parts = list(zip(x_check.split(4096), y_check.split(4096)))
            return float(sum(((layer_forward(module, x, w, bias) - y) ** 2).mean() for x, y in parts) / len(parts))

    nearest = torch.where(scale > 0, torch.clamp(torch.round(weight * safe), -qmax, qmax) / safe,
                          torch.zeros_like(weight))
    before = error(nearest)
    optimiser = torch.optim.Adam([v], lr=lr)
    warm = int(WARMUP * iterations)
    for step in range(iterations):
        pick = torch.randint(len(x_all), (per_step,), generator=generator)
        h = _soft(v)
        # as the reference code weighs them: squared error summed per sample (row or image), averaged over samples
        loss = ((layer_forward(module, x_all[pick], weights(h), bias) - y_all[pick]) ** 2).flatten(1).sum(1).mean()
        if step >= warm:
            beta = 20.0 + (2.0 - 20.0) * (step - warm) / max(1, iterations - warm)
            loss = loss + weight_decay * (1.0 - (2.0 * h - 1.0).abs().pow(beta)).sum()
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    with torch.no_grad():
        hard = weights((v >= 0).float())
    after = error(hard)
    if after > before:  # the learned rounding must beat rounding to nearest on samples it did not learn from
        return nearest, {"before": before, "after": before, "kept": "nearest"}
    return hard, {"before": before, "after": after}


def adaround(qmodel, batches: list[torch.Tensor], iterations: int = 1000, rows: int = 1024, progress=None,
             quantized_inputs: bool = False) -> dict[str, torch.Tensor]:
    """AdaRound every quantized weight layer of ``qmodel`` in network order, in place; returns
    ``{<module>.weight: refined weight}`` (each on its quantizer's grid). ``quantized_inputs``: learn on the
    quantized model's inputs to each layer (earlier layers refined) instead of the FP32 model's."""
    changed: dict[str, torch.Tensor] = {}
    names = [n for n in qmodel.weight_names if not qmodel.quantizer(n)._disabled]
    reference = Reference(qmodel, names, batches, inputs=not quantized_inputs)  # FP32: taken once for all
    for name in (progress(names) if progress is not None else names):
        module, quantizer = qmodel.weight_module(name), qmodel.quantizer(name)
        fp32 = reference.pop(name)
        inputs = [x for x, _ in (capture(qmodel, name, batches) if quantized_inputs else fp32)]
        targets = [y for _, y in fp32]
        with torch.enable_grad():
            weight, report = round_layer(module, module.weight.detach().float(), quantizer.amax, quantizer.num_bits,
                                         inputs, targets, iterations, rows)
        log.info("adaround %s (%d bits): output mse %.3g -> %.3g", name, quantizer.num_bits, report["before"],
                 report["after"])
        key = name.rsplit(":", 1)[0] + ".weight"
        changed[key] = weight.to(module.weight.dtype)
        qmodel.add_refined({key: changed[key]})
    return changed
