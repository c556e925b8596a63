"""The W+A BOPs search (``configs/fashion_vit_bops.yaml``) before and after issue 18, side by side, seeds 0-2.

    python benchmarks/bench_bops_side_by_side.py [--seeds 0,1,2] [--config configs/fashion_vit_bops.yaml]

Each run is ``python -m quantsearch.explore --config ...`` in a fresh process, timed from start to end:
- ``before``: the search as it was before issue 18 (0-dim tensor operands in the fake quantizer, glibc's adaptive
  allocator thresholds; the config's settings as they were: budget 400, early rejection at the floor, no
  validation split, 6,000 hold-out images);
- ``after``: today's code and config: a validation split (2,000 images that a point must also pass, paired with
  FP32 at ``validation-confidence``, 80 % one-sided, before it is reported; the hold-out split becomes the last
  4,000), racing (``early-reject: front``) and a budget of 240.

Printed per run: wall seconds, evaluations, reported points and how many meet the floor on the hold-out split,
the cheapest of those (x W8A8's BOPs) and the hold-out hypervolume (accuracy points above the hold-out floor x
fraction of FP32's BOPs saved, the front's points scored by their hold-out accuracy). The two variants' hold-out
splits differ in size (6,000 and 4,000 images of the same shuffled test split), so each HV is an unbiased estimate
of the same quantity with its own noise (about 0.4 and 0.5 points of accuracy per point).
"""
from __future__ import annotations

import argparse
import csv
import json
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
from bench_default_run import run_seeds  # noqa: E402  (one way to run variants and seeds, old code for 'before')
VARIANTS = {"before": ["--early-reject", "floor", "--budget", "400", "--validation-samples", "0"],
            "after": ["--early-reject", "front", "--budget", "240", "--validation-samples", "2000"]}


def summary(run_dir: Path, cost: str = "bops") -> dict:
    from pymoo.indicators.hv import HV
    import numpy as np

    record = json.loads((run_dir / "run.json").read_text())
    floor = record["holdout_bound"]["limit"]
    fp32, w8a8 = record["fp32_costs"][cost], record["baselines"]["W8A8"]["costs"][cost]
    rows = list(csv.DictReader((run_dir / "pareto.csv").open()))
    held = [(float(r["accuracy_holdout"]), float(r[cost])) for r in rows]
    meet = [(a, c) for a, c in held if a >= floor]
    points = np.array([[-100 * a, c / fp32] for a, c in meet if c < fp32]).reshape(-1, 2)
    hv = float(HV(ref_point=np.array([-100 * floor, 1.0]))(points)) if len(points) else 0.0
    return {"reported": len(rows), "meet": len(meet), "hv": hv, "evaluations": record["num_evaluations"],
            "cheapest": min((c / w8a8 for _, c in meet), default=float("nan"))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--config", default=str(HERE.parent / "configs" / "fashion_vit_bops.yaml"))
    parser.add_argument("--variants", default=",".join(VARIANTS))
    args = parser.parse_args()
    clock = time.perf_counter()
    results = run_seeds(args.seeds, args.variants, VARIANTS, args.config, summary, lambda v, seed, r: (
        f"  {v} seed {seed}: {r['wall']:.0f} s, {r['evaluations']} evaluations, {r['meet']} of {r['reported']} "
        f"reported points meet the hold-out floor, cheapest of those {r['cheapest']:.3f} x W8A8 BOPs, hold-out HV "
        f"{r['hv']:.4f}"))
    print(f"\n{args.config}, seeds {args.seeds}")
    print(f"{'variant':8} {'wall s (median)':>16} {'x before':>9} {'meet hold-out floor':>20} "
          f"{'HV hold-out (mean)':>19} {'x before':>9}")
    base = results.get("before") or next(iter(results.values()))  # ratios against 'before' when it ran
    wall0, hv0 = statistics.median(r["wall"] for r in base), statistics.mean(r["hv"] for r in base)
    for variant, rs in results.items():
        wall, hv = statistics.median(r["wall"] for r in rs), statistics.mean(r["hv"] for r in rs)
        meet, reported = sum(r["meet"] for r in rs), sum(r["reported"] for r in rs)
        print(f"{variant:8} {wall:16.0f} {wall / wall0:8.2f}x {f'{meet}/{reported} ({100 * meet / reported:.0f} %)':>20} "
              f"{hv:19.4f} {hv / hv0:8.2f}x")
    print(f"\nwall time {time.perf_counter() - clock:.0f} s")


if __name__ == "__main__":
    main()
