"""Block reconstruction (issue 30): LSQ's gradient by hand, the units found, a block's held-back error, and
``apply --refine`` with learned steps re-applying bit for bit."""
import json

import pytest
import torch
from torch import nn

from quantsearch.cli.apply import main as apply_main
from quantsearch.cli.explore import main as explore_main
from quantsearch.deploy.bitconfig import BitConfig
from quantsearch.quantize.quantized_model import QuantizedActivationsModel, make_quantizer
from quantsearch.quantize.refine import refine
from quantsearch.quantize.refine.blocks import find_units, unit_data
from quantsearch.quantize.fakequant import integer_range
from quantsearch.quantize.refine.lsq import lsq_asymmetric, lsq_fake_quant, lsq_grouped
from quantsearch.quantize.refine.reconstruction import _loss, reconstruct_unit


def test_lsq_gradient_by_hand():
    """3-bit narrow grid [-3, 3], step 0.5: x/s = [0.6, -3.4, 9.0, 1.3] round to [1, -3(clipped), 3(clipped), 1].
    Step gradient of sum(out): (1 - 0.6) + (-3) + 3 + (1 - 1.3) = 0.1, times the grad scale; x's gradient is 1
    inside the grid and 0 where clipped."""
    x = torch.tensor([0.3, -1.7, 4.5, 0.65], requires_grad=True)
    step = torch.tensor(0.5, requires_grad=True)
    out = lsq_fake_quant(x, step, -3.0, 3.0, grad_scale=0.25)
    assert torch.allclose(out, torch.tensor([0.5, -1.5, 1.5, 0.5]))
    out.sum().backward()
    assert float(step.grad) == pytest.approx(0.25 * 0.1, abs=1e-6)
    assert torch.equal(x.grad, torch.tensor([1.0, 0.0, 0.0, 1.0]))
    step.grad = None
    lsq_fake_quant(x, step, -3.0, 3.0).sum().backward()  # LSQ's own scale: 1 / sqrt(4 * 3)
    assert float(step.grad) == pytest.approx(0.1 / 12 ** 0.5, abs=1e-6)


def test_lsq_asymmetric_gradient_by_hand():
    """2 bits over [-1, 2]: scale (2 - -1) / 3 = 1, zero point 1. x = [0.4, 5, -3] give [0, 2 (clipped), -1
    (clipped)]. With the zero point rounded straight through, d scale = (d high - d low) / 3 and d zero =
    -2/3 d low - 1/3 d high; summed over the three outputs, low gets -0.4 * -1/3 + 0 + 1 and high
    -0.4 * 1/3 + 1 + 0, each times LSQ's scale 1 / sqrt(3 * 3)."""
    low, high = torch.tensor(-1.0, requires_grad=True), torch.tensor(2.0, requires_grad=True)
    x = torch.tensor([0.4, 5.0, -3.0])
    out = lsq_asymmetric(x, low, high, 3.0)
    assert torch.allclose(out, torch.tensor([0.0, 2.0, -1.0]))
    out.sum().backward()
    assert float(low.grad) == pytest.approx((0.4 / 3 + 1) / 3, abs=1e-6)
    assert float(high.grad) == pytest.approx((-0.4 / 3 + 1) / 3, abs=1e-6)


def test_lsq_grouped_is_lsq_per_group():
    """Per-head steps: each group's values and step gradient are those of LSQ on that group alone."""
    torch.manual_seed(0)
    x = torch.randn(5, 3, 8) * 2
    steps = torch.tensor([0.2, 0.5, 1.0, 0.3], requires_grad=True)
    lsq_grouped(x, steps, -7.0, 7.0).sum().backward()
    for g in range(4):
        step = steps[g].detach().clone().requires_grad_(True)
        part = x[..., 2 * g: 2 * g + 2]
        alone = lsq_fake_quant(part, step, -7.0, 7.0)
        assert torch.allclose(lsq_grouped(x, steps.detach(), -7.0, 7.0)[..., 2 * g: 2 * g + 2], alone)
        alone.sum().backward()
        assert float(steps.grad[g]) == pytest.approx(float(step.grad), rel=1e-5)


@pytest.mark.parametrize("unsigned", [False, True])
def test_lsq_matches_the_quantizer_at_its_amax(unsigned):
    """The learned grid is the quantizer's own: at amax = step * high, both give the same values."""
    torch.manual_seed(0)
    quantizer = make_quantizer(4)
    quantizer.register_buffer("_amax", torch.tensor(2.5))
    quantizer.unsigned = unsigned
    x = torch.randn(1000) * 2
    high, low = integer_range(4, unsigned, True)
    step = 2.5 / high
    assert (low, high) == ((0.0, 15.0) if unsigned else (-7.0, 7.0))
    assert torch.allclose(lsq_fake_quant(x, torch.tensor(step), low, high), quantizer(x.clamp_min(0) if unsigned
                                                                                       else x), atol=1e-6)


class _Residual(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(width, width, 3, padding=1), nn.Conv2d(width, width, 3, padding=1)
        self.relu = nn.ReLU()

    def forward(self, x):
        return self.relu(x + self.conv2(self.relu(self.conv1(x))))


class _ResNet(nn.Module):
    """A stem, two residual blocks in a Sequential, a head: units stem, layer.0, layer.1, head."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Conv2d(1, 8, 3, padding=1)
        self.layer = nn.Sequential(_Residual(8), _Residual(8))
        self.head = nn.Linear(8, 10)

    def forward(self, x):
        return self.head(self.layer(self.stem(x)).mean((2, 3)))


def _resnet_qmodel(bits=3):
    qmodel = QuantizedActivationsModel(_ResNet().eval(), "conv2d", weight_quantizers=True, num_bits=bits)
    batches = [torch.randn(32, 1, 8, 8) for _ in range(2)]
    qmodel.calibrate(batches)
    return qmodel, batches


def test_units_are_blocks_and_lone_layers_in_forward_order():
    qmodel, batches = _resnet_qmodel()
    units = find_units(qmodel, batches[0])
    assert [u.name for u in units] == ["stem", "layer.0", "layer.1", "head"]
    assert units[1].weights == ("layer.0.conv1:weight", "layer.0.conv2:weight")
    assert units[1].activations == ("layer.0.conv1", "layer.0.conv2")
    assert units[0].activations == ("stem",) and units[3].activations == ()
    from quantsearch.sources.models import create_demo_vit

    vit = QuantizedActivationsModel(create_demo_vit(), "vit", weight_quantizers=True)
    names = [u.name for u in find_units(vit, torch.zeros(1, 1, 28, 28))]
    assert names == ["patch_embed.proj", "blocks.0", "blocks.1", "blocks.2", "blocks.3", "head"]


def test_a_block_reconstruction_lowers_its_held_back_error():
    """A 3-bit residual block: the reported held-back errors are those of nearest (before) and of the kept
    weights and steps (after), recomputed here on the quantized model itself; after < before; the weights stay
    on their quantizers' grids and a learned step is the quantizer's amax."""
    qmodel, batches = _resnet_qmodel()
    unit = find_units(qmodel, batches[0])[1]
    data = unit_data(qmodel, unit, batches)
    amax = qmodel.amax
    generator = torch.Generator().manual_seed(0)
    check = torch.randperm(64, generator=generator)[:16]  # the quarter reconstruct_unit holds back (same seed)

    def held_back() -> float:
        with torch.no_grad():
            return float(_loss(unit.module(data[0][check]), data[2][check], 1))

    nearest = held_back()
    report = reconstruct_unit(qmodel, unit, data, iterations=200, seed=0)
    assert report["before"] == pytest.approx(nearest, rel=1e-4)
    assert report["after"] == pytest.approx(held_back(), rel=1e-4)
    assert report["after"] < 0.9 * report["before"] and report["kept"] > 0
    for name in unit.weights:
        weight = qmodel.weight_module(name).weight.detach()
        assert torch.equal(qmodel.quantizer(name)(weight), weight)
    assert any(qmodel.amax[n] != amax[n] for n in unit.activations)
    assert all(qmodel.amax[n] == amax[n] for n in qmodel.activation_names if n not in unit.activations)


def test_refine_qdrop_chains_and_keeps_unrefined_model_apart():
    """qdrop then bias correction through refine(): weights and biases come back as the model had them on
    remove(), and a drop probability of 1 is refused in one line."""
    qmodel, batches = _resnet_qmodel()
    own = {k: v.clone() for k, v in qmodel.model.state_dict().items()}
    changed = refine(qmodel, batches, "qdrop,bias-correction", iterations=20)
    assert {k.rsplit(".", 1)[1] for k in changed} == {"weight", "bias"}
    assert any(not torch.equal(own[k], v) for k, v in changed.items())
    with pytest.raises(ValueError, match="drop probability"):
        refine(qmodel, batches, "qdrop", drop=1.0)
    model = qmodel.remove()
    assert all(torch.equal(own[k], v) for k, v in model.state_dict().items())


def test_apply_refine_brecq_lsq_reapplies_identically(tmp_path, capsys):
    """apply --refine brecq-lsq: the refined bit-config records the options and the learned steps (amax), and
    re-applies to identical accuracies; --drop without qdrop and zero iterations are refused in one line."""
    out = tmp_path / "run"
    assert explore_main(["--pop-size", "4", "--generations", "1", "--eval-samples", "200", "--holdout-samples",
                         "200", "--calib-batches", "1", "--batch-size", "100", "--no-progress", "--log-level",
                         "WARNING", "--search-space", "both", "--out", str(out)]) == 0
    point = sorted((out / "pareto").glob("point_*.json"))[0]
    capsys.readouterr()
    assert apply_main([str(point), "--refine", "brecq-lsq", "--refine-iterations", "30"]) == 0
    assert "activation steps" in capsys.readouterr().out
    refined = point.with_name(point.stem + ".brecq-lsq.json")
    config, original = BitConfig.load(refined), BitConfig.load(point)
    assert config.refined["method"] == "brecq-lsq" and config.refined["options"] == {"iterations": 30}
    assert any(config.amax[n] != original.amax[n] for n in config.amax if not n.endswith(":weight"))
    assert apply_main([str(refined), "--check"]) == 0
    assert capsys.readouterr().out.count("identical") >= 2
    assert apply_main([str(point), "--refine", "brecq", "--drop", "0.5"]) == 2
    assert "--drop 0.5: needs a probability in [0, 1) and --refine qdrop" in capsys.readouterr().err
    assert apply_main([str(point), "--refine", "qdrop", "--refine-iterations", "0"]) == 2
    assert "--refine-iterations 0" in capsys.readouterr().err
    payload = json.loads(refined.read_text())
    payload["refined"]["options"]["drop"] = 1.5
    (tmp_path / "bad.json").write_text(json.dumps(payload))
    assert apply_main([str(tmp_path / "bad.json")]) == 2
    assert "violates the bit-config schema" in capsys.readouterr().err


def test_a_block_that_learns_nothing_better_keeps_nearest_and_its_calibrated_steps():
    """Twenty steps at learning rates 5 and 1 throw rounding and steps about: no checkpoint beats the start on the
    held-back quarter, so the block keeps rounding to nearest (computed here) and its calibrated amax."""
    qmodel, batches = _resnet_qmodel()
    unit = find_units(qmodel, batches[0])[1]
    data = unit_data(qmodel, unit, batches)
    amax = qmodel.amax
    nearest = {n: qmodel.quantizer(n)(qmodel.weight_module(n).weight.detach()) for n in unit.weights}
    report = reconstruct_unit(qmodel, unit, data, iterations=20, lr=5.0, step_lr=1.0, seed=0)
    assert report["kept"] == 0 and report["after"] == report["before"]
    for name in unit.weights:
        assert torch.equal(qmodel.weight_module(name).weight.detach(), nearest[name])
    assert all(qmodel.amax[n] == pytest.approx(amax[n], rel=1e-6) for n in unit.activations)


def test_fisher_weights_follow_what_reaches_the_logits():
    """The demo ViT's head reads the class token alone: the last block's Fisher weights are zero on every other
    token and positive on it, and they average 1."""
    from quantsearch.quantize.refine.blocks import output_fisher
    from quantsearch.sources.models import create_demo_vit

    qmodel = QuantizedActivationsModel(create_demo_vit(), "vit", weight_quantizers=True)
    torch.manual_seed(0)
    weights = output_fisher(qmodel, qmodel.model.blocks[3], [torch.randn(8, 1, 28, 28)])
    assert weights.shape == (8, 17, 64) and float(weights.mean()) == pytest.approx(1.0, rel=1e-5)
    assert float(weights[:, 1:].abs().max()) == 0.0 and float(weights[:, 0].sum()) > 0
    assert all(p.grad is None for p in qmodel.model.parameters())


def test_learned_weight_steps_become_the_weight_quantizers_amax():
    """scales=True: the kept per-channel weight steps are the weight quantizers' amax, the refined weights sit on
    that grid (their quantizer returns them unchanged), at least one step moved, and the held-back error falls."""
    qmodel, batches = _resnet_qmodel()
    unit = find_units(qmodel, batches[0])[1]
    data = unit_data(qmodel, unit, batches)
    amax = qmodel.amax
    report = reconstruct_unit(qmodel, unit, data, iterations=200, scales=True, step_lr=1e-2, seed=0)
    assert report["after"] < report["before"] and report["kept"] > 0
    moved = False
    for name in unit.weights:
        weight = qmodel.weight_module(name).weight.detach()
        assert torch.equal(qmodel.quantizer(name)(weight), weight)
        codes = weight * (2 ** (qmodel.quantizer(name).num_bits - 1) - 1) / torch.tensor(
            qmodel.amax[name]).reshape(-1, *[1] * (weight.dim() - 1))
        assert torch.allclose(codes, codes.round(), atol=1e-4)  # integer codes on the learned steps
        moved |= any(abs(a / b - 1) > 1e-4 for a, b in zip(qmodel.amax[name], amax[name]) if b > 0)
    assert moved
