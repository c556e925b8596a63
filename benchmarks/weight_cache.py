"""How much the per-bit-width cache of fake-quantized weights saves per evaluation (demo ViT, CPU).

Times one accuracy evaluation with weight quantizers three ways, in the same run: activations only (no weight
quantizers), weights from the cache (what a search does), and weights re-quantized on every forward call (the
cache dropped before each batch). Prints seconds per evaluation and the ratios.

    PYTHONPATH=src python benchmarks/weight_cache.py [--images 1000] [--repeats 3]
"""
from __future__ import annotations

import argparse
import time
import warnings

import torch


def main() -> None:
    warnings.simplefilter("ignore", FutureWarning)
    from quantsearch.sources.data import load_fashion_mnist, split_dataset
    from quantsearch.search.evaluator import AccuracyEvaluator
    from quantsearch.sources.models import create_demo_vit
    from quantsearch.quantize.quantized_model import QuantizedActivationsModel

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    splits = split_dataset(load_fashion_mnist(), 500, args.images, seed=0)
    evaluate = AccuracyEvaluator(splits.search, 250)
    calibration = [torch.stack([splits.calibration[i][0] for i in range(250)])]

    def timed(qmodel, before_batch=None) -> float:
        handle = qmodel.model.register_forward_pre_hook(lambda *_: before_batch()) if before_batch else None
        best = float("inf")
        for _ in range(args.repeats):
            start = time.perf_counter()
            evaluate(qmodel)
            best = min(best, time.perf_counter() - start)
        if handle:
            handle.remove()
        return best

    activations = QuantizedActivationsModel(create_demo_vit(), "vit")
    activations.calibrate(calibration)
    both = QuantizedActivationsModel(create_demo_vit(), "vit", weight_quantizers=True)
    both.calibrate(calibration)
    both.bit_widths = {n: 4 for n in both.weight_names}

    def drop_cache():
        for swap in both._weights.values():
            swap.cache.clear()

    t_act = timed(activations)
    t_cached = timed(both)
    t_fresh = timed(both, drop_cache)
    print(f"one evaluation over {args.images} images (best of {args.repeats}), {torch.get_num_threads()} threads")
    print(f"  activation quantizers only:          {t_act:.3f} s")
    print(f"  + weight quantizers, cached weights: {t_cached:.3f} s  ({t_cached / t_act:.2f}x activations only)")
    print(f"  + weight quantizers, re-quantized:   {t_fresh:.3f} s  ({t_fresh / t_act:.2f}x activations only)")
    print(f"  cache speed-up: {t_fresh / t_cached:.2f}x")


if __name__ == "__main__":
    main()
