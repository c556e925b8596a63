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

import torch

from . import __version__
from .bitconfig import BitConfig
from .config import ExploreConfig
from .costs import get_costs
from .data import data_loader, load_dataset, split_dataset
from .evaluation import Evaluator
from .models import DEMO_MODEL, create_model, model_preprocessing
from .plots import plot_bits_heatmap, plot_front
from .problem import Evaluation, LayerwiseQuantizationProblem
from .quantized_model import QuantizedActivationsModel
from .results import pareto_front
from .search import nsga2, run_search
from .store import RunStore

__all__ = ["RunResult", "explore", "resolve_predicate", "UNIFORM_BASELINES"]

log = logging.getLogger("quantsearch")
UNIFORM_BASELINES = (8, 6, 4)


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
    metric: str = "top1"  # what "accuracy" holds; a fraction shown as %, or not
    higher_is_better: bool = True
    fraction: bool = True


def resolve_predicate(predicate: str, model: torch.nn.Module) -> str:
    """``auto``: ``vit`` for models with (timm) attention modules, else ``conv2d``."""
    if predicate != "auto":
        return predicate
    return "vit" if any(hasattr(m, "fused_attn") for m in model.modules()) else "conv2d"


def _versions() -> dict[str, str]:
    import pymoo
    import pytorch_quantization
    import timm

    return {"quantsearch": __version__, "torch": torch.__version__, "timm": timm.__version__,
            "pymoo": pymoo.__version__, "pytorch_quantization": pytorch_quantization.__version__,
            "python": platform.python_version()}


def _device_name(device: str) -> str:
    if str(device).startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.device(device))
    return f"cpu ({torch.get_num_threads()} threads)"


def explore(config: ExploreConfig, progress: bool = True) -> RunResult:
    """Run one exploration as ``config`` says and write its outputs into ``config.out``."""
    config.validate()
    timings: dict[str, float] = {}
    clock = time.perf_counter()
    lo, hi = config.bit_range
    device = torch.device(config.device)
    torch.manual_seed(config.seed)
    run_dir = config.resolved_out()
    RunStore.check_free(run_dir, config.overwrite)

    # model and data
    pretrained = config.pretrained if config.pretrained is not None else config.checkpoint is None
    model = create_model(config.model, checkpoint=config.checkpoint, pretrained=pretrained,
                         checkpoint_key=config.checkpoint_key, **(config.model_kwargs or {}))
    preprocessing = model_preprocessing(model, config.preprocessing)
    model = model.to(device, memory_format=torch.channels_last) if config.channels_last else model.to(device)
    dataset = load_dataset(config.dataset, preprocessing, config.class_index, **(config.dataset_kwargs or {}))
    splits = split_dataset(dataset, config.calibration_samples, config.eval_samples, config.holdout_samples,
                           seed=config.seed)
    predicate = resolve_predicate(config.predicate, model)
    timings["load"] = time.perf_counter() - clock

    # quantized model and calibration
    t = time.perf_counter()
    qmodel = QuantizedActivationsModel(model, predicate, quantize_input=config.quantize_input).to(device)
    if len(qmodel) == 0:
        raise ValueError(f"predicate {predicate!r} selects no module of {config.model}")
    qmodel.calibrate(data_loader(splits.calibration, config.batch_size, device, config.workers), config.calib_batches)
    timings["calibration"] = time.perf_counter() - t
    log.info("%d quantizers (%s), calibrated on %d images", len(qmodel), predicate, len(splits.calibration))

    # evaluators and the floor
    t = time.perf_counter()
    # batches on the device; label-free metrics cache the FP32 (quantization off) outputs here, once
    options = dict(metric=config.metric, batch_size=config.batch_size, device=device, reference=qmodel,
                   channels_last=config.channels_last, amp=config.amp, workers=config.workers,
                   metric_kwargs=config.metric_kwargs)
    search_eval = Evaluator(splits.search, **options)
    holdout_eval = Evaluator(splits.holdout, **options) if len(splits.holdout) else None
    with qmodel.quantization_disabled():
        t_fp32 = time.perf_counter()
        fp32 = {"search": search_eval(qmodel)}
        timings["fp32_search_evaluation"] = time.perf_counter() - t_fp32  # the yardstick of seconds per evaluation
        if holdout_eval:
            fp32["holdout"] = holdout_eval(qmodel)
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
                                 "preprocessing_resolved": preprocessing.to_dict(), "pretrained_resolved": pretrained}
    store = RunStore.create(run_dir, settings, overwrite=config.overwrite)
    costs = get_costs(config.cost, qmodel)
    cost_names = [c.name for c in costs]
    problem = LayerwiseQuantizationProblem(qmodel, search_eval, min_accuracy, (lo, hi), costs)
    generation = {"now": 0}
    problem.listeners.append(lambda e: store.record(e, generation["now"]))

    t = time.perf_counter()
    baselines = {f"A{b}": problem.evaluate_bits([b] * len(qmodel))
                 for b in UNIFORM_BASELINES if lo <= b <= hi}
    timings["baselines"] = time.perf_counter() - t

    # search
    t = time.perf_counter()
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=config.generations, desc="NSGA-II", unit="gen", dynamic_ncols=True)
    generation["now"] = 1

    def on_generation(n_gen, _algorithm):
        generation["now"] = n_gen + 1
        store.write_evaluations_csv(qmodel.quantizer_names, min_accuracy, better)
        if bar is not None:
            front_now = pareto_front(problem.evaluations, min_accuracy, cost_names, better)
            bar.update(1)
            bar.set_postfix(evals=len(problem.evaluations), front=len(front_now),
                            cheapest=f"{front_now[0].costs[cost_names[0]]:g}" if front_now else "-")

    try:
        run_search(problem, nsga2(config.pop_size), config.generations, config.seed, on_generation)
    finally:
        if bar is not None:
            bar.close()
        store.write_evaluations_csv(qmodel.quantizer_names, min_accuracy, better)
    timings["search"] = time.perf_counter() - t
    timings["mean_evaluation"] = sum(e.seconds for e in problem.evaluations) / max(1, len(problem.evaluations))

    # front, hold-out confirmation, outputs
    t = time.perf_counter()
    front = pareto_front(problem.evaluations, min_accuracy, cost_names, better)
    holdout = {}
    if holdout_eval:
        for e in front:
            qmodel.bit_widths = e.bits
            holdout[e.bits] = holdout_eval(qmodel)
    timings["holdout"] = time.perf_counter() - t
    fp32_costs = {c.name: c.fp32 for c in costs}
    bitconfigs = _write_front(store, qmodel, config, predicate, splits, front, holdout, fp32_costs)
    timings["total"] = time.perf_counter() - clock

    result = RunResult(run_dir, qmodel.quantizer_names, cost_names, fp32, min_accuracy, baselines, front, holdout,
                       bitconfigs, timings, len(problem.evaluations), metric, better, search_eval.fraction)
    _write_summary(store, result, settings, splits, costs)
    store.write_json("splits.json", {"seed": config.seed, "dataset": config.dataset, "num_samples": len(dataset),
                                     **splits.indices()})
    plot_front(problem.evaluations, front, cost_names[0], baselines, fp32["search"], min_accuracy,
               path=run_dir / "pareto.png", metric=metric, percent=search_eval.fraction, higher_is_better=better)
    plot_bits_heatmap(front, qmodel.quantizer_names, cost_names[0], path=run_dir / "bits_heatmap.png",
                      metric=metric, percent=search_eval.fraction)
    store.close()
    return result


def _write_front(store, qmodel, config, predicate, splits, front, holdout, fp32_costs) -> list[Path]:
    model_info = {"name": config.model, "checkpoint": config.checkpoint, "predicate": predicate,
                  "quantize_input": config.quantize_input}
    dataset_info = {"name": config.dataset, "seed": config.seed, "calibration": len(splits.calibration),
                    "search": len(splits.search), "holdout": len(splits.holdout), "batch_size": config.batch_size,
                    "metric": config.metric}
    paths, rows = [], []
    for i, e in enumerate(front):
        qmodel.bit_widths = e.bits
        normalized = {k: v / fp32_costs[k] for k, v in e.costs.items()}
        config_ = BitConfig.from_model(qmodel, model_info, dataset=dataset_info,
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


def _write_summary(store, result: RunResult, settings, splits, costs) -> None:
    def point(e: Evaluation) -> dict:
        return {"accuracy": e.accuracy, "costs": dict(e.costs), "bits": list(e.bits)}

    store.write_json("run.json", {
        "settings": settings,
        "model_is_demo": settings["model"] == DEMO_MODEL,
        "splits": splits.describe(),
        "splits_sha256": splits.fingerprint(),
        "metric": {"name": result.metric, "higher_is_better": result.higher_is_better,
                   "bound": "floor" if result.higher_is_better else "ceiling"},
        "quantizers": result.quantizer_names,
        "fp32_accuracy": result.fp32,
        "fp32_costs": {c.name: c.fp32 for c in costs},
        "min_accuracy": result.min_accuracy,
        "baselines": {k: point(e) for k, e in result.baselines.items()},
        "front": [point(e) | {"accuracy_holdout": result.holdout.get(e.bits)} for e in result.front],
        "num_evaluations": result.num_evaluations,
        "versions": _versions(),
        "device": _device_name(settings.get("device", "cpu")),
        "timings_s": {k: round(v, 3) for k, v in result.timings.items()},
    })
