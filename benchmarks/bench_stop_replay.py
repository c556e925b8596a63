"""Replay a whole-budget search under other convergence stops, scored on hold-out (issue 27).

    python benchmarks/bench_stop_replay.py [--config FILE] [--seeds 0,1,2] [--rules 20:2:0.001,10:2:0.001]

A stop only cuts a search short: the configurations a seed's search asks for, in order, do not depend on when it
stops. So each seed is run once with ``--patience 0`` (the whole budget, in a fresh process), every configuration
it measured is then measured on the hold-out split too (and checked on the validation split, when the config has
one), and each stop rule is replayed on the search split's record: after the uniform configurations, a check every
``slice`` configurations of the search space, ``patience`` checks in a row each gaining less than ``min_gain`` of
the hypervolume (relative) end it, as :class:`quantsearch.search.stopping.FrontStop` does (its slice is the
population, 20). At the stop, the front is built as ``explore`` builds it (validated, a failed point dropped and the
front recomputed) and scored as ``bench_default_run.py`` scores a run: points that meet the hold-out floor, the
cheapest of them (first cost, as a fraction of FP32's, and of W8A8's where that baseline has the cost), and the
hold-out hypervolume of those points (costs as fractions of FP32, reference: the hold-out floor and 1.0).
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

warnings.simplefilter("ignore", FutureWarning)


def whole_budget_run(seed: str, config: str | None, out: Path) -> None:
    command = [sys.executable, "-m", "quantsearch.explore", "--out", str(out), "--seed", seed, "--patience", "0",
               "--no-progress"] + (["--config", config] if config else [])
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def measure(run_dir: Path) -> dict:
    """The run's in-space evaluations in order, each with its hold-out accuracy and validation verdict."""
    from quantsearch.run.pipeline import _validation_check
    from quantsearch.run.record import load_run

    record = load_run(run_dir)
    session = record.session()
    ranges, genes = session.bit_ranges, set(session.genes)
    names = session.qmodel.quantizer_names

    def in_space(bits) -> bool:
        return all(ranges[n][0] <= b <= ranges[n][1] if n in genes else b == ranges[n][1]
                   for n, b in zip(names, bits))

    holdout = session.evaluator("holdout")
    check = _validation_check(session) if session.evaluator("validation") is not None else None
    rows, first = [], 0
    for evaluation, generation in record.evaluations:
        if not in_space(evaluation.bits):
            continue
        first += generation == 0
        held, passed = None, None
        if evaluation.status == "ok":
            session.qmodel.bit_widths = evaluation.bits
            held = holdout(session.qmodel)
            passed = check(session.qmodel)[1] if check is not None else True
        rows.append((evaluation, held, passed))
    cost = record.cost_names[0]
    w8a8 = record.baseline_costs.get("W8A8", {}).get(cost)
    return {"rows": rows, "first": first, "bound": record.bound, "fp32": record.fp32_costs,
            "holdout_floor": record.summary["holdout_bound"]["limit"], "costs": record.cost_names,
            "w8a8": w8a8}


def race_gaps(run: dict) -> list[float]:
    """For every configuration after the uniform ones, how far (points) its search accuracy trails the best one
    measured before it at no higher cost: what a race against a cheaper point would have to detect."""
    cost, gaps, before = run["costs"][0], [], []
    for i, (e, _, _) in enumerate(run["rows"]):
        if i >= run["first"] and e.status == "ok":
            bar = max((a for a, c in before if c <= e.costs[cost]), default=None)
            if bar is not None:
                gaps.append(100 * (bar - e.accuracy))
        if e.status == "ok":
            before.append((e.accuracy, e.costs[cost]))
    return gaps


def stop_at(run: dict, slice_: int, patience: int, min_gain: float) -> int:
    """How many in-space configurations the search had measured when the rule stopped it."""
    from quantsearch.search.front import hypervolume

    evaluations = [e for e, _, _ in run["rows"]]
    n, before, calm = run["first"], None, 0
    while n < len(evaluations):
        n = min(n + slice_, len(evaluations))
        now = hypervolume(evaluations[:n], run["bound"], run["fp32"], run["costs"])
        calm = calm + 1 if before is not None and before > 0 and now - before < min_gain * before else 0
        before = now
        if patience and calm >= patience:
            break
    return n


def score(run: dict, n: int) -> dict:
    """The validated front of the first ``n`` configurations, scored on hold-out."""
    from pymoo.indicators.hv import HV

    from quantsearch.search.front import pareto_front

    rows = run["rows"][:n]
    held = {e.bits: h for e, h, _ in rows}
    failed = {e.bits for e, _, passed in rows if passed is False}
    front = pareto_front([e for e, _, _ in rows if e.bits not in failed], run["bound"], run["costs"])
    cost, floor = run["costs"][0], run["holdout_floor"]
    confirmed = [(held[e.bits], e.costs[cost]) for e in front if held[e.bits] >= floor]
    points = np.array([[-100 * a, c / run["fp32"][cost]] for a, c in confirmed]).reshape(-1, 2)
    hv = float(HV(ref_point=np.array([-100 * floor, 1.0]))(points)) if len(points) else 0.0
    cheapest = min((c for _, c in confirmed), default=float("nan"))
    return {"n": n, "front": len(front), "confirmed": len(confirmed), "hv": hv,
            "cheapest": cheapest / (run["w8a8"] or run["fp32"][cost]),
            "unit": "W8A8" if run["w8a8"] else "FP32"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="an explore YAML (default: the embedded demo)")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--rules", default="20:2:0.001,20:1:0.001,10:2:0.001,10:3:0.001,10:2:0.002",
                        help="slice:patience:min-gain, comma separated (20:2:0.001 is explore's default)")
    args = parser.parse_args()
    clock = time.perf_counter()
    rules = [(int(s), int(p), float(g)) for s, p, g in (r.split(":") for r in args.rules.split(","))]
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds.split(","):
            whole_budget_run(seed, args.config, Path(tmp) / seed)
            runs[seed] = measure(Path(tmp) / seed)
            print(f"  seed {seed}: {len(runs[seed]['rows'])} configurations of the search space measured on "
                  f"hold-out", flush=True)
    print(f"\n{args.config or 'embedded demo'}, seeds {args.seeds}: each rule replayed on the whole-budget search")
    print(f"{'rule (slice, patience, min-gain)':34} {'configurations':>15} {'confirmed':>10} "
          f"{'cheapest confirmed':>19} {'HV hold-out':>12} {'median HV':>10}")
    for label, stops in [("whole budget", {s: len(r["rows"]) for s, r in runs.items()})] + [
            (f"{s}, {p}, {g:g}", {seed: stop_at(r, s, p, g) for seed, r in runs.items()}) for s, p, g in rules]:
        scores = [score(runs[seed], n) for seed, n in stops.items()]
        counts = " / ".join(str(x["n"]) for x in scores)
        confirmed = " ".join(f"{x['confirmed']}/{x['front']}" for x in scores)
        cheapest = " / ".join(f"{x['cheapest']:.3f}" for x in scores) + f" x {scores[0]['unit']}"
        hvs = " / ".join(f"{x['hv']:.4f}" for x in scores)
        median = statistics.median(x["hv"] for x in scores)
        print(f"{label:34} {counts:>15} {confirmed:>10} {cheapest:>19} {hvs:>12} {median:10.4f}")
    print("\nhow far each configuration after the uniform ones trails the best one before it at no higher cost "
          "(search split; a race against a cheaper point must detect this gap):")
    for seed, run in runs.items():
        gaps = race_gaps(run)
        print(f"  seed {seed}: {len(gaps)} configurations, median {statistics.median(gaps):.2f} points; "
              f"trailing by more than 0.2 / 0.5 / 1 point: {sum(g > 0.2 for g in gaps)} / "
              f"{sum(g > 0.5 for g in gaps)} / {sum(g > 1 for g in gaps)}")
    print(f"\nwall time {time.perf_counter() - clock:.0f} s")


if __name__ == "__main__":
    main()
