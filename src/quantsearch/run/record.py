"""The run record: one type for what a run found, returned by ``explore`` and read back by :func:`load_run`.

The record is a view of the run directory (``run.json`` and the run store), so a finished run and a run read back
later are the same thing; the report, the command line and the notebook all read it.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from ..quantize.calib import Calibration
from ..search.bound import Bound
from ..search.problem import Evaluation
from .convergence import Convergence, convergence
from .session import Session, build_session
from .settings import ExploreConfig
from .lock import live_owner
from .store import RunStore, StoreError

__all__ = ["RunRecord", "load_run", "read_record"]

log = logging.getLogger("quantsearch")


@dataclass
class RunRecord:
    """What a finished run holds, read back from its directory."""

    run_dir: Path
    settings: dict
    quantizer_names: list[str]
    cost_names: list[str]
    fp32_accuracy: dict[str, float]
    fp32_costs: dict[str, float]
    bound: Bound
    baselines: dict[str, Evaluation]
    front: list[Evaluation]  # cheapest first, as in pareto.csv
    holdout: dict[tuple[int, ...], float | None]
    bitconfigs: list[Path]  # pareto/point_NNN.json, in front order
    confirmed: dict[tuple[int, ...], bool | None]  # met the bound on the hold-out split (None: no hold-out)
    intervals: dict[tuple[int, ...], list[float] | None]  # 95 % interval of the hold-out accuracy
    evaluations: list[tuple[Evaluation, int]]  # every evaluation and the generation it was made in
    summary: dict = field(default_factory=dict)  # run.json as written
    running: bool = False  # a live process still owns the run (see quantsearch.run.lock)

    @property
    def all_evaluations(self) -> list[Evaluation]:
        return [e for e, _ in self.evaluations]

    @property
    def baseline_costs(self) -> dict[str, dict[str, float]]:
        """Every cost of FP32 and of each uniform baseline."""
        return {name: b["costs"] for name, b in self.summary.get("baselines", {}).items()}

    @property
    def timings(self) -> dict[str, float]:
        return self.summary.get("timings_s", {})

    @property
    def search(self) -> dict:
        return self.summary.get("search", {})

    @property
    def genes(self) -> list[str]:
        return self.summary.get("genes", [])

    @property
    def num_evaluations(self) -> int:
        return int(self.summary.get("num_evaluations", len(self.evaluations)))

    def convergence(self) -> Convergence:
        return convergence(self.evaluations, self.bound, self.fp32_costs, self.cost_names)

    def session(self) -> Session:
        """The run's session, rebuilt from its settings with the calibration it used (``calibration.json``), so
        every width gets the range the search judged it with. A target run's int8-static ranges are ONNX
        Runtime's MinMax over the same calibration split, computed again (the same ranges: MinMax is exact)."""
        settings = {k: v for k, v in self.settings.items() if k in ExploreConfig.keys()}
        config = ExploreConfig(**settings | {"out": None, "calibration": None, "workers": 0, "ray_address": None})
        calibration = None if config.target else Calibration.load(self.run_dir / "calibration.json")
        return build_session(config, calibration=calibration)

    def point(self, index: int) -> tuple[Evaluation, Path]:
        """The ``index``-th Pareto point and its bit-config file."""
        return self.front[index], self.bitconfigs[index]

    def cheapest_meeting(self, limit: float | None = None, cost: str | None = None,
                         split: str = "holdout") -> int | None:
        """Index of the cheapest Pareto point whose ``split`` metric meets ``limit`` in the bound's direction
        (default: the run's own bound); hold-out by default, the estimate the search never saw. None if none."""
        cost = cost or self.cost_names[0]
        bound = self.bound if limit is None else Bound(float(limit), self.bound.higher_is_better,
                                                       self.bound.metric, self.bound.fraction)

        def value(e: Evaluation) -> float | None:
            return e.accuracy if split == "search" else self.holdout.get(e.bits)

        ok = [i for i, e in enumerate(self.front) if value(e) is not None and bound.holds(value(e))]
        return min(ok, key=lambda i: (self.front[i].costs[cost], -bound.sign * value(self.front[i]))) if ok else None


def read_record(store: RunStore) -> RunRecord:
    """The record of the run in ``store`` (its ``run.json`` must exist)."""
    summary = json.loads((store.run_dir / "run.json").read_text())
    evaluations = store.evaluations()
    known = {e.bits: e for e, _ in evaluations}

    def evaluation(point: dict) -> Evaluation:
        bits = tuple(point["bits"])
        return known.get(bits) or Evaluation(bits, point["accuracy"], point["costs"], 0.0)

    front = [evaluation(p) for p in summary["front"]]
    return RunRecord(
        run_dir=store.run_dir,
        settings=summary["settings"],
        quantizer_names=summary["quantizers"],
        cost_names=[c.strip() for c in summary["settings"]["cost"].split(",") if c.strip()],
        fp32_accuracy=summary["fp32_accuracy"],
        fp32_costs=summary["fp32_costs"],
        bound=Bound.from_dict(summary["bound"]),
        baselines={k: evaluation(p) for k, p in summary["baselines"].items() if p.get("bits") is not None},
        front=front,
        holdout={e.bits: p.get("accuracy_holdout") for e, p in zip(front, summary["front"])},
        bitconfigs=[store.run_dir / "pareto" / f"point_{i:03d}.json" for i in range(len(front))],
        confirmed={e.bits: p.get("confirmed") for e, p in zip(front, summary["front"])},
        intervals={e.bits: p.get("ci_holdout") for e, p in zip(front, summary["front"])},
        evaluations=evaluations,
        summary=summary,
    )


def load_run(run_dir: str | Path) -> RunRecord:
    """Read a finished run directory (``run.json`` and ``run.sqlite``)."""
    owner = live_owner(run_dir)
    store = RunStore.open(run_dir)
    try:
        if not (store.run_dir / "run.json").is_file():
            if owner is not None:
                raise StoreError(f"{run_dir} is still running (pid {owner.get('pid')} on {owner.get('host')}): its "
                                 "results are written when it finishes; evaluations.csv holds those so far")
            raise StoreError(f"{run_dir} holds no run.json: the run did not finish (--resume it)")
        record = read_record(store)
    finally:
        store.close()
    if owner is not None:
        log.warning("%s is still running (pid %s): this is the record of its last finished pass", run_dir,
                    owner.get("pid"))
    record.running = owner is not None
    return record
