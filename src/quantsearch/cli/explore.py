"""``python -m quantsearch.explore``: search per-layer bit-widths for a model and write the Pareto front.

With no arguments it runs the embedded default: the demo ViT on the Fashion-MNIST test split shipped in the
package. Settings come from defaults, then ``--config FILE.yaml``, then flags. Bad input exits with status 2 and
one line naming the problem.
"""
from __future__ import annotations

import argparse
import logging
import signal
import sqlite3
import sys

from . import run_command
from ..run.settings import PARALLEL_KEYS, ConfigError, ExploreConfig, load_yaml

log = logging.getLogger("quantsearch")
SHORT_FORMATS = {"int4-weight": "i4", "int8-dynamic": "dyn", "int8-static": "st", "fp32": "fp"}


def build_parser() -> argparse.ArgumentParser:
    d = ExploreConfig()
    p = argparse.ArgumentParser(prog="python -m quantsearch.explore", description=__doc__.splitlines()[0])
    p.add_argument("--config", help="YAML file with any of the settings below (flags override it)")
    p.add_argument("--model", help="timm name, torchvision:NAME, package.module:callable, or the demo "
                                   f"(default {d.model}); keyword arguments: model_kwargs in --config")
    p.add_argument("--checkpoint", help="state dict to load into the model (read with weights_only=True)")
    p.add_argument("--checkpoint-key", help="entry of a nested checkpoint that holds the state dict (model.ema)")
    p.add_argument("--no-pretrained", dest="pretrained", action="store_const", const=False,
                   help="random weights for a timm/torchvision name (default: its published weights)")
    p.add_argument("--dataset", help="fashion-mnist[:DIR], imagefolder:PATH, images:PATH (unlabeled) or "
                                     f"package.module:callable (default {d.dataset})")
    p.add_argument("--class-index", help="JSON or text file mapping imagefolder class folders to class indices")
    p.add_argument("--metric", help="top1, top5, agreement (top-1 equals FP32's), kl (to FP32's outputs; lower is "
                                    f"better) or package.module:callable (default {d.metric})")
    p.add_argument("--predicate", help="where quantizers go: auto, conv2d, batchnorm, linear, vit, all-leaf (default auto)")
    p.add_argument("--no-input-quant", dest="quantize_input", action="store_const", const=False,
                   help="do not quantize the model input")
    p.add_argument("--bits", help=f"activation bit-width range LO:HI (default {d.bits})")
    p.add_argument("--weight-bits", help=f"weight bit-width range LO:HI (default {d.weight_bits}); quantizers "
                   "outside the search space stay at HI of their range")
    p.add_argument("--search-space", help="which quantizers are genes: activations, weights or both "
                   f"(default {d.search_space})")
    floor = p.add_mutually_exclusive_group()
    floor.add_argument("--min-accuracy", type=float,
                       help="the bound on the metric: a floor, a fraction in [0, 1]; for kl a ceiling in nats")
    floor.add_argument("--max-accuracy-drop", type=float,
                       help=f"bound relative to FP32 on the search split (default {d.max_accuracy_drop}; "
                            "for kl: FP32 + this)")
    p.add_argument("--cost", help="cost objective(s), comma separated, from bits, activation-memory, model-size, "
                   "bops (default bits); with --target from latency (ms, measured here) and size (bytes as the "
                   "runtime stores them; default latency); three or more objectives use NSGA-III")
    p.add_argument("--target", help="deploy on a runtime: onnxruntime-cpu makes each Linear/Conv layer's ONNX "
                   "Runtime format a gene (int4-weight MatMulNBits, int8-dynamic, int8-static QLinear*, fp32), "
                   "accuracy what the runtime computes, latency measured on this machine; the front is exported, "
                   "scored and timed in ONNX Runtime (default: none, bit-widths for hardware that runs them)")
    p.add_argument("--deploy-batch", type=int, help=f"the batch size the target serves at (default {d.deploy_batch})")
    p.add_argument("--threads", type=int, help="the runtime's intra-op threads (default: its own)")
    p.add_argument("--latency-table", metavar="FILE", help="a latency table measured before on this machine "
                   "(default: measured now, each layer shape cached per CPU, threads and ONNX Runtime version)")
    p.add_argument("--algorithm", help="random, greedy (AMP-style), ilp (HAWQ-style), nsga2, or guided (NSGA-II "
                   f"seeded from sensitivities, greedy and ILP; default {d.algorithm})")
    p.add_argument("--budget", type=float, help="evaluations to spend, in full search-split equivalents, the "
                   "baselines included (default: pop-size x (generations + 1) after the baselines)")
    p.add_argument("--patience", type=int, help="stop nsga2 and guided once the search split's front has gained "
                   "less than --min-gain of its hypervolume this many checks in a row (one per generation and per "
                   f"population of seeds; 0: spend the whole budget; default {d.patience})")
    p.add_argument("--min-gain", type=float, help="the relative hypervolume gain a check must make to count as "
                   f"progress (default {d.min_gain})")
    p.add_argument("--block-cache-mb", type=int, help="memory for block outputs that later candidates with the same "
                   "widths up to that block reuse instead of computing (identical results; 0: off; default "
                   f"{d.block_cache_mb})")
    p.add_argument("--sensitivity", help="how greedy, ilp and guided rate the genes: measured (single-gene "
                   "evaluations, AMP) or gradient (one backward pass, HAWQ/ModelOpt); default: measured for greedy, "
                   "gradient for ilp and guided")
    p.add_argument("--early-reject", nargs="?", const="floor", metavar="MODE",
                   help="stop evaluating a candidate once it is below the floor (floor; the flag alone), or also once "
                   "it cannot beat a cheaper point (front: racing), with 99.9 %% confidence; off; auto (default): "
                   "front for metrics that count hits per image")
    p.add_argument("--pop-size", type=int, help=f"NSGA-II population (default {d.pop_size})")
    p.add_argument("--generations", type=int, help=f"NSGA-II generations (default {d.generations})")
    p.add_argument("--calib-batches", type=int, help=f"calibration batches (default {d.calib_batches})")
    p.add_argument("--calib-method", help="max, percentile, entropy, mse or moving-max (asymmetric and per-head "
                   "forms take mse or max; log2 forms always max); per-quantizer overrides go in the YAML config as "
                   f"calib-overrides (default {d.calib_method})")
    p.add_argument("--calib-percentile", type=float,
                   help=f"percentile of |x| kept by --calib-method percentile (default {d.calib_percentile})")
    p.add_argument("--calib-momentum", type=float,
                   help=f"momentum of --calib-method moving-max (default {d.calib_momentum})")
    p.add_argument("--quant-form", action="append", metavar="GLOB=FORM", dest="quant_form",
                   help="give the activation quantizers matching GLOB the form FORM: uniform, asymmetric, log2 "
                        "(FQ-ViT's, for attention probabilities), log2-narrow (log2 at 4 bits and below, uniform "
                        "above), log-sqrt2 and log-sqrt2-narrow (the same with RepQ-ViT's base sqrt(2), finer near "
                        "the top), per-head (a range per attention head and q/k/v part) or per-channel (LayerNorm "
                        "outputs, folded as RepQ-ViT does), e.g. '*.attn_drop=log2-narrow'; repeatable, first "
                        "match wins, before the YAML's quant-forms")
    _add_integer_arguments(p)
    p.add_argument("--calibration", metavar="FILE",
                   help="reuse a calibration file (python -m quantsearch.calibrate) instead of calibrating; "
                        "refused if it was made for other weights or data")
    p.add_argument("--eval-samples", type=int, help=f"images in the search split (default {d.eval_samples})")
    p.add_argument("--holdout-samples", type=int, help="images in the hold-out split (default: the rest)")
    p.add_argument("--validation-confidence", type=float,
                   help="one-sided confidence at which a front candidate must pass the validation split (default "
                   "0.8; paired with FP32 on the same images for max-accuracy-drop; 0.5: the point estimate)")
    p.add_argument("--validation-samples", type=int,
                   help="images of a validation split that every front candidate must also pass before it is "
                        "reported (default 0: none); taken before the hold-out split, which stays untouched")
    _add_refine_arguments(p, d)
    p.add_argument("--batch-size", type=int, help=f"batch size (default {d.batch_size})")
    p.add_argument("--seed", type=int, help=f"seed of splits and search (default {d.seed})")
    p.add_argument("--device", help="cpu, cuda or cuda:N (default cpu)")
    p.add_argument("--compile", action="store_const", const=True,
                   help="torch.compile the quantized model once (one graph serves every candidate; pays off on "
                        "long searches and large models)")
    p.add_argument("--channels-last", action="store_const", const=True, help="channels-last model and batches")
    p.add_argument("--amp", action="store_const", const=True,
                   help="autocast evaluations: float16 on CUDA, bfloat16 on CPU (see README)")
    p.add_argument("--loader-workers", type=int, help="data loader worker processes (default: one per core, up to 8, "
                                               "for image files; none for tensors)")
    p.add_argument("--workers", type=int, help="evaluate candidates on N Ray actors (default 0: serial, no Ray); "
                   "one GPU each where there are GPUs, else a share of the CPU threads")
    p.add_argument("--ray-address", help="join an existing Ray cluster (auto: the one this node belongs to) "
                   "instead of starting a local one")
    p.add_argument("--out", help="run directory (default runs/<timestamp>)")
    p.add_argument("--overwrite", action="store_const", const=True, help="replace a run already in --out")
    p.add_argument("--resume", metavar="DIR",
                   help="continue the run in DIR with its stored settings; finished evaluations are not redone")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    return p


def _add_integer_arguments(p: argparse.ArgumentParser) -> None:
    """Integer operators (quantize/integer)."""
    p.add_argument("--integer-ops", metavar="PRESET|GLOB=IMPL,...",
                   help="run nonlinear operators on integers: integer-only (I-ViT's Shiftmax, ShiftGELU, "
                        "I-LayerNorm and residual adds on 16-bit grids), fqvit (FQ-ViT's Log-Int-Softmax and PTF "
                        "LayerNorm, I-ViT's GELU and adds), or operator-name globs mapped to float, ivit or fqvit, "
                        "e.g. '*.softmax=fqvit,*=ivit' (default: float)")
    p.add_argument("--integer-add-bits", type=int,
                   help="width of the residual adds' grids with integer adds (default 16)")


def _add_refine_arguments(p: argparse.ArgumentParser, d: ExploreConfig) -> None:
    """The refined front's flags (run/refined.py)."""
    p.add_argument("--refine", metavar="METHOD",
                   help="a refined front: after the search, refine the cheapest candidates near the floor with "
                        "METHOD (brecq-lsq, qdrop, adaround, ...; see apply --refine), then validate and re-check "
                        "them like the front (default: none)")
    p.add_argument("--refine-budget", type=float, metavar="N",
                   help=f"full search-split evaluations the refined front may take (default {d.refine_budget:g})")
    p.add_argument("--refine-iterations", type=int, metavar="N",
                   help=f"learning iterations per layer or block of each refinement (default {d.refine_iterations})")
    p.add_argument("--refine-margin", type=float, metavar="X",
                   help=f"how far below the floor a candidate may be, in the metric's units (default "
                        f"{d.refine_margin:g}: 2 points of top-1)")


def parse_forms(items: list[str]) -> dict[str, str]:
    """``["GLOB=FORM", ...]`` from --quant-form, in order."""
    forms = {}
    for item in items:
        glob, sep, form = item.rpartition("=")
        if not sep or not glob:
            raise ConfigError(f"--quant-form takes GLOB=FORM (for example '*.attn_drop=log2'), got {item!r}")
        forms[glob] = form
    return forms


def config_from_args(args: argparse.Namespace) -> ExploreConfig:
    if args.resume:
        from ..run.pipeline import resume_config

        free = ("out", *PARALLEL_KEYS)  # how a run is parallelised does not change its results
        given = [k for k, v in vars(args).items() if k in ExploreConfig.keys() and v is not None and k not in free]
        given += ["quant-form"] if args.quant_form else []
        if given or args.config:
            raise ConfigError(f"--resume takes the run's stored settings; drop --{(given or ['config'])[0]}")
        return resume_config(args.resume).merged({k: getattr(args, k) for k in PARALLEL_KEYS}).validate()
    base = ExploreConfig()
    if args.config:
        base = ExploreConfig.from_mapping(load_yaml(args.config), source=args.config)
    flags = {k: v for k, v in vars(args).items() if k in ExploreConfig.keys()}
    if args.quant_form:
        given = parse_forms(args.quant_form)  # before the YAML's: the first glob that matches wins
        flags["quant_forms"] = given | {k: v for k, v in (base.quant_forms or {}).items() if k not in given}
    if args.min_accuracy is not None:  # a flag floor replaces a YAML floor of the other kind
        flags["max_accuracy_drop"] = base.max_accuracy_drop
    config = base.merged(flags).validate()
    config.out = str(config.resolved_out())  # fixed once, so messages and --resume name the same folder
    return config


def _print_notes(run, show, unit: str) -> None:
    """What the front table does not say: the integer operators, validation, hold-out confirmation."""
    bound = run.bound
    if (run.summary.get("integer_ops") or {}).get("operators"):
        from ..run.report import integer_line

        print(f"integer operators: {integer_line(run.summary['integer_ops'])}")
    validation = run.summary.get("validation")
    if validation:
        level = (f" at {100 * validation['confidence']:.0f} % one-sided confidence, {validation.get('test')}"
                 if validation.get("confidence") is not None else "")
        print(f"validation: {validation['checked']} front candidates measured on the validation split, "
              f"{validation['failed']} failed its {bound.kind} ({show(validation['bound']['limit'])}{unit}{level}) "
              "and were left off the front")
    holdout_bound = run.summary.get("holdout_bound")
    if holdout_bound and run.front:
        unconfirmed = sum(1 for e in run.front if run.confirmed.get(e.bits) is False)
        print(f"confirmed: the point meets the {bound.kind} on the hold-out split too "
              f"({show(holdout_bound['limit'])}{unit}: the bound moved by FP32's own shift between the splits); "
              f"{unconfirmed} of {len(run.front)} points are not confirmed: do not deploy them on the search "
              "split's word")


def print_report(run) -> None:
    """The run's tables: FP32 and the bound, the uniform baselines, the front, the search and the time."""
    from ..run.tables import format_table

    bound, fp32, fp32_costs = run.bound, run.fp32_accuracy, run.fp32_costs
    unit = " %" if bound.fraction else ""

    def show(value: float | None) -> str:
        return bound.show(value, unit=False)

    print(f"\nFP32 {bound.metric}: search {show(fp32['search'])}{unit}"
          + (f", hold-out {show(fp32['holdout'])}{unit}" if "holdout" in fp32 else "")
          + f"; {bound.kind} {show(bound.limit)}{unit} on the search split")
    every = list(fp32_costs)
    rows = []
    for name, costs in run.baseline_costs.items():
        accuracy = run.baselines[name].accuracy if name in run.baselines else fp32["search"]
        rows.append([name, show(accuracy),
                     *[cell for c in every for cell in (f"{costs[c]:g}", f"{costs[c] / fp32_costs[c]:.4f}")]])
    print("\nBaselines (search split; costs per sample, memory and size in bytes; x FP32 = relative to FP32)\n"
          + format_table(["config", f"{bound.metric}{unit}", *[h for c in every for h in (c, "x FP32")]], rows))
    genes = set(run.genes)
    gene_index = [i for i, n in enumerate(run.quantizer_names) if n in genes]
    def interval(e) -> str:
        ci = run.intervals.get(e.bits)
        return f"{show(ci[0])}-{show(ci[1])}" if ci else "-"

    def verdict(e) -> str:
        return {True: "yes", False: "NO", None: "-"}[run.confirmed.get(e.bits)]

    target = run.settings.get("target")
    if target:
        from ..deploy.targets.onnxruntime import FORMATS
    code = (lambda g: SHORT_FORMATS[FORMATS[g]]) if target else str
    rows = [[i, show(e.accuracy), show(run.holdout.get(e.bits)), interval(e), verdict(e),
             *[cell for c in run.cost_names for cell in (f"{e.costs[c]:g}", f"{e.costs[c] / fp32_costs[c]:.4f}")],
             " ".join(code(e.bits[j]) for j in gene_index)]
            for i, e in enumerate(run.front)]
    space = f"target {target}: formats {', '.join(f'{c}={f}' for f, c in SHORT_FORMATS.items())}" \
        if target else run.summary.get("search_space")
    print(f"\nPareto front ({len(run.front)} points, {run.num_evaluations} evaluations, cheapest "
          f"{run.cost_names[0]} first; {len(genes)} genes: {space})\n"
          + format_table(["#", f"search{unit}", f"hold-out{unit}", "95 % interval", "confirmed",
                          *[h for c in run.cost_names for h in (c, "x FP32")],
                          "format per layer" if target else "bits per searched quantizer"], rows))
    if run.summary.get("deployed"):
        from ..run.report import DEPLOYED_HEADER, deployed_rows

        print(f"\nDeployed in ONNX Runtime: exported, scored and timed in a default session, batch "
              f"{run.summary['deployed']['deploy_batch']} (latency predicted, by the table or timed whole, against measured)\n"
              + format_table(DEPLOYED_HEADER, deployed_rows(run, show)))
    _print_notes(run, show, unit)
    search = run.search
    if search:
        rejection = search.get("early_rejection") or {}
        saved = (f"; early rejection ({rejection.get('mode', 'floor')}): {rejection['rejected']} below the floor, "
                 f"{rejection.get('dominated', 0)} dominated, {100 * rejection['fraction_saved']:.1f} % of images "
                 "saved" if rejection else "")
        print(f"\nSearch: {search['algorithm']}, {search['budget_spent']:.1f} of {search['budget']:.1f} full "
              f"evaluations spent{saved}")
    per, fp32_time = run.timings.get("mean_evaluation"), run.timings.get("fp32_search_evaluation")
    speed = f"; {per:.3g} s per evaluation (FP32: {fp32_time:.3g} s)" if per and fp32_time else ""
    print(f"\nWrote {run.run_dir}/ (report.md, evaluations.csv, pareto.csv, pareto/*.json, *.png, run.json) "
          f"in {run.timings['total']:.0f} s{speed}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(levelname)s %(name)s: %(message)s")
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
        from ..run.pipeline import Interrupted, explore

        result = explore(config, progress=not args.no_progress, resume=bool(args.resume),
                         stop_requested=lambda: stop["requested"])
    except ValueError as exc:  # every error a user can fix (ConfigError, ModelError, DataError, StoreError, ...)
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (Interrupted, KeyboardInterrupt):
        where = f" {config.resolved_out()}" if config is not None and config.out else " DIR"
        print(f"interrupted: finished evaluations are kept; continue with --resume{where}", file=sys.stderr)
        return 130
    except (OSError, sqlite3.Error) as exc:  # a full disk, a vanished directory: what was committed is kept
        where = f" {config.resolved_out()}" if config is not None and config.out else " DIR"
        reason = getattr(exc, "strerror", None) or str(exc).splitlines()[0]
        print(f"error: the run stopped on an I/O error ({reason}); finished evaluations are kept: fix it and "
              f"continue with --resume{where}", file=sys.stderr)
        return 2
    finally:  # once stopping, a further Ctrl-C (say, during teardown) must not print a traceback
        signal.signal(signal.SIGINT, signal.SIG_IGN if stop["requested"] else previous)
    print_report(result)
    return 0


if __name__ == "__main__":
    run_command(main)
