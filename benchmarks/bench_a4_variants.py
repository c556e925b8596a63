"""Where the 4-bit activations of the embedded ViT lose accuracy, and what other quantizer forms would win back.

    python benchmarks/bench_a4_variants.py

The starting point is W4A4 with the activations that no multiply reads (fc1, proj, fc2, patch-embedding and head
outputs) at 8 bits: the configuration that costs 0.25 of W8A8's BOPs. Each variant replaces the fake quantization
of some quantizers by another form, computed here with plain tensor operations (forward hooks on the quantizers),
and is evaluated on the search and the hold-out split:

- ``asym``: an asymmetric range [lo, hi] with an integer zero point (2^b levels), lo and hi fitted by a grid search
  minimising the squared error on 50,000 calibration values per batch;
- ``qkv per head``: q, k and v of each head with their own symmetric range (MSE-fitted), as separate tensors would
  have in an integer attention.

These are measurements for the README's note on the BOPs bar, not features: quantsearch's quantizers stay
pytorch-quantization's symmetric per-tensor ones.
"""
from __future__ import annotations

import time
import warnings

import numpy as np
import torch

warnings.simplefilter("ignore", FutureWarning)

from quantsearch.run.settings import ExploreConfig  # noqa: E402
from quantsearch.run.session import build_session  # noqa: E402
from quantsearch.run.tables import format_table  # noqa: E402
from quantsearch.search.sensitivity import _fake_quant as fake_quant_symmetric  # noqa: E402  (x, amax, bits, unsigned)

NOT_READ_BY_A_MULTIPLY = ("mlp.fc1", "attn.proj", "mlp.fc2", "patch_embed.proj", "head")


def fake_quant_asymmetric(x, lo, hi, bits):
    levels = 2 ** bits - 1
    scale = (hi - lo) / levels
    zero = float(round(-lo / scale))
    return ((x / scale).round() + zero).clamp(0, levels).sub(zero).mul(scale)


def fit_asymmetric(x, bits, fallback):
    """(lo, hi) with the least squared error over a grid, or None if the symmetric ``fallback`` error is lower."""
    best_error, best = float(((fallback(x) - x) ** 2).mean()), None
    top = float(x.max())
    for lo in torch.quantile(x[:200_000], torch.tensor([0.0, 1e-4, 1e-3, 1e-2])).tolist():
        for fraction in np.linspace(0.2, 1.0, 33):
            hi = float(lo + (top - lo) * fraction)
            if lo < 0 < hi:
                error = float(((fake_quant_asymmetric(x, lo, hi, bits) - x) ** 2).mean())
                if error < best_error:
                    best_error, best = error, (lo, hi)
    return best


def fit_symmetric(x, bits):
    amaxes = np.linspace(0.05, 1.0, 60) * float(x.abs().max())
    errors = [float(((fake_quant_symmetric(x, a, bits, False) - x) ** 2).mean()) for a in amaxes]
    return float(amaxes[int(np.argmin(errors))])


def main() -> None:
    clock = time.perf_counter()
    config = ExploreConfig(bits="2:8")
    session = build_session(config)  # the run's model, splits and calibration, as explore builds them
    model, splits, qmodel = session.model, session.splits, session.qmodel
    search, holdout = session.evaluator("search"), session.evaluator("holdout")
    acts, weights = qmodel.activation_names, qmodel.weight_names
    free = [n for n in acts if n.endswith(NOT_READ_BY_A_MULTIPLY)]
    base = {n: 4 for n in acts + weights} | {n: 8 for n in free}

    # calibration values per activation quantizer, and the qkv outputs whole
    samples = {n: [] for n in acts}
    qkv = {}
    generator = torch.Generator().manual_seed(0)
    handles = []
    for name in acts:
        def sample(_module, args, name=name):
            x = args[0].detach().flatten()
            samples[name].append(x[torch.randint(0, x.numel(), (50_000,), generator=generator)])
        handles.append(qmodel.quantizer(name).register_forward_pre_hook(sample))
    for i, block in enumerate(model.blocks):
        handles.append(block.attn.qkv.register_forward_hook(
            lambda _m, _a, out, i=i: qkv.setdefault(i, []).append(out.detach())))
    with qmodel.quantization_disabled(), torch.no_grad():
        for x, _ in torch.utils.data.DataLoader(splits.calibration, batch_size=config.batch_size):
            model(x)
    for handle in handles:
        handle.remove()
    samples = {n: torch.cat(v) for n, v in samples.items()}
    unsigned = qmodel.unsigned
    heads = model.blocks[0].attn.num_heads

    def asymmetric_ranges(names, bits):
        """Asymmetric ranges fitted at ``bits`` for the signed quantizers among ``names``; each must be one that
        ``base`` puts at ``bits`` (the hook quantizes with the quantizer's own width, so a range fitted at 4 bits on
        a quantizer kept at 8 would replace its 8-bit symmetric form by a mismatched one)."""
        wrong = [n for n in names if base[n] != bits]
        if wrong:
            raise ValueError(f"{wrong[0]!r} is at {base[wrong[0]]} bits in W4A4, not {bits}")
        return {n: fit_asymmetric(samples[n], bits, lambda x, n=n: fake_quant_symmetric(
            x, qmodel.amax_table[n][bits], bits, unsigned[n])) for n in names if not unsigned[n]}

    def per_head_ranges(bits):
        out = {}
        for i, outputs in qkv.items():
            x = torch.cat(outputs).reshape(-1, 3, heads, outputs[0].shape[-1] // (3 * heads))
            out[f"blocks.{i}.attn.qkv"] = torch.tensor(
                [[fit_symmetric(x[:, p, h].flatten()[::3], bits) for h in range(heads)] for p in range(3)])
        return out

    def evaluate(bits, asymmetric=None, per_head=None):
        handles = []
        for name, ranges in (asymmetric or {}).items():
            if ranges is not None:
                lo, hi = ranges
                handles.append(qmodel.quantizer(name).register_forward_hook(
                    lambda m, a, _o, lo=lo, hi=hi: fake_quant_asymmetric(a[0], lo, hi, m.num_bits)))
        for name, amax in (per_head or {}).items():
            def grouped(m, a, _o, amax=amax):
                x = a[0]
                groups = x.reshape(*x.shape[:-1], 3, heads, -1)
                return fake_quant_symmetric(groups, amax.reshape(3, heads, 1), m.num_bits, False).reshape(x.shape)
            handles.append(qmodel.quantizer(name).register_forward_hook(grouped))
        qmodel.bit_widths = bits
        try:
            return search(qmodel), holdout(qmodel)
        finally:
            for handle in handles:
                handle.remove()

    def family(*suffixes):
        return [n for n in acts if n.endswith(suffixes) or n in suffixes]

    qkv3 = dict(base) | {n: 3 for n in family("attn.qkv")}
    at_4_bits = [n for n in acts if base[n] == 4]
    variants = [
        ("symmetric per tensor (quantsearch)", base, {}, {}),
        # every signed activation that W4A4 puts at 4 bits: those no multiply reads (the logits included) stay
        # symmetric 8-bit, as in the reference row
        ("asym on every signed activation", base, asymmetric_ranges(at_4_bits, 4), {}),
        ("asym on GELU outputs", base, asymmetric_ranges(family("mlp.act"), 4), {}),
        ("asym on LayerNorm outputs", base, asymmetric_ranges(family("norm1", "norm2", "norm"), 4), {}),
        ("asym on qkv outputs", base, asymmetric_ranges(family("attn.qkv"), 4), {}),
        ("qkv per part and head", base, {}, per_head_ranges(4)),
        ("qkv at 3 bits, per tensor", qkv3, {}, {}),
        ("qkv at 3 bits, per part and head", qkv3, {}, per_head_ranges(3)),
    ]
    with qmodel.quantization_disabled():
        fp32 = (search(qmodel), holdout(qmodel))
    rows = [["FP32", f"{100 * fp32[0]:.2f}", f"{100 * fp32[1]:.2f}", "", ""]]
    reference = None
    for label, bits, asymmetric, per_head in variants:
        s, h = evaluate(bits, asymmetric, per_head)
        if reference is None or label.startswith("qkv at 3 bits, per tensor"):
            reference = (s, h)
        rows.append([label, f"{100 * s:.2f}", f"{100 * h:.2f}", f"{100 * (s - reference[0]):+.2f}",
                     f"{100 * (h - reference[1]):+.2f}"])
        print(f"  {label}: {100 * s:.2f} / {100 * h:.2f}", flush=True)
    print(f"\nW4A4, the activations no multiply reads at 8 bits; search {search.num_samples} images, hold-out "
          f"{holdout.num_samples}; differences against the symmetric row above each group\n"
          + format_table(["variant", "search %", "hold-out %", "d search", "d hold-out"], rows))
    print(f"\nwall time {time.perf_counter() - clock:.0f} s")


if __name__ == "__main__":
    main()
