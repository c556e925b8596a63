"""The W+A BOPs search with a refined front (issue 30), several seeds: what refinement adds at the cheap end, and
what it costs in wall time.

    python benchmarks/bench_refined_front.py [--seeds 0,1,2] [--config configs/fashion_vit_bops.yaml]
        [--variants plain,brecq-lsq]

Each variant and seed is one explore run in a fresh process, timed from its start to its end. ``plain`` is the
config as it is; a refinement variant adds ``--refine METHOD`` with ``--refine-budget`` and
``--refine-iterations`` as given. The search is the same in both (same seed: the refined front runs after it),
so the wall-time ratio is the refined front's whole cost.

Printed per run: wall seconds, the cheapest plain point that held on hold-out (first cost as a fraction of
W8A8's), the refined candidates and how many were refined, the cheapest point of the refined front (search floor
met, validation passed) that held on hold-out, and each refined point: its cost, search accuracy before and
after against the search floor, validation verdict, whether it is on the refined front, and hold-out accuracy
against the hold-out floor.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_default_run import run_seeds  # noqa: E402

CONFIG = str(Path(__file__).resolve().parents[1] / "configs" / "fashion_vit_bops.yaml")


def summarize(run_dir: Path) -> dict:
    record = json.loads((run_dir / "run.json").read_text())
    floor = record["holdout_bound"]["limit"]
    cost = (record["settings"].get("cost") or "bits").split(",")[0]
    w8a8 = record["baselines"]["W8A8"]["costs"][cost]
    held = [p["costs"][cost] / w8a8 for p in record["front"] if p["confirmed"]]
    refined = record.get("refined_front") or {}
    points = [{"cost": p["costs"][cost] / w8a8, "before": p["accuracy_before"], "search": p["search"],
               "passed": p["validation_passed"], "holdout": p["holdout"], "held": p["confirmed"],
               "on_front": p["on_front"]} for p in refined.get("points", [])]
    good = [p["cost"] for p in points if p["held"] and p["on_front"]]
    return {"floor": floor, "search_floor": record["bound"]["limit"], "cheapest": min(held, default=float("nan")),
            "points": points,
            "candidates": refined.get("candidates", 0), "spent": refined.get("spent", 0.0),
            "refine_s": record["timings_s"].get("refine", 0.0), "cheapest_refined": min(good, default=float("nan")),
            "cost": cost}


def describe(variant: str, seed: str, r: dict) -> str:
    lines = [f"  {variant} seed {seed}: {r['wall']:.0f} s (refined front {r['refine_s']:.0f} s, {r['spent']:.0f} "
             f"full evaluations), cheapest plain point that held {r['cheapest']:.3f} of W8A8 {r['cost']}, "
             f"{len(r['points'])} of {r['candidates']} candidates refined, cheapest on the refined front that held "
             f"{r['cheapest_refined']:.3f}"]
    for p in sorted(r["points"], key=lambda p: p["cost"]):
        lines.append(f"    {p['cost']:.3f} x W8A8: search {100 * p['before']:.2f} -> {100 * p['search']:.2f} (floor "
                     f"{100 * r['search_floor']:.2f}), validation "
                     f"{'-' if p['passed'] is None else ('passed' if p['passed'] else 'failed')}, "
                     f"{'on' if p['on_front'] else 'off'} the refined front, hold-out {100 * p['holdout']:.2f} (floor "
                     f"{100 * r['floor']:.2f}): {'held' if p['held'] else 'missed'}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--config", default=CONFIG)
    parser.add_argument("--variants", default="plain,brecq-lsq")
    parser.add_argument("--refine-budget", default="200")
    parser.add_argument("--refine-iterations", default="300")
    args = parser.parse_args()
    clock = time.perf_counter()
    print(f"# bench_refined_front {time.strftime('%Y-%m-%d %H:%M')}, {args.config}, seeds {args.seeds}, refine "
          f"budget {args.refine_budget}, {args.refine_iterations} iterations, 2 cores", flush=True)
    flags = {v: [] if v == "plain" else ["--refine", v, "--refine-budget", args.refine_budget,
                                         "--refine-iterations", args.refine_iterations]
             for v in args.variants.split(",")}
    results = run_seeds(args.seeds, args.variants, flags, args.config, summarize, describe)
    plain = results.get("plain")
    print(f"\nmedians over seeds {args.seeds}")
    print(f"{'variant':10} {'wall s':>7} {'x plain':>8} {'cheapest held (plain)':>22} {'cheapest held (refined)':>24}")
    for variant, rs in results.items():
        wall = statistics.median(r["wall"] for r in rs)
        ratio = f"{wall / statistics.median(r['wall'] for r in plain):7.2f}x" if plain else ""
        refined = [r["cheapest_refined"] for r in rs]
        print(f"{variant:10} {wall:7.0f} {ratio:>8} {statistics.median(r['cheapest'] for r in rs):22.3f} "
              f"{'  '.join(f'{v:.3f}' for v in refined):>24}")
    print(f"\nwall time {time.perf_counter() - clock:.0f} s")


if __name__ == "__main__":
    main()
