"""Uniform bit-widths on the embedded ViT with each quantizer form, on the search and the hold-out split.

    python benchmarks/bench_forms.py [--config configs/fashion_vit_demo.yaml]

Rows: W8A8, W4A8, W8A4, W4A4 and W3A4 (every activation and weight quantizer at that width) for each set of
forms: ``uniform`` (pytorch-quantization's grid everywhere, the baseline measured in the same run) and ``log2 on
attention probabilities`` (FQ-ViT's log2 grid on ``*.attn_drop``, the softmax outputs). Each set is its own
session (model, splits and calibration exactly as ``explore`` builds them), so the differences are the forms'
alone. Forms not built yet (asymmetric, RepQ-ViT's folded per-channel LayerNorm, per-head ranges, AdaRound) have
no row.
"""
from __future__ import annotations

import argparse
import time
import warnings

warnings.simplefilter("ignore", FutureWarning)

from quantsearch.run.settings import ExploreConfig, load_yaml  # noqa: E402
from quantsearch.run.session import build_session  # noqa: E402
from quantsearch.run.tables import format_table  # noqa: E402

WIDTHS = [(8, 8), (4, 8), (8, 4), (4, 4), (3, 4)]  # (weights, activations)
FORM_SETS = {"uniform": None, "log2 on attention probabilities": {"*.attn_drop": "log2"}}


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
        for w, a in WIDTHS:
            qmodel.bit_widths = {n: (w if n in weights else a) for n in qmodel.quantizer_names}
            s, h = search(qmodel), holdout(qmodel)
            ref = reference.setdefault((w, a), (s, h))
            rows.append([f"W{w}A{a}", label, f"{100 * s:.2f}", f"{100 * h:.2f}", f"{100 * (s - ref[0]):+.2f}",
                         f"{100 * (h - ref[1]):+.2f}"])
            print(f"  W{w}A{a} {label}: {100 * s:.2f} / {100 * h:.2f}", flush=True)
    print(f"\n{base.model}: uniform widths per form; search {search.num_samples} images, hold-out "
          f"{holdout.num_samples}; d = against the uniform form at the same widths\n"
          + format_table(["widths", "forms", "search %", "hold-out %", "d search", "d hold-out"], rows))
    print(f"\nwall time {time.perf_counter() - clock:.0f} s")


if __name__ == "__main__":
    main()
