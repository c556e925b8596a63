"""Cost models against values computed by hand: a small Conv net and one timm ViT block."""
import pytest
import torch
from timm.models.vision_transformer import Block

from quantsearch.run.settings import ConfigError, ExploreConfig
from quantsearch.search.costs import COSTS, get_costs, profile_model
from quantsearch.quantize.quantized_model import QuantizedActivationsModel


def costs_by_name(qmodel, example):
    return {c.name: c for c in get_costs(list(COSTS), qmodel, example)}


def test_conv_net_costs_by_hand(convnet):
    # conv1: 1->4, 3x3, pad 1 on 8x8 -> 4x8x8; conv2: 4->8, 3x3, stride 2 -> 8x4x4; avg pool; fc: 8->10
    qmodel = QuantizedActivationsModel(convnet, "conv2d", weight_quantizers=True)
    assert qmodel.quantizer_names == ["input", "conv1", "conv2", "conv1:weight", "conv2:weight", "fc:weight"]
    profile = profile_model(qmodel, torch.randn(3, 1, 8, 8))  # only the first sample counts
    macs = {"conv1": (4 * 8 * 8) * (1 * 3 * 3), "conv2": (8 * 4 * 4) * (4 * 3 * 3), "fc": 8 * 10}
    assert [(op.name, op.kind, op.macs) for op in profile.ops] == [
        ("conv1", "conv", macs["conv1"]), ("conv2", "conv", macs["conv2"]), ("fc", "linear", macs["fc"])]
    # conv2 reads conv1's quantized output through the ReLU (same grid); the average pool leaves the grid,
    # so fc's input is unquantized (None, counted at 32 bits)
    assert [op.operands for op in profile.ops] == [
        ("conv1:weight", "input"), ("conv2:weight", "conv1"), ("fc:weight", None)]
    assert profile.activation_elements == {"input": 64, "conv1": 256, "conv2": 128}

    bits = {"input": 6, "conv1": 5, "conv2": 4, "conv1:weight": 3, "conv2:weight": 7, "fc:weight": 2}
    costs = costs_by_name(qmodel, torch.randn(1, 1, 8, 8))
    assert costs["bops"](bits) == 2304 * 3 * 6 + 4608 * 7 * 5 + 80 * 2 * 32 == 207872
    assert costs["bops"].fp32 == (2304 + 4608 + 80) * 32 * 32
    assert costs["activation-memory"](bits) == (64 * 6 + 256 * 5 + 128 * 4) / 8 == 272
    assert costs["activation-memory"].fp32 == (64 + 256 + 128) * 4
    # weights 36, 288, 80 elements; biases 4 + 8 + 10 stay at 32 bits
    assert costs["model-size"](bits) == (36 * 3 + 288 * 7 + 80 * 2 + 22 * 32) / 8 == 373.5
    assert costs["model-size"].fp32 == (36 + 288 + 80 + 22) * 4 == 4 * sum(p.numel() for p in convnet.parameters())
    assert costs["bits"](bits) == 27 and costs["bits"].fp32 == 6 * 32


def test_without_weight_quantizers_weights_count_at_32_bits(convnet):
    qmodel = QuantizedActivationsModel(convnet, "conv2d")
    costs = costs_by_name(qmodel, torch.randn(1, 1, 8, 8))
    bits = {"input": 8, "conv1": 8, "conv2": 8}
    assert costs["bops"](bits) == 2304 * 32 * 8 + 4608 * 32 * 8 + 80 * 32 * 32
    assert costs["model-size"](bits) == costs["model-size"].fp32 == 426 * 4


@pytest.fixture
def vit_block():
    torch.manual_seed(0)
    return Block(dim=8, num_heads=2, mlp_ratio=2.0, qkv_bias=True).eval()


def test_vit_block_macs_operands_and_costs_by_hand(vit_block):
    N, C, H = 5, 8, 2  # tokens, width, heads (head dim 4); MLP hidden 16
    qmodel = QuantizedActivationsModel(vit_block, "vit", weight_quantizers=True)
    profile = profile_model(qmodel, torch.randn(2, N, C))
    ops = {op.name: op for op in profile.ops}
    assert list(ops) == ["attn.qkv", "attn:matmul0", "attn:matmul1", "attn.proj", "mlp.fc1", "mlp.fc2"]
    assert {name: op.macs for name, op in ops.items()} == {
        "attn.qkv": N * C * 3 * C,            # 960
        "attn:matmul0": H * N * N * (C // H),  # q @ k^T: 200
        "attn:matmul1": H * N * N * (C // H),  # attn @ v: 200
        "attn.proj": N * C * C,                # 320
        "mlp.fc1": N * C * 2 * C,              # 640
        "mlp.fc2": N * 2 * C * C,              # 640
    }
    assert {name: op.operands for name, op in ops.items()} == {
        "attn.qkv": ("attn.qkv:weight", "norm1"),
        "attn:matmul0": ("attn.qkv", "attn.qkv"),            # q (scaled) and k^T: views of the quantized qkv
        "attn:matmul1": ("attn.attn_drop", "attn.qkv"),      # quantized probabilities and v
        "attn.proj": ("attn.proj:weight", "attn.proj:input"),
        "mlp.fc1": ("mlp.fc1:weight", "norm2"),
        "mlp.fc2": ("mlp.fc2:weight", "mlp.act"),
    }
    bits = {"input": 8, "norm1": 7, "attn.qkv": 6, "attn.attn_drop": 5, "attn.proj:input": 4, "attn.proj": 8,
            "norm2": 3, "mlp.fc1": 8, "mlp.act": 2, "mlp.fc2": 8,
            "attn.qkv:weight": 2, "attn.proj:weight": 3, "mlp.fc1:weight": 4, "mlp.fc2:weight": 5}
    assert set(bits) == set(qmodel.quantizer_names)
    costs = costs_by_name(qmodel, torch.randn(1, N, C))
    assert costs["bops"](bits) == (960 * 2 * 7 + 200 * 6 * 6 + 200 * 5 * 6 + 320 * 3 * 4 + 640 * 4 * 3
                                   + 640 * 5 * 2) == 44560
    assert costs["bops"].fp32 == (960 + 200 + 200 + 320 + 640 + 640) * 1024
    elements = {"input": 40, "norm1": 40, "attn.qkv": 120, "attn.attn_drop": H * N * N, "attn.proj:input": 40,
                "attn.proj": 40, "norm2": 40, "mlp.fc1": 80, "mlp.act": 80, "mlp.fc2": 40}
    assert profile.activation_elements == elements
    assert costs["activation-memory"](bits) == sum(elements[n] * bits[n] for n in elements) / 8 == 411.25
    # weights 192, 64, 128, 128; norms 16 + 16 and biases 24 + 8 + 16 + 8 stay at 32 bits
    assert costs["model-size"](bits) == (192 * 2 + 64 * 3 + 128 * 4 + 128 * 5 + 88 * 32) / 8 == 568
    assert costs["model-size"].fp32 == (512 + 88) * 4


def test_fused_attention_is_counted_with_unquantized_probabilities(vit_block):
    assert vit_block.attn.fused_attn  # the "linear" preset keeps timm's scaled_dot_product_attention
    qmodel = QuantizedActivationsModel(vit_block, "linear", weight_quantizers=True)
    ops = {op.name: op for op in profile_model(qmodel, torch.randn(1, 5, 8)).ops}
    assert (ops["attn:matmul0"].macs, ops["attn:matmul0"].operands) == (200, ("attn.qkv", "attn.qkv"))
    assert (ops["attn:matmul1"].macs, ops["attn:matmul1"].operands) == (200, (None, "attn.qkv"))
    assert ops["mlp.fc2"].operands == ("mlp.fc2:weight", None)  # GELU output is not quantized by "linear"


def test_profile_leaves_the_model_as_it_was(vit_block):
    x = torch.randn(2, 5, 8)
    qmodel = QuantizedActivationsModel(vit_block, "vit", weight_quantizers=True)
    qmodel.calibrate([x], 1)
    qmodel.bit_widths = [4] * len(qmodel)
    with torch.no_grad():
        before = qmodel(x)
    hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in vit_block.modules())
    profile_model(qmodel, x)
    with torch.no_grad():
        assert torch.equal(qmodel(x), before)
    assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in vit_block.modules()) == hooks


def test_cost_names_are_checked(convnet):
    qmodel = QuantizedActivationsModel(convnet, "conv2d")
    with pytest.raises(ValueError, match="unknown cost 'flops'"):
        get_costs("bops,flops", qmodel)
    with pytest.raises(ValueError, match="needs an example input"):
        get_costs("bops", qmodel)
    assert [c.name for c in get_costs("bits", qmodel)] == ["bits"]
    with pytest.raises(ConfigError, match="given twice"):
        ExploreConfig(cost="bops,bops").validate()
    with pytest.raises(ConfigError, match="unknown search-space 'all'"):
        ExploreConfig(search_space="all").validate()
    with pytest.raises(ConfigError, match="weight-bits 8:4: LO is greater than HI"):
        ExploreConfig(weight_bits="8:4").validate()
