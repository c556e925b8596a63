import numpy as np
import pytest
from pymoo.algorithms.moo.nsga3 import NSGA3
from pymoo.optimize import minimize
from pymoo.util.ref_dirs import get_reference_directions

from quantsearch.problem import LayerwiseQuantizationProblem
from quantsearch.quantized_model import QuantizedActivationsModel
from quantsearch.sampling import uniform_configurations
from quantsearch.search import nsga2, run_search


class ToyAccuracy:
    """Accuracy as a known function of the bits set on the model: more bits, more accuracy, saturating."""

    def __init__(self):
        self.calls = 0

    def __call__(self, qmodel):
        self.calls += 1
        bits = np.array(qmodel.bit_widths)
        return float(np.mean(1 - 0.5 ** (bits - 1)))


@pytest.fixture
def toy_problem(convnet):
    qmodel = QuantizedActivationsModel(convnet, "conv2d")
    return LayerwiseQuantizationProblem(qmodel, ToyAccuracy(), min_accuracy=0.9, bits=(2, 8))


def test_shapes_bounds_and_constraint_sign(toy_problem):
    p = toy_problem
    assert (p.n_var, p.n_obj, p.n_ieq_constr) == (3, 2, 1)
    assert list(p.xl) == [2, 2, 2] and list(p.xu) == [8, 8, 8]
    out = p.evaluate(np.array([[8, 8, 8], [2, 2, 2], [4, 5, 6]]), return_as_dictionary=True)
    acc = [1 - 0.5 ** 7, 0.5, np.mean([1 - 0.5 ** 3, 1 - 0.5 ** 4, 1 - 0.5 ** 5])]
    np.testing.assert_allclose(out["F"][:, 0], [-a for a in acc])
    np.testing.assert_allclose(out["F"][:, 1], [24, 6, 15])
    np.testing.assert_allclose(out["G"][:, 0], [0.9 - a for a in acc])
    assert out["G"][0, 0] < 0 < out["G"][1, 0]  # feasible <=> G <= 0


def test_configurations_are_never_evaluated_twice(toy_problem):
    toy_problem.evaluate(np.array([[4, 4, 4], [4, 4, 4], [5, 4, 4]]))
    toy_problem.evaluate(np.array([[4.2, 3.9, 4.0]]))  # rounds to a known configuration
    assert toy_problem.metric.calls == 2
    assert [e.bits for e in toy_problem.evaluations] == [(4, 4, 4), (5, 4, 4)]


def test_works_with_other_pymoo_algorithms(toy_problem):
    algorithm = NSGA3(ref_dirs=get_reference_directions("das-dennis", 2, n_partitions=6), pop_size=8)
    res = minimize(toy_problem, algorithm, ("n_gen", 3), seed=1)
    assert res.F is not None and len(toy_problem.evaluations) > 8


def test_nsga2_seeds_uniform_configurations_and_is_reproducible(convnet):
    def run(seed):
        qmodel = QuantizedActivationsModel(convnet, "conv2d")
        problem = LayerwiseQuantizationProblem(qmodel, ToyAccuracy(), 0.9, bits=(3, 6))
        run_search(problem, nsga2(pop_size=8), generations=4, seed=seed)
        return problem

    a, b = run(3), run(3)
    assert [e.bits for e in a.evaluations] == [e.bits for e in b.evaluations]
    first = {e.bits for e in a.evaluations[:8]}
    assert {tuple(r) for r in uniform_configurations(3, 3, 6)} <= first
    assert all(3 <= v <= 6 for e in a.evaluations for v in e.bits)
