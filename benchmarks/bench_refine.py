"""Refinement time on the demo W4A4, before and after the FP32 reference is taken once for all layers (issue 28).

    OMP_NUM_THREADS=1 python benchmarks/bench_refine.py [--before feb0a30] [--repeats 1] [--iterations 1000]

``before`` is ``quantize/refine`` as it was at git revision ``--before`` (read with ``git archive``, loaded beside
the installed package, with the rest of quantsearch as it is now): it captured the FP32 reference per layer, twice
per layer for AdaRound, each capture entering ``qmodel.unrefined()`` once per batch. ``after`` is the installed
package. Both run in this process on one session as ``explore`` builds it (the embedded demo ViT, its calibration
split), every weight and activation quantizer at 4 bits, from the unrefined model each time, in turn (the order
alternates per repeat, so a slower machine moment hits both). Printed per method: the median seconds of each, the
ratio before / after, and whether every refined tensor is bit-identical (the same rounding decisions and biases).
AdaRound's optimisation (``round_layer``, the same work in both) is timed apart, and what is left (capturing the
layers' data: what changed) is printed on its own, so that a busy machine's noise in the former does not hide it.
"""
from __future__ import annotations

import argparse
import importlib.util
import io
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
import warnings
from pathlib import Path

warnings.simplefilter("ignore", FutureWarning)

import torch  # noqa: E402

from quantsearch.quantize.refine import refine as refine_after  # noqa: E402
from quantsearch.run.session import build_session  # noqa: E402
from quantsearch.run.settings import ExploreConfig  # noqa: E402
from quantsearch.run.tables import format_table  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
PACKAGE = "src/quantsearch/quantize/refine"
METHODS = ("bias-correction", "adaround", "adaround,bias-correction")
OPTIMISING = {"before": 0.0, "after": 0.0}  # seconds spent in round_layer, per variant


def time_round_layer(module_name: str, label: str) -> None:
    """Wrap ``round_layer`` of adaround module ``module_name`` so that its seconds add to ``OPTIMISING[label]``."""
    module = sys.modules[module_name]
    inner = module.round_layer

    def timed_round_layer(*args, **kwargs):
        start = time.perf_counter()
        try:
            return inner(*args, **kwargs)
        finally:
            OPTIMISING[label] += time.perf_counter() - start

    module.round_layer = timed_round_layer


def refine_before(revision: str, folder: Path):
    """``refine`` of ``quantize/refine`` at ``revision``, loaded as ``quantsearch.quantize._refine_before``."""
    archive = subprocess.run(["git", "-C", str(REPO), "archive", revision, PACKAGE], check=True,
                             capture_output=True).stdout
    tarfile.open(fileobj=io.BytesIO(archive)).extractall(folder)
    path, name = folder / PACKAGE, "quantsearch.quantize._refine_before"
    spec = importlib.util.spec_from_file_location(name, path / "__init__.py", submodule_search_locations=[str(path)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module.refine


def timed(qmodel, refine, inputs, method: str, iterations: int, label: str) -> tuple[float, float, dict]:
    """Seconds ``refine`` takes on the unrefined model, those outside AdaRound's optimisation, and what it
    changed; the model is unrefined after."""
    options = {"iterations": iterations} if "adaround" in method else {}
    optimising, start = OPTIMISING[label], time.perf_counter()
    changed = refine(qmodel, inputs, method, **options)
    seconds = time.perf_counter() - start
    qmodel.refined = {}
    return seconds, seconds - (OPTIMISING[label] - optimising), changed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", default="feb0a30", help="the git revision whose refinement is 'before'")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--iterations", type=int, default=1000, help="AdaRound's per layer (apply's default)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        variants = {"before": refine_before(args.before, Path(folder)), "after": refine_after}
        time_round_layer("quantsearch.quantize._refine_before.adaround", "before")
        time_round_layer("quantsearch.quantize.refine.adaround", "after")
        session = build_session(ExploreConfig())
        qmodel, inputs = session.qmodel, session.calibration_inputs()
        qmodel.bit_widths = {n: 4 for n in qmodel.quantizer_names}
        rows = []
        for method in METHODS:
            seconds, rest, identical = {"before": [], "after": []}, {"before": [], "after": []}, True
            for repeat in range(args.repeats):
                order = list(variants) if repeat % 2 == 0 else list(variants)[::-1]
                changed = {}
                for label in order:
                    took, left, changed[label] = timed(qmodel, variants[label], inputs, method, args.iterations, label)
                    seconds[label].append(took)
                    rest[label].append(left)
                identical &= changed["before"].keys() == changed["after"].keys() and all(
                    torch.equal(changed["before"][k], changed["after"][k]) for k in changed["before"])
            (before, after), (rest_before, rest_after) = ([statistics.median(d[k]) for k in ("before", "after")]
                                                          for d in (seconds, rest))
            rows.append([method, f"{before:.2f}", f"{after:.2f}", f"{before / after:.2f}x", f"{rest_before:.2f}",
                         f"{rest_after:.2f}", f"{rest_before / rest_after:.2f}x", "yes" if identical else "NO"])
            print(f"  {method}: {before:.2f} s -> {after:.2f} s; outside the optimisation {rest_before:.2f} s -> "
                  f"{rest_after:.2f} s", flush=True)
    print(f"\nembedded demo, W4A4: {len(qmodel.weight_names)} weight layers, {sum(len(x) for x in inputs)} "
          f"calibration images in {len(inputs)} batches; AdaRound {args.iterations} iterations per layer; "
          f"{torch.get_num_threads()} torch thread(s); median of {args.repeats} run(s) each, before = {args.before}\n"
          + format_table(["method", "before s", "after s", "before / after", "capture before s", "capture after s",
                         "capture before / after", "bit-identical"], rows))
    print("(capture = all but AdaRound's optimisation, round_layer, which is the same work in both)")


if __name__ == "__main__":
    main()
