"""The convergence stop (``--patience``, ``--min-gain``) against spending the whole budget, several seeds.

    python benchmarks/bench_convergence_stop.py [--seeds 0,1,2] [--config FILE] [--variants budget,stop,stop-0.005]

Each variant and seed is one explore run in a fresh process (the command a user types), timed from the start of
the process to its end. Variants:
- ``budget``: ``--patience 0``, the whole budget spent (the behaviour before the stop);
- ``stop``: today's default, ``--patience 2 --min-gain 0.001``;
- ``stop-0.005``: a coarser threshold, ``--min-gain 0.005``;
- ``stop-vc0.8``, ``stop-vc0.9``: the stop with the validation split's confidence at 80 % or 90 % (for configs with
  a validation split).

Printed per run: wall seconds, evaluations, where the stop fired, front size, confirmed points (meeting the floor
on the hold-out split), the cheapest confirmed point's first cost as a fraction of W8A8's, and the hold-out
hypervolume (the confirmed points by hold-out accuracy against the hold-out floor, first cost as a fraction of
FP32; reference: the floor and 1.0).
"""
from __future__ import annotations

import argparse
import csv
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_default_run import run_seeds  # noqa: E402

VARIANTS = {"budget": ["--patience", "0"], "stop": [], "stop-0.005": ["--min-gain", "0.005"],
            "stop-vc0.8": ["--validation-confidence", "0.8"], "stop-vc0.9": ["--validation-confidence", "0.9"]}


def summarize(run_dir: Path) -> dict:
    import numpy as np
    from pymoo.indicators.hv import HV

    record = json.loads((run_dir / "run.json").read_text())
    floor = record["holdout_bound"]["limit"]
    cost = (record["settings"].get("cost") or "bits").split(",")[0]
    fp32 = record["fp32_costs"][cost]
    rows = list(csv.DictReader((run_dir / "pareto.csv").open()))
    held = [(float(r["accuracy_holdout"]), float(r[cost]) / fp32) for r in rows if r["confirmed"] == "1"]
    points = np.array([[-100 * a, c] for a, c in held if a >= floor and c < 1.0]).reshape(-1, 2)
    hv = float(HV(ref_point=np.array([-100 * floor, 1.0]))(points)) if len(points) else 0.0
    stop = record["search"]["details"].get("stop") or {}
    w8a8 = record["baselines"]["W8A8"]["costs"][cost] / fp32
    return {"front": len(rows), "confirmed": len(held), "hv": hv, "cost": cost,
            "cheapest": min((c for _, c in held), default=float("nan")) / w8a8, "evaluations": record["num_evaluations"],
            "stopped": (f"check {stop['converged_at_check']} of {stop['checks']}" if stop.get("converged_at_check")
                        else "budget")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--config", help="an explore YAML (default: the embedded demo)")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    args = parser.parse_args()
    clock = time.perf_counter()
    print(f"# bench_convergence_stop {time.strftime('%Y-%m-%d %H:%M')}, {args.config or 'embedded demo'}, "
          f"seeds {args.seeds}, 2 cores", flush=True)
    flags = {v: VARIANTS[v] for v in args.variants.split(",")}
    results = run_seeds(args.seeds, args.variants, flags, args.config, summarize, lambda v, seed, r: (
        f"  {v} seed {seed}: {r['wall']:.0f} s, {r['evaluations']} evaluations, stopped at {r['stopped']}, "
        f"{r['confirmed']}/{r['front']} confirmed, cheapest confirmed {r['cheapest']:.3f} of W8A8 {r['cost']}, "
        f"hold-out HV {r['hv']:.4f}"))
    base = results.get("budget")
    print(f"\nmedians over seeds {args.seeds} (ratios against 'budget', the whole budget spent)")
    print(f"{'variant':11} {'wall s':>7} {'x budget':>9} {'evals':>6} {'confirmed':>10} {'cheapest x W8A8':>15} "
          f"{'HV hold-out':>12} {'x budget':>9}")
    for variant, rs in results.items():
        wall, hv = statistics.median(r["wall"] for r in rs), statistics.median(r["hv"] for r in rs)
        confirmed = sum(r["confirmed"] for r in rs) / max(1, sum(r["front"] for r in rs))
        ratio = f"{wall / statistics.median(r['wall'] for r in base):8.2f}x" if base else ""
        hv_ratio = f"{hv / statistics.median(r['hv'] for r in base):8.4f}x" if base else ""
        print(f"{variant:11} {wall:7.0f} {ratio:>9} {statistics.median(r['evaluations'] for r in rs):6.0f} "
              f"{100 * confirmed:9.0f}% {statistics.median(r['cheapest'] for r in rs):15.3f} {hv:12.4f} {hv_ratio:>9}")
    print(f"\nwall time {time.perf_counter() - clock:.0f} s")


if __name__ == "__main__":
    main()
