"""Cost of a fake-quantized forward pass against FP32, plain TensorQuantizer hooks against quantsearch's.

    python benchmarks/bench_overhead.py [--repeats 9] [--batch-size 8] [--models deit_tiny_patch16_224,resnet18]

For each model (random weights; speed does not depend on them) three copies run in the same process, interleaved,
one forward pass each in turn: FP32 (no hooks), the plain way (pytorch-quantization TensorQuantizer forward hooks,
as the original tool did) and quantsearch (the same hooks and quantizers, fast fake-quant path). Printed: median
milliseconds, quantsearch / FP32 (the overhead ratio) and plain / quantsearch (the speed-up a user sees).
Quantizers: deit_tiny on Linear, GELU and LayerNorm outputs (86) plus the input; resnet18 on Conv2d outputs (20)
plus the input.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time
import warnings

import torch
from torch import nn

warnings.simplefilter("ignore", FutureWarning)

from quantsearch.quantize.predicates import by_type  # noqa: E402
from quantsearch.quantize.quantized_model import QuantizedActivationsModel  # noqa: E402

PREDICATES = {"deit_tiny_patch16_224": by_type(nn.Linear, nn.GELU, nn.LayerNorm), "resnet18": by_type(nn.Conv2d)}


def build(name: str) -> nn.Module:
    import timm

    return timm.create_model(name, pretrained=False).eval()


def time_once(model: nn.Module, x: torch.Tensor) -> float:
    start = time.perf_counter()
    model(x)
    return time.perf_counter() - start


def bench(name: str, repeats: int, batch_size: int, bits: int, compile: bool) -> dict[str, float]:
    torch.manual_seed(0)
    fp32 = build(name)
    x = torch.randn(batch_size, 3, 224, 224)
    variants = {"fp32": fp32}
    for label, fast in (("plain", False), ("quantsearch", True)):
        qmodel = QuantizedActivationsModel(copy.deepcopy(fp32), PREDICATES[name], fast=fast)
        qmodel.calibrate([x], 1)
        qmodel.bit_widths = [bits] * len(qmodel)
        variants[label] = qmodel
    with torch.inference_mode():
        reference = variants["plain"](x)
        assert torch.equal(reference, variants["quantsearch"](x)), "fast path is not bit-identical"
    compile_s = 0.0
    if compile:  # FP32 is compiled too, so the ratio compares like with like; plain hooks stay eager
        start = time.perf_counter()
        with torch.inference_mode():
            for label in ("fp32", "quantsearch"):
                variants[label] = torch.compile(variants[label])
                variants[label](x)
        compile_s = time.perf_counter() - start
        qmodel = variants["quantsearch"]._orig_mod
        with torch.inference_mode():
            qmodel.bit_widths = [bits - 1] * len(qmodel)  # another candidate: the same graph must serve it
            changed = variants["quantsearch"](x)
            qmodel.bit_widths = [bits] * len(qmodel)
            same = variants["quantsearch"](x)
        print(f"  {name}: compile {compile_s:.0f} s; compiled output max |diff| vs eager "
              f"{(same - reference).abs().max().item():.2e}; {bits - 1}-bit output differs: "
              f"{not torch.equal(changed, same)}", flush=True)
    times = {label: [] for label in variants}
    with torch.inference_mode():
        for model in variants.values():  # warm-up
            model(x)
        for _ in range(repeats):
            for label, model in variants.items():
                times[label].append(time_once(model, x))
    result = {label: 1000 * statistics.median(t) for label, t in times.items()}
    result["quantizers"] = len(variants["quantsearch"])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="deit_tiny_patch16_224,resnet18")
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--bits", type=int, default=6)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--compile", action="store_true", help="torch.compile FP32 and quantsearch models")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"batch {args.batch_size}x3x224x224, {args.bits}-bit activations, median of {args.repeats} interleaved "
          f"runs, {args.threads} threads, torch {torch.__version__}, {'compiled' if args.compile else 'eager'}")
    print(f"{'model':24} {'quantizers':>10} {'FP32 ms':>9} {'plain ms':>9} {'qsearch ms':>10} "
          f"{'qsearch/FP32':>12} {'plain/FP32':>10} {'speed-up':>9}")
    for name in args.models.split(","):
        r = bench(name, args.repeats, args.batch_size, args.bits, args.compile)
        print(f"{name:24} {r['quantizers']:>10} {r['fp32']:9.1f} {r['plain']:9.1f} {r['quantsearch']:10.1f} "
              f"{r['quantsearch'] / r['fp32']:11.2f}x {r['plain'] / r['fp32']:9.2f}x "
              f"{r['plain'] / r['quantsearch']:8.2f}x", flush=True)


if __name__ == "__main__":
    main()
