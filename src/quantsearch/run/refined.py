"""The refined front: the cheapest candidates near the floor, refined, then validated and re-checked like the front.

Refinement (:mod:`quantsearch.quantize.refine`) is too slow to run per candidate, but it moves a configuration by a
point or more at 3-4 bits, so the search's best candidates just below the floor are worth it. After the search,
the candidates are the evaluations whose search accuracy is at most ``refine-margin`` below the floor and that are
cheaper than the cheapest point that held on hold-out, minus those another candidate dominates. They are refined
one at a time, nearest the floor first, until ``refine-budget`` is spent. Like everything else it is charged in
full evaluations: a refinement and its measurements cost their seconds over one FP32 evaluation of the search
split. Each refined point is measured on the search split (which refinement never sees: it learns on the
calibration split), on the validation split with the front's own test, and on hold-out.

Each refined point's bit-config and weights are written the moment it is done (``refined/point_<key>.json`` and
``.pt``, keyed by its bits and the refinement's settings), so an interrupted run resumed reads them back instead of
refining again, and ``apply refined/point_<key>.json --check`` reproduces its accuracies exactly.
"""
from __future__ import annotations

import hashlib
import logging
import time
from typing import Callable

from ..deploy.bitconfig import BitConfig, refined_weights
from ..quantize.refine import refine
from ..search.front import pareto_front
from ..search.problem import Evaluation
from .session import Session
from .store import RunStore

__all__ = ["refine_front", "refine_candidates"]

log = logging.getLogger("quantsearch")


def refine_candidates(session: Session, evaluations: list[Evaluation], confirmed: list[Evaluation],
                      cost_names: list[str]) -> list[Evaluation]:
    """The evaluations worth refining, nearest the floor first (see the module docstring)."""
    bound, margin = session.bound, session.config.refine_margin
    cheapest = min((e.costs[cost_names[0]] for e in confirmed), default=float("inf"))
    near = [e for e in evaluations if e.status != "failed" and e.costs[cost_names[0]] < cheapest
            and bound.sign * (e.accuracy - bound.limit) >= -margin]
    shifted = bound.shifted(-bound.sign * margin)  # the front of the candidates, as if the floor were margin lower
    return sorted(pareto_front(near, shifted, cost_names), key=lambda e: -bound.sign * e.accuracy)


def _name(e: Evaluation, method: str, iterations: int) -> str:
    """A refined point's files, without suffix: keyed by its bits and the refinement's settings."""
    key = hashlib.sha256(f"{method}|{iterations}|{list(e.bits)}".encode()).hexdigest()[:12]
    return f"refined/point_{key}"


def refine_front(session: Session, store: RunStore, candidates: list[Evaluation], sections: dict,
                 fp32_costs: dict, validation_check: Callable | None, holdout_bound, progress=None) -> dict:
    """Refine ``candidates`` in order within the budget; returns the refined points and what they cost.

    ``sections`` are the bit-config sections of the run (:func:`~.outputs.bitconfig_sections`),
    ``validation_check`` the front's validation test (None without a validation split)."""
    config, qmodel = session.config, session.qmodel
    method, iterations = config.refine, config.refine_iterations
    one = session.fp32_seconds["search"]  # the yardstick: one full evaluation of the search split
    budget, spent, points = config.refine_budget, 0.0, []
    search = session.evaluator("search")
    rejection, search.early_rejection = search.early_rejection, None  # refined points: the whole split
    inputs = session.calibration_inputs()
    try:
        for e in (progress(candidates) if progress is not None else candidates):
            charge = points[-1]["charged"] if points else 0.0  # the last one's cost predicts the next's
            if spent + charge > budget:
                break
            point = _read_back(store, e, method, iterations, holdout_bound) or _refine_one(
                session, store, e, inputs, sections, fp32_costs, validation_check, holdout_bound)
            point["charged"] = point["seconds"] / one
            spent += point["charged"]
            points.append(point)
    finally:
        search.early_rejection = rejection
        qmodel.refined = {}
    front = pareto_front([Evaluation(tuple(p["bits"]), p["search"], p["costs"], p["seconds"]) for p in points
                          if p["validation_passed"] is not False], session.bound, list(fp32_costs))
    on_front = {f.bits for f in front}
    for p in points:
        p["on_front"] = tuple(p["bits"]) in on_front
    return {"method": method, "iterations": iterations, "budget": budget, "spent": spent,
            "candidates": len(candidates), "points": points}


def _refine_one(session: Session, store: RunStore, e: Evaluation, inputs, sections: dict, fp32_costs: dict,
                validation_check, holdout_bound) -> dict:
    """Refine one configuration, measure it, write its bit-config and weights; the model is left unrefined."""
    config, qmodel = session.config, session.qmodel
    start = time.perf_counter()
    qmodel.refined = {}
    qmodel.bit_widths = e.bits  # amax (and low ends) from calibration again: learned grids dropped
    changed = refine(qmodel, inputs, config.refine, iterations=config.refine_iterations)
    search = session.evaluator("search")(qmodel)
    validation, passed = validation_check(qmodel) if validation_check is not None else (None, None)
    holdout_eval = session.evaluator("holdout")
    holdout = holdout_eval(qmodel) if holdout_eval is not None else None
    seconds = time.perf_counter() - start
    name = _name(e, config.refine, config.refine_iterations)
    data, digest = refined_weights(changed)
    store.write_file(name + ".pt", data)  # first: a bit-config never names missing weights
    accuracy = {"search": search, "holdout": holdout, **({"validation": validation} if validation is not None else {})}
    refined = {"method": config.refine, "file": name.rsplit("/", 1)[1] + ".pt", "sha256": digest,
               "parameters": sorted(changed), "accuracy_before": {"search": e.accuracy},
               "options": {"iterations": config.refine_iterations}, "seconds": round(seconds, 3)}
    point = _point(e, name, search, validation, passed, holdout, holdout_bound, seconds)
    sure = {"confirmed": point["confirmed"], "validation_passed": passed,
            "holdout_limit": None if holdout_bound is None else holdout_bound.limit}
    bitconfig = BitConfig.from_model(qmodel, sections["model"], example=session.example, dataset=sections["dataset"],
                                     metric=sections["metric"], settings=sections["settings"], accuracy=accuracy,
                                     confidence=sure,
                                     costs=dict(e.costs),
                                     costs_normalized={k: v / fp32_costs[k] for k, v in e.costs.items()},
                                     refined=refined)
    store.write_file(name + ".json", bitconfig.to_json())
    qmodel.refined = {}
    qmodel.bit_widths = e.bits
    log.info("refined %s with %s: search %.4f -> %.4f, hold-out %s, %.1f s", name, config.refine, e.accuracy,
             search, "-" if holdout is None else f"{holdout:.4f}", seconds)
    return point


def _point(e: Evaluation, name: str, search: float, validation, passed, holdout, holdout_bound,
           seconds: float) -> dict:
    return {"bits": list(e.bits), "costs": dict(e.costs), "accuracy_before": e.accuracy, "search": search,
            "validation": validation, "validation_passed": passed, "holdout": holdout,
            "confirmed": None if holdout is None or holdout_bound is None else holdout_bound.holds(holdout),
            "seconds": seconds, "bitconfig": name + ".json"}


def _read_back(store: RunStore, e: Evaluation, method: str, iterations: int, holdout_bound) -> dict | None:
    """A refined point an interrupted run of these settings finished already (None if there is none)."""
    name = _name(e, method, iterations)
    path = store.run_dir / (name + ".json")
    if not path.is_file():
        return None
    config = BitConfig.load(path)
    accuracy = config.accuracy
    point = _point(e, name, accuracy["search"], accuracy.get("validation"),
                   config.confidence.get("validation_passed"), accuracy.get("holdout"), holdout_bound,
                   float(config.refined.get("seconds", 0.0)))
    return point | {"read_back": True}
