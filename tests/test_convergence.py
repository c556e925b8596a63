"""Hypervolume and per-generation convergence against hand-computed values."""
import math

import pytest

from quantsearch.run.convergence import convergence, hypervolume
from quantsearch.search.problem import Evaluation
from quantsearch.run.store import RunStore


def ev(accuracy, bits_cost, status="ok", **costs):
    return Evaluation((round(1000 * accuracy), int(bits_cost)), accuracy, {"bits": float(bits_cost), **costs},
                      0.1, status)


FP32 = {"bits": 100.0}
FLOOR = 0.80


def test_hypervolume_two_objectives_by_hand():
    # objectives (-100 acc, bits / 100), reference (-80, 1):
    # (0.90, 50): 10 points x 0.5 = 5;  (0.85, 25): 5 x 0.75 = 3.75;  overlap 5 x 0.5 = 2.5  ->  6.25
    a, b = ev(0.90, 50), ev(0.85, 25)
    assert hypervolume([a], FLOOR, FP32) == pytest.approx(5.0)
    assert hypervolume([a, b], FLOOR, FP32) == pytest.approx(6.25)
    # infeasible, failed, dominated and costlier-than-FP32 points add nothing
    extra = [ev(0.79, 10), ev(0.99, 5, status="failed"), ev(0.84, 60), ev(0.95, 120)]
    assert hypervolume([a, b, *extra], FLOOR, FP32) == pytest.approx(6.25)
    assert hypervolume(extra[:2], FLOOR, FP32) == 0.0
    assert hypervolume([], FLOOR, FP32) == 0.0
    # a point exactly on the floor has zero volume
    assert hypervolume([ev(0.80, 10)], FLOOR, FP32) == 0.0


def test_hypervolume_three_objectives_by_hand():
    fp32 = {"bits": 100.0, "size": 40.0}
    a = ev(0.90, 50, size=20.0)  # 10 x 0.5 x 0.5 = 2.5
    b = ev(0.85, 25, size=30.0)  # 5 x 0.75 x 0.25 = 0.9375; overlap 5 x 0.5 x 0.25 = 0.625
    assert hypervolume([a, b], FLOOR, fp32, ["bits", "size"]) == pytest.approx(2.5 + 0.9375 - 0.625)


def test_convergence_per_generation_from_a_run_store(tmp_path):
    store = RunStore.create(tmp_path / "run", {})
    records = [(ev(0.90, 50), 0),  # baseline
               (ev(0.85, 25), 1), (ev(0.79, 10), 1), (ev(0.99, 5, status="failed"), 1),
               # generation 2: nothing new (every candidate came from the cache)
               (ev(0.84, 60), 3), (ev(0.88, 20), 3)]
    for e, g in records:
        store.record(e, g)
    conv = convergence(store.evaluations(), FLOOR, FP32)
    store.close()
    assert conv.generations == [0, 1, 2, 3]
    assert conv.evaluations == [1, 3, 0, 2]
    assert conv.feasible == [1, 1, 0, 2]
    fraction = conv.feasible_fraction
    assert fraction[0] == 1.0 and fraction[1] == pytest.approx(1 / 3) and math.isnan(fraction[2])
    assert fraction[3] == 1.0
    # generation 3 adds (0.88, 20), which dominates (0.85, 25): 10 x 0.5 + 8 x 0.8 - overlap 8 x 0.5 = 7.4
    assert conv.hypervolume == pytest.approx([5.0, 6.25, 6.25, 7.4])
    assert conv.rows()[2] == [2, 0, 0, "", "6.25"]
