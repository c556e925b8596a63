"""End to end: the real CLI on the embedded demo (small budget), then every exported bit-config re-applied."""
import csv
import json
import subprocess
import sys

import pytest

from quantsearch.bitconfig import apply_bitconfig
from quantsearch.data import load_fashion_mnist, split_dataset
from quantsearch.evaluation import AccuracyEvaluator
from quantsearch.explore import main
from quantsearch.models import create_model


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "demo"
    code = main(["--pop-size", "8", "--generations", "3", "--eval-samples", "800", "--holdout-samples", "800",
                 "--calib-batches", "2", "--bits", "3:8", "--out", str(out), "--no-progress", "--seed", "1"])
    assert code == 0
    return out


def test_outputs_written(run_dir):
    for name in ("run.sqlite", "evaluations.csv", "pareto.csv", "pareto.png", "bits_heatmap.png", "run.json"):
        assert (run_dir / name).is_file(), name
    run = json.loads((run_dir / "run.json").read_text())
    assert run["splits"] == {"calibration": 500, "search": 800, "holdout": 800}
    assert run["settings"]["predicate_resolved"] == "vit"
    assert set(run["baselines"]) == {"A8", "A6", "A4"}
    assert run["versions"]["pytorch_quantization"] == "2.1.3"
    rows = list(csv.DictReader((run_dir / "evaluations.csv").open()))
    assert len(rows) == run["num_evaluations"] >= 8
    # every uniform configuration of the range was evaluated (seeded into the first population)
    uniform = {int(r["bits"]) // 40 for r in rows if len({r[k] for k in run["quantizers"]}) == 1}
    assert uniform == set(range(3, 9))
    pareto = list(csv.DictReader((run_dir / "pareto.csv").open()))
    assert len(pareto) == len(list((run_dir / "pareto").glob("*.json"))) == len(run["front"]) >= 1
    floor = run["min_accuracy"]
    assert all(float(p["accuracy_search"]) >= floor for p in pareto)
    costs = [float(p["bits"]) for p in pareto]
    accs = [float(p["accuracy_search"]) for p in pareto]
    assert costs == sorted(costs) and accs == sorted(accs)  # a front: more bits buy more accuracy


def test_bitconfigs_reproduce_recorded_accuracy_exactly(run_dir):
    points = sorted((run_dir / "pareto").glob("*.json"))
    data = json.loads(points[0].read_text())["dataset"]
    splits = split_dataset(load_fashion_mnist(), data["calibration"], data["search"], data["holdout"],
                           seed=data["seed"])
    search = AccuracyEvaluator(splits.search, data["batch_size"])
    holdout = AccuracyEvaluator(splits.holdout, data["batch_size"])
    for path in points:
        recorded = json.loads(path.read_text())["accuracy"]
        qmodel = apply_bitconfig(create_model("fashion-vit"), path)
        assert search(qmodel) == recorded["search"], path.name
        assert holdout(qmodel) == recorded["holdout"], path.name


def test_existing_run_is_refused_and_bad_bits_exit_2(run_dir):
    for args, message in ([["--out", str(run_dir)], "already holds a run"],
                          [["--bits", "9:3"], "LO is greater than HI"],
                          [["--model", "no_such_model_xyz"], "unknown model"]):
        proc = subprocess.run([sys.executable, "-m", "quantsearch.explore", *args, "--no-progress"],
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2, proc.stderr
        assert message in proc.stderr and "Traceback" not in proc.stderr
