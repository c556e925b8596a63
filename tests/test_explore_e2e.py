"""End to end: the real CLI on the embedded demo (small budget, activation and weight genes, BOPs), then every
exported bit-config re-applied."""
import csv
import json
import subprocess
import sys

import pytest
from conftest import assert_real_png

from quantsearch.deploy.bitconfig import apply_bitconfig
from quantsearch.sources.data import load_fashion_mnist, split_dataset
from quantsearch.search.evaluator import AccuracyEvaluator
from quantsearch.cli.explore import main
from quantsearch.sources.models import create_model


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "demo"
    code = main(["--pop-size", "8", "--generations", "3", "--eval-samples", "800", "--holdout-samples", "800",
                 "--calib-batches", "2", "--bits", "3:8", "--weight-bits", "3:8", "--search-space", "both",
                 "--cost", "bops", "--out", str(out), "--no-progress", "--seed", "1"])
    assert code == 0
    return out


def test_outputs_written(run_dir):
    for name in ("run.sqlite", "evaluations.csv", "pareto.csv", "pareto.png", "bits_heatmap.png", "run.json"):
        assert (run_dir / name).is_file(), name
    for name in ("pareto.png", "bits_heatmap.png"):
        assert_real_png(run_dir / name)
    run = json.loads((run_dir / "run.json").read_text())
    assert run["splits"] == {"calibration": 500, "search": 800, "holdout": 800}
    assert run["settings"]["predicate_resolved"] == "vit"
    assert list(run["baselines"]) == ["FP32", "W8A8", "W8A6", "W6A6", "W4A8", "W8A4", "W4A4"]
    assert run["fp32_costs"]["bops"] == run["baselines"]["FP32"]["costs"]["bops"]
    ratio = {name: b["costs_vs_fp32"]["bops"] for name, b in run["baselines"].items() if name != "FP32"}
    assert ratio["W8A8"] == 8 * 8 / (32 * 32) and ratio["W4A4"] == 4 * 4 / (32 * 32)  # every multiply quantized
    # the attention matmuls multiply two activations: W4A8 costs more than 4 x 8 bits per MAC
    assert 4 * 8 / (32 * 32) < ratio["W4A8"] < ratio["W8A8"]
    assert len(run["quantizers"]) == len(run["genes"]) == 58 and run["search_space"] == "both"
    assert run["versions"]["pytorch_quantization"] == "2.1.3"
    rows = list(csv.DictReader((run_dir / "evaluations.csv").open()))
    assert len(rows) == run["num_evaluations"] >= 8
    # every uniform configuration of the range was evaluated (seeded into the first population)
    uniform = {int(r[run["quantizers"][0]]) for r in rows if len({r[k] for k in run["quantizers"]}) == 1}
    assert uniform == set(range(3, 9))
    pareto = list(csv.DictReader((run_dir / "pareto.csv").open()))
    assert len(pareto) == len(list((run_dir / "pareto").glob("*.json"))) == len(run["front"]) >= 1
    floor = run["bound"]["limit"]
    assert all(float(p["accuracy_search"]) >= floor for p in pareto)
    costs = [float(p["bops"]) for p in pareto]
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
