"""The Q/DQ ONNX export as a new user meets it: a W+A search on the demo, then ``apply --export`` of its cheapest
point and of its most accurate one, each loaded in a default ONNX Runtime session.

    python benchmarks/bench_onnx_export.py [--out DIR] [--integer-ops integer-only]

Runs ``python -m quantsearch.explore --search-space both --pop-size 6 --generations 2`` (weights down to 2 bits,
so 4-bit weights are packed as int4 at opset 21), then ``apply POINT --check --export POINT.onnx`` and prints
apply's own output: hold-out top-1 in PyTorch, in ONNX Runtime as written (reference) and in a default session
(deployed), the kernels the default session runs, size and latency against the FP32 export, side by side.
``--integer-ops`` runs the search with integer operators (their int64 arithmetic exported as standard ONNX ops).
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path


def run(*args: str) -> str:
    done = subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(args)} exited {done.returncode}: {done.stderr.strip().splitlines()[-1:]}")
    return done.stdout


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", help="keep the run here (default: a temporary folder)")
    p.add_argument("--integer-ops", help="explore's --integer-ops (e.g. integer-only)")
    args = p.parse_args(argv)
    integer = ["--integer-ops", args.integer_ops] if args.integer_ops else []
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(args.out or tmp) / "run"
        text = run("quantsearch.explore", "--search-space", "both", "--pop-size", "6", "--generations", "2",
                   "--no-progress", "--out", str(out), "--overwrite", *integer)
        print("\n".join(line for line in text.splitlines() if line.strip())[-2000:])
        points = sorted((out / "pareto").glob("point_*.json"))
        for point in dict.fromkeys([points[0], points[-1]]):
            print(f"\n$ python -m quantsearch.apply {point.name} --check --export {point.stem}.onnx")
            print(run("quantsearch.apply", str(point), "--check", "--export", str(out / f"{point.stem}.onnx")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
