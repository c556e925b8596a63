"""``python -m quantsearch.apply BITCONFIG.json``: re-apply a bit-config to its model, evaluate it, export it.

The bit-config records every setting its run was built with (model source and weights, preprocessing, dataset,
splits, metric); apply rebuilds that run's session from them (flags override any of them), applies the bits and
ranges (refused, naming the first mismatch, when quantizer names or tensor shapes differ), evaluates the same search
and hold-out images with the same metric and prints each next to the recorded value, then every recorded cost
recomputed. A checkpoint, weights or images that differ from the run's are named, and their accuracy is not
compared. ``--refine METHOD`` (bias-correction, adaround, brecq, brecq-lsq, qdrop, or steps chained with commas) then refines the weights (and, with brecq-lsq and qdrop, the activation steps) on the calibration split
(:mod:`quantsearch.quantize.refine`), measures both splits again and writes a new bit-config with its refined
weights beside it. ``--export PATH.onnx`` writes a Q/DQ ONNX model and checks it in ONNX Runtime
(:mod:`quantsearch.deploy.onnx_export`); other suffixes write tensors (:mod:`quantsearch.deploy.export`). Bad
input exits with status 2 and one line.
"""
from __future__ import annotations

import argparse
import logging
import sys

from . import run_command

OVERRIDES = ("model", "checkpoint", "dataset", "metric", "eval_samples", "holdout_samples", "batch_size", "seed",
             "device", "calib_batches", "channels_last")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m quantsearch.apply", description=__doc__.splitlines()[0])
    p.add_argument("bitconfig", help="a bit-config JSON (for example runs/DIR/pareto/point_000.json)")
    p.add_argument("--model", help="timm name, package.module:callable, or the demo (default: the bit-config's)")
    p.add_argument("--checkpoint", help="state dict to load into the model (default: the bit-config's)")
    p.add_argument("--dataset", help="fashion-mnist[:DIR], imagefolder:PATH, ... (default: the bit-config's)")
    p.add_argument("--metric", help="top1, top5, agreement, kl or package.module:callable (default: the "
                                    "bit-config's)")
    p.add_argument("--calib-batches", type=int,
                   help="calibration batches the split sets aside (default: the bit-config's)")
    p.add_argument("--eval-samples", type=int, help="images in the search split (default: the bit-config's)")
    p.add_argument("--holdout-samples", type=int, help="images in the hold-out split (default: the bit-config's)")
    p.add_argument("--batch-size", type=int, help="batch size (default: the bit-config's)")
    p.add_argument("--seed", type=int, help="seed of the splits (default: the bit-config's)")
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: the bit-config's)")
    p.add_argument("--channels-last", action="store_const", const=True, help="channels-last model and batches")
    p.add_argument("--split", choices=["search", "holdout", "both"], default="both",
                   help="which split(s) to evaluate (default both)")
    p.add_argument("--export", metavar="PATH",
                   help="PATH.onnx: a Q/DQ ONNX model, checked in ONNX Runtime on the hold-out split; .safetensors, "
                        ".pt or .pth: weights, amax and bits, with metadata beside it")
    p.add_argument("--refine", metavar="METHOD",
                   help="bias-correction, adaround (layer by layer), brecq, brecq-lsq, qdrop (block by block; -lsq "
                        "and qdrop also learn activation grids and biases), or steps chained with commas "
                        "(brecq-lsq,bias-correction):"
                        " refine the weights on the calibration split, re-measure, and write a new bit-config plus "
                        "its refined weights (see --refine-out); --export then exports the refined model")
    p.add_argument("--refine-iterations", type=int, metavar="N",
                   help="learning iterations per layer (adaround) or block (brecq, brecq-lsq, qdrop); default 1000")
    p.add_argument("--drop", type=float, metavar="P",
                   help="qdrop: the probability of dropping an activation's quantization while learning (default "
                        "0.5)")
    p.add_argument("--refine-out", metavar="PATH.json",
                   help="the refined bit-config (default: beside the input, BITCONFIG.METHOD.json; the weights "
                        "go to the same name with .pt)")
    p.add_argument("--check", action="store_true",
                   help="exit with status 1 when an accuracy differs from the one the bit-config records")
    p.add_argument("--log-level", default="WARNING", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    return p


def recorded_settings(bitconfig) -> dict:
    """The explore settings a bit-config was made with: recorded whole since schema 3, rebuilt from its
    ``model`` and ``dataset`` sections for schemas 1 and 2."""
    from ..run.settings import ConfigError, ExploreConfig

    if bitconfig.settings:
        return {k: v for k, v in bitconfig.settings.items() if k in ExploreConfig.keys()}
    model, data, defaults = bitconfig.model, bitconfig.dataset, ExploreConfig()
    values = {"model": model["name"], "checkpoint": model.get("checkpoint"), "predicate": model["predicate"],
              "quantize_input": model["quantize_input"], "dataset": data.get("name", defaults.dataset),
              "eval_samples": data.get("search", defaults.eval_samples),
              "holdout_samples": data.get("holdout", defaults.holdout_samples),
              "batch_size": data.get("batch_size", defaults.batch_size), "seed": data.get("seed", defaults.seed),
              "metric": data.get("metric", defaults.metric)}
    calibration = data.get("calibration", defaults.calibration_samples)
    if not isinstance(calibration, int) or calibration <= 0 or calibration % values["batch_size"]:
        raise ConfigError(f"the bit-config's dataset.calibration ({calibration!r}) is not a whole number of "
                          f"batches of {values['batch_size']}: give --calib-batches")
    return values | {"calib_batches": calibration // values["batch_size"]}


def resolve(args: argparse.Namespace, bitconfig):
    """The settings to rebuild: the bit-config's, overridden by flags, validated."""
    from ..run.settings import ExploreConfig

    values = recorded_settings(bitconfig) | {"calibration": None, "workers": 0, "ray_address": None}
    return ExploreConfig(**values).merged({k: getattr(args, k) for k in OVERRIDES}).validate()


def identity_mismatches(bitconfig, session) -> list[str]:
    """What differs from the run the bit-config came from: checkpoint bytes, weights, search or hold-out images."""
    model, data = bitconfig.model, bitconfig.dataset
    mine = session.fingerprints
    checks = [("checkpoint", model.get("checkpoint_sha256"), mine["checkpoint"], "checkpoint file bytes"),
              ("weights", model.get("weights_sha256"), mine["model"], "model weights"),
              *[(split, data.get("fingerprints", {}).get(split), mine[split], f"{split} images")
                for split in ("search", "holdout")]]
    return [f"{what} differ from the run's (sha256 {str(theirs)[:12]}, here {str(ours)[:12]})"
            for _, theirs, ours, what in checks if theirs is not None and theirs != ours]


def run(args: argparse.Namespace) -> int:
    from ..deploy.bitconfig import BitConfig
    from ..run.session import build_session
    from ..run.tables import format_table
    from ..search.bound import Bound

    from .. import files
    from ..deploy.targets.formatconfig import FormatConfigError, is_formatconfig

    if is_formatconfig(files.read_json(args.bitconfig, "bit-config", FormatConfigError)):
        return _run_target(args)
    if args.refine:  # refused in one line before the model loads
        from ..quantize.limits import check_refinement

        check_refinement(args.refine)
    _check_refine_options(args)
    bitconfig = BitConfig.load(args.bitconfig)
    config = resolve(args, bitconfig)
    session = build_session(config, calibrate=False,
                            weight_quantizers=bool(bitconfig.model.get("weight_quantizers", False)))
    qmodel = session.qmodel
    bitconfig.apply(qmodel, example=session.example)
    bits = qmodel.bit_widths
    integer = (f"; {len(qmodel.integer)} integer operators, integer-only: "
               f"{'yes' if qmodel.integer_only else 'no'}") if len(qmodel.integer) else ""
    print(f"{args.bitconfig}: {len(qmodel)} quantizers of {config.model} (predicate {session.predicate}), "
          f"bits {min(bits)}..{max(bits)}, {sum(bits)} in all{integer}")
    mismatches = identity_mismatches(bitconfig, session)
    for line in mismatches:
        print(f"note: {line}: recorded accuracies are not compared")
    if mismatches and args.check:
        raise ValueError(f"cannot check {args.bitconfig}: {mismatches[0]}")

    rows, differs, measured = [], False, {}
    for name in (["search", "holdout"] if args.split == "both" else [args.split]):
        evaluate = session.evaluator(name)
        if evaluate is None:
            continue
        bound = Bound.of(0.0, evaluate)
        value, recorded = evaluate(qmodel), bitconfig.accuracy.get(name)
        measured[name] = value
        if mismatches or recorded is None:
            verdict = "-"
        elif value == recorded:
            verdict = "identical"
        else:
            differs = True
            delta = bound.show(abs(value - recorded), unit=False)
            verdict = f"differs by {'+' if value > recorded else '-'}{delta}{' points' if bound.fraction else ''}"
        hits = evaluate.metric.successes()  # (hits, images) for a fraction metric (top-k, agreement)
        rows.append([name, evaluate.num_samples, hits[0] if hits else "-", bound.show(value, unit=False),
                     bound.show(recorded, unit=False), verdict])
    metric = session.evaluator("search").name
    unit = " %" if session.evaluator("search").fraction else ""
    print(format_table(["split", "images", "hits", f"{metric}{unit}", f"recorded{unit}", ""], rows))
    print(format_table(["cost", "value", "/ FP32", "recorded", ""], _cost_rows(session, bitconfig)))
    if args.refine:
        _refine(args, session, bitconfig, measured)
    if args.export and str(args.export).endswith(".onnx"):
        differs = not _export_onnx(args.export, session) or differs
    elif args.export:
        from ..deploy.export import export_quantized

        tensors, metadata = export_quantized(qmodel, bitconfig, args.export)
        print(f"exported {tensors} and {metadata}")
    return 1 if args.check and differs else 0


def _refine_options(args: argparse.Namespace) -> dict:
    """The refinement settings given on the command line (recorded in the refined bit-config)."""
    return {k: v for k, v in (("iterations", args.refine_iterations), ("drop", args.drop)) if v is not None}


def _check_refine_options(args: argparse.Namespace) -> None:
    """One line for a refinement setting that is out of range or given without the refinement that reads it."""
    from ..quantize.limits import check_refinement

    steps = check_refinement(args.refine) if args.refine else []
    if args.refine_iterations is not None and (args.refine_iterations < 1 or not set(steps) & {
            "adaround", "brecq", "brecq-lsq", "qdrop"}):
        raise ValueError(f"--refine-iterations {args.refine_iterations}: needs a positive count and --refine "
                         "adaround, brecq, brecq-lsq or qdrop")
    if args.drop is not None and (not 0.0 <= args.drop < 1.0 or "qdrop" not in steps):
        raise ValueError(f"--drop {args.drop}: needs a probability in [0, 1) and --refine qdrop")


def _refine(args: argparse.Namespace, session, bitconfig, before: dict) -> None:
    """Refine the applied model on the calibration split, measure it again, and write the refined bit-config and
    its weights (both atomically; the weights first, so a bit-config never names missing weights)."""
    import time
    from pathlib import Path

    from tqdm.auto import tqdm

    from ..deploy.bitconfig import BitConfig, refined_weights
    from ..files import write_atomic
    from ..quantize.limits import check_refinement
    from ..quantize.refine import refine
    from ..run.tables import format_table
    from ..search.bound import Bound

    source = Path(args.bitconfig)
    label = "+".join(check_refinement(args.refine))
    out = Path(args.refine_out) if args.refine_out else source.with_name(f"{source.stem}.{label}.json")
    if out.suffix != ".json":
        raise ValueError(f"--refine-out {out} must end in .json (the weights go beside it, in .pt)")
    qmodel, clock = session.qmodel, time.perf_counter()
    bar = (lambda steps: tqdm(steps, desc=args.refine, unit="step", leave=False)) if sys.stderr.isatty() else None
    inputs = session.calibration_inputs()
    options, amax = _refine_options(args), qmodel.amax
    changed = refine(qmodel, inputs, args.refine, progress=bar, **options)
    steps = sum(value != amax[name] for name, value in qmodel.amax.items())
    seconds = time.perf_counter() - clock
    after = {name: session.evaluator(name)(qmodel) for name in before}
    rows = []
    for name, value in after.items():
        show = Bound.of(0.0, session.evaluator(name)).show
        rows.append([name, show(before[name], unit=False), show(value, unit=False),
                     f"{'+' if value >= before[name] else '-'}{show(abs(value - before[name]), unit=False)}"])
    print(f"\nrefined {len(changed)} parameters{f' and {steps} activation steps' if steps else ''} with "
          f"{args.refine} in {seconds:.1f} s on "
          f"{sum(len(x) for x in inputs)} calibration images")
    print(format_table(["split", "before", "after", "change"], rows))
    data, digest = refined_weights(changed)
    weights = out.with_suffix(".pt")
    write_atomic(weights, data)
    refined = {"method": ",".join(check_refinement(args.refine)), "file": weights.name, "sha256": digest,
               "parameters": sorted(changed), "accuracy_before": dict(before)}
    if options:
        refined["options"] = options
    config = BitConfig.from_model(qmodel, bitconfig.model, example=session.example, dataset=bitconfig.dataset,
                                  accuracy=after, costs=bitconfig.costs, costs_normalized=bitconfig.costs_normalized,
                                  metric=bitconfig.metric, settings=bitconfig.settings, refined=refined)
    write_atomic(out, config.to_json())
    print(f"wrote {out} and {weights} ({len(data) / 1e3:.0f} kB); re-apply with "
          f"python -m quantsearch.apply {out}")


def _export_onnx(path: str, session) -> bool:
    """Write the Q/DQ ONNX model, run it in ONNX Runtime on the hold-out split (the search split when there is
    none) beside PyTorch, and print sizes and latencies against an FP32 ONNX export measured side by side.
    Returns whether ONNX Runtime's reference execution agrees with PyTorch to within one image in a thousand."""
    import tempfile
    from pathlib import Path

    from ..deploy.onnx_export import (RUNTIMES, compare_onnx, export_fp32_onnx, export_onnx, integer_kernels,
                                      onnx_latency, onnx_session, runtime_kernels)
    from ..run.tables import format_table
    from ..search.bound import Bound

    qmodel, split = session.qmodel, "holdout" if session.evaluator("holdout") is not None else "search"
    evaluate = session.evaluator(split)
    info = export_onnx(qmodel, path, session.example)
    with tempfile.TemporaryDirectory() as tmp:
        fp32 = export_fp32_onnx(qmodel, Path(tmp) / "fp32.onnx", session.example)
        fp32_size = fp32.stat().st_size
        compared = compare_onnx(path, qmodel, evaluate)
        batch = evaluate.batches[0][0].cpu().contiguous().numpy()
        sessions = {"fp32": onnx_session(fp32), "qdq": onnx_session(path)}
        latency = {n: onnx_latency(sessions, b) for n, b in (("1", batch[:1]), (str(len(batch)), batch))}
    size = Path(path).stat().st_size
    show = Bound.of(0.0, evaluate).show
    n = compared["images"]
    rows = [["PyTorch fake quant", show(compared["pytorch"], unit=False), "-"]] + [
        [f"ONNX Runtime, {name} ({RUNTIMES[name][0]})", show(compared[name], unit=False),
         f"{compared[f'{name}_agreeing']}/{n}"] for name in RUNTIMES]
    print(f"\nONNX: {path} (opset {info['opset']}; {info['QuantizeLinear']} QuantizeLinear, "
          f"{info['DequantizeLinear']} DequantizeLinear, {info['int4_weights']} weights as int4)")
    print(format_table(["runtime", f"{split} {evaluate.name}", "top-1 as PyTorch's"], rows))
    print(f"size {size / 1e3:.0f} kB, FP32 ONNX {fp32_size / 1e3:.0f} kB ({size / fp32_size:.2f}x)")
    kernels = runtime_kernels(path)
    integer = integer_kernels(kernels)
    left = sum(kernels.get(k, 0) for k in ("QuantizeLinear", "DequantizeLinear"))
    print("a default session runs " + (", ".join(f"{v} {k}" for k, v in integer.items()) or "no integer kernel")
          + f"; {left} QuantizeLinear/DequantizeLinear left in float after its optimisation")
    for b, t in latency.items():
        print(f"ONNX Runtime latency, batch {b} (CPU, median of 20 interleaved): FP32 {1e3 * t['fp32']:.2f} ms, "
              f"Q/DQ {1e3 * t['qdq']:.2f} ms ({t['qdq'] / t['fp32']:.2f}x)")
    return n - compared["reference_agreeing"] <= n / 1000


def _run_target(args: argparse.Namespace) -> int:
    """A target run's format config: rebuild its session, set the formats and ranges, score both splits as the
    search simulated them and as a default ONNX Runtime session computes them, recompute the costs; ``--export``
    writes the runtime's graph, counts its integer kernels and times it against FP32."""
    from ..deploy.targets.formatconfig import FormatConfig
    from ..run.session import build_session
    from ..run.tables import format_table
    from ..search.bound import Bound

    if args.refine:
        raise ValueError("--refine adjusts fake-quantized weights; a format config runs the runtime's own formats")
    fconfig = FormatConfig.load(args.bitconfig)
    config = resolve(args, fconfig)
    session = build_session(config, calibrate=False)
    rmodel = session.qmodel
    fconfig.apply(rmodel)
    counts = {f: list(fconfig.layers.values()).count(f) for f in dict.fromkeys(fconfig.layers.values())}
    print(f"{args.bitconfig}: {len(rmodel)} layers of {config.model}, target {config.target} (batch "
          f"{config.deploy_batch}): " + ", ".join(f"{n} {f}" for f, n in counts.items()))
    mismatches = identity_mismatches(fconfig, session)
    for line in mismatches:
        print(f"note: {line}: recorded accuracies are not compared")
    if mismatches and args.check:
        raise ValueError(f"cannot check {args.bitconfig}: {mismatches[0]}")
    rows, differs = [], False
    for name in (["search", "holdout"] if args.split == "both" else [args.split]):
        evaluate = session.evaluator(name)
        if evaluate is None:
            continue
        show = Bound.of(0.0, evaluate).show
        simulated = evaluate(rmodel)
        rmodel.evaluate_in = "onnxruntime"
        runtime = evaluate(rmodel)
        rmodel.evaluate_in = "auto"
        recorded = [fconfig.accuracy.get(name), fconfig.accuracy.get(f"{name}_onnxruntime")]
        same = [r is None or v == r for v, r in zip((simulated, runtime), recorded)]
        differs = differs or (not mismatches and not all(same))
        verdict = "-" if mismatches or recorded == [None, None] else "identical" if all(same) else "differs"
        rows.append([name, evaluate.num_samples, show(simulated, unit=False), show(runtime, unit=False),
                     *["-" if r is None else show(r, unit=False) for r in recorded], verdict])
    metric = session.evaluator("search").name
    print(format_table(["split", "images", f"{metric} (search's)", f"{metric} (ONNX Runtime)", "recorded",
                        "recorded (ORT)", ""], rows))
    print(format_table(["cost", "value", "/ FP32", "recorded", ""], _cost_rows(session, fconfig)))
    if args.export:
        _export_target(args.export, session, fconfig)
    return 1 if args.check and differs else 0


def _export_target(path: str, session, fconfig) -> None:
    """Write the runtime's graph (loads in a default session, or one line and nothing written), then print what
    a default session runs and how fast, against the FP32 export, interleaved at the deployment batch."""
    import tempfile
    from pathlib import Path

    from ..deploy.onnx_export import integer_kernels, runtime_kernels
    from ..deploy.targets.latency import measure_end_to_end
    from ..deploy.targets.onnxruntime import export_runtime_onnx
    from ..run.session import LATENCY_REPEATS

    if not str(path).endswith(".onnx"):
        raise ValueError(f"--export {path}: a format config exports the runtime's ONNX graph: give PATH.onnx")
    rmodel, config, example = session.qmodel, session.config, session.example.cpu()
    export_runtime_onnx(rmodel, path, example)
    integer = integer_kernels(runtime_kernels(path))
    with tempfile.TemporaryDirectory() as tmp, rmodel.fp32():
        fp32 = export_runtime_onnx(rmodel, Path(tmp) / "fp32.onnx", example)["path"]
        batch = example[:1].expand(config.deploy_batch, *example.shape[1:]).contiguous().numpy()
        times = measure_end_to_end({"fp32": fp32, "target": path}, batch, config.threads, LATENCY_REPEATS)
        fp32_size = fp32.stat().st_size
    size = Path(path).stat().st_size
    print(f"\nONNX: {path}, ONNX Runtime's own graph; a default session runs "
          + (", ".join(f"{v} {k}" for k, v in integer.items()) or "no integer kernel") + " after its optimisation")
    print(f"size {size / 1e3:.0f} kB, FP32 ONNX {fp32_size / 1e3:.0f} kB ({size / fp32_size:.2f}x)")
    recorded = fconfig.latency.get("measured_ms")
    print(f"latency, batch {config.deploy_batch}, threads {config.threads or 'default'} (median of "
          f"{LATENCY_REPEATS} interleaved): FP32 {1e3 * times['fp32']:.3f} ms, this {1e3 * times['target']:.3f} ms "
          f"({times['fp32'] / times['target']:.2f}x FP32's speed)"
          + (f"; the run measured {recorded:.3f} ms" if recorded else ""))


def _cost_rows(session, bitconfig) -> list[list]:
    """Every recorded cost, recomputed on the model as applied (BOPs from a profile of this model)."""
    rows = []
    for name, recorded in (bitconfig.costs or {"bits": None}).items():
        try:
            (cost,) = session.costs(name)
        except ValueError:  # a cost this version does not know: show what was recorded
            rows.append([name, "-", "-", f"{recorded:g}", ""])
            continue
        value = float(cost(session.qmodel.bits_dict()))
        verdict = "" if recorded is None else "identical" if value == recorded else "differs"
        if name == "latency" and recorded:  # a measurement on this machine now, not a count
            verdict = f"measured again ({value / recorded - 1:+.0%})"
        rows.append([name, f"{value:g}", f"{value / cost.fp32:.3f}", "-" if recorded is None else f"{recorded:g}",
                     verdict])
    return rows


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(levelname)s %(name)s: %(message)s")
    try:
        return run(args)
    except ValueError as exc:  # every error a user can fix (BitConfigError, ModelError, DataError, ...)
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    run_command(main)
