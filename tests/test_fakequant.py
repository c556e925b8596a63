"""The fast path must give exactly what pytorch-quantization's TensorQuantizer gives."""
import warnings

import pytest
import torch

from quantsearch.quantize.fakequant import FastTensorQuantizer
from quantsearch.quantize.quantized_model import QuantizedActivationsModel

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from pytorch_quantization.nn import TensorQuantizer
    from pytorch_quantization.tensor_quant import QuantDescriptor


def pair(bits, amax, unsigned=False, narrow=True):
    desc = QuantDescriptor(num_bits=bits, fake_quant=True, axis=None, unsigned=unsigned, narrow_range=narrow,
                           amax=amax)
    return TensorQuantizer(desc), FastTensorQuantizer(desc)


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8, 12, 16])
@pytest.mark.parametrize("narrow", [True, False])
def test_bit_identical_on_random_tensors(bits, narrow):
    torch.manual_seed(bits)
    plain, fast = pair(bits, 2.5, narrow=narrow)
    x = torch.randn(64, 197, 32) * 1.5
    # values exactly on .5 boundaries of the grid, and beyond amax on both sides
    bound = 2 ** (bits - 1) - 1
    x.view(-1)[:200] = (torch.arange(200) - 100 + 0.5) * 2.5 / bound
    x.view(-1)[200:210] = torch.tensor([-1e6, 1e6, -3.0, 3.0, 0.0, -0.0, 2.5, -2.5, 1e-9, -1e-9])
    with torch.inference_mode():
        assert torch.equal(fast(x), plain(x))


def test_bit_identical_unsigned_on_nonnegative_data():
    plain, fast = pair(4, 1.0, unsigned=True)
    x = torch.rand(1000) * 1.3
    with torch.inference_mode():
        assert torch.equal(fast(x), plain(x))
        assert len(torch.unique(fast(x))) <= 16


def test_falls_back_where_the_fast_path_does_not_apply():
    plain, fast = pair(8, 2.0)
    x = torch.randn(10, requires_grad=True)
    y = fast(x)  # gradients needed: TensorQuantizer's autograd Function (straight-through estimator)
    y.sum().backward()
    assert torch.equal(x.grad, (x.abs() <= 2.0).float())
    with torch.inference_mode():
        half = torch.randn(10).half()
        assert torch.equal(fast(half), plain(half))


def test_bit_identical_on_real_activations(fashion):
    from quantsearch.sources.models import create_demo_vit

    x = fashion.tensors[0][:200]
    outputs = {}
    for fast in (False, True):
        qmodel = QuantizedActivationsModel(create_demo_vit(), "vit", fast=fast)
        assert all(isinstance(q, FastTensorQuantizer) == fast for _, q in qmodel.named_quantizers())
        qmodel.calibrate([x], 1)
        qmodel.bit_widths = [3, 4, 5, 6, 8] * (len(qmodel) // 5)
        with torch.inference_mode():
            outputs[fast] = qmodel(x)
    assert torch.equal(outputs[True], outputs[False])



def test_only_an_output_no_one_else_holds_is_quantized_in_place():
    """In evaluation a quantizer overwrites its module's fresh output (no copy). An output that is the module's
    input (a pass-through), or that an earlier hook already holds, is quantized into a new tensor, so what others
    hold keeps its values. The results are TensorQuantizer's, bit for bit."""
    import copy

    from torch import nn

    from quantsearch.quantize.predicates import by_type

    class PassThrough(nn.Module):
        def forward(self, x):
            return x

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), PassThrough(), nn.Linear(8, 8), nn.Linear(8, 4)).eval()
    plain = copy.deepcopy(model)
    x = torch.randn(16, 8)
    qmodels = {}
    for fast, m in ((True, model), (False, plain)):
        qmodels[fast] = QuantizedActivationsModel(m, by_type(nn.Linear, PassThrough), quantize_input=False, fast=fast)
        qmodels[fast].calibrate([x], 1)
        qmodels[fast].bit_widths = {"0": 3, "1": 2, "2": 3, "3": 3}  # the pass-through re-quantizes coarser
    raw, held = {}, {}
    linear_forward = model[0].forward
    model[0].forward = lambda t: raw.setdefault("0", linear_forward(t))  # the layer's own output, before hooks

    def hold(name):
        def hook(_module, _args, out):
            held.setdefault(name, (out, out.clone()))  # returns None: the output stays what it is
        return hook

    model[0].register_forward_hook(hold("0"))
    model[2].register_forward_hook(hold("2"), prepend=True)
    with torch.inference_mode():
        out = qmodels[True](x)
        reference = qmodels[False](x)
    assert torch.equal(out, reference)
    quantized_0, values_0 = held["0"]
    assert quantized_0.data_ptr() == raw["0"].data_ptr()  # layer 0's quantizer wrote into the layer's output
    assert torch.equal(quantized_0, values_0)  # the pass-through's quantizer did not overwrite its input
    fp32_2, values_2 = held["2"]
    assert torch.equal(fp32_2, values_2)  # layer 2's FP32 output, held by an earlier hook, kept its values
    with torch.no_grad():  # outside inference mode nothing is overwritten
        raw.clear(), held.clear()
        qmodels[True](x)
        assert held["0"][0].data_ptr() != raw["0"].data_ptr()
