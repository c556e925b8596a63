"""Refinement through each convolution's own forward (issue 28).

timm's TensorFlow-style ``Conv2dSame`` pads in its forward: a refinement that called ``_conv_forward`` skipped the
padding and, at stride 2, met 7 outputs against 8. Checked here on that layer and on others whose forward is not
``Conv2d``'s (weight standardization, reflect padding), against the module itself, and on the EfficientNet-Lite0
example (``tf_efficientnet_lite0``, built of ``Conv2dSame`` and padded convolutions) end to end.
"""
import copy
import functools
import json

import pytest
import torch
from conftest import write_fashion_pngs
from timm.layers import Conv2dSame, StdConv2dSame
from torch import nn

from quantsearch.quantize import refine as refine_package
from quantsearch.quantize.quantized_model import QuantizedActivationsModel
from quantsearch.quantize.refine import refine
from quantsearch.quantize.refine.adaround import adaround
from quantsearch.quantize.refine.layers import layer_forward

# kind: (layer, whether the 16 input channels move together, bound on AdaRound's error / nearest's on the data).
# Channels that move together make an output's error the sum of its rounding errors, which AdaRound cancels; a
# weight-standardized layer re-centres its weights, so it gains a little, and on independent channels.
CONVS = {"Conv2dSame stride 2": (lambda: Conv2dSame(16, 4, 3, stride=2), True, 0.5),
         "StdConv2dSame stride 2": (lambda: StdConv2dSame(16, 4, 3, stride=2, bias=True), False, 0.99),
         "Conv2d reflect-padded": (lambda: nn.Conv2d(16, 4, 3, padding=1, padding_mode="reflect"), True, 0.75)}


def _inputs(samples: int = 64, together: bool = True) -> torch.Tensor:
    """16x16 images of 16 channels, moving together (plus a little noise) or independent."""
    if not together:
        return torch.randn(samples, 16, 16, 16)
    return torch.randn(samples, 1, 16, 16) * torch.ones(1, 16, 1, 1) + 0.05 * torch.randn(samples, 16, 16, 16)


@pytest.mark.parametrize("kind", list(CONVS))
def test_layer_forward_is_the_modules_own_forward(kind):
    """Other weights through :func:`layer_forward` give what the module itself gives with them loaded (its padding
    included: 8x8 outputs at stride 2), gradients reach them, and the module keeps its own parameters."""
    torch.manual_seed(0)
    module, x = CONVS[kind][0](), _inputs(4)
    weight, bias = torch.randn_like(module.weight).requires_grad_(), torch.randn(4)
    twin = copy.deepcopy(module)
    with torch.no_grad():
        twin.weight.copy_(weight)
        twin.bias.copy_(bias)
        expected = twin(x)
    out = layer_forward(module, x, weight, bias)
    assert out.shape == expected.shape and torch.allclose(out, expected, atol=1e-5)
    out.square().sum().backward()
    assert weight.grad is not None and float(weight.grad.abs().sum()) > 0
    assert isinstance(module.weight, nn.Parameter) and isinstance(module.bias, nn.Parameter)
    assert not torch.equal(module.weight, weight)


@pytest.mark.parametrize("kind", list(CONVS))
def test_adaround_and_bias_correction_on_convolutions_with_their_own_forward(kind):
    """AdaRound's weight lies on the 3-bit grid and the refined model's error on the data, measured here through
    the model itself, is clearly below round-to-nearest's; bias correction leaves no mean error per channel."""
    torch.manual_seed(0)
    make, together, bound = CONVS[kind]
    model = nn.Sequential(make())
    qmodel = QuantizedActivationsModel(model, lambda n, m: False, quantize_input=False, weight_quantizers=True,
                                       num_bits=3)
    x = _inputs(together=together)
    with qmodel.quantization_disabled(), torch.no_grad():
        target = model(x)
    with torch.no_grad():
        nearest = float((qmodel(x) - target).square().mean())
    changed = refine(qmodel, [x], "adaround", iterations=200)
    codes = changed["0.weight"] * (3.0 / qmodel.quantizer("0:weight").amax.reshape(-1, 1, 1, 1))
    assert torch.allclose(codes, codes.round(), atol=1e-4) and float(codes.abs().max()) <= 3 + 1e-4
    with torch.no_grad():
        assert float((qmodel(x) - target).square().mean()) < bound * nearest
    qmodel.refined = {}
    assert list(refine(qmodel, [x], "bias-correction")) == ["0.bias"]
    with torch.no_grad():
        assert float((qmodel(x) - target).mean(dim=(0, 2, 3)).abs().max()) < 1e-5


@pytest.fixture(scope="module")
def lite0_refined(tmp_path_factory):
    """A reported point of the shipped EfficientNet-Lite0 config (agreement, 16 unlabeled images) refined by
    ``apply --refine`` with each method: ``{method: (exit code, refined bit-config)}``, read-only afterwards.
    AdaRound runs 20 iterations per layer instead of 1,000: which rounding it learns is not the point here, only
    that all 50 layers (``Conv2dSame`` among them) go through."""
    from quantsearch.cli.apply import main as apply_main
    from quantsearch.cli.explore import main as explore_main
    from test_efficientnet_lite0 import CONFIG

    folder = tmp_path_factory.mktemp("lite0")
    photos, out = folder / "photos", folder / "run"
    write_fashion_pngs(photos, 16)
    assert explore_main(["--config", str(CONFIG), "--dataset", f"images:{photos}", "--batch-size", "4",
                         "--calib-batches", "1", "--eval-samples", "8", "--holdout-samples", "4",
                         "--max-accuracy-drop", "0.5", "--pop-size", "2", "--generations", "1",
                         "--out", str(out), "--no-progress", "--log-level", "WARNING"]) == 0
    point = sorted((out / "pareto").glob("point_*.json"))[0]
    refined = {}
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(refine_package.REFINERS, "adaround", functools.partial(adaround, iterations=20))
        for method in ("adaround", "bias-correction"):
            code = apply_main([str(point), "--refine", method])
            refined[method] = code, point.with_name(f"{point.stem}.{method}.json")
    return refined


@pytest.mark.slow  # about 40 s: the model is built five times
@pytest.mark.parametrize("method", ["adaround", "bias-correction"])
def test_refine_efficientnet_lite0_end_to_end(lite0_refined, method):
    """``apply --refine adaround`` and ``--refine bias-correction`` run on the EfficientNet-Lite0 example and
    write a refined bit-config that changed the parameters the method names."""
    code, refined = lite0_refined[method]
    assert code == 0
    record = json.loads(refined.read_text())["refined"]
    suffix = ".weight" if method == "adaround" else ".bias"
    assert record["method"] == method and record["parameters"]
    assert all(key.endswith(suffix) for key in record["parameters"])


@pytest.mark.slow
@pytest.mark.parametrize("method", ["adaround", "bias-correction"])
def test_refined_efficientnet_lite0_checks_identical(lite0_refined, method, capsys):
    """``apply --check`` of the refined bit-config finds its recorded accuracies again. Agreement compares with the
    FP32 model, which has no refinements."""
    from quantsearch.cli.apply import main as apply_main

    capsys.readouterr()
    code = apply_main([str(lite0_refined[method][1]), "--check"])
    text = capsys.readouterr().out
    assert code == 0 and text.count("identical") >= 3 and "differs" not in text, text
