"""Evaluations per minute: serial against 1 and N Ray workers, on the same search (the embedded default).

Each run is the same NSGA-II search (same seed, so the same configurations: the runs are checked to agree), timed
from the explore's own timings: ``search`` includes starting Ray and building every worker's model
(``workers_start``), so two rates are printed: over the whole search, and over the search after the workers are
up (steady state). On CPU each of N workers gets 1/N of the cores as torch threads; the serial run uses them all.
Run: ``PYTHONPATH=src python benchmarks/bench_parallel.py [--workers 1 2] [--generations 4]``.
"""
from __future__ import annotations

import argparse
import csv
import os
import tempfile
from pathlib import Path

from quantsearch.run.settings import ExploreConfig
from quantsearch.run.pipeline import explore
from quantsearch.run.tables import format_table


def _bits(run_dir: Path) -> list[str]:
    with open(run_dir / "evaluations.csv", newline="") as fh:
        return [row["bits"] + row["accuracy"] for row in csv.DictReader(fh)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--pop-size", type=int, default=20)
    p.add_argument("--generations", type=int, default=4)
    p.add_argument("--eval-samples", type=int, default=3000)
    args = p.parse_args()
    rows, reference, serial_rate = [], None, None
    with tempfile.TemporaryDirectory() as tmp:
        for workers in [0, *args.workers]:
            config = ExploreConfig(pop_size=args.pop_size, generations=args.generations,
                                   eval_samples=args.eval_samples, workers=workers,
                                   out=str(Path(tmp) / f"w{workers}"))
            result = explore(config, progress=False)
            searched = result.num_evaluations - len(result.baselines)  # the baselines run on the driver
            # the search stage starts once the workers are up; their start is a stage of its own
            start = result.timings.get("workers_start", 0.0)
            seconds = result.timings["search"] + start
            rate, steady = 60 * searched / seconds, 60 * searched / (seconds - start)
            serial_rate = serial_rate or rate
            same = _bits(result.run_dir)
            reference = reference or same
            rows.append(["serial" if workers == 0 else f"{workers} Ray worker{'s' * (workers > 1)}", searched,
                         f"{seconds:.1f}", f"{start:.1f}", f"{rate:.1f}", f"{steady:.1f}", f"{steady / serial_rate:.2f}x",
                         "yes" if same == reference else "NO"])
    print(f"embedded default, pop {args.pop_size} x {args.generations} generations, search split "
          f"{args.eval_samples} images, {os.cpu_count()} CPU cores")
    print(format_table(["evaluation", "evaluations", "search s", "of which start s", "evals/min",
                        "evals/min after start", "vs serial", "same results"], rows))


if __name__ == "__main__":
    main()
