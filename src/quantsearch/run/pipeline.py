"""One exploration run, end to end: model -> quantized model -> problem -> search -> run store -> results.

:func:`explore` is the library call behind ``python -m quantsearch.explore``; it logs and shows progress but
prints no tables (the command line does that from the returned :class:`RunResult`).
"""
from __future__ import annotations

import logging
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from pymoo.core.problem import LoopedElementwiseEvaluation

from .. import __version__
from ..deploy.bitconfig import BitConfig
from ..search.budget import Budget, evaluation_cost, spent
from ..quantize.calib import Calibration, calibrate, data_fingerprint
from .settings import PARALLEL_KEYS, ExploreConfig
from ..search.costs import COSTS, get_costs, profile_model
from ..sources.data import data_loader, load_dataset, split_dataset
from ..search.evaluator import Evaluator, NumericalError
from ..fingerprints import fingerprint_model, fingerprint_tensors, fingerprint_values
from ..sources.models import DEMO_MODEL, create_model, model_preprocessing
from .plots import plot_bits_heatmap, plot_front, plot_sensitivity_table
from ..search.problem import Evaluation, LayerwiseQuantizationProblem
from ..quantize.quantized_model import INPUT_QUANTIZER, QuantizedActivationsModel
from .report import write_report
from ..search.front import pareto_front
from ..search.sampling import uniform_genomes
from ..search.algorithms import run_algorithm
from .store import RunStore, StoreError

__all__ = ["RunResult", "Interrupted", "explore", "resume_config", "resolve_predicate", "BASELINES",
           "search_genes", "calibrate_run", "calibrate_only", "evaluate_baselines"]

log = logging.getLogger("quantsearch")
# uniform (weight bits, activation bits) configurations, as in the ViT quantization literature's tables
BASELINES = {"W8A8": (8, 8), "W8A6": (8, 6), "W6A6": (6, 6), "W4A8": (4, 8), "W8A4": (8, 4), "W4A4": (4, 4)}


class Interrupted(Exception):
    """The user asked the run to stop (SIGINT); every finished evaluation is in the store."""


@dataclass
class RunResult:
    """What a run found: accuracies, the uniform baselines, the front (search and hold-out accuracy)."""

    run_dir: Path
    quantizer_names: list[str]
    cost_names: list[str]
    fp32: dict[str, float]
    min_accuracy: float
    baselines: dict[str, Evaluation]
    front: list[Evaluation]
    holdout: dict[tuple[int, ...], float]
    bitconfigs: list[Path]
    timings: dict[str, float] = field(default_factory=dict)
    num_evaluations: int = 0
    fp32_costs: dict[str, float] = field(default_factory=dict)  # every cost model's FP32 value
    baseline_costs: dict[str, dict[str, float]] = field(default_factory=dict)  # every cost, FP32 row included
    search_space: str = "activations"
    genes: list[str] = field(default_factory=list)
    reused_evaluations: int = 0
    metric: str = "top1"  # what "accuracy" holds; a fraction shown as %, or not
    higher_is_better: bool = True
    fraction: bool = True
    parallel: dict = field(default_factory=dict)  # Ray workers: evaluations per worker, replacements
    search: dict = field(default_factory=dict)  # algorithm, budget, early rejection (see _search_summary)


def resolve_predicate(predicate: str, model: torch.nn.Module) -> str:
    """``auto``: ``vit`` for models with (timm) attention modules, else ``conv2d``."""
    if predicate != "auto":
        return predicate
    return "vit" if any(hasattr(m, "fused_attn") for m in model.modules()) else "conv2d"


def search_genes(qmodel, search_space: str) -> list[str]:
    """The quantizers searched: activations, weights or both (each kind in the model's order)."""
    return {"activations": qmodel.activation_names, "weights": qmodel.weight_names,
            "both": qmodel.activation_names + qmodel.weight_names}[search_space]


def _versions() -> dict[str, str]:
    import pymoo
    import pytorch_quantization
    import timm

    return {"quantsearch": __version__, "torch": torch.__version__, "timm": timm.__version__,
            "pymoo": pymoo.__version__, "pytorch_quantization": pytorch_quantization.__version__,
            "python": platform.python_version()}


def evaluate_baselines(problem: LayerwiseQuantizationProblem) -> tuple[dict[str, Evaluation], np.ndarray]:
    """Evaluate the uniform baselines (:data:`BASELINES`) and every uniform configuration of the search space.

    Every algorithm starts from them, so that no front is worse than uniform quantization. Returns the baselines
    by name and the genomes of all those in the space (seeds for a population).
    """
    names, weights = problem.qmodel.quantizer_names, set(problem.qmodel.weight_names)
    baselines = {name: problem.evaluate_bits({n: (w if n in weights else a) for n in names})
                 for name, (w, a) in BASELINES.items()}
    uniform = problem.evaluate_genomes(uniform_genomes(problem))
    inside = [e for e in [*baselines.values(), *uniform] if problem.in_space(e.bits)]
    seeds = np.array(list(dict.fromkeys(problem.genome(e.bits) for e in inside)), dtype=int)
    return baselines, seeds.reshape(-1, problem.n_var)


def calibration_bits(config: ExploreConfig) -> tuple[int, int]:
    """The activation widths to calibrate: the search range, widened to the uniform baselines' A4..A8."""
    lo, hi = config.bit_range
    return min(lo, min(a for _, a in BASELINES.values())), max(hi, max(a for _, a in BASELINES.values()))


def check_predicate_selects(qmodel: QuantizedActivationsModel, predicate: str, model: str) -> None:
    """Refuse a predicate that places no activation quantizer (the model input's own does not count)."""
    if not [n for n in qmodel.activation_names if n != INPUT_QUANTIZER]:
        raise ValueError(f"predicate {predicate!r} selects no module of {model}")


def calibrate_run(config: ExploreConfig, qmodel: QuantizedActivationsModel, calibration_split) -> Calibration:
    """Calibrate ``qmodel`` as ``config`` says, or apply ``config.calibration`` after checking that it fits."""
    loader = data_loader(calibration_split, config.batch_size, config.device, config.loader_workers)
    if config.calibration:
        calibration = Calibration.load(config.calibration)
        calibration.check_fits(qmodel, data_fingerprint(loader, config.calib_batches), config.bit_range,
                               source=f"calibration file {config.calibration}")
        calibration.apply(qmodel)
        return calibration
    return calibrate(qmodel, loader, config.calib_batches, config.calib_method, bits=calibration_bits(config),
                     overrides=config.calib_overrides, percentile=config.calib_percentile,
                     momentum=config.calib_momentum)


def calibrate_only(config: ExploreConfig) -> tuple[Calibration, QuantizedActivationsModel]:
    """Build the run's model, data and quantizers and calibrate them, nothing more (``quantsearch.calibrate``)."""
    config.validate()
    torch.manual_seed(config.seed)
    model, dataset, _ = load_model_and_data(config)
    model = model.to(torch.device(config.device))
    splits = split_dataset(dataset, config.calibration_samples, config.eval_samples, config.holdout_samples,
                           seed=config.seed)
    predicate = resolve_predicate(config.predicate, model)
    qmodel = QuantizedActivationsModel(model, predicate, quantize_input=config.quantize_input,
                                       weight_quantizers=True).to(config.device)
    check_predicate_selects(qmodel, predicate, config.model)
    return calibrate_run(config, qmodel, splits.calibration), qmodel


def load_model_and_data(config: ExploreConfig):
    """The model (on the CPU), the dataset with the model's preprocessing, and whether weights are pretrained."""
    pretrained = config.pretrained if config.pretrained is not None else config.checkpoint is None
    model = create_model(config.model, checkpoint=config.checkpoint, pretrained=pretrained,
                         checkpoint_key=config.checkpoint_key, **(config.model_kwargs or {}))
    preprocessing = model_preprocessing(model, config.preprocessing)
    dataset = load_dataset(config.dataset, preprocessing, config.class_index, **(config.dataset_kwargs or {}))
    return model, dataset, (preprocessing, pretrained)


def evaluator_options(config: ExploreConfig, device, qmodel: QuantizedActivationsModel) -> dict:
    """How the run's evaluators are built (the driver's and every parallel worker's, so that they agree)."""
    return dict(metric=config.metric, batch_size=config.batch_size, device=device, reference=qmodel,
                channels_last=config.channels_last, amp=config.amp, workers=config.loader_workers,
                metric_kwargs=config.metric_kwargs)


def _device_name(device: str) -> str:
    if str(device).startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.device(device))
    return f"cpu ({torch.get_num_threads()} threads)"


def resume_config(run_dir: str | Path) -> ExploreConfig:
    """The configuration a run in ``run_dir`` was started with, read from its store."""
    store = RunStore.open(run_dir)
    settings = {k: v for k, v in store.settings.items() if k in ExploreConfig.keys()}
    store.close()
    return ExploreConfig(**settings | {"out": str(run_dir), "overwrite": False})


def explore(config: ExploreConfig, progress: bool = True, resume: bool = False,
            stop_requested=lambda: False) -> RunResult:
    """Run one exploration as ``config`` says and write its outputs into ``config.out``.

    ``resume=True`` continues the run already in ``config.out``: the search is replayed with the same seed and
    every configuration found in the store is read back, not evaluated again, so the front equals that of an
    uninterrupted run. ``stop_requested()`` is polled after each evaluation; when it turns true the run stops
    with :class:`Interrupted`, leaving a resumable store.
    """
    config.validate()
    timings: dict[str, float] = {}
    clock = time.perf_counter()
    a_range, w_range = config.bit_range, config.weight_bit_range
    device = torch.device(config.device)
    torch.manual_seed(config.seed)
    run_dir = config.resolved_out()
    if resume:
        store = RunStore.open(run_dir)
        stored = {k: v for k, v in store.settings.items()
                  if k in ExploreConfig.keys() and k not in ("overwrite", *PARALLEL_KEYS)}
        mine = {k: v for k, v in asdict(config).items() if k in stored}
        changed = [k for k in stored if stored[k] != mine.get(k)]
        if changed:
            store.close()
            raise StoreError(f"cannot resume {run_dir}: it was run with other settings ({changed[0]}: "
                             f"{stored[changed[0]]!r}, now {mine.get(changed[0])!r})")
    else:
        RunStore.check_free(run_dir, config.overwrite)

    # model and data
    model, dataset, (preprocessing, pretrained) = load_model_and_data(config)
    model = model.to(device, memory_format=torch.channels_last) if config.channels_last else model.to(device)
    splits = split_dataset(dataset, config.calibration_samples, config.eval_samples, config.holdout_samples,
                           seed=config.seed)
    predicate = resolve_predicate(config.predicate, model)
    timings["load"] = time.perf_counter() - clock

    # quantized model and calibration
    t = time.perf_counter()
    qmodel = QuantizedActivationsModel(model, predicate, quantize_input=config.quantize_input,
                                       weight_quantizers=True).to(device)
    check_predicate_selects(qmodel, predicate, config.model)
    genes = search_genes(qmodel, config.search_space)
    if not genes:
        raise ValueError(f"search-space {config.search_space}: {config.model} has no Conv/Linear weight to search")
    calibration = calibrate_run(config, qmodel, splits.calibration)
    timings["calibration"] = time.perf_counter() - t
    log.info("%d activation and %d weight quantizers (%s), calibrated on %d images (%s); %d genes (%s)",
             len(qmodel.activation_names), len(qmodel.weight_names), predicate, len(splits.calibration),
             config.calibration or config.calib_method, len(genes), config.search_space)

    # evaluators and the floor
    t = time.perf_counter()
    # batches on the device; label-free metrics cache the FP32 (quantization off) outputs here, once
    options = evaluator_options(config, device, qmodel)
    try:
        search_eval = Evaluator(splits.search, compile=config.compile, **options)
        holdout_eval = Evaluator(splits.holdout, **options) if len(splits.holdout) else None
        with qmodel.quantization_disabled():
            t_fp32 = time.perf_counter()
            fp32 = {"search": search_eval(qmodel)}
            timings["fp32_search_evaluation"] = time.perf_counter() - t_fp32  # the yardstick of one evaluation
            if holdout_eval:
                fp32["holdout"] = holdout_eval(qmodel)
    except NumericalError as exc:  # nothing to compare candidates with: a bad input, not a failed candidate
        raise ValueError(f"the FP32 model (quantization off) {exc}") from None
    metric, better = search_eval.name, search_eval.higher_is_better
    # the bound: a floor for higher-is-better metrics, a ceiling (FP32 + drop) for KL and other lower-is-better ones
    drop = float(config.max_accuracy_drop)
    min_accuracy = (float(config.min_accuracy) if config.min_accuracy is not None
                    else fp32["search"] - drop if better else fp32["search"] + drop)
    if (min_accuracy > fp32["search"]) if better else (min_accuracy < fp32["search"]):
        raise ValueError(f"min-accuracy {min_accuracy:.4f} is {'above' if better else 'below'} the FP32 {metric} "
                         f"on the search split ({fp32['search']:.4f}): no configuration can reach it")
    log.info("FP32 %s: search %.4f%s; %s %.4f", metric, fp32["search"],
             f", hold-out {fp32['holdout']:.4f}" if holdout_eval else "", "floor" if better else "ceiling",
             min_accuracy)
    timings["fp32"] = time.perf_counter() - t

    # store, problem, baselines
    settings = asdict(config) | {"out": str(run_dir), "predicate_resolved": predicate,
                                 "calibration_methods": sorted(set(calibration.methods.values())),
                                 "preprocessing_resolved": preprocessing.to_dict(), "pretrained_resolved": pretrained}
    fingerprint = {"model": fingerprint_model(model), "calibration": fingerprint_values(calibration.to_dict()),
                   "search": fingerprint_tensors(t for batch in search_eval.batches for t in batch)}
    if resume:
        stored_fingerprint = store.get("fingerprint")
        if stored_fingerprint != fingerprint:
            store.close()
            raise StoreError(f"cannot resume {run_dir}: its model, calibration or data differ from this run's "
                             f"(fingerprint {stored_fingerprint} != {fingerprint})")
    else:
        store = RunStore.create(run_dir, settings, overwrite=config.overwrite)
        store.put("fingerprint", fingerprint)
        store.write_json("calibration.json", calibration.to_dict())
    known = store.cache()
    t = time.perf_counter()
    profile = profile_model(qmodel, splits.calibration[0][0].unsqueeze(0).to(device))
    costs = get_costs(config.cost, qmodel, profile=profile)
    every_cost = get_costs(list(COSTS), qmodel, profile=profile)
    timings["profile"] = time.perf_counter() - t
    cost_names = [c.name for c in costs]
    weights = set(qmodel.weight_names)
    kind_range = {n: (w_range if n in weights else a_range) for n in qmodel.quantizer_names}
    problem = LayerwiseQuantizationProblem(qmodel, search_eval, min_accuracy, {g: kind_range[g] for g in genes},
                                           costs, cache=known, genes=genes,
                                           fixed_bits={n: r[1] for n, r in kind_range.items()})
    generation = {"now": 0}

    def record(evaluation: Evaluation) -> None:
        store.record(evaluation, generation["now"])
        if evaluation.status == "failed":
            log.warning("candidate %d failed: %s", len(problem.evaluations), evaluation.message)
        if stop_requested():
            raise Interrupted(f"stopped after {len(problem.evaluations)} new evaluations")

    problem.listeners.append(record)

    def searched():  # baselines outside the search space (W4A8 in an activations search) stay off the front
        return [e for e in problem.evaluations if problem.in_space(e.bits)]

    def stored_evaluations():  # this run's and any resumed ones, in the order they were first recorded
        return [e for e, _ in store.evaluations()]

    pool, parallel = None, {}
    bar = None
    try:
        if config.workers:  # before the baselines: every batch of genomes of the run goes to the pool
            from .parallel import RayEvaluationPool

            t = time.perf_counter()
            pool = RayEvaluationPool(asdict(config), calibration.to_dict(), config.workers, config.ray_address)
            timings["workers_start"] = time.perf_counter() - t  # Ray and every actor's model, once
            problem.elementwise_runner = pool

        t = time.perf_counter()
        baselines, seeds = evaluate_baselines(problem)
        fp32_costs = {c.name: c.fp32 for c in every_cost}
        baseline_costs = {"FP32": dict(fp32_costs)} | {
            name: {c.name: float(c(dict(zip(qmodel.quantizer_names, e.bits)))) for c in every_cost}
            for name, e in baselines.items()}
        timings["baselines"] = time.perf_counter() - t

        # search
        t = time.perf_counter()
        if config.early_reject:  # after the baselines: their table reports full-split accuracies
            search_eval.reject_below(min_accuracy)
            if pool is not None:
                pool.reject_below(min_accuracy)
        budget = Budget(problem, config.budget if config.budget is not None
                        else spent(problem) + config.pop_size * (config.generations + 1))
        if progress:
            from tqdm.auto import tqdm

            name = "NSGA-III" if config.algorithm == "nsga2" and problem.n_obj > 2 else config.algorithm
            bar = tqdm(total=round(budget.limit, 1), initial=round(budget.spent, 1), desc=name, unit="eval",
                       dynamic_ncols=True, bar_format="{l_bar}{bar}| {n:.0f}/{total:.0f} evaluations "
                                                      "[{elapsed}<{remaining}{postfix}]")
        generation["now"] = 1

        def on_generation(n_gen):
            generation["now"] = n_gen + 1
            store.write_evaluations_csv(qmodel.quantizer_names, min_accuracy, better)
            if bar is not None:
                front_now = pareto_front(searched(), min_accuracy, cost_names, better)
                bar.update(min(budget.spent, bar.total) - bar.n)  # in full-evaluation equivalents of the budget
                bar.set_postfix(evals=len(problem.evaluations), front=len(front_now),
                                cheapest=f"{front_now[0].costs[cost_names[0]]:g}" if front_now else "-",
                                **({"per_worker": pool.progress()} if pool is not None else {}))
            if pool is not None:
                log.debug("generation %d: evaluations per worker %s", n_gen, pool.progress())

        outcome = run_algorithm(config.algorithm, problem, budget, config.pop_size, config.generations,
                                config.seed, seeds, on_generation, sensitivity=config.sensitivity)
    finally:
        if pool is not None:
            parallel = {"workers": len(pool.done), "evaluations_per_worker": list(pool.done),
                        "workers_replaced": pool.replaced}
            problem.elementwise_runner = LoopedElementwiseEvaluation()
            pool.close()
        if bar is not None:
            bar.close()
        store.write_evaluations_csv(qmodel.quantizer_names, min_accuracy, better)

    search_summary = _search_summary(config, problem, budget, outcome, search_eval)
    if outcome.sensitivity is not None:
        store.put("sensitivity", outcome.sensitivity.to_dict())
        store.write_csv("sensitivity.csv", outcome.sensitivity.ROW_HEADER, outcome.sensitivity.rows())
        plot_sensitivity_table(outcome.sensitivity, path=run_dir / "sensitivity.png")
    timings["search"] = time.perf_counter() - t
    timings["mean_evaluation"] = sum(e.seconds for e in problem.evaluations) / max(1, len(problem.evaluations))

    # front, hold-out confirmation, outputs
    t = time.perf_counter()
    evaluations = stored_evaluations()
    front = pareto_front([e for e in evaluations if problem.in_space(e.bits)], min_accuracy, cost_names, better)
    holdout = {}
    if holdout_eval:
        for e in front:
            qmodel.bit_widths = e.bits
            holdout[e.bits] = holdout_eval(qmodel)
    timings["holdout"] = time.perf_counter() - t
    bitconfigs = _write_front(store, qmodel, config, predicate, splits, front, holdout, fp32_costs)
    timings["total"] = time.perf_counter() - clock

    result = RunResult(run_dir, qmodel.quantizer_names, cost_names, fp32, min_accuracy, baselines, front, holdout,
                       bitconfigs, timings, len(evaluations), fp32_costs, baseline_costs,
                       config.search_space, list(genes), len(known), metric, better, search_eval.fraction,
                       parallel, search_summary)
    _write_summary(store, result, settings, splits)
    store.write_json("splits.json", {"seed": config.seed, "dataset": config.dataset, "num_samples": len(dataset),
                                     **splits.indices()})
    plot_front(evaluations, front, cost_names[0], baselines, fp32["search"], min_accuracy,
               path=run_dir / "pareto.png", metric=metric, percent=search_eval.fraction, higher_is_better=better)
    plot_bits_heatmap(front, qmodel.quantizer_names, cost_names[0], path=run_dir / "bits_heatmap.png",
                      metric=metric, percent=search_eval.fraction)
    write_report(store)  # convergence.csv/.png, holdout.png, report.md
    store.close()
    return result


def _write_front(store, qmodel, config, predicate, splits, front, holdout, fp32_costs) -> list[Path]:
    model_info = {"name": config.model, "checkpoint": config.checkpoint, "predicate": predicate,
                  "quantize_input": config.quantize_input, "weight_quantizers": bool(qmodel.weight_names)}
    dataset_info = {"name": config.dataset, "seed": config.seed, "calibration": len(splits.calibration),
                    "search": len(splits.search), "holdout": len(splits.holdout), "batch_size": config.batch_size,
                    "metric": config.metric}
    paths, rows = [], []
    example = splits.search[0][0].unsqueeze(0)  # one input: records tensor shapes for the check on apply
    for i, e in enumerate(front):
        qmodel.bit_widths = e.bits
        normalized = {k: v / fp32_costs[k] for k, v in e.costs.items()}
        config_ = BitConfig.from_model(qmodel, model_info, example=example, dataset=dataset_info,
                                       accuracy={"search": e.accuracy, "holdout": holdout.get(e.bits)},
                                       costs=dict(e.costs), costs_normalized=normalized)
        name = f"pareto/point_{i:03d}.json"
        paths.append(store.write_file(name, config_.to_json()))
        rows.append([i, f"{e.accuracy:.6f}", "" if e.bits not in holdout else f"{holdout[e.bits]:.6f}",
                     *[f"{v:g}" for v in e.costs.values()], *[f"{v:.4f}" for v in normalized.values()],
                     name, *e.bits])
    cost_names = list(front[0].costs) if front else []
    header = ["point", "accuracy_search", "accuracy_holdout", *cost_names, *[f"{c}_vs_fp32" for c in cost_names],
              "bitconfig", *qmodel.quantizer_names]
    store.write_csv("pareto.csv", header, rows)
    return paths


def _search_summary(config, problem, budget, outcome, search_eval) -> dict:
    """What the search did: algorithm and its details, budget spent, and what early rejection saved (new
    evaluations of this process; a resumed run counts its own)."""
    total = search_eval.num_samples
    rejected = [e for e in problem.evaluations if e.status == "rejected"]
    images = sum(evaluation_cost(e, total) for e in problem.evaluations) * total
    summary = {"algorithm": config.algorithm, "budget": budget.limit, "budget_spent": budget.spent,
               "details": {k: v for k, v in outcome.details.items()}}
    if config.early_reject:
        full = len(problem.evaluations) * total
        summary["early_rejection"] = {
            "confidence": search_eval.early_rejection.confidence, "rejected": len(rejected),
            "evaluations": len(problem.evaluations), "images_run": int(round(images)),
            "images_saved": int(round(full - images)), "fraction_saved": (full - images) / full if full else 0.0,
            "bound": "exact hypergeometric p-value at doubling slices, union bound over the checks"}
    return summary


def _write_summary(store, result: RunResult, settings, splits) -> None:
    def point(e: Evaluation) -> dict:
        return {"accuracy": e.accuracy, "costs": dict(e.costs), "bits": list(e.bits)}

    def baseline(name: str) -> dict:
        costs = result.baseline_costs[name]
        e = result.baselines.get(name)
        return {"accuracy": e.accuracy if e else result.fp32["search"], "bits": list(e.bits) if e else None,
                "costs": costs, "costs_vs_fp32": {c: v / result.fp32_costs[c] for c, v in costs.items()}}

    store.write_json("run.json", {
        "settings": settings,
        "model_is_demo": settings["model"] == DEMO_MODEL,
        "splits": splits.describe(),
        "splits_sha256": splits.fingerprint(),
        "metric": {"name": result.metric, "higher_is_better": result.higher_is_better,
                   "bound": "floor" if result.higher_is_better else "ceiling"},
        "quantizers": result.quantizer_names,
        "search_space": result.search_space,
        "genes": result.genes,
        "fp32_accuracy": result.fp32,
        "fp32_costs": result.fp32_costs,
        "min_accuracy": result.min_accuracy,
        "baselines": {name: baseline(name) for name in result.baseline_costs},
        "front": [point(e) | {"accuracy_holdout": result.holdout.get(e.bits)} for e in result.front],
        "search": result.search,
        "num_evaluations": result.num_evaluations,
        "reused_evaluations": result.reused_evaluations,
        "new_evaluations": result.num_evaluations - result.reused_evaluations,
        "versions": _versions(),
        "device": _device_name(settings.get("device", "cpu")),
        "timings_s": {k: round(v, 3) for k, v in result.timings.items()},
        "parallel": result.parallel,
    })
