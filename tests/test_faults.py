"""Numerical faults: a quantizer that cannot quantize, NaN/Inf in the model output, named by quantizer; a failed
candidate is recorded as failed (accuracy 0, infeasible), never silently scored."""
import pytest
import torch

from quantsearch.quantize.calib import CalibrationError
from quantsearch.search.evaluator import Evaluator, NumericalError
from quantsearch.search.problem import LayerwiseQuantizationProblem
from quantsearch.quantize.quantized_model import QuantizedActivationsModel


@pytest.fixture
def batches():
    torch.manual_seed(1)
    x, y = torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,))
    return [(x[:4], y[:4]), (x[4:], y[4:])]


@pytest.fixture
def qmodel(convnet, batches):
    q = QuantizedActivationsModel(convnet, "conv2d", weight_quantizers=True)
    q.calibrate(batches)
    return q


def test_a_quantizer_that_makes_nan_is_named(qmodel, batches):
    evaluate = Evaluator(batches, batch_size=4)
    assert 0 <= evaluate(qmodel) <= 1
    qmodel.quantizer("conv2")._amax.data.fill_(float("nan"))  # a corrupted amax, past the setter's checks
    with pytest.raises(NumericalError) as raised:
        evaluate(qmodel)
    assert str(raised.value) == ("model output holds NaN or Inf (batch 0): quantizer 'conv2' (8 bits, amax nan) "
                                 "turns a finite tensor into NaN or Inf")


def test_nan_made_upstream_names_the_first_quantizer_it_reaches(convnet, qmodel, batches):
    with torch.no_grad():
        convnet.conv2.bias[0] = float("nan")  # conv2's output: the quantizer "conv2" is the first to see it
    with pytest.raises(NumericalError, match="NaN or Inf reaches quantizer 'conv2': made upstream of it"):
        Evaluator(batches, batch_size=4)(qmodel)


def test_nan_only_in_the_second_batch_is_found_there(convnet, qmodel, batches):
    x, y = batches[1]
    x = x.clone()
    x[2, 0, 3, 3] = float("nan")
    with pytest.raises(NumericalError, match=r"\(batch 1\): NaN or Inf reaches quantizer 'input'"):
        Evaluator([batches[0], (x, y)], batch_size=4)(qmodel)


def test_a_failed_candidate_is_recorded_failed_and_infeasible(qmodel, batches):
    evaluate = Evaluator(batches, batch_size=4)
    problem = LayerwiseQuantizationProblem(qmodel, evaluate, 0.0, bits=(4, 8))
    ok = problem.evaluate_bits([8] * problem.n_var)
    qmodel.quantizer("conv1")._amax.data.fill_(float("nan"))
    qmodel.amax_table.clear()  # keep the corrupted amax when bits change
    failed = problem.evaluate_bits([4] * problem.n_var)
    assert ok.status == "ok" and failed.status == "failed" and failed.accuracy == 0.0
    assert "quantizer 'conv1'" in failed.message
    # the floor is 0: a failed candidate would "meet" it with accuracy 0, yet it is infeasible
    assert not problem.is_feasible(failed) and problem.objectives(failed)[1][0] > 0


def test_calibration_refuses_a_quantizer_with_zero_amax_by_name(convnet, batches):
    with torch.no_grad():
        convnet.conv1.weight.zero_()
        convnet.conv1.bias.zero_()
    qmodel = QuantizedActivationsModel(convnet, "conv2d")
    with pytest.raises(CalibrationError, match=r"quantizer 'conv1' has amax 0.0: it cannot quantize"):
        qmodel.calibrate(batches, method="mse", bits=(4, 8))
