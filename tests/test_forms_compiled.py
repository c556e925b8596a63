"""The forms under ``torch.compile``: one graph for every width (no Python number that changes between candidates
is read in the forward), no graph break, and the same values as the eager forward, bit for bit."""
import pytest
import torch

from quantsearch.quantize.forms import (AsymmetricTensorQuantizer, Log2TensorQuantizer, LogSqrt2TensorQuantizer,
                                        NarrowLog2TensorQuantizer, NarrowLogSqrt2TensorQuantizer,
                                        PerHeadTensorQuantizer, asymmetric_grid, asymmetric_grid_tensors)
from quantsearch.quantize.quantized_model import make_quantizer


def _calibrated(form):
    """A quantizer of ``form`` with a range for every width (the values calibration would set), and a setter."""
    torch.manual_seed(0)
    q = make_quantizer(8, form=form, heads=(4, 16))
    assert type(q) is {"asymmetric": AsymmetricTensorQuantizer, "log2": Log2TensorQuantizer,
                       "log2-narrow": NarrowLog2TensorQuantizer, "per-head": PerHeadTensorQuantizer,
                       "log-sqrt2": LogSqrt2TensorQuantizer, "log-sqrt2-narrow": NarrowLogSqrt2TensorQuantizer}[form]
    q.unsigned = form.startswith("log")
    q.register_buffer("_amax", torch.ones(4 if form == "per-head" else ()))

    def set_width(bits):
        q.num_bits = bits
        if form == "asymmetric":
            q.amax, q.low = 2.0 + bits / 7, -0.3 - bits / 50
        elif form == "per-head":
            q._amax.data.copy_(torch.tensor([0.5, 1.0, 2.0 + bits / 9, 3.0]))  # as QuantizedActivationsModel does
        else:
            q.amax = 1.0 - bits / 100
    return q, set_width


@pytest.mark.parametrize("form", ["asymmetric", "log2", "log2-narrow", "per-head", "log-sqrt2", "log-sqrt2-narrow"])
def test_one_graph_serves_every_width_and_matches_eager(form):
    import torch._dynamo

    q, set_width = _calibrated(form)
    x = torch.randn(8, 16) * 2
    x[0, 0] = 0.4999  # near a level's edge somewhere
    if form.startswith("log"):
        x = x.abs()
    torch._dynamo.reset()
    counts = {"frames": 0}

    def backend(graph, example_inputs):
        counts["frames"] += 1
        return graph.forward

    compiled = torch.compile(q, backend=backend, fullgraph=True, dynamic=False)
    for bits in (2, 3, 4, 5, 6, 8, 3):
        set_width(bits)
        with torch.no_grad():
            eager, traced = q(x), compiled(x)
        assert torch.equal(traced, eager), bits
    assert counts["frames"] == 1


def test_asymmetric_grid_in_tensors_is_the_python_grid():
    torch.manual_seed(1)
    for _ in range(500):
        low, high = (float(v) for v in torch.randn(2, dtype=torch.float32) * torch.rand(2) * 10)
        low, high = min(low, high), max(low, high)
        bits = int(torch.randint(2, 17, ()))
        try:
            expected = asymmetric_grid(low, high, bits)
        except ValueError:  # an empty range: calibration never sets one
            continue
        scale, zero, top = asymmetric_grid_tensors(torch.tensor(low), torch.tensor(high),
                                                   torch.tensor(2.0 ** bits - 1.0))
        assert (float(scale), float(zero), float(top)) == expected


def test_one_group_is_the_uniform_grid_bit_for_bit():
    """A per-head quantizer with one group is TensorQuantizer's uniform grid, with amax values where a reciprocal
    times the bound (a number over a tensor) and the bound over amax round differently."""
    from pytorch_quantization import tensor_quant

    from quantsearch.quantize.forms import grouped_fake_quant

    torch.manual_seed(2)
    amaxes = torch.rand(2000) * 5 + 0.1
    bound = torch.tensor(7.0)
    differ = amaxes[(amaxes.reciprocal() * 7.0) != (bound / amaxes)][:20]
    assert len(differ) > 0  # the two scales do differ for these amax values
    x = torch.randn(64, 16) * 3
    for amax in differ:
        reference = tensor_quant.fake_tensor_quant(x, amax, 4, False, True)
        assert torch.equal(grouped_fake_quant(x, [float(amax)], 4, False), reference)
