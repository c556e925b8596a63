"""The block-output cache on a search's own order of configurations, with and without it, in one process.

    python benchmarks/bench_block_cache.py [--seed 0] [--rounds 2] [--budget-mb 1024]

A default explore run (cache off, the embedded demo) gives the order in which its search evaluated
configurations (``evaluations.csv``). This process then replays that order on the run's own session: every
configuration evaluated on the whole search split (no racing, so both sides do the same work), once without the
cache and once with it, alternating, ``--rounds`` times each; the fastest round of each is kept (on this shared
machine a neighbour's load only ever adds time). Printed: seconds per replay, the ratio, the block calls the
cache answered or skipped, and that every accuracy is identical.
"""
from __future__ import annotations

import argparse
import csv
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

warnings.simplefilter("ignore", FutureWarning)


def replay(session, order: list[list[int]], cache) -> tuple[float, list[float]]:
    evaluate, qmodel = session.evaluator("search"), session.qmodel
    evaluate.reject_below(None)
    accuracies = []
    start = time.perf_counter()
    if cache is None:
        for bits in order:
            qmodel.bit_widths = bits
            accuracies.append(evaluate(qmodel))
    else:
        with cache.active():
            for bits in order:
                qmodel.bit_widths = bits
                accuracies.append(evaluate(qmodel))
    return time.perf_counter() - start, accuracies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", default="0")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--budget-mb", type=int, default=1024)
    args = parser.parse_args()
    from quantsearch import load_run
    from quantsearch.search.unit_cache import UnitOutputCache

    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "quantsearch.explore", "--out", f"{tmp}/run", "--seed", args.seed,
                        "--block-cache-mb", "0", "--no-progress", "--log-level", "WARNING"], check=True,
                       capture_output=True)
        run = load_run(f"{tmp}/run")
        names = run.quantizer_names
        with open(f"{tmp}/run/evaluations.csv") as f:
            order = [[int(row[n]) for n in names] for row in csv.DictReader(f)]
        session = run.session()
    print(f"# bench_block_cache {time.strftime('%Y-%m-%d %H:%M')}, embedded demo, seed {args.seed}: {len(order)} "
          f"configurations in the search's order, each on all {session.evaluator('search').num_samples} search "
          f"images; budget {args.budget_mb} MiB, fastest of {args.rounds} alternating rounds each")
    times = {"off": [], "on": []}
    reference, stats = None, None
    for _ in range(args.rounds):
        for label in ("off", "on"):
            cache = UnitOutputCache(session.qmodel, session.example, args.budget_mb << 20) if label == "on" else None
            seconds, accuracies = replay(session, order, cache)
            times[label].append(seconds)
            reference = reference or accuracies
            assert accuracies == reference, "the cache changed an accuracy"
            if cache is not None:
                stats = cache.stats()
            print(f"  {label}: {seconds:.1f} s", flush=True)
    off, on = min(times["off"]), min(times["on"])
    print(f"without the cache {off:.1f} s, with it {on:.1f} s: {on / off:.2f}x; {100 * stats['hit_rate']:.1f} % of "
          f"{stats['block_calls']} block calls answered ({stats['hits']}) or skipped ({stats['skipped']}); every "
          f"accuracy identical")


if __name__ == "__main__":
    main()
