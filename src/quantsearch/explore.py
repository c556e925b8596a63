"""``python -m quantsearch.explore``: search per-layer bit-widths for a model and write the Pareto front.

With no arguments it runs the embedded default: the demo ViT on the Fashion-MNIST test split shipped in the
package. Settings come from defaults, then ``--config FILE.yaml``, then flags. Bad input exits with status 2 and
one line naming the problem.
"""
from __future__ import annotations

import argparse
import logging
import signal
import sys

from .config import ConfigError, ExploreConfig, load_yaml

log = logging.getLogger("quantsearch")


def build_parser() -> argparse.ArgumentParser:
    d = ExploreConfig()
    p = argparse.ArgumentParser(prog="python -m quantsearch.explore", description=__doc__.splitlines()[0])
    p.add_argument("--config", help="YAML file with any of the settings below (flags override it)")
    p.add_argument("--model", help=f"timm name, package.module:callable, or the demo (default {d.model})")
    p.add_argument("--checkpoint", help="state dict to load into the model (read with weights_only=True)")
    p.add_argument("--dataset", help=f"fashion-mnist[:DIR] or imagefolder:PATH (default {d.dataset})")
    p.add_argument("--predicate", help="where quantizers go: auto, conv2d, linear, vit, all-leaf (default auto)")
    p.add_argument("--no-input-quant", dest="quantize_input", action="store_const", const=False,
                   help="do not quantize the model input")
    p.add_argument("--bits", help=f"activation bit-width range LO:HI (default {d.bits})")
    p.add_argument("--weight-bits", help=f"weight bit-width range LO:HI (default {d.weight_bits}); quantizers "
                   "outside the search space stay at HI of their range")
    p.add_argument("--search-space", help="which quantizers are genes: activations, weights or both "
                   f"(default {d.search_space})")
    floor = p.add_mutually_exclusive_group()
    floor.add_argument("--min-accuracy", type=float, help="accuracy floor, a fraction in [0, 1]")
    floor.add_argument("--max-accuracy-drop", type=float,
                       help=f"floor relative to FP32 on the search split (default {d.max_accuracy_drop})")
    p.add_argument("--cost", help="cost objective(s), comma separated, from bits, activation-memory, model-size, "
                   f"bops (default {d.cost}); three or more objectives use NSGA-III")
    p.add_argument("--pop-size", type=int, help=f"NSGA-II population (default {d.pop_size})")
    p.add_argument("--generations", type=int, help=f"NSGA-II generations (default {d.generations})")
    p.add_argument("--calib-batches", type=int, help=f"calibration batches (default {d.calib_batches})")
    p.add_argument("--calib-method", help="max, percentile, entropy, mse or moving-max; per-quantizer overrides "
                   f"go in the YAML config as calib-overrides (default {d.calib_method})")
    p.add_argument("--calib-percentile", type=float,
                   help=f"percentile of |x| kept by --calib-method percentile (default {d.calib_percentile})")
    p.add_argument("--calib-momentum", type=float,
                   help=f"momentum of --calib-method moving-max (default {d.calib_momentum})")
    p.add_argument("--calibration", metavar="FILE",
                   help="reuse a calibration file (python -m quantsearch.calibrate) instead of calibrating; "
                        "refused if it was made for other weights or data")
    p.add_argument("--eval-samples", type=int, help=f"images in the search split (default {d.eval_samples})")
    p.add_argument("--holdout-samples", type=int, help="images in the hold-out split (default: the rest)")
    p.add_argument("--batch-size", type=int, help=f"batch size (default {d.batch_size})")
    p.add_argument("--seed", type=int, help=f"seed of splits and search (default {d.seed})")
    p.add_argument("--device", help="cpu, cuda or cuda:N (default cpu)")
    p.add_argument("--compile", action="store_const", const=True,
                   help="torch.compile the quantized model once (one graph serves every candidate; pays off on "
                        "long searches and large models)")
    p.add_argument("--out", help="run directory (default runs/<timestamp>)")
    p.add_argument("--overwrite", action="store_const", const=True, help="replace a run already in --out")
    p.add_argument("--resume", metavar="DIR",
                   help="continue the run in DIR with its stored settings; finished evaluations are not redone")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    return p


def config_from_args(args: argparse.Namespace) -> ExploreConfig:
    if args.resume:
        from .exploration import resume_config

        given = [k for k, v in vars(args).items() if k in ExploreConfig.keys() and v is not None and k != "out"]
        if given or args.config:
            raise ConfigError(f"--resume takes the run's stored settings; drop --{(given or ['config'])[0]}")
        return resume_config(args.resume).validate()
    base = ExploreConfig()
    if args.config:
        base = ExploreConfig.from_mapping(load_yaml(args.config), source=args.config)
    flags = {k: v for k, v in vars(args).items() if k in ExploreConfig.keys()}
    if args.min_accuracy is not None:  # a flag floor replaces a YAML floor of the other kind
        flags["max_accuracy_drop"] = base.max_accuracy_drop
    config = base.merged(flags).validate()
    config.out = str(config.resolved_out())  # fixed once, so messages and --resume name the same folder
    return config


def print_report(result) -> None:
    from .results import format_table

    cost = result.cost_names[0]
    fp32_costs = result.fp32_costs
    print(f"\nFP32 accuracy: search {100 * result.fp32['search']:.2f}%"
          + (f", hold-out {100 * result.fp32['holdout']:.2f}%" if "holdout" in result.fp32 else "")
          + f"; floor {100 * result.min_accuracy:.2f}% on the search split")
    every = list(fp32_costs)
    rows = []
    for name, costs in result.baseline_costs.items():
        accuracy = result.baselines[name].accuracy if name in result.baselines else result.fp32["search"]
        rows.append([name, f"{100 * accuracy:.2f}",
                     *[cell for c in every for cell in (f"{costs[c]:g}", f"{costs[c] / fp32_costs[c]:.4f}")]])
    print("\nBaselines (search split; costs per sample, memory and size in bytes; x FP32 = relative to FP32)\n"
          + format_table(["config", "acc %", *[h for c in every for h in (c, "x FP32")]], rows))
    genes = set(result.genes)
    gene_index = [i for i, n in enumerate(result.quantizer_names) if n in genes]
    rows = [[i, f"{100 * e.accuracy:.2f}",
             f"{100 * result.holdout[e.bits]:.2f}" if e.bits in result.holdout else "-",
             *[cell for c in result.cost_names for cell in (f"{e.costs[c]:g}", f"{e.costs[c] / fp32_costs[c]:.4f}")],
             " ".join(str(e.bits[j]) for j in gene_index)]
            for i, e in enumerate(result.front)]
    print(f"\nPareto front ({len(result.front)} points, {result.num_evaluations} evaluations, cheapest {cost} first; "
          f"{len(genes)} genes: {result.search_space})\n"
          + format_table(["#", "search %", "hold-out %", *[h for c in result.cost_names for h in (c, "x FP32")],
                          "bits per searched quantizer"], rows))
    print(f"\nWrote {result.run_dir}/ (report.md, evaluations.csv, pareto.csv, pareto/*.json, *.png, run.json) "
          f"in {result.timings['total']:.0f} s")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(levelname)s %(name)s: %(message)s")
    from .bitconfig import BitConfigError
    from .calibration import CalibrationError
    from .data import DataError
    from .models import ModelError
    from .store import StoreError

    stop = {"requested": False}

    def on_sigint(_signum, _frame):
        if stop["requested"]:  # a second Ctrl-C stops at once
            raise KeyboardInterrupt
        stop["requested"] = True
        print("\nstopping after the current evaluation (Ctrl-C again to stop at once)", file=sys.stderr)

    previous = signal.signal(signal.SIGINT, on_sigint)
    config = None
    try:
        config = config_from_args(args)
        from .exploration import Interrupted, explore

        result = explore(config, progress=not args.no_progress, resume=bool(args.resume),
                         stop_requested=lambda: stop["requested"])
    except (ConfigError, ModelError, DataError, StoreError, BitConfigError, CalibrationError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (Interrupted, KeyboardInterrupt):
        where = f" {config.resolved_out()}" if config is not None and config.out else " DIR"
        print(f"interrupted: finished evaluations are kept; continue with --resume{where}", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGINT, previous)
    print_report(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
