"""Sensitivity tables, the additive cost model, greedy path, ILP, guided NSGA-II seeds and budgets, checked by hand
and by brute force on small instances."""
import itertools

import numpy as np
import pytest
import torch

from quantsearch.search.random_greedy import greedy_path, greedy_search, random_search
from quantsearch.search.budget import Budget
from quantsearch.search.costs import get_costs
from quantsearch.search.evaluator import AccuracyEvaluator
from quantsearch.search.guided import guided_nsga2
from quantsearch.search.ilp import coarse_to_fine, min_cost_for_drop, solve_ilp
from quantsearch.search.problem import LayerwiseQuantizationProblem
from quantsearch.quantize.quantized_model import QuantizedActivationsModel
from quantsearch.search.sampling import uniform_configurations
from quantsearch.search.algorithms import run_algorithm, run_search
from quantsearch.search.sensitivity import Sensitivity, measure_sensitivity
from quantsearch.search.surrogate import AdditiveModel, GeneCosts

# input, conv1, conv2, conv1:weight, conv2:weight, fc:weight
WEIGHTS = np.array([0.3, 0.5, 0.2, 1.0, 0.4, 0.1])


class Separable:
    """accuracy = 1 - sum_i w_i 2^-b_i: every single-gene drop is known in closed form."""

    def __init__(self, weights=WEIGHTS):
        self.weights = np.asarray(weights)

    def __call__(self, qmodel):
        return float(1 - (self.weights * 0.5 ** np.array(qmodel.bit_widths)).sum())


@pytest.fixture
def qmodel(convnet):
    return QuantizedActivationsModel(convnet, "conv2d", weight_quantizers=True)


@pytest.fixture
def bops(qmodel):
    return get_costs("bops", qmodel, torch.randn(1, 1, 8, 8))


def test_sensitivity_by_hand(qmodel):
    problem = LayerwiseQuantizationProblem(qmodel, Separable(), 0.5, bits=(2, 6))
    heard = []
    problem.listeners.append(heard.append)
    table = measure_sensitivity(problem, widths=[5, 3])
    w = WEIGHTS
    reference = 1 - (w * 0.5 ** 6).sum()
    assert table.reference == pytest.approx(reference)
    for i, g in enumerate(qmodel.quantizer_names):
        for b in (5, 3):
            assert table.measured[g][b] == pytest.approx(reference - w[i] * (0.5 ** b - 0.5 ** 6))
            assert table.raw_drop(g, b) == pytest.approx(w[i] * (0.5 ** b - 0.5 ** 6))
    # 1 reference + 6 genes x 2 widths, all through the problem: cached and heard by its listeners
    assert len(problem.evaluations) == len(heard) == 13 and len(problem.cache) == 13
    # the reference's "luck": the median drop one bit below the top (6 such drops, the middle two averaged)
    top1 = sorted(w * (0.5 ** 5 - 0.5 ** 6))
    noise = (top1[2] + top1[3]) / 2
    assert table.noise == pytest.approx(noise)
    drops = table.drops()
    conv1 = "conv1"  # w = 0.5
    d5, d3 = (max(0.0, 0.5 * (0.5 ** b - 0.5 ** 6) - noise) for b in (5, 3))
    assert drops[conv1][6] == 0 and drops[conv1][5] == pytest.approx(d5) and drops[conv1][3] == pytest.approx(d3)
    # width 4 is interpolated linearly in 4^-b between 5 and 3; width 2 extrapolated from the top through 3
    t = (4.0 ** -4 - 4.0 ** -5) / (4.0 ** -3 - 4.0 ** -5)
    assert drops[conv1][4] == pytest.approx(d5 + t * (d3 - d5))
    assert drops[conv1][2] == pytest.approx(d3 * (4.0 ** -2 - 4.0 ** -6) / (4.0 ** -3 - 4.0 ** -6))
    model = AdditiveModel(table, GeneCosts(problem))
    genome = [6, 4, 3, 6, 5, 2]
    expected = table.effective_reference - sum(drops[g][b] for g, b in zip(qmodel.quantizer_names, genome))
    assert model.predicted(np.array([genome]))[0] == pytest.approx(expected)
    assert Sensitivity.from_dict(table.to_dict()) == table


def test_sensitivity_through_a_real_evaluator(convnet, splits):
    qmodel = QuantizedActivationsModel(convnet, "conv2d")
    qmodel.calibrate([(x.unsqueeze(0), y) for x, y in (splits.calibration[i] for i in range(32))])
    evaluator = AccuracyEvaluator(splits.search, 100, limit=200)
    problem = LayerwiseQuantizationProblem(qmodel, evaluator, 0.0, bits=(2, 8))
    table = measure_sensitivity(problem, widths=[3])
    for i, g in enumerate(qmodel.quantizer_names):  # each by hand: that gene alone at 3 bits
        qmodel.bit_widths = [3 if j == i else 8 for j in range(len(qmodel))]
        assert table.measured[g][3] == evaluator(qmodel)
    qmodel.bit_widths = [8] * len(qmodel)
    assert table.reference == evaluator(qmodel)


def test_gene_costs_match_the_cost_models(qmodel, bops):
    problem = LayerwiseQuantizationProblem(qmodel, Separable(), 0.5, bits=(2, 6),
                                           costs=bops + get_costs("bits,model-size", qmodel, torch.randn(1, 1, 8, 8)))
    rng = np.random.default_rng(0)
    genomes = rng.integers(2, 7, size=(20, 6))
    for k in range(3):
        costs = GeneCosts(problem, k)
        assert costs.exact
        truth = [problem.costs[k](dict(zip(qmodel.quantizer_names, g))) for g in genomes]
        np.testing.assert_allclose(costs.values(genomes), truth, rtol=1e-12)
        saved = costs.savings(genomes[0])
        for i in range(6):
            for b in range(2, 7):
                moved = genomes[0].copy()
                moved[i] = b
                assert saved[i, b] == pytest.approx(costs.value(genomes[0]) - costs.value(moved))
    assert len(GeneCosts(problem, 0).pairs) == 2  # conv1 and conv2: weight gene x input gene


def _model(qmodel, costs, bits=(2, 5)):
    problem = LayerwiseQuantizationProblem(qmodel, Separable(), 0.5, bits=bits, costs=costs)
    return problem, AdditiveModel(measure_sensitivity(problem), GeneCosts(problem))


def test_ilp_is_optimal_against_brute_force(qmodel, bops):
    problem, model = _model(qmodel, bops)
    genomes = np.array(list(itertools.product(range(2, 6), repeat=6)))
    drops, costs = model.total_drop(genomes), model.costs.values(genomes)
    for fraction in (0.2, 0.35, 0.5, 0.7, 0.9):
        budget = costs.min() + fraction * (costs.max() - costs.min())
        best = drops[costs <= budget].min()
        genome = solve_ilp(model, budget)
        assert model.costs.value(genome) <= budget * (1 + 1e-12)
        assert model.total_drop(np.array([genome]))[0] == pytest.approx(best, abs=1e-9)
    assert solve_ilp(model, costs.min() * 0.99) is None  # nothing fits below the all-lowest cost
    for limit in (0.0, 0.05, 0.2):  # the other form: cheapest within a drop
        genome = min_cost_for_drop(model, limit)
        assert model.costs.value(genome) == pytest.approx(costs[drops <= limit + 1e-12].min())


def test_greedy_path_is_monotone_and_takes_the_best_ratio(qmodel, bops):
    problem, model = _model(qmodel, bops)
    path = greedy_path(model)
    costs = [model.costs.value(g) for g in path]
    assert list(path[0]) == [5] * 6
    assert all(later < earlier for earlier, later in zip(costs, costs[1:]))  # strictly cheaper at every step
    for before, after in zip(path, path[1:]):
        moved = np.flatnonzero(before != after)
        assert len(moved) == 1 and after[moved[0]] < before[moved[0]]  # one gene, lowered
        ratios = []  # every possible move from `before`, by hand
        for i in range(6):
            for b in range(2, before[i]):
                candidate = before.copy()
                candidate[i] = b
                saved = model.costs.value(before) - model.costs.value(candidate)
                if saved > 0:
                    ratios.append((model.drops[i, b] - model.drops[i, before[i]]) / saved)
        taken = (model.drops[moved[0], after[moved[0]]] - model.drops[moved[0], before[moved[0]]]) / (
            model.costs.value(before) - model.costs.value(after))
        assert taken == pytest.approx(min(ratios), abs=1e-15)
    # every gene that saves cost ends at the bottom of its range
    last = path[-1]
    for i in range(6):
        if model.costs.savings(np.full(6, 5))[i, 2] > 0:
            assert last[i] == 2


def test_greedy_and_random_respect_the_budget(qmodel, bops):
    problem, model = _model(qmodel, bops)
    used = len(problem.visited)
    budget = Budget(problem, used + 5)
    path, evaluated = greedy_search(problem, model, budget)
    # step 0 (every gene at the top) is the sensitivity reference, already known: it costs nothing
    assert len(problem.visited) == used + 5 and len(evaluated) == 6 and evaluated[0] == 0
    # with a budget below the path's length the first steps are a bisection for the floor crossing
    assert evaluated[1] == len(path) // 2
    random_problem = LayerwiseQuantizationProblem(qmodel, Separable(), 0.5, bits=(2, 5), costs=bops)
    random_search(random_problem, Budget(random_problem, 12), seed=3)
    assert len(random_problem.visited) == 12


def test_guided_seeds_are_in_generation_zero(qmodel, bops):
    problem, model = _model(qmodel, bops, bits=(2, 6))
    algorithm = guided_nsga2(problem, model, pop_size=16, allowed_drop=0.05)
    seeds = {tuple(int(v) for v in s) for s in algorithm.seeds}
    assert len(seeds) == 11  # the population less the 5 uniform configurations (at least half of it)
    assert all(problem.in_space(problem.configuration(s)) for s in seeds)
    run_search(problem, algorithm, generations=1, seed=0)  # one generation: the initial population only
    initial = {tuple(int(v) for v in x) for x in np.rint(algorithm.pop.get("X"))}
    uniform = {tuple(int(v) for v in r) for r in uniform_configurations(6, 2, 6)}
    assert initial == seeds | uniform
    # the seeds are ILP solutions and greedy steps: the ILP optimum at some budget is among them
    path = {tuple(int(v) for v in g) for g in greedy_path(model)}
    assert seeds & path and seeds - path


def test_run_algorithm_every_algorithm_within_budget(qmodel, bops):
    for name in ("random", "greedy", "ilp", "nsga2", "guided"):
        problem = LayerwiseQuantizationProblem(qmodel, Separable(), 0.9, bits=(2, 6), costs=bops)
        ticks = []
        outcome = run_algorithm(name, problem, Budget(problem, 40), pop_size=8, seed=1, on_generation=ticks.append)
        assert ticks == list(range(1, len(ticks) + 1)) and ticks, name
        # full evaluations (no early rejection) cost 1 each: the last generation is cut to what is left (before
        # the cut, NSGA-II's last generation of 8 overshot to 48); greedy may end its path earlier
        assert len(problem.visited) <= 40, name
        if name in ("random", "nsga2", "guided"):
            assert len(problem.visited) == 40, name
        assert (outcome.sensitivity is None) == (name in ("random", "nsga2")), name


def test_coarse_to_fine_covers_each_index_once():
    for n in (1, 2, 5, 16, 33):
        order = coarse_to_fine(n)
        assert sorted(order) == list(range(n))
    assert coarse_to_fine(8)[:3] == [4, 2, 6]


# -- early rejection ---------------------------------------------------------------------------------------------
def test_early_rejection_bound_by_hand():
    from math import comb

    from quantsearch.search.evaluator import EarlyRejection

    rule = EarlyRejection(floor=0.8, confidence=0.99)
    assert rule.hits_needed(10) == 8 and rule.hits_needed(7) == 6  # 6/7 = 0.857 >= 0.8 > 5/7
    assert EarlyRejection.checkpoints(12) == [1, 2, 4, 8]
    # P(X <= 3) for X ~ H(N=10, K=8, n=5): hits among the first 5 of 10 images when 8 of 10 are right
    by_hand = sum(comb(8, k) * comb(2, 5 - k) for k in range(0, 4)) / comb(10, 5)
    assert rule.p_value(3, 5, 10) == pytest.approx(by_hand)
    assert rule.rejects(3, 5, 10, checks=1) == (False, pytest.approx(by_hand))  # 0.22 > 0.01
    assert rule.rejects(0, 3, 10, checks=1)[0]  # 3 misses of 3: K=8 leaves only 2 misses, p = 0
    assert not rule.rejects(1, 3, 10, checks=1)[0]  # p = C(8,1)C(2,2)/C(10,3) = 8/120 > 0.01


def test_early_rejection_stops_bad_candidates_and_never_changes_good_ones(demo_vit, splits):
    from quantsearch.search.evaluator import EarlyRejected

    qmodel = QuantizedActivationsModel(demo_vit, "vit")
    qmodel.calibrate([(splits.calibration[i][0].unsqueeze(0), 0) for i in range(64)], method="max", bits=(2, 8))
    full = AccuracyEvaluator(splits.search, 100, limit=800)
    early = AccuracyEvaluator(splits.search, 100, limit=800)
    qmodel.bit_widths = [8] * len(qmodel)
    good = full(qmodel)
    early.reject_below(good - 0.05)
    assert early(qmodel) == good  # above the floor: evaluated in full, the same value
    qmodel.bit_widths = [2] * len(qmodel)
    bad = full(qmodel)
    with pytest.raises(EarlyRejected) as raised:
        early(qmodel)
    assert raised.value.samples < 800 and raised.value.accuracy < good - 0.05 and bad < good - 0.05
    problem = LayerwiseQuantizationProblem(qmodel, early, good - 0.05, bits=(2, 8))
    e = problem.evaluate_bits([2] * len(qmodel))
    assert e.status == "rejected" and e.extra["samples"] == raised.value.samples and not problem.is_feasible(e)


def test_racing_stops_a_candidate_that_a_cheaper_point_beats_and_races_each_batch_alike(demo_vit, splits):
    """Racing: the bar is the best point of the space that costs no more; a candidate clearly below it stops
    part-way as ``dominated`` (kept feasible by its partial accuracy, never on the front); within a batch every
    candidate races against the points known when the batch began."""
    from quantsearch.search.front import pareto_front

    qmodel = QuantizedActivationsModel(demo_vit, "vit")
    qmodel.calibrate([(splits.calibration[i][0].unsqueeze(0), 0) for i in range(64)], method="max", bits=(2, 8))
    evaluate = AccuracyEvaluator(splits.search, 100, limit=800)
    n = len(qmodel)
    problem = LayerwiseQuantizationProblem(qmodel, evaluate, 0.0, bits=(2, 8), racing=True)
    evaluate.reject_below(0.0)  # a floor nothing falls below: any stop is the race's
    cheap = problem.evaluate_bits([5] * n)
    assert cheap.status == "ok" and problem.race_bar(problem.configuration([8] * n)) == cheap.accuracy
    assert problem.race_bar(problem.configuration([4] * n)) is None  # nothing costs no more than all-4
    worse = [6] * n  # all-6 but the patch embedding's output at 2 bits: costs more than all-5, scores far worse
    worse[1] = 2
    assert problem.race_bar(problem.configuration(worse)) == cheap.accuracy
    bad = problem.evaluate_bits(worse)
    assert bad.status == "dominated" and bad.extra["samples"] < 800 and bad.accuracy < cheap.accuracy
    assert "dominated after" in bad.message and problem.objectives(bad)[1][0] <= 0
    assert pareto_front(problem.evaluations, 0.0) == [cheap]
    good = problem.evaluate_bits([6] * n)  # costs more, scores at least as well: raced, but not stopped
    assert good.status == "ok" and good.extra["samples"] == 800
    with problem.batch():  # the batch began before all-5's cheaper rival: the bar stays what it was
        before = problem.race_bar(problem.configuration([7] * n))
        problem.evaluate_bits([4] * n)
        assert problem.race_bar(problem.configuration([7] * n)) == before
    assert problem.race_bar(problem.configuration([7] * n)) >= before


# -- budgets -----------------------------------------------------------------------------------------------------
def test_budget_evaluates_in_batches_that_fit_and_charges_other_work(qmodel, bops):
    problem = LayerwiseQuantizationProblem(qmodel, Separable(), 0.5, bits=(2, 6), costs=bops)
    batches = []

    def runner(f, X):
        batches.append(len(X))
        return [f(x) for x in X]

    problem.elementwise_runner = runner
    budget = Budget(problem, 10.5)
    budget.charge(2.25)
    rng = np.random.default_rng(0)
    results = budget.evaluate(rng.integers(2, 7, size=(50, 6)))
    # 8.25 whole evaluations were left: 8 at once, then 0.25 left, less than one evaluation: it stops there
    assert batches == [8] and len(results) == 8 and budget.spent == pytest.approx(10.25)
    assert budget.whole_left == 0 and not budget.exhausted


@pytest.mark.parametrize("limit", [3, 7.5, 13, 21.5])
def test_no_algorithm_overspends_a_small_budget(qmodel, bops, limit):
    """Budgets below one population, with sensitivities and seeds to pay for: spent never exceeds the limit."""
    for name in ("random", "greedy", "ilp", "nsga2", "guided"):
        problem = LayerwiseQuantizationProblem(qmodel, Separable(), 0.9, bits=(2, 6), costs=bops)
        budget = Budget(problem, limit)
        run_algorithm(name, problem, budget, pop_size=8, seed=1)
        assert budget.spent <= limit + 1e-9, (name, budget.spent)
        assert budget.whole_left == 0 or name in ("greedy", "ilp"), (name, budget.spent)


# -- gradient sensitivities ----------------------------------------------------------------------------------------
def test_gradient_scores_by_hand():
    from torch import nn

    from conftest import fake_quant_by_hand
    from quantsearch.search.sensitivity import gradient_scores

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 3)).eval()
    qmodel = QuantizedActivationsModel(net, "linear", weight_quantizers=True)
    x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    qmodel.calibrate([(x, y)], method="max", bits=(2, 8))
    genes = qmodel.quantizer_names  # input, 0, 0:weight
    scores = gradient_scores(qmodel, [(x[:8], y[:8]), (x[8:], y[8:])], genes, [(2, 8)] * 3)
    W, b = net[0].weight.detach(), net[0].bias.detach()
    z = x @ W.T + b
    g = torch.softmax(z, 1) - torch.nn.functional.one_hot(y, 3)  # dL/dz of the summed cross-entropy
    g_x = g @ W
    amax = qmodel.amax
    # the hand formula is the signed narrow range: the input, the logits and the weight are all signed here
    assert not any(qmodel.unsigned[n] for n in genes) and (x < 0).any() and (z < 0).any()
    for bits in (2, 4, 8):
        dz = fake_quant_by_hand(z, qmodel.amax_table["0"][bits], bits) - z
        dx = fake_quant_by_hand(x, qmodel.amax_table["input"][bits], bits) - x
        dW = fake_quant_by_hand(W, torch.tensor(amax["0:weight"]).reshape(-1, 1), bits) - W
        assert dz.abs().max() > 0 and dx.abs().max() > 0 and dW.abs().max() > 0  # a real error at every width
        for gene, value in (("0", (g * dz)), ("input", (g_x * dx)), ("0:weight", g * (x @ dW.T))):
            assert scores[gene][bits] == pytest.approx(0.5 * float((value ** 2).sum()) / 16, rel=1e-4), (gene, bits)
    assert scores["0"][2] > scores["0"][4] > scores["0"][8]  # more bits, less loss


def test_fit_scale_by_hand():
    """Two genes a, b in 2..4 with known gradient scores; the drops are chosen so that the in-band ratios
    measured / estimated are 2 and 8 (geometric mean 4, where an arithmetic mean would give 5), and every point the
    rule must ignore would move the result if it were counted."""
    from types import SimpleNamespace

    from quantsearch.search.problem import Evaluation
    from quantsearch.search.sensitivity import fit_scale

    # estimated (unit) drops: a: 4 -> 0, 3 -> 0.01, 2 -> 0.05; b: 4 -> 0, 3 -> 0.02, 2 -> 0.02 (running maximum);
    # the table's own scale (3) must not enter the fit
    scores = {"a": {4: 0.02, 3: 0.03, 2: 0.07}, "b": {4: 0.02, 3: 0.04, 2: 0.03}}
    table = Sensitivity(("a", "b"), ((2, 4), (2, 4)), 0.9, {}, method="gradient", scores=scores, scale=3.0)
    problem = SimpleNamespace(in_space=lambda bits: all(2 <= b <= 4 for b in bits), genome=tuple)

    def at(bits, accuracy, status="ok"):
        return Evaluation(bits, accuracy, {}, 0.0, status)

    allowed = 0.04  # the band: drops within [0.01, 0.2]
    in_band = [at((3, 4), 0.88),  # drop 0.02 / estimate 0.01 = 2
               at((4, 3), 0.74)]  # drop 0.16 / estimate 0.02 = 8
    ignored = [at((2, 4), 0.65),  # drop 0.25 > 5 x allowed (ratio 5)
               at((3, 3), 0.8995),  # drop 0.0005 < 0.25 x allowed (ratio 1/60)
               at((4, 2), 0.88, "rejected"),  # not ok (ratio 1)
               at((5, 4), 0.85),  # outside the search space
               at((3, 2), 0.91),  # no drop (better than the reference)
               at((4, 4), 0.89)]  # estimate 0: the top itself
    assert fit_scale(table, in_band + ignored, problem, allowed) == pytest.approx(4.0)
    assert fit_scale(table, ignored + in_band[::-1], problem, allowed) == pytest.approx(4.0)  # order-free
    assert fit_scale(table, in_band[:1], problem, allowed) == pytest.approx(2.0)
    # nothing in the band: any positive drop up to 10 x allowed (0.4) counts: 0.25 / 0.05 = 5, while the drop 0.42
    # at estimate 0.07 (ratio 6) lies beyond
    assert fit_scale(table, [at((2, 4), 0.65), at((2, 2), 0.48)], problem, allowed) == pytest.approx(5.0)
    assert fit_scale(table, [at((2, 2), 0.48)] + ignored[2:], problem, allowed) == 1.0  # nothing usable
    assert fit_scale(table, [], problem, allowed) == 1.0
    # a lower-is-better metric: drops are increases over the reference 0.1
    lower = Sensitivity(("a", "b"), ((2, 4), (2, 4)), 0.1, {}, higher_is_better=False, method="gradient",
                        scores=scores)
    assert fit_scale(lower, [at((3, 4), 0.12), at((4, 3), 0.26), at((2, 4), 0.35)], problem,
                     allowed) == pytest.approx(4.0)


def _activation_problem(demo_vit, splits, batch: int, images: int):
    """The demo ViT calibrated on 64 images, its activations the genes (weights at 8 bits), the floor FP32 - 1
    point on ``images`` search images: ``(qmodel, evaluator, fp32, problem)``."""
    qmodel = QuantizedActivationsModel(demo_vit, "vit", weight_quantizers=True)
    qmodel.calibrate([(splits.calibration[i][0].unsqueeze(0), 0) for i in range(64)], method="max", bits=(2, 8))
    evaluate = AccuracyEvaluator(splits.search, batch, limit=images)
    with qmodel.quantization_disabled():
        fp32 = evaluate(qmodel)
    problem = LayerwiseQuantizationProblem(qmodel, evaluate, fp32 - 0.01, (2, 8), genes=qmodel.activation_names,
                                           fixed_bits=8)
    return qmodel, evaluate, fp32, problem


def test_gradient_sensitivity_is_scaled_to_the_uniform_baselines(demo_vit, splits):
    from quantsearch.run.pipeline import evaluate_baselines
    from quantsearch.search.sensitivity import fit_scale, gradient_sensitivity

    qmodel, evaluate, fp32, problem = _activation_problem(demo_vit, splits, 200, 400)
    evaluate_baselines(problem)
    budget = Budget(problem, 100)
    before = budget.spent
    table = gradient_sensitivity(problem, budget, images=200)
    # one batch of 200 of the 400 images: (3 passes + 7 widths) x 200 / 400 full evaluations
    assert budget.spent - before == pytest.approx(5.0) and table.method == "gradient" and table.scale > 0
    # the scale is fit_scale's (checked by hand in test_fit_scale_by_hand) of the unit estimates against every
    # evaluation so far, for the drop the floor (FP32 - 0.01) allows below the reference
    unit = Sensitivity(**{**table.__dict__, "scale": 1.0})
    allowed = table.reference - (fp32 - 0.01)
    assert allowed > 0 and table.scale == pytest.approx(fit_scale(unit, problem.visited, problem, allowed))
    assert table.drops()["blocks.0.mlp.act"][4] == pytest.approx(table.scale * unit.drops()["blocks.0.mlp.act"][4])
    # every gene has an estimate at every width, never lower with fewer bits
    drops = table.drops()
    assert all(drops[g][b] >= drops[g][b + 1] >= 0 for g in table.genes for b in range(2, 8))
    assert Sensitivity.from_dict(table.to_dict()) == table


def test_refit_recovers_per_gene_weights(qmodel, bops):
    from quantsearch.search.problem import Evaluation

    problem, model = _model(qmodel, bops, bits=(2, 6))
    rng = np.random.default_rng(1)
    truth = np.array([0.5, 2.0, 1.0, 1.5, 0.8, 1.2])
    genomes = rng.integers(2, 7, size=(200, 6))
    drops = model.drops[np.arange(6), genomes]
    evaluations = [Evaluation(problem.configuration(g), model.reference - 0.002 - float((truth * d).sum()), {}, 0.0)
                   for g, d in zip(genomes, drops)]
    fitted = model.refit(evaluations, problem, cap=10.0, strength=1e-6)
    np.testing.assert_allclose(fitted.drops[:, 2] / model.drops[:, 2], truth, rtol=1e-3)
    assert fitted.reference == pytest.approx(model.reference - 0.002, abs=1e-6)
    assert model.refit(evaluations[:2], problem, cap=10.0) is model  # too few to fit: unchanged


def test_guided_search_offers_each_configuration_once_and_uses_infill(qmodel, bops):
    problem = LayerwiseQuantizationProblem(qmodel, Separable(), 0.93, bits=(2, 6), costs=bops)
    asked = []
    problem.listeners.append(lambda e: asked.append(e.bits))
    outcome = run_algorithm("guided", problem, Budget(problem, 60), pop_size=8, seed=0)
    assert len(asked) == len(set(asked)) == len(problem.visited)
    # infill solved the refitted model each generation; on this 6-gene toy its solutions may all be known already
    details = outcome.details
    assert details["infill_solved"] > 0 and 0 <= details["infilled"] <= details["infill_solved"]
    assert outcome.sensitivity.method == "measured"  # Separable has no data


def test_uniform_configurations_race_and_the_named_baselines_do_not(demo_vit, splits):
    """Early rejection comes on between the baselines' table (whole-split accuracies, even far below the floor)
    and the other uniform configurations, which are search candidates: 3-bit activations stop part-way."""
    from quantsearch.run.pipeline import evaluate_baselines

    qmodel, evaluate, fp32, problem = _activation_problem(demo_vit, splits, 100, 800)
    named = {"W8A2": {**{n: 2 for n in qmodel.activation_names}, **{n: 8 for n in qmodel.weight_names}}}
    switched = []
    baselines, seeds = evaluate_baselines(problem, named, then=lambda: (evaluate.reject_below(fp32 - 0.01),
                                                                        switched.append(len(problem.evaluations))))
    assert switched == [1]  # after the one named baseline, before any uniform configuration
    assert baselines["W8A2"].status == "ok" and baselines["W8A2"].extra["samples"] == 800
    by_width = {e.bits[0]: e for e in problem.evaluations}
    assert set(by_width) == set(range(2, 9)) and len(seeds) == 7  # A2 is the baseline's, measured once
    assert by_width[3].status == "rejected" and by_width[3].extra["samples"] < 800
    assert by_width[8].status == "ok" and by_width[8].extra["samples"] == 800
