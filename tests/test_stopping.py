"""The convergence stop: the hypervolume rule by hand, and a search that stops once its front stops moving."""
from types import SimpleNamespace

import numpy as np
import pytest

from quantsearch.search.algorithms import run_algorithm
from quantsearch.search.bound import Bound
from quantsearch.search.budget import Budget
from quantsearch.search.front import hypervolume
from quantsearch.search.problem import Evaluation, LayerwiseQuantizationProblem
from quantsearch.search.stopping import FrontStop
from quantsearch.quantize.quantized_model import QuantizedActivationsModel

from test_guided_search import Separable


def _stub(floor=0.80):
    """A problem as FrontStop reads it: one cost ``bits`` (FP32: 100), every point in the space."""
    return SimpleNamespace(costs=[SimpleNamespace(name="bits", fp32=100.0)], visited=[], bound=Bound(floor),
                           in_space=lambda bits: True)


def _point(problem, accuracy, bits, status="ok"):
    problem.visited.append(Evaluation((len(problem.visited),), accuracy, {"bits": float(bits)}, 0.0, status))


def test_front_stop_by_hand():
    problem = _stub()
    stop = FrontStop(problem, patience=2, min_gain=1e-3)
    _point(problem, 0.79, 20)  # below the floor: no volume, and no volume never counts as converged
    assert not stop.check() and stop.history == [0.0]
    _point(problem, 0.85, 50)  # (85 - 80) points x (1 - 0.5) saved = 2.5
    assert not stop.check() and stop.history[-1] == pytest.approx(2.5) and stop.calm == 0
    _point(problem, 0.82, 30)  # 2 x 0.7 = 1.4, of which 2 x 0.5 overlaps: 2.9
    assert not stop.check() and stop.history[-1] == pytest.approx(2.9) and stop.calm == 0
    assert not stop.check() and len(stop.history) == 3  # nothing new visited: the check does not count
    _point(problem, 0.81, 40)  # dominated: no gain
    assert not stop.check() and stop.calm == 1
    _point(problem, 0.8201, 30)  # 0.01 x (0.5 - 0.3) = 0.002 more: 0.069 % of 2.9, below 0.1 %
    assert stop.check() and stop.converged_at == 5 and stop.calm == 2
    assert stop.history[-1] == pytest.approx(2.902)
    _point(problem, 0.95, 10)  # converged stays converged
    assert stop.check() and len(stop.history) == 5


def test_a_gain_above_the_threshold_resets_patience_and_zero_patience_never_stops():
    problem = _stub()
    stop, never = FrontStop(problem, patience=2, min_gain=1e-3), FrontStop(problem, patience=0)
    for accuracy, bits in [(0.85, 50), (0.81, 55), (0.83, 30), (0.81, 45), (0.805, 48)]:
        _point(problem, accuracy, bits)
        stop.check(), never.check()
    # 2.5; dominated: calm; 3 x 0.7 + 2 x 0.5 = 3.1 (+24 %: calm again from zero); calm; calm -> converged at the fifth
    assert stop.history == pytest.approx([2.5, 2.5, 3.1, 3.1, 3.1]) and stop.converged_at == 5
    assert never.converged_at is None and never.history == stop.history


@pytest.fixture
def qmodel(convnet):
    return QuantizedActivationsModel(convnet, "conv2d", weight_quantizers=True)


@pytest.mark.parametrize("name", ["guided", "nsga2"])
def test_a_search_stops_once_its_front_stops_moving(qmodel, name):
    runs = {}
    for patience in (0, 2):
        problem = LayerwiseQuantizationProblem(qmodel, Separable(), 0.9, bits=(2, 6))
        stop = FrontStop(problem, patience, 1e-3) if patience else None
        outcome = run_algorithm(name, problem, Budget(problem, 300), pop_size=8, seed=0, stop=stop)
        runs[patience] = (problem, outcome)
    spent, stopped = runs[0][0], runs[2][0]
    assert "stop" not in runs[0][1].details
    summary = runs[2][1].details["stop"]
    assert summary["converged_at_check"] == summary["checks"] and len(stopped.visited) < len(spent.visited) - 50
    # the rule held at the check that stopped it, and at no check before: patience gains in a row below 0.1 %
    hv = summary["hypervolumes"]
    calm = [b > 0 and a - b < 1e-3 * b for b, a in zip(hv, hv[1:])]
    assert calm[-2:] == [True, True] and not any(x and y for x, y in zip(calm[:-2], calm[1:-1]))
    fp32 = {c.name: c.fp32 for c in stopped.costs}
    assert hv[-1] == pytest.approx(hypervolume(stopped.visited, stopped.bound, fp32), abs=1e-6)
    # the same configurations in the same order as the run that spent its budget, up to where it stopped
    first = [e.bits for e in stopped.visited]
    assert first == [e.bits for e in spent.visited][:len(first)] or name == "guided"


def test_guided_seeds_are_drawn_lazily_and_interleaved(qmodel, monkeypatch):
    from quantsearch.search import ilp
    from quantsearch.search.costs import get_costs
    from quantsearch.search.guided import guided_seed_stream, guided_seeds
    from test_guided_search import _model
    import torch

    problem, model = _model(qmodel, get_costs("bops", qmodel, torch.randn(1, 1, 8, 8)), bits=(2, 6))
    everything = guided_seeds(model, 40, 0.05)
    solved = []
    real = ilp.solve_ilp
    monkeypatch.setattr(ilp, "solve_ilp", lambda *a, **k: solved.append(1) or real(*a, **k))
    stream = guided_seed_stream(model, 40, 0.05)
    first, counts = [], []
    for _ in range(4):
        first.append(next(stream))
        counts.append(len(solved))
    # of the first n drawn, round(0.75 n) are ILP solutions (ILP, ILP, greedy step, ILP), each solved only when drawn
    assert counts == [1, 2, 2, 3]
    rest = list(stream)  # drawing the rest gives what the eager form gives, in the same order
    assert np.array_equal(np.array(first + rest), everything) and len(everything) > 20  # both families ran out
