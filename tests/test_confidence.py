"""Confidence intervals and hold-out confirmation of Pareto points, against numbers worked out by hand."""
import json

import pytest

from quantsearch.search.bound import Bound
from quantsearch.search.confidence import wilson_interval


def test_wilson_interval_by_hand():
    # p = 0.884 on n = 500, z = 1.96: centre (0.884 + z^2/1000) / (1 + z^2/500) = 0.881072,
    # half-width z sqrt(0.884 * 0.116 / 500 + z^2 / 10^6) / (1 + z^2/500) = 0.028114
    low, high = wilson_interval(0.884, 500)
    assert low == pytest.approx(0.852958, abs=2e-6) and high == pytest.approx(0.909186, abs=2e-6)
    # no hit in 10: [0, z^2 / (10 + z^2)] = [0, 0.277533]
    assert wilson_interval(0.0, 10) == (0.0, pytest.approx(0.277533, abs=2e-6))
    assert wilson_interval(1.0, 10) == (pytest.approx(1 - 0.277533, abs=2e-6), pytest.approx(1.0))


def test_bound_shifted_for_the_holdout_split():
    floor = Bound.relative_to(0.90, 0.01)  # FP32 90 % on search, 1 point allowed
    assert floor.limit == pytest.approx(0.89)
    moved = floor.shifted(0.885 - 0.90)  # FP32 scores 88.5 % on hold-out
    assert moved.limit == pytest.approx(0.875) and moved.holds(0.876) and not moved.holds(0.874)
    ceiling = Bound.relative_to(0.10, 0.05, higher_is_better=False, metric="kl", fraction=False)
    assert ceiling.limit == pytest.approx(0.15) and ceiling.shifted(0.02).holds(0.169)
    assert not ceiling.shifted(0.02).holds(0.171)


def test_run_points_carry_intervals_and_confirmation(tmp_path):
    from quantsearch.cli.explore import main

    out = tmp_path / "run"
    assert main(["--bits", "3:8", "--pop-size", "4", "--generations", "1", "--eval-samples", "300",
                 "--holdout-samples", "400", "--calib-batches", "1", "--batch-size", "100", "--max-accuracy-drop",
                 "0.02", "--no-progress", "--log-level", "WARNING", "--out", str(out)]) == 0
    run = json.loads((out / "run.json").read_text())
    fp32, bound = run["fp32_accuracy"], run["bound"]
    limit = bound["limit"] + fp32["holdout"] - fp32["search"]
    assert run["holdout_bound"]["limit"] == pytest.approx(limit)
    assert run["front"]
    for i, point in enumerate(run["front"]):
        assert point["confirmed"] == (point["accuracy_holdout"] >= limit)
        assert point["ci_holdout"] == pytest.approx(list(wilson_interval(point["accuracy_holdout"], 400)), abs=1e-6)
        assert point["ci_search"] == pytest.approx(list(wilson_interval(point["accuracy"], 300)), abs=1e-6)
        bitconfig = json.loads((out / "pareto" / f"point_{i:03d}.json").read_text())
        assert bitconfig["confidence"]["confirmed"] == point["confirmed"]
        assert bitconfig["confidence"]["holdout_limit"] == pytest.approx(limit)
    rows = (out / "pareto.csv").read_text().splitlines()
    header = rows[0].split(",")
    assert header[3:6] == ["holdout_ci_low", "holdout_ci_high", "confirmed"]
    assert [int(r.split(",")[5]) for r in rows[1:]] == [int(p["confirmed"]) for p in run["front"]]


def test_validation_split_keeps_only_points_that_hold_there(tmp_path):
    """With --validation-samples, every reported point also meets the bound (moved by FP32's shift) on a
    validation split disjoint from search and hold-out; candidates that fail it are left off the front."""
    from quantsearch.cli.explore import main

    out = tmp_path / "run"
    assert main(["--bits", "3:8", "--pop-size", "6", "--generations", "2", "--eval-samples", "300",
                 "--validation-samples", "600", "--holdout-samples", "600", "--calib-batches", "1", "--batch-size",
                 "100", "--max-accuracy-drop", "0.005", "--validation-confidence", "0.5", "--no-progress",
                 "--log-level", "WARNING",
                 "--out", str(out)]) == 0
    run = json.loads((out / "run.json").read_text())
    fp32, validation = run["fp32_accuracy"], run["validation"]
    limit = run["bound"]["limit"] + fp32["validation"] - fp32["search"]
    assert validation["bound"]["limit"] == pytest.approx(limit)
    assert run["front"] and validation["checked"] >= len(run["front"])
    assert all(p["accuracy_validation"] >= limit for p in run["front"])
    splits = json.loads((out / "splits.json").read_text())
    parts = [set(splits[k]) for k in ("calibration", "search", "validation", "holdout")]
    assert [len(p) for p in parts] == [100, 300, 600, 600] and len(set().union(*parts)) == 1600
    rows = (out / "pareto.csv").read_text().splitlines()
    assert rows[0].split(",")[6] == "accuracy_validation"
    assert [float(r.split(",")[6]) for r in rows[1:]] == pytest.approx([p["accuracy_validation"] for p in run["front"]])


def test_a_front_point_that_fails_validation_gives_way_to_the_point_it_hid():
    """A is cheapest and most accurate on the search split, so it hides B; A fails the validation split, B passes:
    the reported front is B and C, and every configuration was measured on validation once."""
    from types import SimpleNamespace

    from quantsearch.run.pipeline import _validated_front
    from quantsearch.search.problem import Evaluation

    search = {(2,): (0.90, 10), (3,): (0.85, 20), (4,): (0.95, 30)}
    on_validation = {(2,): 0.70, (3,): 0.82, (4,): 0.90}
    measured = []
    qmodel = SimpleNamespace(bit_widths=None)

    def validate(model):
        measured.append(tuple(model.bit_widths))
        return on_validation[tuple(model.bit_widths)]

    validate.fraction = False  # a metric that counts no hits: the value itself must meet the bound
    session = SimpleNamespace(bound=Bound(0.8), qmodel=qmodel,
                              config=SimpleNamespace(min_accuracy=0.8, validation_confidence=0.8),
                              evaluator=lambda split: validate if split == "validation" else None)
    problem = SimpleNamespace(costs=[SimpleNamespace(name="bits")])
    evaluations = [Evaluation(bits, accuracy, {"bits": cost}, 0.0) for bits, (accuracy, cost) in search.items()]
    front, validation, failed = _validated_front(session, problem, evaluations, progress=False)
    assert [e.bits for e in front] == [(3,), (4,)] and failed == {(2,)}
    assert validation == on_validation and sorted(measured) == [(2,), (3,), (4,)]


def test_paired_drop_by_hand_and_the_paired_validation_check():
    """Differences FP32 - model per image: [0, 1, 0, -1, 1]: mean 0.2, sample sd sqrt(2.8 / 4) = 0.83666; the 80 %
    one-sided bound adds z = 0.841621 x 0.83666 / sqrt(5) = 0.314906. A point passes when that bound is within the
    allowed drop, whatever its point estimate says."""
    from types import SimpleNamespace

    import torch

    from quantsearch.run.pipeline import _validation_check
    from quantsearch.search.confidence import paired_drop

    reference, hits = torch.tensor([1, 1, 1, 0, 1]), torch.tensor([1, 0, 1, 1, 0])
    drop, upper = paired_drop(reference, hits, 0.8)
    assert drop == pytest.approx(0.2) and upper == pytest.approx(0.514906, abs=1e-6)
    assert paired_drop(reference, hits, 0.5) == (pytest.approx(0.2), pytest.approx(0.2))
    assert paired_drop(reference, reference, 0.99) == (0.0, 0.0)  # the same predictions: no doubt at all

    n = 1000  # FP32 right on 900; the model loses 12 of them and gains 2 others: drop 1.0 point, 14 disagreements
    fp32 = torch.zeros(n, dtype=torch.bool)
    fp32[:900] = True
    model = fp32.clone()
    model[:12] = False
    model[900:902] = True
    qmodel = SimpleNamespace(quantization_disabled=lambda: _Toggle(state), bit_widths=None)
    state = {"fp32": False}
    evaluate = SimpleNamespace(fraction=True, num_samples=n,
                               sample_hits=lambda _m: fp32 if state["fp32"] else model)
    for confidence, allowed, passes in ((0.5, 0.0101, True), (0.8, 0.0101, False), (0.8, 0.014, True)):
        config = SimpleNamespace(min_accuracy=None, max_accuracy_drop=allowed, validation_confidence=confidence)
        session = SimpleNamespace(config=config, qmodel=qmodel, bound=Bound(0.89),
                                  evaluator=lambda split: evaluate, fp32=lambda split: 0.9)
        accuracy, passed = _validation_check(session)(qmodel)
        # sd of the differences: sqrt((14 - 1000 * 0.01^2) / 999) = 0.118030; bound 0.01 + 0.841621 * 0.118030 /
        # sqrt(1000) = 0.013141 at 80 %
        assert accuracy == pytest.approx(0.89) and passed == passes, (confidence, allowed)


class _Toggle:
    def __init__(self, state):
        self.state = state

    def __enter__(self):
        self.state["fp32"] = True

    def __exit__(self, *exc):
        self.state["fp32"] = False
