import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from conftest import fake_quant_by_hand
from quantsearch.quantize.calib import CalibrationError
from quantsearch.quantize.predicates import by_name, by_type, get_target
from quantsearch.quantize.quantized_model import QuantizedActivationsModel


def test_fake_quant_matches_hand_formula(convnet):
    x = torch.randn(4, 1, 8, 8)
    raw = {}
    convnet.conv2.register_forward_hook(lambda m, i, o: raw.__setitem__("conv2", o.clone()))
    qmodel = QuantizedActivationsModel(convnet, "conv2d")
    qmodel.amax = {"input": 1.5, "conv1": 0.7, "conv2": 0.9}
    for bits in (2, 3, 4, 8):
        qmodel.bit_widths = [bits] * 3
        seen = {}
        h = convnet.conv2.register_forward_hook(lambda m, i, o: seen.__setitem__("q", o.clone()))
        qmodel(x)
        h.remove()
        # conv2's own output, recomputed from its quantized input, then quantized by hand
        expected = fake_quant_by_hand(raw["conv2"], 0.9, bits)
        torch.testing.assert_close(seen["q"], expected, rtol=0, atol=1e-6)
        assert len(torch.unique(seen["q"])) <= 2 ** bits - 1


def test_input_quantizer_applies_formula(convnet):
    qmodel = QuantizedActivationsModel(convnet, by_name("nothing-matches"))
    assert qmodel.quantizer_names == ["input"]
    qmodel.amax = {"input": 2.0}
    qmodel.bit_widths = [4]
    got = {}
    convnet.conv1.register_forward_pre_hook(lambda m, a: got.__setitem__("x", a[0].clone()))
    x = torch.randn(2, 1, 5, 5) * 3
    qmodel(x)
    torch.testing.assert_close(got["x"], fake_quant_by_hand(x, 2.0, 4), rtol=0, atol=1e-6)
    # values beyond amax are clamped to +-amax
    assert got["x"].abs().max().item() == pytest.approx(2.0)


def test_calibrated_amax_is_max_abs_over_calibration_batches(convnet):
    torch.manual_seed(1)
    data = TensorDataset(torch.randn(40, 1, 8, 8) * 2, torch.zeros(40, dtype=torch.long))
    expected = {"input": 0.0, "conv1": 0.0, "conv2": 0.0}

    def track(name):
        return lambda m, i, o: expected.__setitem__(name, max(expected[name], o.abs().max().item()))

    handles = [convnet.conv1.register_forward_hook(track("conv1")),
               convnet.conv2.register_forward_hook(track("conv2"))]
    with torch.no_grad():
        for x, _ in list(DataLoader(data, batch_size=10))[:3]:  # 3 of the 4 batches
            expected["input"] = max(expected["input"], x.abs().max().item())
            convnet(x)
    for h in handles:
        h.remove()
    qmodel = QuantizedActivationsModel(convnet, "conv2d")
    amax = qmodel.calibrate(DataLoader(data, batch_size=10), num_batches=3)
    for name, value in expected.items():
        assert amax[name] == pytest.approx(value, rel=1e-6), name
    # quantization is on after calibration and off while calibrating (FP32 activations were measured)
    assert all(q._if_quant and not q._if_calib for _, q in qmodel.named_quantizers())


def test_hook_count_is_selection_plus_input(demo_vit):
    target = get_target("vit")
    outputs = [n for n, m in demo_vit.named_modules() if n and target.outputs(n, m)]
    inputs = [n for n, m in demo_vit.named_modules() if n and target.inputs(n, m)]
    qmodel = QuantizedActivationsModel(demo_vit, "vit")
    forward_hooks = sum(len(m._forward_hooks) for m in demo_vit.modules())
    pre_hooks = sum(len(m._forward_pre_hooks) for m in demo_vit.modules())
    assert forward_hooks == len(outputs)
    assert pre_hooks == len(inputs) + 1  # + the model input quantizer
    assert len(qmodel) == len(outputs) + len(inputs) + 1
    # 4 blocks x (norm1, qkv, attn probs, proj input, proj, norm2, fc1, act, fc2) + input, patch embed, norm, head
    assert len(qmodel) == 4 * 9 + 4
    assert qmodel.quantizer_names[:3] == ["input", "patch_embed.proj", "blocks.0.norm1"]
    assert "blocks.2.attn.proj:input" in qmodel.quantizer_names


def test_remove_restores_bit_identical_outputs(demo_vit, fashion):
    x = fashion.tensors[0][:64]
    with torch.no_grad():
        before = demo_vit(x).clone()
    fused = [m.fused_attn for m in demo_vit.modules() if hasattr(m, "fused_attn")]
    qmodel = QuantizedActivationsModel(demo_vit, "vit")
    qmodel.calibrate([x], 1)
    qmodel.bit_widths = [4] * len(qmodel)
    with torch.no_grad():
        assert not torch.equal(qmodel(x), before)
    model = qmodel.remove()
    assert model is demo_vit
    assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()) == 0
    assert [m.fused_attn for m in model.modules() if hasattr(m, "fused_attn")] == fused
    with torch.no_grad():
        assert torch.equal(model(x), before)


def test_disabled_quantization_gives_fp32_outputs(convnet):
    x = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        before = convnet(x)
    qmodel = QuantizedActivationsModel(convnet, "conv2d")
    qmodel.calibrate([x], 1)
    qmodel.bit_widths = [2, 2, 2]
    with qmodel.quantization_disabled(), torch.no_grad():
        assert torch.equal(qmodel(x), before)
    with torch.no_grad():
        assert not torch.equal(qmodel(x), before)


@pytest.mark.parametrize("bits", [3, 4])
def test_vit_attention_probabilities_and_projection_input_are_quantized(demo_vit, fashion, bits):
    x = fashion.tensors[0][:32]
    qmodel = QuantizedActivationsModel(demo_vit, "vit")
    qmodel.calibrate([x], 1)
    qmodel.bit_widths = [bits] * len(qmodel)
    attn = demo_vit.blocks[1].attn
    seen = {}
    # registered after the quantizers' hooks, so they see the quantized tensors
    attn.attn_drop.register_forward_hook(lambda m, i, o: seen.__setitem__("probs", o))
    attn.proj.register_forward_pre_hook(lambda m, a: seen.__setitem__("proj_in", a[0]))
    with torch.no_grad():
        qmodel(x)
    assert seen["probs"].shape[-1] == seen["probs"].shape[-2] == 17  # 16 patches + class token
    for key in ("probs", "proj_in"):
        assert len(torch.unique(seen[key])) <= 2 ** bits, key
    # and they are genuinely not FP32: the unquantized probabilities take many more values
    qmodel.remove()
    with torch.no_grad():
        attn.fused_attn = False
        demo_vit(x)
    assert len(torch.unique(seen["probs"])) > 1000


def test_bit_widths_list_and_dict(convnet):
    qmodel = QuantizedActivationsModel(convnet, by_type(nn.Conv2d) | by_name("fc"))
    assert qmodel.quantizer_names == ["input", "conv1", "conv2", "fc"]
    qmodel.bit_widths = [2, 3, 4, 5]
    assert qmodel.bit_widths == [2, 3, 4, 5]
    qmodel.bit_widths = {"conv2": 8}
    assert qmodel.bits_dict() == {"input": 2, "conv1": 3, "conv2": 8, "fc": 5}
    with pytest.raises(ValueError, match="expected 4"):
        qmodel.bit_widths = [8, 8]
    with pytest.raises(KeyError, match="conv9"):
        qmodel.bit_widths = {"conv9": 4}
    with pytest.raises(ValueError, match="outside"):
        qmodel.bit_widths = [1, 8, 8, 8]


def test_zero_amax_is_refused_by_name(convnet):
    qmodel = QuantizedActivationsModel(convnet, "conv2d")
    with pytest.raises(CalibrationError, match="'input'"):
        qmodel.calibrate([torch.zeros(2, 1, 8, 8)], 1)
