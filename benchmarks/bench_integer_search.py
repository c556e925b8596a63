"""The W+A BOPs search with every nonlinear operator on integers (issue 29) against today's float operators.

    python benchmarks/bench_integer_search.py [--seeds 0,1,2] [--config configs/fashion_vit_bops.yaml]
        [--variants float,integer-only]

Each variant and seed is one explore run in a fresh process: ``float`` is the config as it is, ``integer-only``
adds ``--integer-ops integer-only`` (I-ViT's Shiftmax, ShiftGELU, I-LayerNorm, residual adds on 16-bit grids).
Same seed, same splits and floor definition. Printed per run: wall seconds, the front's points, how many held on
hold-out, how many are integer-only, and the cheapest point that held (BOPs as a fraction of W8A8's); then the
integer-only run's cheapest held point over the float run's, per seed.
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
    w8a8 = record["baselines"]["W8A8"]["costs"]["bops"]
    front = record["front"]
    held = [p["costs"]["bops"] / w8a8 for p in front if p["confirmed"]]
    return {"points": len(front), "held": len(held), "integer_only": sum(bool(p.get("integer_only")) for p in front),
            "cheapest": min(held, default=float("nan")), "fp32_holdout": record["fp32_accuracy"]["holdout"],
            "floor": record["holdout_bound"]["limit"],
            "cheapest_holdout": min(((p["costs"]["bops"], p["accuracy_holdout"]) for p in front if p["confirmed"]),
                                    default=(0, float("nan")))[1]}


def describe(variant: str, seed: str, r: dict) -> str:
    return (f"  {variant} seed {seed}: {r['wall']:.0f} s, {r['points']} front points, {r['held']} held on hold-out "
            f"(floor {100 * r['floor']:.2f}), {r['integer_only']} integer-only; cheapest that held "
            f"{r['cheapest']:.3f} of W8A8's BOPs at {100 * r['cheapest_holdout']:.2f} % hold-out")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--config", default=CONFIG)
    parser.add_argument("--variants", default="float,integer-only")
    args = parser.parse_args()
    clock = time.perf_counter()
    print(f"# bench_integer_search {time.strftime('%Y-%m-%d %H:%M')}, {args.config}, seeds {args.seeds}, 2 cores",
          flush=True)
    flags = {v: [] if v == "float" else ["--integer-ops", v] for v in args.variants.split(",")}
    results = run_seeds(args.seeds, args.variants, flags, args.config, summarize, describe)
    base = results.get("float")
    print(f"\nper seed: cheapest held point, BOPs / W8A8's; the integer run's over the float run's")
    for variant, rs in results.items():
        ratios = [r["cheapest"] / b["cheapest"] for r, b in zip(rs, base)] if base else []
        cheapest = "  ".join(f"{r['cheapest']:.3f}" for r in rs)
        ratio = "  ".join(f"{x:.3f}" for x in ratios)
        print(f"{variant:13} wall {statistics.median(r['wall'] for r in rs):5.0f} s (median)  cheapest {cheapest}"
              + (f"  ratio {ratio}" if variant != "float" else ""))
    print(f"\nwall time {time.perf_counter() - clock:.0f} s")


if __name__ == "__main__":
    main()
