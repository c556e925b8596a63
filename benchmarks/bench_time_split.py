"""Where a run's time goes: run.json's phases, and the search phase split by a profiler.

    python benchmarks/bench_time_split.py [--config configs/fashion_vit_bops.yaml] [--variants budget,stop]

Each variant is one explore run in a fresh process under cProfile (``budget``: ``--patience 0``, the whole budget
spent; ``stop``: the default convergence stop). Printed per variant: the phases run.json times (load, calibration,
FP32, baselines, search, validation and hold-out checks), and the search phase split into candidate evaluations
(``problem.measure`` less the baselines phase), ILP solves (HiGHS, for guided's seeds and infill), the gradient sensitivity pass and the
rest (NSGA-II, model refits, bookkeeping). The profiler adds a few per cent to every figure.
"""
from __future__ import annotations

import argparse
import json
import pstats
import subprocess
import sys
import tempfile
import time
from pathlib import Path

VARIANTS = {"budget": ["--patience", "0"], "stop": []}
PARTS = {"candidate evaluations": ("problem.py", "measure"), "ILP solves": ("ilp.py", "solve"),
         "gradient sensitivity": ("sensitivity.py", "gradient_sensitivity")}


def cumulative(stats: pstats.Stats, file: str, function: str) -> float:
    return sum(row[3] for (path, _, name), row in stats.stats.items() if path.endswith(file) and name == function)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(Path(__file__).resolve().parents[1] / "configs/fashion_vit_bops.yaml"))
    parser.add_argument("--variants", default=",".join(VARIANTS))
    args = parser.parse_args()
    print(f"# bench_time_split {time.strftime('%Y-%m-%d %H:%M')}, {Path(args.config).name}, seed 0, 2 cores, "
          "under cProfile")
    with tempfile.TemporaryDirectory() as tmp:
        for variant in args.variants.split(","):
            out, prof = Path(tmp) / variant, Path(tmp) / f"{variant}.prof"
            start = time.perf_counter()
            subprocess.run([sys.executable, "-m", "cProfile", "-o", str(prof), "-m", "quantsearch.explore",
                            "--config", args.config, "--out", str(out), "--no-progress", "--log-level", "WARNING",
                            *VARIANTS[variant]], check=True, capture_output=True)
            wall = time.perf_counter() - start
            record = json.loads((out / "run.json").read_text())
            t = record["timings_s"]
            stats = pstats.Stats(str(prof))
            parts = {k: cumulative(stats, *v) for k, v in PARTS.items()}
            parts["candidate evaluations"] -= t["baselines"]  # the baselines phase is measures too, outside search
            rest = t["search"] - sum(parts.values())
            print(f"\n## {variant}: {wall:.0f} s wall, {record['num_evaluations']} evaluations")
            print("phases (run.json): " + ", ".join(f"{k} {t[k]:.1f} s" for k in
                  ("load", "calibration", "fp32", "baselines", "search", "holdout") if k in t)
                  + f", outside them (imports, outputs) {wall - t['total']:.1f} s")
            print("search phase: " + ", ".join(f"{k} {v:.1f} s ({100 * v / t['search']:.0f} %)"
                                               for k, v in parts.items())
                  + f", the rest {rest:.1f} s ({100 * rest / t['search']:.0f} %)")
            calls = sum(row[1] for (path, _, name), row in stats.stats.items()
                        if path.endswith("ilp.py") and name == "solve")
            print(f"ILP solves: {calls}, {parts['ILP solves'] / max(calls, 1):.2f} s each; evaluations "
                  f"{record['timings_s'].get('mean_evaluation', 0):.3f} s each (FP32 "
                  f"{record['timings_s'].get('fp32_search_evaluation', 0):.3f} s)")


if __name__ == "__main__":
    main()
