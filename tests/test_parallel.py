"""Ray evaluation: 2 CPU actors give exactly the serial run, and a killed actor is replaced without losing work."""
import csv
import json
import threading
import time

import pytest

ray = pytest.importorskip("ray")

from quantsearch.sources.data import split_dataset  # noqa: E402
from quantsearch.search.evaluator import AccuracyEvaluator  # noqa: E402
from quantsearch.cli.explore import main  # noqa: E402
from quantsearch.sources.models import create_demo_vit  # noqa: E402
from quantsearch.run.parallel import RayEvaluationPool  # noqa: E402
from quantsearch.search.problem import LayerwiseQuantizationProblem  # noqa: E402
from quantsearch.quantize.quantized_model import QuantizedActivationsModel  # noqa: E402
from quantsearch.search.algorithms import nsga2, run_search  # noqa: E402

SMALL = ["--eval-samples", "300", "--holdout-samples", "100", "--calib-batches", "1", "--batch-size", "100",
         "--bits", "3:8", "--pop-size", "6", "--generations", "3", "--no-progress"]


def _rows(path):
    """evaluations.csv without its timing column (seconds differ from run to run, nothing else may)."""
    with open(path, newline="") as fh:
        rows = list(csv.reader(fh))
    drop = rows[0].index("seconds")
    return [[c for i, c in enumerate(row) if i != drop] for row in rows]


def test_two_ray_workers_give_exactly_the_serial_run(tmp_path):
    assert main([*SMALL, "--out", str(tmp_path / "serial")]) == 0
    assert main([*SMALL, "--workers", "2", "--out", str(tmp_path / "ray")]) == 0
    serial, parallel = tmp_path / "serial", tmp_path / "ray"
    assert _rows(serial / "evaluations.csv") == _rows(parallel / "evaluations.csv")
    assert (serial / "pareto.csv").read_text() == (parallel / "pareto.csv").read_text()
    run = json.loads((parallel / "run.json").read_text())
    assert run["parallel"]["workers"] == 2 and run["parallel"]["workers_replaced"] == 0
    # every searched configuration (all but the 6 uniform baselines the driver measures) went to a worker
    assert sum(run["parallel"]["evaluations_per_worker"]) == run["num_evaluations"] - 6
    assert min(run["parallel"]["evaluations_per_worker"]) > 0  # both workers took candidates
    assert json.loads((serial / "run.json").read_text())["front"] == run["front"]


def test_a_killed_worker_is_replaced_and_the_result_is_unchanged(fashion_splits):
    splits = fashion_splits
    model = create_demo_vit()
    qmodel = QuantizedActivationsModel(model, "vit", weight_quantizers=True)
    calibration = qmodel_calibration(qmodel, splits)
    settings = {"eval_samples": 300, "holdout_samples": 100, "calib_batches": 1, "batch_size": 100,
                "calib_method": "max"}

    def problem():
        evaluate = AccuracyEvaluator(splits.search, 100)
        return LayerwiseQuantizationProblem(qmodel, evaluate, 0.5, (3, 8), genes=qmodel.activation_names,
                                            fixed_bits=8)

    serial = problem()
    run_search(serial, nsga2(6), 3, seed=1)

    parallel = problem()
    pool = RayEvaluationPool(settings, calibration, workers=2)
    try:
        parallel.elementwise_runner = pool
        killer = threading.Thread(target=_kill_first_worker_after, args=(pool, 4), daemon=True)
        killer.start()
        run_search(parallel, nsga2(6), 3, seed=1)
        killer.join(timeout=1)
        assert pool.replaced >= 1
    finally:
        pool.close()
    assert [(e.bits, e.accuracy, e.status) for e in parallel.evaluations] == \
        [(e.bits, e.accuracy, e.status) for e in serial.evaluations]


def _kill_first_worker_after(pool, evaluations: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while sum(pool.done) < evaluations and time.monotonic() < deadline:
        time.sleep(0.01)
    ray.kill(pool.actors[0], no_restart=True)


def qmodel_calibration(qmodel, splits):
    """The calibration the workers build from settings: max over the first 100 calibration images."""
    from torch.utils.data import DataLoader

    from quantsearch.quantize.calib import calibrate

    return calibrate(qmodel, DataLoader(splits.calibration, batch_size=100), 1, "max", bits=(2, 8)).to_dict()


@pytest.fixture(scope="module")
def fashion_splits():
    from quantsearch.sources.data import load_fashion_mnist

    return split_dataset(load_fashion_mnist(), 100, 300, 100, seed=0)  # as the workers split: 1 x 100


@pytest.mark.slow
def test_losing_the_ray_head_keeps_every_evaluation_and_resumes(tmp_path):
    """The head (GCS, raylet) and both actors killed mid-search (the fault benchmark's own trial): Ray ends the
    driver itself once it gives up reconnecting (10 s in the trial); everything committed survives, and the resume
    reaches the serial run."""
    import random
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import bench_faults as faults

    plain, run = tmp_path / "plain", tmp_path / "ray"
    assert faults.quiet([*faults.ARGS, "--out", str(plain)]) == 0
    total = json.loads((plain / "run.json").read_text())["num_evaluations"]
    at_fault = faults.lose_ray_head(run, random.Random(0), total)
    kept = faults.stored(run)
    assert 0 < at_fault <= kept < total
    assert faults.resume(run)["reused_evaluations"] == kept  # nothing committed is evaluated again
    assert faults.same_run(run, plain)
