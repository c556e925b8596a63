"""One exploration run as named stages: session -> store -> problem -> baselines -> search -> front -> outputs.

:func:`explore` is the library call behind ``python -m quantsearch.explore``. It logs and shows progress but prints
no tables: it returns the :class:`~quantsearch.run.record.RunRecord` that the command line prints.
"""
from __future__ import annotations

import logging
import time
from contextlib import ExitStack, contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import numpy as np
from pymoo.core.problem import LoopedElementwiseEvaluation

from ..fingerprints import fingerprint_values
from ..search.algorithms import run_algorithm
from ..search.bound import Bound
from ..search.budget import Budget, evaluation_cost
from ..search.stopping import FrontStop
from ..search.confidence import one_sided_z, paired_drop, wilson_interval
from ..search.costs import COSTS, TARGET_COSTS
from ..search.front import pareto_front
from ..search.problem import Evaluation, LayerwiseQuantizationProblem
from ..search.sampling import uniform_genomes
from .allocator import keep_freed_memory
from .outputs import bitconfig_sections, write_outputs
from .plots import plot_sensitivity_table
from .record import RunRecord, read_record
from .refined import refine_candidates, refine_front
from .session import BASELINES, Session, build_session
from .settings import PARALLEL_KEYS, ExploreConfig
from .lock import RunLock
from .store import STORE_NAME, RunStore, StoreError

__all__ = ["Interrupted", "explore", "resume_config", "evaluate_baselines"]

log = logging.getLogger("quantsearch")
LATENCY_TABLE = "latency_table.json"  # a target run's latency table, kept in its directory


class Interrupted(Exception):
    """The user asked the run to stop (SIGINT); every finished evaluation is in the store."""


class _Clock:
    """Wall time per stage, for ``run.json``."""

    def __init__(self):
        self.start, self.timings = time.perf_counter(), {}

    @contextmanager
    def __call__(self, stage: str):
        t = time.perf_counter()
        try:
            yield
        finally:
            self.timings[stage] = self.timings.get(stage, 0.0) + time.perf_counter() - t


def resume_config(run_dir: str | Path) -> ExploreConfig:
    """The configuration a run in ``run_dir`` was started with, read from its store."""
    store = RunStore.open(run_dir)
    settings = {k: v for k, v in store.settings.items() if k in ExploreConfig.keys()}
    store.close()
    settings.setdefault("patience", 0)  # a run from before the convergence stop spent its whole budget
    return ExploreConfig(**settings | {"out": str(run_dir), "overwrite": False})


def _baseline_bits(problem: LayerwiseQuantizationProblem) -> dict[str, dict[str, int]]:
    names, weights = problem.qmodel.quantizer_names, set(problem.qmodel.weight_names)
    return {name: {n: (w if n in weights else a) for n in names} for name, (w, a) in BASELINES.items()}


def baseline_cost(problem: LayerwiseQuantizationProblem, named: dict | None = None) -> int:
    """Full evaluations the uniform baselines (``named``, default :data:`BASELINES`) and uniform configurations
    take (each distinct one once)."""
    named = _baseline_bits(problem) if named is None else named
    keys = {problem.configuration(bits) for bits in named.values()}
    return len(keys | {problem.configuration(g) for g in uniform_genomes(problem)})


def evaluate_baselines(problem: LayerwiseQuantizationProblem, named: dict | None = None,
                       then: Callable[[], None] | None = None) -> tuple[dict[str, Evaluation], np.ndarray]:
    """Evaluate the uniform baselines (``named``: ``{name: {quantizer: bits}}``, default :data:`BASELINES`) and
    every uniform configuration of the search space.

    Every algorithm starts from them, so that no front is worse than uniform quantization. ``then`` runs between
    the two: the baselines' table reports whole-split accuracies, while the other uniform configurations are
    search candidates like any other, which early rejection may stop (2-bit activations are far below any floor).
    Returns the baselines by name and the genomes of all those in the space (seeds for a population).
    """
    named = _baseline_bits(problem) if named is None else named
    baselines = {name: problem.evaluate_bits(bits) for name, bits in named.items()}
    if then is not None:
        then()
    uniform = problem.evaluate_genomes(uniform_genomes(problem))
    inside = [e for e in [*baselines.values(), *uniform] if problem.in_space(e.bits)]
    seeds = np.array(list(dict.fromkeys(problem.genome(e.bits) for e in inside)), dtype=int)
    return baselines, seeds.reshape(-1, problem.n_var)


# -- stages -----------------------------------------------------------------------------------------------------
def _check_resumable(config: ExploreConfig, run_dir: Path) -> None:
    """Refuse to resume a run that was started with other settings (how it is parallelised aside)."""
    store = RunStore.open(run_dir)
    try:
        stored = {k: v for k, v in store.settings.items()
                  if k in ExploreConfig.keys() and k not in ("out", "overwrite", *PARALLEL_KEYS)}
        mine = {k: v for k, v in asdict(config).items() if k in stored}
        changed = [k for k in stored if stored[k] != mine.get(k)]
        if changed:
            raise StoreError(f"cannot resume {run_dir}: it was run with other settings ({changed[0]}: "
                             f"{stored[changed[0]]!r}, now {mine.get(changed[0])!r})")
    finally:
        store.close()


def _open_store(session: Session, run_dir: Path, resume: bool) -> RunStore:
    """The run store: a new one, or the resumed run's after checking that model, calibration and data agree."""
    config = session.config
    fingerprints = session.fingerprints
    fingerprint = {"model": fingerprints["model"], "calibration": fingerprint_values(session.calibration.to_dict()),
                   "search": fingerprints["search"]}
    if resume:
        store = RunStore.open(run_dir)
        stored = store.get("fingerprint")
        if stored != fingerprint:
            store.close()
            changed = next((k for k in fingerprint if (stored or {}).get(k) != fingerprint[k]), "model")
            raise StoreError(f"cannot resume {run_dir}: its model, calibration or data differ from this run's "
                             f"({changed} fingerprint {str((stored or {}).get(changed))[:12]}, now "
                             f"{str(fingerprint[changed])[:12]})")
        return store
    settings = session.resolved_settings | {"out": str(run_dir)}
    store = RunStore.create(run_dir, settings, overwrite=config.overwrite)
    store.put("fingerprint", fingerprint)
    store.write_json("calibration.json", session.calibration.to_dict())
    if config.target:  # a resumed run costs its new evaluations with this same table
        store.write_json(LATENCY_TABLE, session.latency_table.to_dict())
    return store


def _build_problem(session: Session, store: RunStore) -> LayerwiseQuantizationProblem:
    ranges = session.bit_ranges
    return LayerwiseQuantizationProblem(session.qmodel, session.evaluator("search"), session.bound,
                                        {g: ranges[g] for g in session.genes},
                                        session.costs(session.config.cost_names),
                                        cache=store.cache(), genes=session.genes,
                                        fixed_bits={n: r[1] for n, r in ranges.items()})


def _progress_bar(config: ExploreConfig, problem, budget: Budget):
    from tqdm.auto import tqdm

    name = "NSGA-III" if config.algorithm == "nsga2" and problem.n_obj > 2 else config.algorithm
    return tqdm(total=round(budget.limit, 1), initial=round(budget.spent, 1), desc=name, unit="eval",
                dynamic_ncols=True, bar_format="{l_bar}{bar}| {n:.0f}/{total:.0f} evaluations "
                                               "[{elapsed}<{remaining}, {rate_fmt}{postfix}]")


def _phase(items, desc: str, progress: bool, total: int | None = None):
    """``items``, with a progress bar (rate and time left) when ``progress``."""
    if not progress:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, total=total, dynamic_ncols=True, leave=False)


def _reject_early(session: Session, problem, pool) -> None:
    """Early rejection (and with ``front``, racing) on for the search split and the Ray pool, as configured."""
    mode, limit = session.config.early_reject_mode, session.bound.limit
    if mode != "off":
        session.evaluator("search").reject_below(limit)
        problem.racing = mode == "front"
        if pool is not None:
            pool.reject_below(limit)


def _search(session: Session, problem, store: RunStore, clock: _Clock, progress: bool, stop_requested) -> dict:
    """Baselines, then the algorithm on the budget; every evaluation goes to the store as it completes."""
    config, bound = session.config, session.bound
    cost_names = [c.name for c in problem.costs]
    generation = {"now": 0}

    def record(evaluation: Evaluation) -> None:
        store.record(evaluation, generation["now"])
        if evaluation.status == "failed":
            log.warning("candidate %d failed: %s", len(problem.evaluations), evaluation.message)
        if stop_requested():
            raise Interrupted(f"stopped after {len(problem.evaluations)} new evaluations")

    problem.listeners.append(record)
    needed = baseline_cost(problem, session.baselines)
    if config.budget is not None and config.budget < needed:
        raise ValueError(f"budget {config.budget:g} is below the {needed} full evaluations that the uniform "
                         f"baselines take before any search: give --budget {needed} or more")
    # the default budget: the baselines, then pop-size x (generations + 1) evaluations of the search
    budget = Budget(problem, config.budget if config.budget is not None
                    else needed + config.pop_size * (config.generations + 1))
    pool, bar, found = None, None, {"parallel": {}}
    cache, stack = _unit_cache(session), ExitStack()
    try:
        if config.workers:  # before the baselines: every batch of genomes of the run goes to the pool
            from .parallel import RayEvaluationPool

            with clock("workers_start"):  # Ray and every actor's session, once
                pool = RayEvaluationPool(asdict(config), session.calibration.to_dict(), config.workers,
                                         config.ray_address)
            problem.elementwise_runner = pool
        if progress:  # one bar over the whole budget, moved by every configuration as it is measured
            bar = _progress_bar(config, problem, budget)
            problem.visitors.append(lambda _e: bar.update(min(budget.spent, bar.total) - bar.n))
        if cache is not None:
            stack.enter_context(cache.active())
        with clock("baselines"):  # early rejection on after the named baselines (their table: whole-split values)
            found["baselines"], seeds = evaluate_baselines(problem, session.baselines,
                                                           then=lambda: _reject_early(session, problem, pool))
        with clock("search"):
            generation["now"] = 1

            def on_generation(n_gen):
                generation["now"] = n_gen + 1
                store.write_evaluations_csv(problem.qmodel.quantizer_names, bound)
                if bar is not None:
                    now = pareto_front([e for e in problem.evaluations if problem.in_space(e.bits)], bound,
                                       cost_names)
                    bar.update(min(budget.spent, bar.total) - bar.n)  # charged work (gradients) too
                    bar.set_postfix(evals=len(problem.evaluations), front=len(now),
                                    cheapest=f"{now[0].costs[cost_names[0]]:g}" if now else "-",
                                    **({"per_worker": pool.progress()} if pool is not None else {}))

            stop = FrontStop(problem, config.patience, config.min_gain) if config.patience else None
            outcome = run_algorithm(config.algorithm, problem, budget, config.pop_size, config.generations,
                                    config.seed, seeds, on_generation, sensitivity=config.sensitivity, stop=stop)
    finally:
        stack.close()  # the block cache off and emptied: validation and hold-out run the model as it is
        if pool is not None:
            found["parallel"] = {"workers": len(pool.done), "evaluations_per_worker": list(pool.done),
                                 "workers_replaced": pool.replaced}
            problem.elementwise_runner = LoopedElementwiseEvaluation()
            pool.close()
        if bar is not None:
            bar.close()
        store.write_evaluations_csv(problem.qmodel.quantizer_names, bound)
    if outcome.sensitivity is not None:
        store.put("sensitivity", outcome.sensitivity.to_dict())
        store.write_csv("sensitivity.csv", outcome.sensitivity.ROW_HEADER, outcome.sensitivity.rows())
        plot_sensitivity_table(outcome.sensitivity, path=store.run_dir / "sensitivity.png")
    found["search"] = _search_summary(config, session, problem, budget, outcome)
    if cache is not None:
        found["search"]["block_cache"] = cache.stats()
    return found


def _unit_cache(session: Session):
    """The block-output cache over the search (:mod:`quantsearch.search.unit_cache`), or None where it cannot
    serve: turned off, a deployment target (the runtime computes), ``--compile`` (traced graphs), Ray workers (each
    holds its own model)."""
    config = session.config
    if not config.block_cache_mb or config.target or config.compile or config.workers:
        return None
    from ..search.unit_cache import UnitOutputCache

    return UnitOutputCache(session.qmodel, session.example, config.block_cache_mb << 20)


def _search_summary(config, session: Session, problem, budget, outcome) -> dict:
    """What the search did: algorithm and its details, budget spent, and what early rejection saved (new
    evaluations of this process; a resumed run counts its own)."""
    search_eval = session.evaluator("search")
    total = search_eval.num_samples
    rejected = [e for e in problem.evaluations if e.status == "rejected"]
    dominated = [e for e in problem.evaluations if e.status == "dominated"]
    images = sum(evaluation_cost(e, total) for e in problem.evaluations) * total
    summary = {"algorithm": config.algorithm, "budget": budget.limit, "budget_spent": budget.spent,
               "details": dict(outcome.details)}
    if config.early_reject_mode != "off":
        full = len(problem.evaluations) * total
        summary["early_rejection"] = {
            "mode": config.early_reject_mode, "confidence": search_eval.early_rejection.confidence,
            "rejected": len(rejected), "dominated": len(dominated),
            "evaluations": len(problem.evaluations), "images_run": int(round(images)),
            "images_saved": int(round(full - images)), "fraction_saved": (full - images) / full if full else 0.0,
            "bound": "exact hypergeometric p-value at doubling slices, union bound over the checks"}
    return summary


def split_bound(session: Session, split: str) -> Bound | None:
    """The bound a point must meet on ``split`` (validation or holdout): a bound relative to FP32
    (``max-accuracy-drop``) moves with FP32's own shift from the search split, an absolute ``min-accuracy`` stays.
    None when the split is empty."""
    if session.evaluator(split) is None:
        return None
    relative = session.config.min_accuracy is None
    return session.bound.shifted(session.fp32(split) - session.fp32("search") if relative else 0.0)


def _validated_front(session: Session, problem, evaluations: list[Evaluation],
                     progress: bool) -> tuple[list, dict, set]:
    """The front of ``evaluations`` whose every point also passes the validation split (:func:`_validation_check`);
    returns it, each checked point's validation metric and the points that failed.

    A point that fails is dropped and the front recomputed without it, so a point it hid can take its place;
    each configuration is measured on the validation split once. Without a validation split: the plain front."""
    cost_names = [c.name for c in problem.costs]
    evaluate = session.evaluator("validation")
    check = _validation_check(session) if evaluate is not None else None
    validation, failed = {}, set()
    while True:
        front = pareto_front([e for e in evaluations if e.bits not in failed], session.bound, cost_names)
        new = [e for e in front if e.bits not in validation] if evaluate is not None else []
        if not new:
            return front, validation, failed
        for e in _phase(new, "validation check", progress):
            session.qmodel.bit_widths = e.bits
            validation[e.bits], passed = check(session.qmodel)
            if not passed:
                failed.add(e.bits)


def _validation_check(session: Session):
    """``qmodel -> (metric, passed)`` on the validation split, at ``validation-confidence`` (one-sided).

    A drop bound (``max-accuracy-drop``) with a metric that counts hits is tested paired, on the same images as
    FP32: the upper confidence bound of the drop must be within the allowed drop. An absolute ``min-accuracy``:
    the lower Wilson bound must reach it. Other metrics: the value must meet the bound."""
    config, evaluate, bound = session.config, session.evaluator("validation"), split_bound(session, "validation")
    z = one_sided_z(config.validation_confidence)
    reference = None
    if config.min_accuracy is None and evaluate.fraction:
        with session.qmodel.quantization_disabled():
            reference = evaluate.sample_hits(session.qmodel)

    def check(qmodel) -> tuple[float, bool]:
        if reference is not None:
            hits = evaluate.sample_hits(qmodel)
            _, upper = paired_drop(reference, hits, config.validation_confidence)
            return float(hits.float().mean()), upper <= float(config.max_accuracy_drop) + 1e-12
        value = evaluate(qmodel)
        if config.min_accuracy is not None and evaluate.fraction and bound.higher_is_better:
            return value, wilson_interval(value, evaluate.num_samples, z)[0] >= bound.limit
        return value, bound.holds(value)

    return check


def _confirm_front(session: Session, problem, store: RunStore, progress: bool = False) -> dict:
    """The front of every stored evaluation, validated (with a validation split), then each point re-measured on
    the hold-out split and confirmed (or not) there against :func:`split_bound`."""
    evaluations = [e for e, _ in store.evaluations() if problem.in_space(e.bits)]
    front, validation, failed = _validated_front(session, problem, evaluations, progress)
    holdout_eval, bound = session.evaluator("holdout"), split_bound(session, "holdout")
    holdout, confirmed = {}, {}
    if holdout_eval is not None:
        for e in _phase(front, "hold-out check", progress):
            session.qmodel.bit_widths = e.bits
            holdout[e.bits] = holdout_eval(session.qmodel)
            confirmed[e.bits] = bound.holds(holdout[e.bits])
    return {"front": front, "holdout": holdout, "confirmed": confirmed, "holdout_bound": bound,
            "validation": validation, "validation_failed": failed,
            "validation_bound": split_bound(session, "validation")}


def _refined_front(session: Session, problem, store: RunStore, found: dict, progress: bool) -> dict:
    """The refined front (:mod:`.refined`): candidates near the floor and cheaper than the cheapest point that
    held on hold-out (the front's cheapest without a hold-out split), refined within the budget."""
    cost_names = [c.name for c in problem.costs]
    evaluations = [e for e, _ in store.evaluations() if problem.in_space(e.bits)]
    held = [e for e in found["front"] if found["confirmed"].get(e.bits, not found["confirmed"])]
    candidates = refine_candidates(session, evaluations, held, cost_names)
    check = _validation_check(session) if session.evaluator("validation") is not None else None
    log.info("refined front: %d candidates within %g of the floor and cheaper than the cheapest point that held",
             len(candidates), session.config.refine_margin)
    return refine_front(session, store, candidates, bitconfig_sections(session, found["bound"]),
                        {c: found["fp32_costs"][c] for c in cost_names}, check, found["holdout_bound"],
                        progress=lambda items: _phase(items, "refined front", progress))


def explore(config: ExploreConfig, progress: bool = True, resume: bool = False,
            stop_requested=lambda: False) -> RunRecord:
    """Run one exploration as ``config`` says and write its outputs into ``config.out``.

    ``resume=True`` continues the run already in ``config.out``: the search is replayed with the same seed and
    every configuration found in the store is read back, not evaluated again, so the front equals that of an
    uninterrupted run. ``stop_requested()`` is polled after each evaluation; when it turns true the run stops
    with :class:`Interrupted`, leaving a resumable store. The process keeps freed activation buffers mapped
    (see :mod:`~quantsearch.run.allocator`).
    """
    config.validate()
    keep_freed_memory()
    run_dir = config.resolved_out()
    _check_directory(config, run_dir, resume)  # before anything is loaded: a mistyped --out costs a second
    return _run(config, run_dir, progress, resume, stop_requested)


def _check_directory(config: ExploreConfig, run_dir: Path, resume: bool) -> None:
    """A directory to resume holds a run made with these settings; a new run's directory holds none."""
    if resume:
        if not (run_dir / STORE_NAME).is_file():
            raise StoreError(f"{run_dir} holds no run store ({STORE_NAME}) to resume")
        _check_resumable(config, run_dir)
    else:
        RunStore.check_free(run_dir, config.overwrite)


def _run(config: ExploreConfig, run_dir: Path, progress: bool, resume: bool, stop_requested) -> RunRecord:
    """The stages of :func:`explore`; the run directory is owned from the store's creation (or reopening) on."""
    clock = _Clock()
    with clock("load"):
        session = build_session(config, calibrate=False)
    with clock("calibration"):
        session.calibrate(progress=lambda batches: _phase(batches, "calibration", progress, config.calib_batches))
    if not session.genes:
        raise ValueError(f"search-space {config.search_space}: {config.model} has no Conv/Linear weight to search")
    if config.target:
        log.info("target %s: %d Linear/Conv layers, each a gene over its formats; int8-static calibrated on %d "
                 "images; deployment batch %d", config.target, len(session.genes), len(session.splits.calibration),
                 config.deploy_batch)
    else:
        log.info("%d activation and %d weight quantizers (%s), calibrated on %d images (%s); %d genes (%s)",
                 len(session.qmodel.activation_names), len(session.qmodel.weight_names), session.predicate,
                 len(session.splits.calibration), config.calibration or config.calib_method, len(session.genes),
                 config.search_space)
    with clock("fp32"):
        fp32 = {split: session.fp32(split) for split in ("search", "validation", "holdout")
                if session.evaluator(split) is not None}
        bound = session.bound
    clock.timings["fp32_search_evaluation"] = session.fp32_seconds["search"]  # the yardstick of one evaluation
    log.info("FP32 %s: search %s%s; %s", bound.metric, bound.show(fp32["search"]),
             f", hold-out {bound.show(fp32['holdout'])}" if "holdout" in fp32 else "", bound)
    if config.target:
        own = run_dir / LATENCY_TABLE
        if resume and own.is_file():  # the table the stored evaluations were costed with
            session.use_latency_table(own)
        with clock("latency_table"):  # measured (or a file checked against this machine) before anything is written
            session.latency_table
    lock = RunLock.acquire(run_dir)  # the run's one owner until it ends, however it ends
    try:
        _check_directory(config, run_dir, resume)  # again, as the owner: nobody else got in meanwhile
        store = _open_store(session, run_dir, resume)
    except BaseException:
        lock.release()
        raise
    try:
        with clock("profile"):
            problem = _build_problem(session, store)
            every_cost = session.costs(list(TARGET_COSTS if config.target else COSTS))
        reused = len(problem.cache)
        found = _search(session, problem, store, clock, progress, stop_requested)
        clock.timings["mean_evaluation"] = (sum(e.seconds for e in problem.evaluations)
                                            / max(1, len(problem.evaluations)))
        with clock("holdout"):
            found |= _confirm_front(session, problem, store, progress)
        if config.target:
            from .target import deploy_front

            with clock("deploy"):
                found["deployed"] = deploy_front(session, found["front"], found["baselines"],
                                                 lambda items, desc: _phase(items, desc, progress))
        names = session.qmodel.quantizer_names
        found["fp32_costs"] = {c.name: c.fp32 for c in every_cost}
        found["baseline_costs"] = {"FP32": dict(found["fp32_costs"])} | {
            name: {c.name: float(c(dict(zip(names, e.bits)))) for c in every_cost}
            for name, e in found["baselines"].items()}
        found |= {"bound": bound, "fp32": fp32, "cost_names": [c.name for c in problem.costs],
                  "num_evaluations": len(store.evaluations()), "reused": reused}
        if config.refine:
            with clock("refine"):
                found["refined"] = _refined_front(session, problem, store, found, progress)
        clock.timings["total"] = time.perf_counter() - clock.start
        found["timings"] = clock.timings
        write_outputs(store, session, found)
        return read_record(store)
    finally:
        store.close()
        lock.release()
