"""Per-output-channel weight quantizers: the hand formula, exact restore, the per-bit-width cache, bit-configs."""
import json

import pytest
import torch

from quantsearch.deploy.bitconfig import BitConfig, BitConfigError, apply_bitconfig
from quantsearch.quantize.quantized_model import QuantizedActivationsModel


def per_channel_by_hand(w, bits):
    """amax_c = max|w_c|; round(w * (2^(b-1)-1) / amax_c), clamped to the narrow signed range, rescaled."""
    amax = w.abs().amax(dim=tuple(range(1, w.dim())), keepdim=True)
    bound = 2 ** (bits - 1) - 1
    scale = bound / amax
    return torch.clamp(torch.round(w * scale), -bound, bound) / scale


def weight_seen_in_forward(qmodel, module, x):
    seen = {}
    handle = module.register_forward_pre_hook(lambda m, a: seen.__setitem__("w", m.weight.detach().clone()))
    with torch.no_grad():
        qmodel(x)
    handle.remove()
    return seen["w"]


def test_weight_fake_quant_matches_per_channel_hand_formula(convnet):
    original = {n: m.weight.detach().clone() for n, m in convnet.named_children() if hasattr(m, "weight")}
    qmodel = QuantizedActivationsModel(convnet, "conv2d", weight_quantizers=True)
    assert qmodel.weight_names == ["conv1:weight", "conv2:weight", "fc:weight"]
    assert qmodel.activation_names == ["input", "conv1", "conv2"]
    assert qmodel.amax["conv2:weight"] == original["conv2"].abs().amax(dim=(1, 2, 3)).tolist()
    assert len(qmodel.amax["fc:weight"]) == 10  # one per output channel
    qmodel.calibrate([torch.randn(4, 1, 8, 8)], 1)
    x = torch.randn(2, 1, 8, 8)
    for bits in (2, 3, 4, 8):
        qmodel.bit_widths = {"conv2:weight": bits, "fc:weight": bits}
        seen = weight_seen_in_forward(qmodel, convnet.conv2, x)
        torch.testing.assert_close(seen, per_channel_by_hand(original["conv2"], bits), rtol=0, atol=1e-7)
        assert all(len(torch.unique(channel)) <= 2 ** bits - 1 for channel in seen)
        # each channel keeps its own extreme value: amax is per channel, not per tensor
        torch.testing.assert_close(seen.abs().amax(dim=(1, 2, 3)), original["conv2"].abs().amax(dim=(1, 2, 3)))
        fc = weight_seen_in_forward(qmodel, convnet.fc, x)
        torch.testing.assert_close(fc, per_channel_by_hand(original["fc"], bits), rtol=0, atol=1e-7)
    # outside a forward call the module holds its original weights
    assert torch.equal(convnet.conv2.weight, original["conv2"])


def test_remove_restores_bit_identical_weights_and_outputs(demo_vit, fashion):
    x = fashion.tensors[0][:32]
    state = {k: v.clone() for k, v in demo_vit.state_dict().items()}
    pointers = {n: p.data_ptr() for n, p in demo_vit.named_parameters()}
    with torch.no_grad():
        before = demo_vit(x).clone()
    qmodel = QuantizedActivationsModel(demo_vit, "vit", weight_quantizers=True)
    assert len(qmodel.weight_names) == 18  # patch embedding, 4 x (qkv, proj, fc1, fc2), head
    qmodel.calibrate([x], 1)
    qmodel.bit_widths = {n: 3 for n in qmodel.weight_names}
    with torch.no_grad():
        weights_only = qmodel(x)
    qkv = demo_vit.blocks[0].attn.qkv
    assert not torch.equal(weight_seen_in_forward(qmodel, qkv, x), state["blocks.0.attn.qkv.weight"])
    with qmodel.quantization_disabled():  # off means FP32, weights included
        assert torch.equal(weight_seen_in_forward(qmodel, qkv, x), state["blocks.0.attn.qkv.weight"])
    qmodel.bit_widths = {n: 8 for n in qmodel.weight_names}
    with torch.no_grad():
        assert not torch.equal(qmodel(x), weights_only)
    model = qmodel.remove()
    assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()) == 0
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in state.items())
    assert {n: p.data_ptr() for n, p in model.named_parameters()} == pointers
    with torch.no_grad():
        assert torch.equal(model(x), before)


def test_weights_come_back_when_forward_raises(convnet):
    original = convnet.conv1.weight.detach().clone()
    qmodel = QuantizedActivationsModel(convnet, "conv2d", weight_quantizers=True)
    qmodel.calibrate([torch.randn(2, 1, 8, 8)], 1)
    qmodel.bit_widths = {"conv1:weight": 2}
    with pytest.raises(RuntimeError):
        qmodel(torch.randn(2, 3, 8, 8))  # 3 channels into a 1-channel conv
    assert torch.equal(convnet.conv1.weight, original)


def test_weights_are_quantized_once_per_bit_width(convnet):
    qmodel = QuantizedActivationsModel(convnet, "conv2d", weight_quantizers=True)
    qmodel.calibrate([torch.randn(2, 1, 8, 8)], 1)
    calls = []
    quantizer = qmodel.quantizer("conv2:weight")
    quantizer.register_forward_hook(lambda m, i, o: calls.append(m.num_bits))
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        for bits in (4, 4, 6, 4, 6):
            qmodel.bit_widths = {"conv2:weight": bits}
            qmodel(x)
    assert calls == [4, 6]
    # a weight changed in place (a new checkpoint loaded) is quantized afresh
    with torch.no_grad():
        convnet.conv2.weight.mul_(2)
        qmodel(x)
    assert calls == [4, 6, 6]
    qmodel.amax = {"conv2:weight": [1.0] * 8}  # and so is one whose amax is set
    with torch.no_grad():
        qmodel(x)
    assert calls == [4, 6, 6, 6]
    with pytest.raises(ValueError, match="needs 8 values"):
        qmodel.amax = {"conv2:weight": [1.0] * 3}


def test_calibration_sees_fp32_weights(convnet):
    data = [torch.randn(4, 1, 8, 8) for _ in range(2)]
    plain = QuantizedActivationsModel(convnet, "conv2d").calibrate(data)
    qmodel = QuantizedActivationsModel(type(convnet)().eval(), "conv2d", weight_quantizers=True)
    qmodel.bit_widths = {n: 2 for n in qmodel.weight_names}
    assert qmodel.calibrate(data) == plain
    assert not any(q._disabled for _, q in qmodel.named_quantizers())


def test_bitconfig_round_trip_with_weight_bits(convnet, tmp_path):
    qmodel = QuantizedActivationsModel(convnet, "conv2d", weight_quantizers=True)
    qmodel.calibrate([torch.randn(4, 1, 8, 8)], 1)
    qmodel.bit_widths = [8, 5, 3, 4, 2, 6]
    model_info = {"name": "toy", "predicate": "conv2d", "quantize_input": True, "weight_quantizers": True}
    path = tmp_path / "c.json"
    path.write_text(BitConfig.from_model(qmodel, model_info).to_json())
    applied = apply_bitconfig(type(convnet)().eval(), path)
    assert applied.bits_dict() == {"input": 8, "conv1": 5, "conv2": 3, "conv1:weight": 4, "conv2:weight": 2,
                                   "fc:weight": 6}
    assert applied.amax == qmodel.amax
    x = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(applied(x), qmodel(x))

    payload = json.loads(path.read_text())
    assert payload["schema_version"] == 3 and len(payload["quantizers"]["conv2:weight"]["amax"]) == 8
    payload["quantizers"]["conv2:weight"]["amax"] = 0.5  # one amax for a per-channel quantizer
    with pytest.raises(BitConfigError, match="needs 8 values"):
        BitConfig.from_dict(payload).apply(QuantizedActivationsModel(type(convnet)().eval(), "conv2d",
                                                                     weight_quantizers=True))
    payload["quantizers"]["conv2:weight"]["amax"] = [0.5, -1.0]
    with pytest.raises(BitConfigError, match="quantizers/conv2:weight/amax"):
        BitConfig.from_dict(payload)
