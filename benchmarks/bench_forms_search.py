"""The W+A BOPs search (``configs/fashion_vit_bops.yaml``) with and without quantizer forms, then refinement.

    python benchmarks/bench_forms_search.py [--seeds 0] [--refine 4] [--method adaround,bias-correction]

Each search is ``python -m quantsearch.explore --config ...`` in a fresh process, timed from start to end:
- ``no forms``: every quantizer uniform (the config as it ships);
- ``forms``: log2-narrow attention probabilities, asymmetric GELU outputs, per-channel (folded) LayerNorm outputs
  and per-head q/k/v and attention outputs (``--quant-form``).

Then the ``--refine`` cheapest reported points of each run (chosen by cost alone, not by any accuracy) are refined
with ``python -m quantsearch.apply POINT --refine METHOD`` (fresh processes, timed; AdaRound then bias correction
by default) and measured again. Printed per
run: wall seconds, how many reported points meet the hold-out floor (FP32 on hold-out - 1 point), the cheapest of
those (x W8A8's BOPs), and for each refined point its cost, hold-out accuracy before and after, and whether it meets
the floor after.
"""
from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
from bench_bops_side_by_side import summary  # noqa: E402  (hold-out floor, cheapest point meeting it, HV)
from bench_default_run import run_seeds  # noqa: E402

FORMS = {"*.attn_drop": "log2-narrow", "*.mlp.act": "asymmetric", "*norm*": "per-channel",
         "*.attn.qkv": "per-head", "*.attn.proj:input": "per-head"}
VARIANTS = {"no forms": [], "forms": [a for glob, form in FORMS.items() for a in ("--quant-form", f"{glob}={form}")]}


def refined(run_dir: Path, count: int, method: str) -> list[dict]:
    """``method`` on the ``count`` cheapest reported points; each point's cost and hold-out before and after."""
    record = json.loads((run_dir / "run.json").read_text())
    floor, w8a8 = record["holdout_bound"]["limit"], record["baselines"]["W8A8"]["costs"]["bops"]
    rows = sorted(csv.DictReader((run_dir / "pareto.csv").open()), key=lambda r: float(r["bops"]))[:count]
    out = []
    for row in rows:
        point = run_dir / row["bitconfig"]
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "quantsearch.apply", str(point), "--refine", method], check=True,
                       stdout=subprocess.DEVNULL)
        label = method.replace(",", "+")
        after = json.loads(point.with_name(f"{point.stem}.{label}.json").read_text())["accuracy"]
        out.append({"cost": float(row["bops"]) / w8a8, "before": float(row["accuracy_holdout"]),
                    "after": after["holdout"], "search_after": after["search"], "floor": floor,
                    "seconds": time.perf_counter() - start})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--config", default=str(HERE.parent / "configs" / "fashion_vit_bops.yaml"))
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--refine", type=int, default=4, help="cheapest reported points refined per run")
    parser.add_argument("--method", default="adaround,bias-correction", help="the refinement (apply --refine)")
    args = parser.parse_args()
    clock = time.perf_counter()

    def score(run_dir: Path) -> dict:
        return summary(run_dir) | {"refined": refined(run_dir, args.refine, args.method)}

    def describe(variant, seed, r) -> str:
        lines = [f"  {variant} seed {seed}: search {r['wall']:.0f} s, {r['evaluations']} evaluations, {r['meet']} of "
                 f"{r['reported']} reported points meet the hold-out floor, cheapest of those {r['cheapest']:.3f} x "
                 f"W8A8 BOPs, hold-out HV {r['hv']:.4f}"]
        for p in r["refined"]:
            lines.append(f"    {args.method} on the point at {p['cost']:.3f} x W8A8 BOPs ({p['seconds']:.0f} s): hold-out "
                         f"{100 * p['before']:.2f} -> {100 * p['after']:.2f} % (floor {100 * p['floor']:.2f}), "
                         f"search {100 * p['search_after']:.2f} %: "
                         f"{'meets' if p['after'] >= p['floor'] else 'below'} the floor")
        return "\n".join(lines)

    results = run_seeds(args.seeds, args.variants, VARIANTS, args.config, score, describe)
    print(f"\n{args.config}, seeds {args.seeds}: the cheapest point meeting the hold-out floor, x W8A8 BOPs")
    print(f"{'variant':10} {'search s':>9} {'as searched':>12} {'refined':>15}   ({args.method})")
    for variant, rs in results.items():
        for r in rs:
            held = [p["cost"] for p in r["refined"] if p["after"] >= p["floor"]]
            best = min([r["cheapest"], *held])
            print(f"{variant:10} {r['wall']:9.0f} {r['cheapest']:12.3f} {best:15.3f}  (seed {r['seed']})")
    print(f"\nwall time {time.perf_counter() - clock:.0f} s")


if __name__ == "__main__":
    main()
