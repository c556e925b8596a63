"""The default run (``python -m quantsearch.explore``) before and after issue 18, side by side, several seeds.

    python benchmarks/bench_default_run.py [--seeds 0,1,2] [--config FILE] [--variants before,now,now-6]

Each variant and seed is one explore run in a fresh process (the same command a user types), timed from the
start of the process to its end. Variants:
- ``before``: the run as it was before issue 18's changes: the fake quantizer with 0-dim tensor operands, glibc's
  adaptive allocator thresholds, no early rejection, 10 generations (pop 20);
- ``now``: today's defaults (scalar operands, freed memory kept, ``early-reject: auto``: racing), 10 generations;
- ``now-6``: the same with 6 generations (the default since issue 18).

Printed per run: wall seconds, evaluations, seconds per evaluation against FP32, front size, confirmed points
(meeting the floor on the 6,000 hold-out images), the cheapest confirmed point's cost and the hold-out
hypervolume: the front's points scored by their hold-out accuracy against the hold-out floor, costs as a
fraction of FP32 (reference point: the floor and 1.0), as ``run/convergence.py`` scores the search split.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

VARIANTS = {"before": ["--early-reject", "off", "--generations", "10"],
            "now": ["--generations", "10"],
            "now-6": ["--generations", "6"],
            "no-cache": ["--block-cache-mb", "0"],  # today's defaults without the block-output cache (issue 27)
            "cache": [],  # today's defaults
            "whole-budget": ["--patience", "0", "--block-cache-mb", "0"]}  # the flags of issue 27's time: no stop,
# no block cache (the code is today's: the fake quantizer in place, uniform configurations racing)


def _before() -> None:
    """Put the pre-issue-18 arithmetic and allocator back in this process (a child)."""
    from quantsearch.quantize.fakequant import FastTensorQuantizer
    from quantsearch.run import pipeline

    sys.path.insert(0, str(Path(__file__).parent))
    from bench_eval_cost import _tensor_operand_forward

    FastTensorQuantizer._quant_forward = _tensor_operand_forward
    pipeline.keep_freed_memory = lambda: False


def child(variant: str, argv: list[str]) -> int:
    if variant == "before":
        _before()
    from quantsearch.cli.explore import main

    return main(argv)


def run_variant(variant: str, argv: list[str]) -> tuple[float, float]:
    """One explore run of ``variant`` in a fresh process (``before``: the old code restored there); wall seconds
    and the process's peak resident memory in MiB."""
    start = time.perf_counter()
    child = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--child", variant, *argv],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _, status, usage = os.wait4(child.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{variant} {' '.join(argv)} failed")
    return time.perf_counter() - start, usage.ru_maxrss / 1024


def run_seeds(seeds: str, variants: str, flags: dict, config: str | None, summarize, describe) -> dict:
    """Every variant on every seed (comma-separated), each in a fresh process writing a temporary run directory;
    ``summarize(run_dir)`` scores it and ``describe(variant, seed, result)`` prints a line. Results by variant."""
    results: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in seeds.split(","):
            for variant in variants.split(","):
                out = Path(tmp) / f"{variant}-{seed}"
                argv = ["--out", str(out), "--seed", seed, "--no-progress", *flags[variant]]
                wall, rss = run_variant(variant, argv + (["--config", config] if config else []))
                result = summarize(out) | {"wall": wall, "seed": seed, "rss_mb": rss}
                results.setdefault(variant, []).append(result)
                print(describe(variant, seed, result), flush=True)
    return results


def holdout_hypervolume(run_dir: Path) -> dict:
    from pymoo.indicators.hv import HV
    import numpy as np

    record = json.loads((run_dir / "run.json").read_text())
    floor = record["holdout_bound"]["limit"]
    fp32_bits = record["fp32_costs"]["bits"]
    rows = list(csv.DictReader((run_dir / "pareto.csv").open()))
    held = [(float(r["accuracy_holdout"]), float(r["bits"]) / fp32_bits) for r in rows if r["confirmed"] == "1"]
    points = np.array([[-100 * a, c] for a, c in held if a >= floor and c < 1.0]).reshape(-1, 2)
    reference = np.array([-100 * floor, 1.0])
    hv = float(HV(ref_point=reference)(points)) if len(points) else 0.0
    timings = record["timings_s"]
    return {"front": len(rows), "confirmed": len(held), "hv": hv,
            "cheapest": min((c for _, c in held), default=float("nan")),
            "evaluations": record["num_evaluations"], "block_cache": record["search"].get("block_cache"),
            "per_eval": timings["mean_evaluation"] / timings["fp32_search_evaluation"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--config", help="an explore YAML (default: the embedded demo)")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--child", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        sys.exit(child(args.child[0], args.child[1:]))
    clock = time.perf_counter()
    results = run_seeds(args.seeds, args.variants, VARIANTS, args.config, holdout_hypervolume, lambda v, seed, r: (
        f"  {v} seed {seed}: {r['wall']:.0f} s, {r['evaluations']} evaluations, {r['per_eval']:.2f}x FP32 per "
        f"evaluation, {r['confirmed']}/{r['front']} confirmed, cheapest confirmed {r['cheapest']:.4f} of FP32 bits, "
        f"hold-out HV {r['hv']:.4f}, peak memory {r['rss_mb']:.0f} MiB"
        + (f", block cache: {100 * r['block_cache']['hit_rate']:.0f} % of block calls answered or skipped"
           if r.get("block_cache") else "")))
    first = args.variants.split(",")[0]
    print(f"\n{args.config or 'embedded demo'}, seeds {args.seeds}: medians (and ratios against '{first}')")
    print(f"{'variant':8} {'wall s':>7} {f'x {first}'[:9]:>9} {'evals':>6} {'eval/FP32':>10} {'confirmed':>10} "
          f"{'HV hold-out':>12} {f'x {first}'[:9]:>9}")
    base = results.get(first)
    for variant, rs in results.items():
        wall, hv = statistics.median(r["wall"] for r in rs), statistics.median(r["hv"] for r in rs)
        confirmed = sum(r["confirmed"] for r in rs) / max(1, sum(r["front"] for r in rs))
        ratio = (f"{wall / statistics.median(r['wall'] for r in base):8.2f}x" if base else "")
        hv_ratio = (f"{hv / statistics.median(r['hv'] for r in base):8.2f}x" if base else "")
        print(f"{variant:8} {wall:7.0f} {ratio:>9} {statistics.median(r['evaluations'] for r in rs):6.0f} "
              f"{statistics.median(r['per_eval'] for r in rs):9.2f}x {100 * confirmed:9.0f}% {hv:12.4f} {hv_ratio:>9}")
    print(f"\nwall time {time.perf_counter() - clock:.0f} s")


if __name__ == "__main__":
    main()
