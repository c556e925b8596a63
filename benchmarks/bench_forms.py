"""Uniform bit-widths on the embedded ViT with each quantizer form, on the search and the hold-out split.

    python benchmarks/bench_forms.py [--config configs/fashion_vit_demo.yaml]

Rows: W8A8, W4A8, W8A4, W4A4 and W3A4 (every activation and weight quantizer at that width), and W8A8 with the
attention probabilities alone at 4 or 3 bits (where a log grid should pay), for each set of
forms: ``uniform`` (pytorch-quantization's grid everywhere, the baseline measured in the same run), ``log2 on
attention probabilities`` (FQ-ViT's log2 grid on ``*.attn_drop``, the softmax outputs), ``asymmetric`` (a zero
point, its range fitted per width) on GELU or LayerNorm outputs, ``per-channel`` LayerNorm outputs (RepQ-ViT's
fold), ``per-head`` q/k/v and attention outputs, and all of them together (log2-narrow probabilities: log2 at 4
bits and below, uniform above; asymmetric GELU, per-channel LayerNorm, per-head attention). Each set is its own session (model, splits and calibration
exactly as ``explore`` builds them), so the differences are the forms' alone. The last set is then refined at each
width with bias correction, AdaRound, and AdaRound then bias correction, each from the unrefined model
(``apply --refine``, on the 1,000 calibration images), and measured again, with each refinement's time.
"""
from __future__ import annotations

import argparse
import fnmatch
import time
import warnings

warnings.simplefilter("ignore", FutureWarning)

from quantsearch.quantize.refine import refine  # noqa: E402
from quantsearch.run.settings import ExploreConfig, load_yaml  # noqa: E402
from quantsearch.run.session import build_session  # noqa: E402
from quantsearch.run.tables import format_table  # noqa: E402

# (label, weight bits, activation bits, {glob: bits} of activations set apart)
WIDTHS = [("W8A8", 8, 8, {}), ("W4A8", 4, 8, {}), ("W8A4", 8, 4, {}), ("W4A4", 4, 4, {}), ("W3A4", 3, 4, {}),
          ("W8A8, probabilities A4", 8, 8, {"*.attn_drop": 4}), ("W8A8, probabilities A3", 8, 8, {"*.attn_drop": 3})]
FORM_SETS = {"uniform": None, "log2 on attention probabilities": {"*.attn_drop": "log2"},
             "asymmetric on GELU outputs": {"*.mlp.act": "asymmetric"},
             "asymmetric on LayerNorm outputs": {"*norm*": "asymmetric"},
             "per-channel LayerNorm outputs": {"*norm*": "per-channel"},
             "per-head q/k/v and attention outputs": {"*.attn.qkv": "per-head", "*.attn.proj:input": "per-head"},
             "all together": {"*.attn_drop": "log2-narrow", "*.mlp.act": "asymmetric", "*norm*": "per-channel",
                              "*.attn.qkv": "per-head", "*.attn.proj:input": "per-head"}}
REFINEMENTS = {"+ bias correction": "bias-correction", "+ AdaRound": "adaround",
               "+ AdaRound + bias correction": "adaround,bias-correction"}


def _row(widths, label, s, h, ref) -> list:
    print(f"  {widths} {label}: {100 * s:.2f} / {100 * h:.2f}", flush=True)
    return [widths, label, f"{100 * s:.2f}", f"{100 * h:.2f}", f"{100 * (s - ref[0]):+.2f}",
            f"{100 * (h - ref[1]):+.2f}"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="an explore YAML (default: the embedded demo)")
    args = parser.parse_args()
    clock = time.perf_counter()
    base = ExploreConfig.from_mapping(load_yaml(args.config)) if args.config else ExploreConfig()
    rows, fp32, reference = [], None, {}
    for label, forms in FORM_SETS.items():
        session = build_session(base.merged({"quant_forms": forms, "bits": "2:8"}))
        qmodel = session.qmodel
        search, holdout = session.evaluator("search"), session.evaluator("holdout")
        if fp32 is None:
            fp32 = (session.fp32("search"), session.fp32("holdout"))
            rows.append(["FP32", "", f"{100 * fp32[0]:.2f}", f"{100 * fp32[1]:.2f}", "", ""])
        weights = set(qmodel.weight_names)
        for widths, w, a, apart in WIDTHS:
            qmodel.bit_widths = {n: (w if n in weights else next(
                (b for g, b in apart.items() if fnmatch.fnmatchcase(n, g)), a)) for n in qmodel.quantizer_names}
            s, h = search(qmodel), holdout(qmodel)
            ref = reference.setdefault(widths, (s, h))
            rows.append(_row(widths, label, s, h, ref))
            if label == list(FORM_SETS)[-1]:
                for suffix, method in REFINEMENTS.items():
                    start = time.perf_counter()
                    refine(qmodel, session.calibration_inputs(), method)
                    seconds = time.perf_counter() - start
                    rows.append(_row(widths, f"{label} {suffix} ({seconds:.0f} s)", search(qmodel),
                                     holdout(qmodel), ref))
                    qmodel.refined = {}
    print(f"\n{base.model}: uniform widths per form; search {search.num_samples} images, hold-out "
          f"{holdout.num_samples}; d = against the uniform form at the same widths\n"
          + format_table(["widths", "forms", "search %", "hold-out %", "d search", "d hold-out"], rows))
    print(f"\nwall time {time.perf_counter() - clock:.0f} s")


if __name__ == "__main__":
    main()
