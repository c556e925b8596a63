"""Outputs: everything a finished run writes besides its store, in one place (each file atomically).

``pareto.csv`` and one bit-config per Pareto point (with every setting that rebuilding needs), ``run.json``,
``splits.json``, the figures, and the report. Only :func:`write_outputs` is called by the exploration stages.
"""
from __future__ import annotations

import platform
from dataclasses import asdict
from pathlib import Path

import torch

from .. import __version__
from ..deploy.bitconfig import BitConfig
from ..search.bound import Bound
from ..search.confidence import CONFIDENCE, wilson_interval
from ..search.problem import Evaluation
from ..sources.models import DEMO_MODEL
from .plots import plot_bits_heatmap, plot_front
from .report import write_report
from .session import Session
from .store import RunStore

__all__ = ["write_outputs", "bitconfig_sections", "REBUILD_EXCLUDED"]

# settings that never change what a bit-config's model, images or metric are
REBUILD_EXCLUDED = ("out", "overwrite", "workers", "ray_address", "calibration", "loader_workers")


def bitconfig_sections(session: Session, bound: Bound) -> dict:
    """The sections of a bit-config that say how to rebuild its model, data and metric (see ``apply``)."""
    config, splits = session.config, session.splits
    fingerprints = session.fingerprints
    model = {"name": config.model, "checkpoint": config.checkpoint, "checkpoint_sha256": fingerprints["checkpoint"],
             "checkpoint_key": config.checkpoint_key, "pretrained": session.pretrained,
             "kwargs": config.model_kwargs, "weights_sha256": fingerprints["model"], "predicate": session.predicate,
             "quantize_input": config.quantize_input,
             "weight_quantizers": bool(getattr(session.qmodel, "weight_names", None))}
    dataset = {"name": config.dataset, "kwargs": config.dataset_kwargs, "class_index": config.class_index,
               "preprocessing": session.preprocessing.to_dict(), "seed": config.seed,
               "calibration": len(splits.calibration), "search": len(splits.search),
               "holdout": len(splits.holdout), "batch_size": config.batch_size,
               "fingerprints": {k: fingerprints[k] for k in ("search", "holdout")}}
    metric = bound.to_dict() | {"kwargs": config.metric_kwargs}
    settings = {k: v for k, v in asdict(config).items() if k not in REBUILD_EXCLUDED}
    return {"model": model, "dataset": dataset, "metric": metric, "settings": settings}


def confidence(session: Session, found: dict, e: Evaluation) -> dict:
    """The Wilson intervals of a point's search and hold-out accuracy (fraction metrics; None otherwise) and
    whether it met the bound on the hold-out split."""
    def interval(split: str, value: float | None):
        evaluate = session.evaluator(split)
        if value is None or evaluate is None or not found["bound"].fraction:
            return None
        return [round(v, 6) for v in wilson_interval(value, evaluate.num_samples)]

    holdout, limit = found["holdout"].get(e.bits), found.get("holdout_bound")
    return {"level": CONFIDENCE, "search": interval("search", e.accuracy), "holdout": interval("holdout", holdout),
            "confirmed": found["confirmed"].get(e.bits), "holdout_limit": None if limit is None else limit.limit}


def _point_config(session: Session, found: dict, sections: dict, index: int, e: Evaluation, **recorded):
    """The re-appliable file of one front point: a bit-config, or a target run's format config (with the
    runtime's own hold-out metric and its predicted and measured latency)."""
    qmodel = session.qmodel
    qmodel.bit_widths = e.bits
    common = dict(dataset=sections["dataset"], metric=sections["metric"], settings=sections["settings"], **recorded)
    if not session.config.target:
        return BitConfig.from_model(qmodel, sections["model"], example=session.example, **common)
    from ..deploy.targets.formatconfig import FormatConfig

    row = found["deployed"]["rows"][f"point {index}"]
    common["accuracy"] = dict(common["accuracy"]) | {"search_onnxruntime": row["search"],
                                                     "holdout_onnxruntime": row["holdout"]}
    target = {"name": session.config.target, "deploy_batch": session.config.deploy_batch,
              "threads": session.config.threads, "machine": found["deployed"]["machine"]}
    latency = {"predicted_ms": row["predicted_ms"], "measured_ms": row["measured_ms"],
               "fp32_measured_ms": found["deployed"]["rows"]["FP32"]["measured_ms"]}
    model = sections["model"] | {"input_shape": [int(d) for d in session.example.shape[1:]]}
    return FormatConfig.from_model(qmodel, target, model, latency=latency, **common)


def _write_front(store: RunStore, session: Session, found: dict) -> list[Path]:
    """One bit-config (a target run: format config) per Pareto point, and ``pareto.csv``."""
    qmodel, bound, holdout, fp32_costs = session.qmodel, found["bound"], found["holdout"], found["fp32_costs"]
    validated = found.get("validation") or {}
    deployed = found.get("deployed")
    sections = bitconfig_sections(session, bound)
    integer_only = [] if deployed else [int(_integer_only(session))]
    paths, rows = [], []
    for i, e in enumerate(found["front"]):
        normalized = {k: v / fp32_costs[k] for k, v in e.costs.items()}
        sure = confidence(session, found, e)
        config = _point_config(session, found, sections, i, e, confidence=sure,
                               accuracy={"search": e.accuracy, "holdout": holdout.get(e.bits),
                                         **({"validation": validated[e.bits]} if validated else {})},
                               costs=dict(e.costs), costs_normalized=normalized)
        name = f"pareto/point_{i:03d}.json"
        paths.append(store.write_file(name, config.to_json()))
        low, high = sure["holdout"] or ("", "")
        row = deployed["rows"][f"point {i}"] if deployed else None
        rows.append([i, f"{e.accuracy:.6f}", "" if e.bits not in holdout else f"{holdout[e.bits]:.6f}",
                     low, high, "" if sure["confirmed"] is None else int(sure["confirmed"]),
                     *([f"{validated[e.bits]:.6f}"] if validated else []),
                     *([_csv(row["holdout"]), f"{row['measured_ms']:.4f}"] if row else []),
                     *integer_only,
                     *[f"{v:g}" for v in e.costs.values()], *[f"{v:.4f}" for v in normalized.values()],
                     name, *(config.layers.values() if deployed else e.bits)])
    cost_names = found["cost_names"]
    header = ["point", "accuracy_search", "accuracy_holdout", "holdout_ci_low", "holdout_ci_high", "confirmed",
              *(["accuracy_validation"] if validated else []),
              *(["accuracy_holdout_onnxruntime", "latency_measured_ms"] if deployed else ["integer_only"]),
              *cost_names, *[f"{c}_vs_fp32" for c in cost_names], "bitconfig", *qmodel.quantizer_names]
    store.write_csv("pareto.csv", header, rows)
    return paths


def _csv(value: float | None) -> str:
    return "" if value is None else f"{value:.6f}"


def _versions() -> dict[str, str]:
    import pymoo
    import pytorch_quantization
    import timm

    return {"quantsearch": __version__, "torch": torch.__version__, "timm": timm.__version__,
            "pymoo": pymoo.__version__, "pytorch_quantization": pytorch_quantization.__version__,
            "python": platform.python_version()}


def _device_name(device: torch.device) -> str:
    if device.type == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_name(device)
    return f"cpu ({torch.get_num_threads()} threads)"


def _summary(session: Session, found: dict) -> dict:
    """``run.json``: settings, splits, the bound, baselines, front, search, versions, device and timings."""
    config, bound, fp32_costs = session.config, found["bound"], found["fp32_costs"]

    integer_only = _integer_only(session)

    def point(e: Evaluation) -> dict:
        sure = confidence(session, found, e)
        return {"accuracy": e.accuracy, "costs": dict(e.costs), "bits": list(e.bits), "integer_only": integer_only,
                "accuracy_holdout": found["holdout"].get(e.bits), "ci_search": sure["search"],
                "ci_holdout": sure["holdout"], "confirmed": sure["confirmed"],
                "accuracy_validation": found["validation"].get(e.bits)}

    def baseline(name: str) -> dict:
        costs = found["baseline_costs"][name]
        e = found["baselines"].get(name)
        return {"accuracy": e.accuracy if e else found["fp32"]["search"], "bits": list(e.bits) if e else None,
                "costs": costs, "costs_vs_fp32": {c: v / fp32_costs[c] for c, v in costs.items()}}

    evaluations = found["num_evaluations"]
    return {
        "settings": session.resolved_settings, "model_is_demo": config.model == DEMO_MODEL,
        "splits": session.splits.describe(), "splits_sha256": session.splits.fingerprint(),
        "metric": {"name": bound.metric, "higher_is_better": bound.higher_is_better, "bound": bound.kind},
        "bound": bound.to_dict(),
        "holdout_bound": None if found.get("holdout_bound") is None else found["holdout_bound"].to_dict(),
        "confidence": CONFIDENCE,
        "validation": None if found.get("validation_bound") is None else {
            "bound": found["validation_bound"].to_dict(), "checked": len(found["validation"]),
            "failed": len(found.get("validation_failed", ())),
            "confidence": config.validation_confidence,
            "test": "paired with FP32 on the same images" if config.min_accuracy is None else "Wilson lower bound"},
        "quantizers": session.qmodel.quantizer_names, "search_space": config.search_space, "genes": session.genes,
        "fp32_accuracy": found["fp32"], "fp32_costs": fp32_costs,
        "baselines": {name: baseline(name) for name in found["baseline_costs"]},
        "front": [point(e) for e in found["front"]],
        "search": found["search"], "num_evaluations": evaluations, "reused_evaluations": found["reused"],
        "new_evaluations": evaluations - found["reused"],
        "versions": _versions(), "device": _device_name(session.device),
        "timings_s": {k: round(v, 3) for k, v in found["timings"].items()}, "parallel": found["parallel"],
        **({"deployed": found["deployed"]} if found.get("deployed") else {}),
        **({"refined_front": found["refined"]} if found.get("refined") else {}),
        **({"integer_ops": _integer_summary(session)} if not config.target else {}),
    }


def _integer_only(session: Session) -> bool | None:
    """Whether the run's quantized model computes in integers alone (its choice of operators is per run)."""
    return None if session.config.target else session.qmodel.integer_only


def _integer_summary(session: Session) -> dict:
    """The integer operators of the run, and the nonlinear operators left in float."""
    from ..quantize.integer import float_operators

    qmodel = session.qmodel
    return {"operators": {n: i for n, i in qmodel.integer_ops.items() if i != "float"},
            "add_bits": session.config.integer_add_bits,
            "float_operators": float_operators(qmodel.model, qmodel.integer_ops),
            "weights_quantized": len(qmodel.weight_names) > 0, "integer_only": qmodel.integer_only}


def write_outputs(store: RunStore, session: Session, found: dict) -> None:
    """Write every output of a finished run from what it ``found`` (see ``pipeline.explore``)."""
    run_dir, bound = store.run_dir, found["bound"]
    evaluations = [e for e, _ in store.evaluations()]
    _write_front(store, session, found)
    store.write_json("run.json", _summary(session, found))
    dataset = session.splits.search.dataset
    store.write_json("splits.json", {"seed": session.config.seed, "dataset": session.config.dataset,
                                     "num_samples": len(dataset), **session.splits.indices()})
    cost = found["cost_names"][0]
    deployed = found.get("deployed")
    measured = {label.replace("point ", "#"): (row["measured_ms"], row["search"])
                for label, row in deployed["rows"].items()} if deployed and cost == "latency" else None
    plot_front(evaluations, found["front"], cost, found["baselines"], found["fp32"]["search"], bound,
               path=run_dir / "pareto.png", measured=measured)
    if not session.config.target:  # a target's genes are formats, listed by name in the report
        plot_bits_heatmap(found["front"], session.qmodel.quantizer_names, cost, path=run_dir / "bits_heatmap.png",
                          metric=bound.metric, percent=bound.fraction)
    write_report(store)  # convergence.csv/.png, holdout.png, report.md
