"""``python -m quantsearch.apply BITCONFIG.json``: re-apply a bit-config to its model, evaluate it, export it.

Builds the model, applies the bit-config (refused, naming the first mismatch, when quantizer names or tensor
shapes differ), evaluates it on the same search and hold-out splits the run used, and prints accuracy against the
recorded one, and the costs. Model and data options are those of ``explore``; their defaults come from the
bit-config's ``model`` and ``dataset`` sections, so a bit-config from a run reproduces its recorded accuracy
exactly. ``--export PATH`` writes the quantized model's weights, amax and bits (safetensors or a torch state dict
of tensors, plus JSON metadata; see :mod:`quantsearch.export`). Bad input exits with status 2 and one line.
"""
from __future__ import annotations

import argparse
import logging
import sys


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m quantsearch.apply", description=__doc__.splitlines()[0])
    p.add_argument("bitconfig", help="a bit-config JSON (for example runs/DIR/pareto/point_000.json)")
    p.add_argument("--model", help="timm name, package.module:callable, or the demo (default: the bit-config's)")
    p.add_argument("--checkpoint", help="state dict to load into the model (default: the bit-config's)")
    p.add_argument("--dataset", help="fashion-mnist[:DIR] or imagefolder:PATH (default: the bit-config's)")
    p.add_argument("--calib-batches", type=int,
                   help="calibration batches the split sets aside (default: the bit-config's calibration size)")
    p.add_argument("--eval-samples", type=int, help="images in the search split (default: the bit-config's)")
    p.add_argument("--holdout-samples", type=int, help="images in the hold-out split (default: the bit-config's)")
    p.add_argument("--batch-size", type=int, help="batch size (default: the bit-config's)")
    p.add_argument("--seed", type=int, help="seed of the splits (default: the bit-config's)")
    p.add_argument("--device", help="cpu, cuda or cuda:N (default cpu)")
    p.add_argument("--split", choices=["search", "holdout", "both"], default="both",
                   help="which split(s) to evaluate (default both)")
    p.add_argument("--export", metavar="PATH",
                   help="write weights, amax and bits to PATH (.safetensors, .pt or .pth) and metadata beside it")
    p.add_argument("--check", action="store_true",
                   help="exit with status 1 when an accuracy differs from the one the bit-config records")
    p.add_argument("--log-level", default="WARNING", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    return p


def resolve(args: argparse.Namespace, bitconfig):
    """The explore settings this bit-config was made with, overridden by flags, validated; and the calibration
    size the split sets aside."""
    from ..run.settings import ConfigError, ExploreConfig

    model, data = bitconfig.model, bitconfig.dataset
    defaults = ExploreConfig()
    values = {
        "model": model["name"], "checkpoint": model.get("checkpoint"), "predicate": model["predicate"],
        "quantize_input": model["quantize_input"],
        "dataset": data.get("name", defaults.dataset), "eval_samples": data.get("search", defaults.eval_samples),
        "holdout_samples": data.get("holdout", defaults.holdout_samples),
        "batch_size": data.get("batch_size", defaults.batch_size), "seed": data.get("seed", defaults.seed),
    }
    flags = {k: getattr(args, k) for k in ("model", "checkpoint", "dataset", "eval_samples", "holdout_samples",
                                           "batch_size", "seed", "device", "calib_batches")}
    config = defaults.merged(values).merged(flags).validate()
    if args.calib_batches is not None:
        calibration = config.calibration_samples
    else:
        calibration = data.get("calibration", config.calibration_samples)
    if not isinstance(calibration, int) or calibration <= 0:
        raise ConfigError(f"the bit-config's dataset.calibration must be a positive integer, got {calibration!r}")
    return config, calibration


def run(args: argparse.Namespace) -> int:
    import torch

    from ..deploy.bitconfig import BitConfig, apply_bitconfig
    from ..search.costs import get_costs
    from ..sources.data import load_dataset, split_dataset
    from ..search.evaluator import AccuracyEvaluator
    from ..sources.models import create_model
    from ..run.tables import format_table

    bitconfig = BitConfig.load(args.bitconfig)
    config, calibration = resolve(args, bitconfig)
    device = torch.device(config.device)
    model = create_model(config.model, checkpoint=config.checkpoint).to(device)
    splits = split_dataset(load_dataset(config.dataset), calibration, config.eval_samples, config.holdout_samples,
                           seed=config.seed)
    example = splits.search[0][0].unsqueeze(0)
    qmodel = apply_bitconfig(model, bitconfig, example=example).to(device)
    bits = qmodel.bit_widths
    print(f"{args.bitconfig}: {len(qmodel)} quantizers of {config.model} (predicate {bitconfig.model['predicate']}),"
          f" bits {min(bits)}..{max(bits)}, {sum(bits)} in all")

    rows, differs = [], False
    wanted = ["search", "holdout"] if args.split == "both" else [args.split]
    for name in wanted:
        data = getattr(splits, name)
        if len(data) == 0:
            continue
        evaluator = AccuracyEvaluator(data, config.batch_size, device)
        accuracy = evaluator(qmodel)
        recorded = bitconfig.accuracy.get(name)
        if recorded is None:
            verdict = "-"
        elif accuracy == recorded:
            verdict = "identical"
        else:
            verdict, differs = f"differs by {100 * (accuracy - recorded):+.2f} points", True
        correct = round(accuracy * evaluator.num_samples)
        rows.append([name, evaluator.num_samples, correct, f"{100 * accuracy:.2f}",
                     "-" if recorded is None else f"{100 * recorded:.2f}", verdict])
    print(format_table(["split", "images", "correct", "accuracy %", "recorded %", ""], rows))

    cost_rows = []
    for name, recorded in (bitconfig.costs or {"bits": None}).items():
        try:
            (cost,) = get_costs(name, qmodel)
        except ValueError:  # a cost this version does not know: show what was recorded
            cost_rows.append([name, "-", "-", f"{recorded:g}"])
            continue
        value = float(cost(qmodel.bits_dict()))
        cost_rows.append([name, f"{value:g}", f"{value / cost.fp32:.3f}", "-" if recorded is None else f"{recorded:g}"])
    print(format_table(["cost", "value", "/ FP32", "recorded"], cost_rows))

    if args.export:
        from ..deploy.export import export_quantized

        tensors, metadata = export_quantized(qmodel, bitconfig, args.export)
        print(f"exported {tensors} and {metadata}")
    return 1 if args.check and differs else 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(levelname)s %(name)s: %(message)s")
    try:
        return run(args)
    except ValueError as exc:  # every error a user can fix (BitConfigError, ModelError, DataError, ...)
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
