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
    validation split disjoint from search and hold-out; candidates that fail it are left off the front. At 90 %
    the paired upper bound lies above the observed drop, so meeting the limit is necessary, not sufficient; every
    candidate checked is either reported or counted failed (the must-fail cases are worked by hand below)."""
    from quantsearch.cli.explore import main

    out = tmp_path / "run"
    assert main(["--bits", "3:8", "--pop-size", "6", "--generations", "2", "--eval-samples", "300",
                 "--validation-samples", "600", "--holdout-samples", "600", "--calib-batches", "1", "--batch-size",
                 "100", "--max-accuracy-drop", "0.005", "--validation-confidence", "0.9", "--no-progress",
                 "--log-level", "WARNING",
                 "--out", str(out)]) == 0
    run = json.loads((out / "run.json").read_text())
    fp32, validation = run["fp32_accuracy"], run["validation"]
    limit = run["bound"]["limit"] + fp32["validation"] - fp32["search"]
    assert validation["bound"]["limit"] == pytest.approx(limit)
    assert validation["confidence"] == 0.9 and validation["test"] == "paired with FP32 on the same images"
    assert run["front"]
    assert validation["checked"] == len(run["front"]) + validation["failed"]
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


def _session(n_hits, n, allowed=None, minimum=None, confidence=0.8, fp32_hits=None):
    """A stand-in session for :func:`_validation_check`: the model right on ``n_hits`` of ``n`` images (the first
    ones); FP32 right on ``fp32_hits`` of them (the first ones, so the model's hits are a subset)."""
    from types import SimpleNamespace

    import torch

    state = {"fp32": False}
    model = torch.arange(n) < n_hits
    fp32 = torch.arange(n) < (fp32_hits if fp32_hits is not None else n_hits)

    class _Evaluate:
        fraction, num_samples = True, n

        def sample_hits(self, _model):
            return fp32 if state["fp32"] else model

        def __call__(self, _model):
            return float(model.float().mean())

    evaluator = _Evaluate()
    qmodel = SimpleNamespace(quantization_disabled=lambda: _Toggle(state), bit_widths=None)
    config = SimpleNamespace(min_accuracy=minimum, max_accuracy_drop=allowed, validation_confidence=confidence)
    bound = Bound(minimum) if minimum is not None else Bound(float(fp32.float().mean()) - allowed)
    return SimpleNamespace(config=config, qmodel=qmodel, bound=bound, evaluator=lambda split: evaluator,
                           fp32=lambda split: float(fp32.float().mean())), qmodel


def test_min_accuracy_validation_fails_a_point_whose_estimate_passes():
    """An absolute floor is tested with the one-sided lower Wilson bound. 176 hits of 200 (88 %) against a floor
    of 85 %: at 95 %, z = 1.644854, z^2 = 2.705545; centre (0.88 + z^2/400) / (1 + z^2/200) = 0.886764 / 1.013528 =
    0.874928; half-width z sqrt(0.88 x 0.12 / 200 + z^2 / 160000) / 1.013528 = 1.644854 x 0.023343 / 1.013528 =
    0.037884: lower bound 0.837044 < 0.85, so it fails although 88 % > 85 %. At 50 % (z = 0) the lower bound is
    0.88 itself: it passes. 186 of 200 (93 %): lower bound 0.8975 at 95 %: it passes."""
    from quantsearch.run.pipeline import _validation_check
    from quantsearch.search.confidence import one_sided_z

    assert one_sided_z(0.95) == pytest.approx(1.644854, abs=1e-6)
    assert wilson_interval(0.88, 200, one_sided_z(0.95))[0] == pytest.approx(0.837044, abs=2e-6)
    for hits, confidence, passes in ((176, 0.95, False), (176, 0.5, True), (186, 0.95, True), (169, 0.5, False)):
        session, qmodel = _session(hits, 200, minimum=0.85, confidence=confidence)
        value, passed = _validation_check(session)(qmodel)
        assert value == pytest.approx(hits / 200) and passed is passes, (hits, confidence)


def test_drop_validation_fails_a_point_whose_estimate_passes():
    """Paired: FP32 right on 900 of 1000, the model on the first 892 of them (it loses 8, gains none): drop 0.008,
    within 0.01 allowed. The differences are 8 ones and 992 zeros: sd sqrt((8 - 1000 x 0.008^2) / 999) = 0.089124;
    at 95 % the bound adds 1.644854 x 0.089124 / sqrt(1000) = 0.004636: 0.012636 > 0.01, so it must fail; at 80 %
    it adds 0.841621 x 0.089124 / sqrt(1000) = 0.002372: 0.010372 > 0.01, fails too; at 60 % (z = 0.253347):
    0.008714, it passes."""
    from quantsearch.run.pipeline import _validation_check
    from quantsearch.search.confidence import paired_drop

    import torch

    fp32, model = torch.arange(1000) < 900, torch.arange(1000) < 892
    assert paired_drop(fp32, model, 0.95) == (pytest.approx(0.008), pytest.approx(0.012636, abs=2e-6))
    assert paired_drop(fp32, model, 0.8)[1] == pytest.approx(0.010372, abs=2e-6)
    for confidence, passes in ((0.95, False), (0.8, False), (0.6, True)):
        session, qmodel = _session(892, 1000, allowed=0.01, confidence=confidence, fp32_hits=900)
        value, passed = _validation_check(session)(qmodel)
        assert value == pytest.approx(0.892) and passed is passes, confidence


def test_stated_error_rates_hold_in_simulation():
    """What the bounds claim, checked by drawing data whose truth is known (seeded, so the test is repeatable):

    - the 95 % Wilson interval of p = 0.9 on n = 500 holds p in 95 % of 4000 draws (within 1.5 points);
    - the one-sided 80 % paired upper bound of the drop, for a model that loses each FP32 hit with 3 % chance and
      gains each FP32 miss with 2 % chance (true drop 0.9 x 0.03 - 0.1 x 0.02 = 0.025) on 1000 images, lies at or
      above 0.025 in 80 % of 2000 draws (within 3 points); so a candidate whose true drop is exactly the allowed
      one passes validation in about 20 % of draws, the rate the 80 % setting states."""
    import numpy as np
    import torch

    from quantsearch.search.confidence import Z, paired_drop

    rng = np.random.default_rng(0)
    p, n = 0.9, 500
    hits = rng.binomial(n, p, size=4000) / n
    covered = np.mean([lo <= p <= hi for lo, hi in (wilson_interval(h, n, Z) for h in hits)])
    assert abs(covered - 0.95) < 0.015, covered
    n, trials, truth = 1000, 2000, 0.9 * 0.03 - 0.1 * 0.02
    fp32 = np.arange(n) < 900
    above = 0
    for _ in range(trials):
        flip = rng.random(n) < np.where(fp32, 0.03, 0.02)
        _, upper = paired_drop(torch.from_numpy(fp32), torch.from_numpy(fp32 ^ flip), 0.8)
        above += upper >= truth
    assert abs(above / trials - 0.8) < 0.03, above / trials
