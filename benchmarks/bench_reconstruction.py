"""Block reconstruction against today's refinements at uniform widths, on the demo ViT and a CNN (issue 30).

    python benchmarks/bench_reconstruction.py [--models vit,cnn] [--iterations 1000] [--seeds 1]
        [--widths W8A8,W4A8,...] [--cnn-widths W4A8,W8A4,W4A4]

Rows: W8A8, W4A8, W8A4, W4A4, W3A4 and W4A3 (every weight quantizer at the first width, every activation
quantizer at the second). Columns, each from the unrefined model of the same session (splits and calibration as
``explore`` builds them): ``none`` (uniform grids, no refinement), ``forms`` (the ViT's best forms together, as in
``bench_forms.py``, with RepQ-ViT's log-sqrt2 grid for the probabilities (``log-sqrt2-narrow``; results up to
``bench_reconstruction_2026-12-07c.txt`` used ``log2-narrow``), asymmetric GELU, per-channel LayerNorm, per-head
q/k/v and attention outputs; the CNN has none), then on the forms: ``adaround,bias-correction`` (today's best), ``brecq`` (block
reconstruction of the rounding), ``brecq-lsq`` (+ activation grids and biases) and ``qdrop`` (+ QDrop's drop
at 0.5). Printed: hold-out top-1 (the search split in the log lines) and each refinement's seconds on this
machine. ``--seeds N`` repeats the ViT's block refinements at W4A4 with N reconstruction seeds (the spread of one
method on one model is part of its answer), on these forms and on the same forms with ``log2-narrow``
probabilities (the forms before log-sqrt2), so the two grids are compared in one run. ``--families`` then puts
each family of activation quantizers (a name with its block number replaced by ``*``) back at 8 bits in turn
and reruns ``brecq-lsq`` at W4A4 (seed 0): what each family still costs after block reconstruction.

The CNN is timm's ``resnet10t`` (grey input, 10 classes) trained on Fashion-MNIST's training split by
``utils/train_fashion_cnn.py`` (run here first if ``benchmarks/.cache/resnet10t_fashion.pt`` is missing), with
activation quantizers after every BatchNorm (the ``batchnorm`` preset) and per-channel weight quantizers.
"""
from __future__ import annotations

import argparse
import re
import statistics
import sys
import time
import warnings
from pathlib import Path

warnings.simplefilter("ignore", FutureWarning)

from quantsearch.quantize.refine import refine  # noqa: E402
from quantsearch.run.session import build_session  # noqa: E402
from quantsearch.run.settings import ExploreConfig  # noqa: E402
from quantsearch.run.tables import format_table  # noqa: E402
from quantsearch.sources.data import DEMO_PREPROCESSING  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
WIDTHS = [("W8A8", 8, 8), ("W4A8", 4, 8), ("W8A4", 8, 4), ("W4A4", 4, 4), ("W3A4", 3, 4), ("W4A3", 4, 3)]
VIT_FORMS = {"*.attn_drop": "log-sqrt2-narrow", "*.mlp.act": "asymmetric", "*norm*": "per-channel",
             "*.attn.qkv": "per-head", "*.attn.proj:input": "per-head"}
REFINEMENTS = ["adaround,bias-correction", "brecq", "brecq-lsq", "qdrop"]
BLOCK_METHODS = ["brecq", "brecq-lsq", "qdrop"]
CNN_WEIGHTS = REPO / "benchmarks" / ".cache" / "resnet10t_fashion.pt"


def cnn_config() -> ExploreConfig:
    if not CNN_WEIGHTS.is_file():
        sys.path.insert(0, str(REPO / "utils"))
        from train_fashion_cnn import train

        print(f"training the CNN first ({CNN_WEIGHTS})", flush=True)
        train(out=CNN_WEIGHTS)
    return ExploreConfig().merged({"model": "resnet10t", "model_kwargs": {"num_classes": 10, "in_chans": 1},
                                   "checkpoint": str(CNN_WEIGHTS), "predicate": "batchnorm",
                                   "preprocessing": DEMO_PREPROCESSING.to_dict()})  # the tensors it trained on


def set_widths(qmodel, w: int, a: int) -> None:
    """Every weight quantizer at ``w``, every activation quantizer at ``a``; amax (and low ends) from the
    calibration tables again, refinements dropped."""
    qmodel.refined = {}
    weights = set(qmodel.weight_names)
    qmodel.bit_widths = {n: (w if n in weights else a) for n in qmodel.quantizer_names}


def measure(model: str, config: ExploreConfig, iterations: int, seeds: int, widths: list[str],
            fisher: bool = False, scales: bool = False, methods: list[str] = REFINEMENTS,
            families: bool = False) -> list[list]:
    plain = build_session(config, weight_quantizers=True)
    forms = build_session(config.merged({"quant_forms": VIT_FORMS}), weight_quantizers=True) if model == "vit" \
        else None
    fp32 = plain.fp32("holdout")
    rows = [["FP32", f"{100 * fp32:.2f}"] + [""] * (1 + 2 * len(REFINEMENTS))]
    for label, w, a in (entry for entry in WIDTHS if entry[0] in widths):
        row = [label]
        for session in (plain, forms):
            if session is None:
                row.append("-")
                continue
            set_widths(session.qmodel, w, a)
            row.append(f"{100 * session.evaluator('holdout')(session.qmodel):.2f}")
        session = forms or plain
        inputs = session.calibration_inputs()
        for method in REFINEMENTS:
            if method not in methods:
                row += ["", ""]
                continue
            set_widths(session.qmodel, w, a)
            options = {"iterations": iterations} if method != "adaround,bias-correction" else {}
            start = time.perf_counter()
            refine(session.qmodel, inputs, method, **options)
            seconds = time.perf_counter() - start
            search, holdout = (session.evaluator(s)(session.qmodel) for s in ("search", "holdout"))
            print(f"  {model} {label} {method}: search {100 * search:.2f}, hold-out {100 * holdout:.2f}, "
                  f"{seconds:.0f} s", flush=True)
            row += [f"{100 * holdout:.2f}", f"{seconds:.0f}"]
        rows.append(row)
        if label == "W4A4" and seeds > 1 and model == "vit":
            rows.append(spread(session, model, inputs, iterations, seeds, methods))
            log2 = build_session(config.merged({"quant_forms": VIT_FORMS | {"*.attn_drop": "log2-narrow"}}),
                                 weight_quantizers=True)
            rows.append(spread(log2, model, log2.calibration_inputs(), iterations, seeds, methods,
                               "log2-narrow probabilities"))
        if label == "W4A4" and fisher:
            rows.append(variant_row(session, model, inputs, iterations, "Fisher-weighted", fisher=True))
        if label == "W4A4" and scales:
            rows.append(variant_row(session, model, inputs, iterations, "weight steps learned", scales=True))
        if label == "W4A4" and families:
            print(f"\n{model}: W4A4 brecq-lsq with one family of activation quantizers at 8 bits\n"
                  + family_costs(session, model, inputs, iterations) + "\n", flush=True)
    return rows


def variant_row(session, model: str, inputs, iterations: int, label: str, **options) -> list:
    """W4A4 ``brecq-lsq`` with one more option of :func:`reconstruct`: ``fisher=True`` (BRECQ's Fisher weighting
    of the block loss) or ``scales=True`` (the weights' per-channel steps learned too)."""
    from quantsearch.quantize.refine.reconstruction import reconstruct

    set_widths(session.qmodel, 4, 4)
    start = time.perf_counter()
    reconstruct(session.qmodel, inputs, iterations=iterations, lsq=True, biases=True, **options)
    seconds = time.perf_counter() - start
    search, holdout = (session.evaluator(s)(session.qmodel) for s in ("search", "holdout"))
    print(f"  {model} W4A4 brecq-lsq, {label}: search {100 * search:.2f}, hold-out {100 * holdout:.2f}, "
          f"{seconds:.0f} s", flush=True)
    return [f"W4A4, {label}", "", "", "", "", "", "", f"{100 * holdout:.2f}", f"{seconds:.0f}", "", ""]


def family_costs(session, model: str, inputs, iterations: int) -> str:
    """W4A4 ``brecq-lsq`` (seed 0) with each family of activation quantizers at 8 bits in turn: hold-out and its
    change against all at 4 bits, as a table."""
    qmodel = session.qmodel
    weights = set(qmodel.weight_names)
    groups: dict[str, list[str]] = {}
    for name in (n for n in qmodel.quantizer_names if n not in weights):
        groups.setdefault(re.sub(r"\.\d+(\.|$)", r".*\1", name), []).append(name)
    rows, base = [], None
    for family, names in [("none", [])] + list(groups.items()):
        set_widths(qmodel, 4, 4)
        qmodel.bit_widths = {n: 8 for n in names}
        refine(qmodel, inputs, "brecq-lsq", iterations=iterations, seed=0)
        holdout = 100 * session.evaluator("holdout")(qmodel)
        base = holdout if base is None else base
        print(f"  {model} W4A4 brecq-lsq, {family} at 8 bits ({len(names)}): hold-out {holdout:.2f}", flush=True)
        rows.append([family, str(len(names)), f"{holdout:.2f}", f"{holdout - base:+.2f}" if names else ""])
    return format_table(["at 8 bits", "quantizers", "hold-out %", "change"], rows)


def spread(session, model: str, inputs, iterations: int, seeds: int, methods: list[str], label: str = "") -> list:
    """W4A4 hold-out of each block method over ``seeds`` reconstruction seeds: mean (min-max)."""
    set_widths(session.qmodel, 4, 4)
    forms = f"{100 * session.evaluator('holdout')(session.qmodel):.2f}" if label else ""
    row = [f"W4A4, {seeds} seeds" + (f", {label}" if label else ""), "", forms] + ["", ""]
    for method in BLOCK_METHODS:
        if method not in methods:
            row += ["", ""]
            continue
        values = []
        for seed in range(seeds):
            set_widths(session.qmodel, 4, 4)
            refine(session.qmodel, inputs, method, iterations=iterations, seed=seed)
            values.append(100 * session.evaluator("holdout")(session.qmodel))
        print(f"  {model} W4A4 {method} seeds 0-{seeds - 1}{', ' + label if label else ''}: "
              f"{', '.join(f'{v:.2f}' for v in values)}", flush=True)
        row += [f"{statistics.mean(values):.2f} ({min(values):.2f}-{max(values):.2f})", ""]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="vit,cnn")
    parser.add_argument("--iterations", type=int, default=1000, help="per block, for brecq, brecq-lsq, qdrop")
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--fisher", action="store_true", help="also brecq-lsq at W4A4 with the Fisher weighting")
    parser.add_argument("--scales", action="store_true", help="also brecq-lsq at W4A4 with the weights' "
                        "per-channel steps learned")
    parser.add_argument("--families", action="store_true", help="also brecq-lsq at W4A4 with each family of "
                        "activation quantizers at 8 bits in turn")
    parser.add_argument("--methods", default=";".join(REFINEMENTS), help="the refinement columns to run, separated by ;")
    parser.add_argument("--widths", default=",".join(w for w, _, _ in WIDTHS), help="the ViT's rows")
    parser.add_argument("--cnn-widths", default="W4A8,W8A4,W4A4", help="the CNN's rows (a block refinement of "
                        "resnet10t takes minutes)")
    args = parser.parse_args()
    clock = time.perf_counter()
    headers = ["widths", "none %", "forms %"] + [h for m in REFINEMENTS for h in (f"{m} %", "s")]
    for model in args.models.split(","):
        config = ExploreConfig() if model == "vit" else cnn_config()
        rows = measure(model, config, args.iterations, args.seeds,
                       (args.widths if model == "vit" else args.cnn_widths).split(","), args.fisher, args.scales,
                       args.methods.split(";"), args.families)
        print(f"\n{config.model} ({model}): hold-out top-1 at uniform widths; refinements on the forms column, "
              f"{args.iterations} iterations per block, 1,000 calibration images; s = seconds on this machine\n"
              + format_table(headers, rows) + "\n", flush=True)
    print(f"wall time {time.perf_counter() - clock:.0f} s")


if __name__ == "__main__":
    main()
