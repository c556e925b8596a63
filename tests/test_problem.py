import numpy as np
import pytest
import torch
from pymoo.algorithms.moo.nsga3 import NSGA3
from pymoo.optimize import minimize
from pymoo.util.ref_dirs import get_reference_directions

from quantsearch.search.problem import LayerwiseQuantizationProblem
from quantsearch.quantize.quantized_model import QuantizedActivationsModel
from quantsearch.search.sampling import uniform_configurations
from quantsearch.search.algorithms import nsga2, run_search


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
    return LayerwiseQuantizationProblem(qmodel, ToyAccuracy(), 0.9, bits=(2, 8))


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
    assert len(toy_problem.evaluations) > 8
    # the result is pymoo's feasible non-dominated set: one row of (-accuracy, bits) per returned configuration
    X, F, G = np.atleast_2d(res.X), np.atleast_2d(res.F), np.atleast_2d(res.G)
    assert F.shape == (len(X), toy_problem.n_obj) == (len(X), 2) and G.shape == (len(X), 1) and len(X) >= 1
    evaluated = {e.bits: e for e in toy_problem.evaluations}
    for x, f, g in zip(X, F, G):
        bits = tuple(int(v) for v in np.rint(x))
        e = evaluated[bits]  # every returned point was evaluated (once) by the problem
        accuracy = float(np.mean([1 - 0.5 ** (b - 1) for b in bits]))  # ToyAccuracy, by hand
        assert e.accuracy == pytest.approx(accuracy) and e.costs["bits"] == sum(bits)
        np.testing.assert_allclose(f, [-accuracy, sum(bits)])
        assert g[0] == pytest.approx(0.9 - accuracy) and g[0] <= 0 and toy_problem.is_feasible(e)
    # and no evaluated feasible configuration dominates a returned one
    feasible = [(-e.accuracy, e.costs["bits"]) for e in toy_problem.evaluations if e.accuracy >= 0.9]
    for f in F:
        assert not any(a <= f[0] and c <= f[1] and (a < f[0] or c < f[1]) for a, c in feasible), f


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


def test_genes_subset_per_gene_ranges_and_fixed_widths(convnet):
    qmodel = QuantizedActivationsModel(convnet, "conv2d", weight_quantizers=True)
    genes = qmodel.weight_names
    problem = LayerwiseQuantizationProblem(qmodel, ToyAccuracy(), 0.5, bits={g: (3, 6) for g in genes} | {
        "fc:weight": (2, 4)}, genes=genes, fixed_bits={"input": 8, "conv1": 7, "conv2": 6})
    assert problem.n_var == 3 and list(problem.xl) == [3, 3, 2] and list(problem.xu) == [6, 6, 4]
    e = problem.evaluate_bits([4, 5, 2])
    assert e.bits == (8, 7, 6, 4, 5, 2)  # every quantizer, in the model's order
    assert qmodel.bits_dict() == dict(zip(qmodel.quantizer_names, e.bits))
    assert problem.genome(e.bits) == (4, 5, 2) and problem.in_space(e.bits)
    # a mapping may set fixed quantizers too (a baseline), which leaves the search space
    baseline = problem.evaluate_bits({n: 4 for n in qmodel.quantizer_names})
    assert baseline.bits == (4,) * 6 and not problem.in_space(baseline.bits)
    with pytest.raises(ValueError, match="no width for gene 'fc:weight'"):
        problem.evaluate_bits({"conv1:weight": 4, "conv2:weight": 4})
    # the uniform seeds respect each gene's range
    run_search(problem, nsga2(pop_size=6), generations=2, seed=0)
    searched = [e for e in problem.evaluations if e is not baseline]
    assert {(6, 6, 4), (3, 3, 3), (3, 3, 2)} <= {problem.genome(e.bits) for e in searched}
    assert all(problem.in_space(e.bits) for e in searched)


def test_three_objectives_use_nsga3(convnet):
    from quantsearch.search.costs import get_costs
    from quantsearch.search.algorithms import algorithm_for

    qmodel = QuantizedActivationsModel(convnet, "conv2d", weight_quantizers=True)
    costs = get_costs("bops,model-size", qmodel, torch.randn(1, 1, 8, 8))
    problem = LayerwiseQuantizationProblem(qmodel, ToyAccuracy(), 0.9, bits=(2, 8), costs=costs)
    assert problem.n_obj == 3
    algorithm = algorithm_for(problem.n_obj, pop_size=10)
    assert isinstance(algorithm, NSGA3) and len(algorithm.ref_dirs) <= 10
    run_search(problem, algorithm, generations=3, seed=0)
    assert len(problem.evaluations) > 10
    out = problem.evaluate(np.array([[8] * 6]), return_as_dictionary=True)
    bits = dict(zip(qmodel.quantizer_names, [8] * 6))
    np.testing.assert_allclose(out["F"][0, 1:], [costs[0](bits), costs[1](bits)])
