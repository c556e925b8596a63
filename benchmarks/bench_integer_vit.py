"""The integer-only ViT (issue 29): the study's table, per-operator costs, on the demo ViT and a 6-block ViT.

    python benchmarks/bench_integer_vit.py [--models demo,vit6] [--iterations 1000]

Rows as in the study the project grew from: weights only (W8/A32, W4/A32), W8A8 and W4A8 with float nonlinear
operators, the same with I-ViT's integer Shiftmax, ShiftGELU, I-LayerNorm and residual adds on 16-bit grids
(``integer-only``), with FQ-ViT's Log-Int-Softmax (on log2 probabilities) and PTF LayerNorm (``fqvit``), W4A8
with layer-wise AdaRound on top, and W4A4, with float and integer operators and with block reconstruction
(``brecq-lsq``, the refinement that exists, straight through the integer operators). Then each operator alone on
integers at W8A8. Every number is hold-out top-1 of the split ``explore`` holds out (calibration and search
images never among them), with its 95 % interval half-width; every weight quantizer at the first width, every
activation quantizer at the second, ranges from one calibration pass (the project's default method).

``vit6`` is timm's ``vit_tiny_patch16_224`` at 28x28, 4x4 patches, 6 blocks, 3 heads, width 96, trained on
Fashion-MNIST's training split by ``utils/train_fashion_cnn.py --model vit6`` (run here first if
``benchmarks/.cache/vit6_fashion.pt`` is missing).
"""
from __future__ import annotations

import argparse
import math
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
VIT6_WEIGHTS = REPO / "benchmarks" / ".cache" / "vit6_fashion.pt"
LOG2_PROBABILITIES = {"*.attn_drop": "log2"}  # FQ-ViT's log2 attention probabilities, which Log-Int-Softmax emits
ALONE = [("softmax: I-ViT Shiftmax", {"*.softmax": "ivit"}), ("softmax: FQ-ViT Log-Int-Softmax", {"*.softmax": "fqvit"}),
         ("GELU: I-ViT ShiftGELU", {"*.act": "ivit"}), ("LayerNorm: I-ViT I-LayerNorm", {"*norm*": "ivit"}),
         ("LayerNorm: FQ-ViT PTF", {"*norm*": "fqvit"}), ("residual adds, 16 bits", {"*.residual*": "ivit"})]


def model_config(model: str) -> ExploreConfig:
    if model == "demo":
        return ExploreConfig()
    sys.path.insert(0, str(REPO / "utils"))
    from train_fashion_cnn import MODELS, train

    if not VIT6_WEIGHTS.is_file():
        print(f"training vit6 first ({VIT6_WEIGHTS})", flush=True)
        train(epochs=4, out=VIT6_WEIGHTS, model="vit6")
    name, kwargs = MODELS["vit6"]
    return ExploreConfig().merged({"model": name, "model_kwargs": kwargs, "checkpoint": str(VIT6_WEIGHTS),
                                   "predicate": "vit", "preprocessing": DEMO_PREPROCESSING.to_dict()})


def set_widths(qmodel, w: int, a: int | None) -> None:
    """Weights at ``w``; activations at ``a`` (None: off, FP32 activations and float operators)."""
    qmodel.refined = {}
    weights = set(qmodel.weight_names)
    qmodel.bit_widths = {n: (w if n in weights else (a or 8)) for n in qmodel.quantizer_names}
    for n in qmodel.activation_names:
        qmodel.quantizer(n).enable() if a else qmodel.quantizer(n).disable()
    for op in qmodel.integer:
        op.enabled = a is not None


class Table:
    """Rows of hold-out top-1; ``store`` keeps a row's accuracy under a key that later rows ``compare`` with."""

    def __init__(self, holdout_size: int):
        self.rows, self.n = [], holdout_size
        self.kept: dict[str, float] = {}

    def add(self, label: str, session, w: int, a: int | None, store: str | None = None,
            compare: str | None = None, seconds: float = 0.0) -> None:
        holdout = session.evaluator("holdout")(session.qmodel)
        if store:
            self.kept[store] = holdout
        base = self.kept.get(compare or "")
        half = 1.96 * math.sqrt(max(holdout * (1 - holdout), 1e-9) / self.n)
        widths = f"W{w}A{a or 32}"
        self.rows.append([label, widths, f"{100 * holdout:.2f} +- {100 * half:.2f}",
                          "" if base is None else f"{100 * (holdout - base):+.2f}",
                          "yes" if a and session.qmodel.integer_only else "no", f"{seconds:.0f}" if seconds else ""])
        print(f"  {label} {widths}: hold-out {100 * holdout:.2f}", flush=True)


def measure(config: ExploreConfig, iterations: int) -> Table:
    plain = build_session(config, weight_quantizers=True)
    ivit = build_session(config.merged({"integer_ops": "integer-only"}), weight_quantizers=True)
    fqvit = build_session(config.merged({"integer_ops": "fqvit", "quant_forms": LOG2_PROBABILITIES}),
                          weight_quantizers=True)
    table = Table(len(plain.splits.holdout))
    table.rows.append(["FP32", "-", f"{100 * plain.fp32('holdout'):.2f}", "", "no", ""])
    for w, a in ((8, None), (4, None), (8, 8), (4, 8)):
        set_widths(plain.qmodel, w, a)
        table.add("weights only" if a is None else "float operators", plain, w, a, store=a and f"W{w}A{a}")
    for label, session in (("I-ViT operators, 16-bit adds", ivit), ("FQ-ViT LIS + PTF, 16-bit adds", fqvit)):
        for w, a in ((8, 8), (4, 8)):
            set_widths(session.qmodel, w, a)
            table.add(label, session, w, a, compare=f"W{w}A{a}")
    inputs = plain.calibration_inputs()
    for w, a, method in ((4, 8, "adaround"), (4, 4, None), (4, 4, "brecq-lsq")):
        key = f"W{w}A{a} {method or ''}"
        for label, session in (("float operators", plain), ("I-ViT operators", ivit)):
            set_widths(session.qmodel, w, a)
            start = time.perf_counter()
            if method:
                refine(session.qmodel, inputs, method, **({"iterations": iterations} if method != "adaround" else {}))
            table.add(label + (f" + {method}" if method else ""), session, w, a,
                      **({"store": key} if session is plain else {"compare": key}),
                      seconds=time.perf_counter() - start if method else 0.0)
    for label, spec in ALONE:
        session = build_session(config.merged({"integer_ops": spec}), weight_quantizers=True)
        set_widths(session.qmodel, 8, 8)
        table.add(f"alone: {label}", session, 8, 8, compare="W8A8")
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="demo,vit6")
    parser.add_argument("--iterations", type=int, default=1000, help="per block, for brecq-lsq")
    args = parser.parse_args()
    clock = time.perf_counter()
    for model in args.models.split(","):
        config = model_config(model)
        table = measure(config, args.iterations)
        print(f"\n{model} ({config.model}): hold-out top-1 on {table.n} images (+- the 95 % half-width); "
              "'vs float' = against the same widths with float operators (refined rows: against the same "
              "refinement with float operators); s = refinement seconds on this machine\n"
              + format_table(["operators", "widths", "hold-out %", "vs float", "integer-only", "s"], table.rows)
              + "\n", flush=True)
    print(f"wall time {time.perf_counter() - clock:.0f} s")


if __name__ == "__main__":
    main()
