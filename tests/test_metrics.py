"""Metrics against hand-computed values, the FP32 reference computed once, lower-is-better bounds in the problem,
and a label-free (kl) search end to end on the demo."""
import json
import math
import sys

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from quantsearch.search.evaluator import Evaluator, NumericalError
from quantsearch.sources.metrics import MetricError, get_metric
from quantsearch.cli.explore import main
from quantsearch.search.problem import LayerwiseQuantizationProblem
from quantsearch.quantize.quantized_model import QuantizedActivationsModel
from quantsearch.search.front import pareto_front

# four samples, three classes: the data are the logits themselves (the candidate model is the identity)
LOGITS = torch.tensor([[2.0, 1.0, 0.0], [0.0, 3.0, 1.0], [1.0, 0.0, 0.5], [0.0, 0.0, 4.0]])
LABELS = torch.tensor([0, 2, 1, 2])
SHIFT = torch.tensor([0.0, 0.0, 1.0])  # the "FP32" model adds this: it flips sample 2's top-1 to class 2


class Shift(nn.Module):
    def __init__(self, shift):
        super().__init__()
        self.shift = shift
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return x + self.shift


def _kl_by_hand(p_logits, q_logits):
    total = 0.0
    for pl, ql in zip(p_logits.tolist(), q_logits.tolist()):
        zp, zq = sum(math.exp(v) for v in pl), sum(math.exp(v) for v in ql)
        p = [math.exp(v) / zp for v in pl]
        q = [math.exp(v) / zq for v in ql]
        total += sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))
    return total / len(p_logits)


def test_builtin_metrics_by_hand():
    data = TensorDataset(LOGITS, LABELS)
    identity = nn.Identity()
    assert Evaluator(data, "top1", batch_size=3)(identity) == 2 / 4  # samples 0 and 3
    assert Evaluator(data, "top2", batch_size=3)(identity) == 3 / 4  # sample 1: its class 2 is second
    reference = Shift(SHIFT)
    agreement = Evaluator(data, "agreement", batch_size=3, reference=reference)
    assert agreement(identity) == 3 / 4 and agreement.higher_is_better
    kl = Evaluator(data, "kl", batch_size=3, reference=reference)
    assert kl(identity) == pytest.approx(_kl_by_hand(LOGITS + SHIFT, LOGITS), rel=1e-6)
    assert kl(reference) == pytest.approx(0.0, abs=1e-7) and not kl.higher_is_better
    # the reference outputs were computed once per evaluator, batch by batch (2 batches each), never again
    assert reference.calls == 2 + 2 + 2


def test_reference_is_the_fp32_model_of_a_quantized_model(demo_vit, fashion):
    x, y = fashion.tensors
    data = TensorDataset(x[:100], y[:100])
    qmodel = QuantizedActivationsModel(demo_vit, "vit")
    qmodel.calibrate([x[100:300]], 1)
    qmodel.bit_widths = [3] * len(qmodel)
    agreement = Evaluator(data, "agreement", batch_size=40, reference=qmodel)
    kl = Evaluator(data, "kl", batch_size=40, reference=qmodel)
    with qmodel.quantization_disabled():
        assert agreement(qmodel) == 1.0 and kl(qmodel) == 0.0  # FP32 against itself, exactly
    assert agreement(qmodel) < 0.9 and kl(qmodel) > 0.1  # 3-bit activations move the outputs
    qmodel.bit_widths = [16] * len(qmodel)
    assert agreement(qmodel) == 1.0 and 0 <= kl(qmodel) < 1e-4  # 16 bits: only clipping beyond amax is left


def test_label_free_data_and_unknown_metrics_are_refused():
    unlabeled = TensorDataset(LOGITS, torch.full((4,), -1))
    with pytest.raises(MetricError, match="top1 needs labels .* use --metric agreement or kl"):
        Evaluator(unlabeled, "top1")
    with pytest.raises(MetricError, match="compares with the FP32 model"):
        Evaluator(unlabeled, "kl")
    with pytest.raises(MetricError, match="unknown metric 'miou'"):
        get_metric("miou")
    evaluator = Evaluator(unlabeled, "agreement", reference=nn.Identity())
    with pytest.raises(NumericalError):
        evaluator(Shift(torch.tensor([0.0, float("nan"), 0.0])))


def test_callable_metrics_function_and_torchmetrics_style_class(tmp_path, monkeypatch):
    (tmp_path / "my_metrics.py").write_text(
        "import torch\n"
        "def margin(outputs, labels, reference, scale=1.0):\n"
        "    return scale * (outputs - reference).abs().max()\n"
        "margin.higher_is_better = False\n"
        "class WrongCount:\n"
        "    higher_is_better = False\n"
        "    def __init__(self, offset=0):\n"
        "        self.offset = offset\n"
        "        self.reset()\n"
        "    def reset(self):\n"
        "        self.wrong = 0\n"
        "    def update(self, outputs, labels):\n"
        "        self.wrong += int((outputs.argmax(1) != labels).sum())\n"
        "    def compute(self):\n"
        "        return torch.tensor(self.wrong + self.offset)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    data = TensorDataset(LOGITS, LABELS)
    margin = Evaluator(data, "my_metrics:margin", batch_size=3, reference=Shift(SHIFT),
                       metric_kwargs={"scale": 2.0})
    assert margin(nn.Identity()) == 2.0 and not margin.higher_is_better  # |shift| = 1, doubled
    wrong = Evaluator(data, "my_metrics:WrongCount", batch_size=3, metric_kwargs={"offset": 10})
    assert wrong(nn.Identity()) == 12.0 and wrong(nn.Identity()) == 12.0  # reset between evaluations
    assert not wrong.higher_is_better and wrong.references is None
    sys.modules.pop("my_metrics", None)


class _Fixed:
    """A lower-is-better evaluator whose value is looked up from the bits (for the orientation test)."""

    name, higher_is_better = "kl", False

    def __init__(self, qmodel, table):
        self.qmodel, self.table = qmodel, table

    def __call__(self, model):
        value = self.table[tuple(self.qmodel.bit_widths)]
        if value is None:
            raise NumericalError("NaN")
        return value


def test_lower_is_better_metric_flips_objective_and_constraint(convnet):
    qmodel = QuantizedActivationsModel(convnet, "conv2d")
    table = {(8, 8, 8): 0.001, (4, 4, 4): 0.2, (8, 4, 4): 0.04, (2, 2, 2): None}
    problem = LayerwiseQuantizationProblem(qmodel, _Fixed(qmodel, table), 0.05, bits=(2, 8))
    assert problem.objective_names == ["kl", "bits"]
    e = {bits: problem.evaluate_bits(bits) for bits in table}
    assert problem.objectives(e[(8, 4, 4)]) == ([0.04, 16.0], [pytest.approx(-0.01)])  # feasible: below the ceiling
    assert problem.objectives(e[(4, 4, 4)])[1][0] == pytest.approx(0.15)  # infeasible
    assert e[(2, 2, 2)].status == "failed" and problem.objectives(e[(2, 2, 2)])[1][0] > 0
    assert [problem.is_feasible(e[b]) for b in table] == [True, False, True, False]
    front = pareto_front(problem.evaluations, problem.bound)
    assert [f.bits for f in front] == [(8, 4, 4), (8, 8, 8)]  # cheapest first, each with the lower KL for its cost


def test_kl_search_end_to_end_on_the_demo(tmp_path):
    out = tmp_path / "kl"
    code = main(["--metric", "kl", "--max-accuracy-drop", "0.05", "--pop-size", "4", "--generations", "2",
                 "--eval-samples", "300", "--holdout-samples", "100", "--calib-batches", "1", "--batch-size", "100",
                 "--bits", "4:8", "--channels-last", "--out", str(out), "--no-progress"])
    assert code == 0
    run = json.loads((out / "run.json").read_text())
    assert run["metric"] == {"name": "kl", "higher_is_better": False, "bound": "ceiling"}
    assert run["fp32_accuracy"]["search"] == 0.0 and run["bound"]["limit"] == 0.05
    base = run["baselines"]
    assert 0 < base["W8A8"]["accuracy"] < base["W8A6"]["accuracy"] < base["W8A4"]["accuracy"]  # fewer bits, more KL
    assert run["front"] and all(p["accuracy"] <= 0.05 for p in run["front"])
    kls = [p["accuracy"] for p in run["front"]]
    assert kls == sorted(kls, reverse=True)  # cheapest first: more bits buy lower KL
    # the hypervolume counts KL below the ceiling (not above it): positive, and never shrinking
    from quantsearch.run.record import load_run

    volumes = load_run(out).convergence().hypervolume
    assert volumes[-1] > 0 and volumes == sorted(volumes)
    splits = json.loads((out / "splits.json").read_text())
    assert len(set(splits["search"]) | set(splits["holdout"]) | set(splits["calibration"])) == 100 + 300 + 100
    assert run["splits_sha256"]["search"] and run["settings"]["metric"] == "kl" and run["settings"]["channels_last"]


def test_channels_last_and_bfloat16_autocast_on_cpu(demo_vit, fashion):
    """What works on CPU: channels-last gives the same result; --amp (bfloat16 there) runs, and the fake quantizers
    then round in bfloat16, so values move by up to a step: close to, not equal to, the float32 result."""
    x, y = fashion.tensors
    data = TensorDataset(x[:200], y[:200])
    qmodel = QuantizedActivationsModel(demo_vit, "vit")
    qmodel.calibrate([x[200:400]], 1)
    qmodel.bit_widths = [6] * len(qmodel)
    fp32 = Evaluator(data, "top1", batch_size=100)(qmodel)
    assert Evaluator(data, "top1", batch_size=100, channels_last=True)(qmodel.to(memory_format=torch.channels_last)) \
        == fp32
    amp = Evaluator(data, "agreement", batch_size=100, amp=True, reference=qmodel)
    assert amp.batches[0][0].dtype == torch.float32  # batches stay float32; autocast casts inside the model
    assert abs(Evaluator(data, "top1", batch_size=100, amp=True)(qmodel) - fp32) <= 0.03
    assert amp(qmodel) >= 0.9
