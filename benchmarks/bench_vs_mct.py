"""quantsearch's W+A BOPs front against Sony MCT's mixed-precision points, side by side on the demo ViT.

    python benchmarks/bench_vs_mct.py --setup          # once: benchmarks/.venv-mct with MCT 2.6.1 from PyPI
    python benchmarks/bench_vs_mct.py [--seeds 0,1,2] [--targets 0.25,0.35,0.5]

MCT lives in the benchmark's own environment (a venv over this Python's packages, ``model-compression-toolkit``
added), never in quantsearch's dependencies. Both tools run in fresh processes, one at a time, on the same cores.

- **quantsearch**: ``explore --config configs/fashion_vit_bops.yaml --seed S`` for each seed, wall time from the
  start of the process to its end. Per seed: reported points, those meeting the floor on the hold-out split, and
  the cheapest of those in BOPs counted both ways, as a fraction of W8A8's: every matmul (ours: Conv/Linear and
  the attention matmuls) and Conv/Linear only (MCT's way); its hold-out accuracy against FP32's.
- **MCT**: ``benchmarks/mct_point.py`` for each BOPs target (a fraction of its own W8A8 count), calibrated on the
  calibration split of seed 0's run and scored on its hold-out split (the same images as ours): seconds inside
  MCT, seconds for the whole script (imports, FP32 evaluation, data), hold-out accuracy against FP32.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ENV = HERE / ".venv-mct"
CONFIG = HERE.parent / "configs" / "fashion_vit_bops.yaml"


def setup() -> None:
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(ENV)], check=True)
    subprocess.run([str(ENV / "bin" / "pip"), "install", "-q", "model-compression-toolkit==2.6.1"], check=True)


def ours(seed: str, out: Path) -> dict:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "quantsearch.explore", "--config", str(CONFIG), "--seed", seed,
                    "--out", str(out), "--no-progress", "--log-level", "WARNING"], check=True, capture_output=True)
    wall = time.perf_counter() - start
    return {"wall": wall, **score(out)}


def score(run_dir: Path) -> dict:
    """The run's confirmed points in BOPs both ways (x W8A8) and hold-out accuracy against FP32's."""
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    from quantsearch import load_run

    record = load_run(run_dir)
    session = record.session()
    ops = session._profile.ops
    names = record.quantizer_names

    def bops(bits: dict, every: bool) -> float:
        width = lambda q: 32 if q is None else bits[q]  # noqa: E731
        return sum(op.macs * width(op.operands[0]) * width(op.operands[1]) for op in ops
                   if every or op.kind in ("conv", "linear"))

    w8a8 = dict(zip(names, record.baselines["W8A8"].bits))
    fp32 = record.summary["fp32_accuracy"]["holdout"]
    points = []
    for e in record.front:
        if record.confirmed.get(e.bits):
            bits = dict(zip(names, e.bits))
            points.append({"ours": bops(bits, True) / bops(w8a8, True), "mct_way": bops(bits, False) / bops(w8a8, False),
                           "drop": 100 * (fp32 - record.holdout[e.bits])})
    cheapest = min(points, key=lambda p: p["ours"], default=None)
    within = [p for p in points if p["drop"] <= 1.0]
    return {"reported": len(record.front), "confirmed": len(points), "cheapest": cheapest,
            "cheapest_within_1": min(within, key=lambda p: p["mct_way"], default=None), "fp32": fp32}


def mct(splits: Path, target: float) -> dict:
    start = time.perf_counter()
    done = subprocess.run([str(ENV / "bin" / "python"), str(HERE / "mct_point.py"), str(splits), str(target)],
                          check=True, capture_output=True, text=True)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return result | {"wall": time.perf_counter() - start}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--setup", action="store_true", help="create benchmarks/.venv-mct with MCT and stop")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--targets", default="0.25,0.35,0.5")
    args = parser.parse_args()
    if args.setup:
        setup()
        return
    if not (ENV / "bin" / "python").exists():
        sys.exit("bench_vs_mct: MCT's environment is missing: run python benchmarks/bench_vs_mct.py --setup")
    clock = time.perf_counter()
    print(f"# bench_vs_mct {time.strftime('%Y-%m-%d %H:%M')}, {CONFIG.name}, seeds {args.seeds}, 2 cores", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        runs = {}
        print("\n## quantsearch (whole front, one run per seed)")
        for seed in args.seeds.split(","):
            r = runs[seed] = ours(seed, Path(tmp) / f"run-{seed}")
            c, w = r["cheapest"], r["cheapest_within_1"]
            print(f"  seed {seed}: {r['wall']:.0f} s wall, {r['confirmed']}/{r['reported']} reported points meet the "
                  f"hold-out floor; cheapest of them {c['ours']:.3f} x W8A8 BOPs (every matmul), "
                  f"{c['mct_way']:.3f} (Conv/Linear only), {-c['drop']:+.2f} points against FP32 on hold-out; "
                  f"cheapest within 1 point of FP32 on hold-out, MCT's count: "
                  f"{w['mct_way']:.3f} ({-w['drop']:+.2f})" if c and w else f"  seed {seed}: no confirmed point",
                  flush=True)
        first = args.seeds.split(",")[0]
        print(f"\n## MCT (one point per run; seed {first}'s calibration and "
              "hold-out images)")
        points = {}
        for target in args.targets.split(","):
            m = points[target] = mct(Path(tmp) / f"run-{first}" / "splits.json", float(target))
            print(f"  BOPs target {target} x W8A8 (MCT's count): {m['mct_seconds']:.1f} s inside MCT, "
                  f"{m['wall']:.0f} s for the whole script; hold-out {100 * m['holdout']:.2f} % against FP32 "
                  f"{100 * m['fp32_holdout']:.2f} % ({100 * (m['holdout'] - m['fp32_holdout']):+.2f} points)",
                  flush=True)
    walls = [r["wall"] for r in runs.values()]
    one = points[args.targets.split(",")[0]]["wall"]
    print(f"\nmedian quantsearch run {statistics.median(walls):.0f} s for a whole front against MCT's whole script "
          f"{one:.0f} s for one point at {args.targets.split(',')[0]}: "
          f"{statistics.median(walls) / one:.2f}x")
    confirmed = sum(r["confirmed"] for r in runs.values()) / max(1, sum(r["reported"] for r in runs.values()))
    print(f"reported points meeting the hold-out floor: {100 * confirmed:.0f} %")
    print(f"wall time {time.perf_counter() - clock:.0f} s")


if __name__ == "__main__":
    main()
