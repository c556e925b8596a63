"""What the quantizer forms cost on the hot path, before and after issue 28 (demo ViT with every form, CPU).

    python benchmarks/bench_forms_cost.py [--config configs/fashion_vit_demo.yaml] [--candidates 20] [--repeats 5]

One process, one session as ``explore`` builds it, with log2-narrow attention probabilities, asymmetric GELU
outputs and per-head q/k/v and attention outputs (``bench_forms.py``'s "all together" less the per-channel fold).
``before`` is the code as it was (feb0a30), patched back in here; ``after`` the code as it is. Each measure runs
the two variants ``--repeats`` times, alternating which goes first, and reports medians and the ratio after /
before, so both see the same machine:

- calibration: one pass over the calibration batches (``calibrate`` as ``explore`` calls it), where ``before``
  draws each batch's sample from a full random permutation of every asymmetric and per-head tensor; also the
  seconds spent in those quantizers' ``collect`` alone, and how far the fitted ranges and the search accuracy of
  uniform widths move with the new sample;
- evaluation: ``--candidates`` seeded random configurations on the search split, ``before`` with the forms'
  forwards as they were (the asymmetric grid keyed by ``float()`` of its buffers in every forward);
- compiled graphs: how many graphs ``torch.compile`` (backend ``eager``: Dynamo's tracing and guards, no code
  generation) builds for the forms' quantizers compiled one by one over the candidates, and for the whole model
  (whose weight fake quantization breaks graphs by itself), before and after.

On CPU eager the asymmetric ``float()`` is a cheap read; its cost (a device sync per forward) is a GPU one, which
this CPU benchmark cannot show: the compiled-graph count shows the compile side.
"""
from __future__ import annotations

import argparse
import statistics
import time
import warnings
from contextlib import contextmanager

warnings.simplefilter("ignore", FutureWarning)

import numpy as np  # noqa: E402
import torch  # noqa: E402

from quantsearch.quantize import forms  # noqa: E402
from quantsearch.quantize.calib import TensorStatistics, calibrate  # noqa: E402
from quantsearch.quantize.fakequant import FastTensorQuantizer  # noqa: E402
from quantsearch.quantize.limits import log_grid_at  # noqa: E402
from quantsearch.run.session import build_session, calibration_bits  # noqa: E402
from quantsearch.run.settings import ExploreConfig, load_yaml  # noqa: E402

FORMS = {"*.attn_drop": "log2-narrow", "*.mlp.act": "asymmetric", "*.attn.qkv": "per-head",
         "*.attn.proj:input": "per-head"}


# -- the code as it was (feb0a30), patched in for "before" ----------------------------------------------------------
def _old_draw(self, flat, keep):
    pick = torch.randperm(len(flat), generator=torch.Generator().manual_seed(self.batches))
    return flat[pick[:keep].to(flat.device)]


def _old_asymmetric(self, inputs):
    amax = self._amax
    key = (float(self._low), float(amax), self._num_bits)
    if self._grid[0] != key:
        self._grid = (key, forms.asymmetric_grid(*key))
    return forms.asymmetric_fake_quant(inputs.float(), *key, grid=self._grid[1]).to(inputs.dtype)


def _old_log2(self, inputs):
    return forms.log2_fake_quant(inputs.float(), self._amax, self._num_bits).to(inputs.dtype)


def _old_narrow(self, inputs):
    if log_grid_at(self.form, self._num_bits):
        return _old_log2(self, inputs)
    return FastTensorQuantizer._quant_forward(self, inputs)


def _old_grouped(x, amax, bits, unsigned):
    amax = torch.as_tensor(amax, dtype=torch.float32, device=x.device).flatten()
    groups = amax.numel()
    bound = 2.0 ** (bits - 1 + int(unsigned)) - 1.0
    scale = bound / amax.reshape(groups, 1)
    out = x.reshape(*x.shape[:-1], groups, -1) * scale
    out.round_().clamp_(0.0 if unsigned else -bound, bound)
    return out.div_(scale).reshape(x.shape)


def _old_per_head(self, inputs):
    return _old_grouped(inputs.float(), self._amax, self._num_bits, self._unsigned).to(inputs.dtype)


OLD = [(TensorStatistics, "_draw", _old_draw), (forms.AsymmetricTensorQuantizer, "_quant_forward", _old_asymmetric),
       (forms.Log2TensorQuantizer, "_quant_forward", _old_log2),
       (forms.NarrowLog2TensorQuantizer, "_quant_forward", _old_narrow),
       (forms.PerHeadTensorQuantizer, "_quant_forward", _old_per_head)]


ORDERS = (("before", "after"), ("after", "before"))  # alternated between repeats: neither always runs first


@contextmanager
def variant(name: str):
    """The code of ``name`` (``before``: the old functions patched in; ``after``: as it is)."""
    saved = [(cls, attr, cls.__dict__[attr]) for cls, attr, _ in OLD]
    if name == "before":
        for cls, attr, old in OLD:
            setattr(cls, attr, old)
    try:
        yield
    finally:
        for cls, attr, current in saved:
            setattr(cls, attr, current)


# -- the measures ---------------------------------------------------------------------------------------------------
def _timed_collect(spent: list):
    """``TensorStatistics.collect`` that adds the seconds of sampled quantizers' calls to ``spent[0]``."""
    collect = TensorStatistics.collect

    def timed(self, x):
        start = time.perf_counter()
        collect(self, x)
        if self.sampling:
            spent[0] += time.perf_counter() - start
    return collect, timed


def calibration_times(session, repeats: int) -> dict:
    """Median seconds of one calibration pass and of the sampled quantizers' collect, per variant; the last
    calibration of each variant."""
    config, out = session.config, {v: {"pass": [], "collect": []} for v in ("before", "after")}
    loader = torch.utils.data.DataLoader(session.splits.calibration, batch_size=config.batch_size)
    for repeat in range(repeats):
        for name in ORDERS[repeat % 2]:
            spent = [0.0]
            collect, TensorStatistics.collect = _timed_collect(spent)
            try:
                with variant(name):
                    start = time.perf_counter()
                    out[name]["calibration"] = calibrate(
                        session.qmodel, loader, config.calib_batches, config.calib_method,
                        bits=calibration_bits(config), overrides=config.calib_overrides)
                    out[name]["pass"].append(time.perf_counter() - start)
            finally:
                TensorStatistics.collect = collect
            out[name]["collect"].append(spent[0])
    return out


def collect_times(shape, repeats: int) -> dict:
    """Median seconds of one sampled ``collect`` on a random tensor of ``shape`` (say a DeiT-S GELU output,
    batch 32: 32 x 197 x 1536), per variant: where a full permutation costs most."""
    x, out = torch.randn(shape), {"before": [], "after": []}
    for repeat in range(repeats):
        for name in ORDERS[repeat % 2]:
            with variant(name):
                stats = TensorStatistics(sample=True)
                start = time.perf_counter()
                stats.collect(x)
                out[name].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in out.items()}


def range_shift(before, after) -> tuple[float, float]:
    """The largest and the median change of an asymmetric or per-head range end (every width, every head) as a
    share of its quantizer's max |x|."""
    shifts = []
    for name, b in before.quantizers.items():
        a = after.quantizers[name]
        if b.form in ("asymmetric", "per-head"):
            for table_b, table_a in ((b.amax, a.amax), (b.low or {}, a.low or {})):
                shifts += [float(v) for w in table_b for v in
                           np.abs(np.atleast_1d(table_a[w]) - np.atleast_1d(table_b[w])) / b.absmax]
    return max(shifts), float(np.median(shifts))


def uniform_accuracies(session, calibration, widths=(4, 6, 8)) -> list[float]:
    calibration.apply(session.qmodel)
    evaluate = session.evaluator("search")
    accuracies = []
    for bits in widths:
        session.qmodel.bit_widths = {n: bits for n in session.qmodel.quantizer_names}
        accuracies.append(evaluate(session.qmodel))
    return accuracies


def evaluation_times(session, configs, repeats: int) -> dict:
    """Median seconds to evaluate every configuration on the search split, per variant, and the accuracies."""
    evaluate, out = session.evaluator("search"), {v: {"times": []} for v in ("before", "after")}
    for repeat in range(repeats):
        for name in ORDERS[repeat % 2]:
            with variant(name):
                start, accuracies = time.perf_counter(), []
                for widths in configs:
                    session.qmodel.bit_widths = widths
                    accuracies.append(evaluate(session.qmodel))
                out[name]["times"].append(time.perf_counter() - start)
                out[name]["accuracies"] = accuracies
    return out


def _counting_backend(graphs: list):
    def backend(graph, example_inputs):
        graphs[0] += 1
        return graph.forward
    return backend


def compiled_graphs(session, configs, images: int = 8) -> dict:
    """Per variant: graphs Dynamo builds (backend ``eager``) for the forms' quantizers compiled one by one on their
    real inputs over ``configs`` (``fullgraph``: a graph break fails), and for the whole model (graphs, breaks)."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    qmodel = session.qmodel
    x = torch.stack([session.splits.search[i][0] for i in range(images)])
    names = [n for n, f in qmodel.forms.items() if f in ("asymmetric", "per-head", "log2-narrow")]
    inputs = {}
    hooks = [qmodel.quantizer(n).register_forward_pre_hook(lambda m, a, n=n: inputs.setdefault(n, a[0]))
             for n in names]
    with torch.no_grad():
        qmodel(x)
    for hook in hooks:
        hook.remove()
    out = {}
    for name in ("before", "after"):
        alone, broken = [0], 0
        with variant(name), torch.no_grad():
            for n in names:
                torch._dynamo.reset()
                compiled = torch.compile(qmodel.quantizer(n), backend=_counting_backend(alone), fullgraph=True,
                                         dynamic=False)
                try:
                    for widths in configs:
                        qmodel.bit_widths = widths
                        compiled(inputs[n])
                except Exception:  # noqa: BLE001 - a graph break under fullgraph
                    broken += 1
            torch._dynamo.reset()
            counters.clear()
            whole = [0]
            compiled = torch.compile(qmodel, backend=_counting_backend(whole), dynamic=False)
            for widths in configs[:4]:
                qmodel.bit_widths = widths
                compiled(x)
        out[name] = {"alone": alone[0], "quantizers": len(names), "broken": broken, "whole": whole[0],
                     "breaks": sum(counters["graph_break"].values())}
    torch._dynamo.reset()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="an explore YAML (default: the embedded demo)")
    parser.add_argument("--candidates", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    clock = time.perf_counter()
    base = ExploreConfig.from_mapping(load_yaml(args.config)) if args.config else ExploreConfig()
    session = build_session(base.merged({"quant_forms": FORMS}))
    qmodel, ranges = session.qmodel, session.bit_ranges
    rng = np.random.default_rng(0)
    configs = [{n: int(rng.integers(lo, hi + 1)) for n, (lo, hi) in ranges.items()} for _ in range(args.candidates)]
    sampled = sum(f in ("asymmetric", "per-head") for f in qmodel.forms.values())
    print(f"{args.config or 'embedded demo'} with forms {FORMS}: {len(qmodel)} quantizers ({sampled} sampled in "
          f"calibration), calibration {session.config.calibration_samples} images ({session.config.calib_method}), "
          f"search {session.evaluator('search').num_samples} images; medians of {args.repeats} alternating repeats; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU")

    calib = calibration_times(session, args.repeats)
    b, a = (statistics.median(calib[v]["pass"]) for v in ("before", "after"))
    cb, ca = (statistics.median(calib[v]["collect"]) for v in ("before", "after"))
    print(f"\ncalibration pass      before {b:7.3f} s   after {a:7.3f} s   after / before {a / b:.2f}")
    print(f"  sampled collect     before {cb:7.3f} s   after {ca:7.3f} s   after / before {ca / cb:.2f}")
    old, new = calib["before"]["calibration"], calib["after"]["calibration"]
    shape = (32, 197, 1536)
    one = collect_times(shape, args.repeats)
    print(f"  one collect on {' x '.join(map(str, shape))}   before {one['before']:7.3f} s   after "
          f"{one['after']:7.3f} s   after / before {one['after'] / one['before']:.2f}")
    worst, median = range_shift(old, new)
    print(f"  range ends moved by the new sample (asymmetric and per-head, every width and head, share of the "
          f"quantizer's max |x|): median {100 * median:.2f} %, at most {100 * worst:.2f} %")
    acc_old, acc_new = uniform_accuracies(session, old), uniform_accuracies(session, new)
    print("  search accuracy, uniform A4 / A6 / A8: before " + " / ".join(f"{100 * v:.2f}" for v in acc_old)
          + "   after " + " / ".join(f"{100 * v:.2f}" for v in acc_new))

    evals = evaluation_times(session, configs, args.repeats)
    b, a = (statistics.median(evals[v]["times"]) for v in ("before", "after"))
    moved = [abs(x - y) for x, y in zip(evals["before"]["accuracies"], evals["after"]["accuracies"]) if x != y]
    print(f"\n{args.candidates} evaluations   before {b:7.3f} s   after {a:7.3f} s   after / before {a / b:.2f}   "
          f"accuracies identical in {args.candidates - len(moved)} of {args.candidates}"
          + (f" (the others by at most {100 * max(moved):.3f} points: per-head scales now divide as "
             "TensorQuantizer does)" if moved else ""))

    graphs = compiled_graphs(session, configs)
    for name, g in graphs.items():
        print(f"\ntorch.compile, {name}: {g['alone']} graphs for the {g['quantizers']} log2-narrow, asymmetric and "
              f"per-head quantizers compiled alone over {len(configs)} candidates ({g['broken']} with a graph break); "
              f"whole model over 4 candidates: {g['whole']} graphs, {g['breaks']} graph breaks", end="")
    print(f"\n(Dynamo's recompile limit: {torch._dynamo.config.recompile_limit} graphs per frame, then eager)")
    print(f"wall time {time.perf_counter() - clock:.0f} s")


if __name__ == "__main__":
    main()
