import pytest
from torch import nn

from quantsearch.quantize.predicates import PRESETS, Predicate, by_name, by_type, get_target, leaf


def selected(predicate, model):
    return [n for n, m in model.named_modules() if n and predicate(n, m)]


def test_type_and_name_compose(convnet):
    assert selected(by_type(nn.Conv2d), convnet) == ["conv1", "conv2"]
    assert selected(by_name("conv*"), convnet) == ["conv1", "conv2"]
    assert selected(by_type(nn.Conv2d) & by_name("*2"), convnet) == ["conv2"]
    assert selected(by_type(nn.Linear) | by_name("relu"), convnet) == ["relu", "fc"]
    assert selected(~by_type(nn.Conv2d) & leaf(), convnet) == ["relu", "pool", "fc"]
    plain = Predicate(lambda name, module: name.endswith("1"), "ends in 1")
    assert selected(plain | by_name("fc"), convnet) == ["conv1", "fc"]


def test_presets_on_demo_vit(demo_vit):
    assert set(PRESETS) == {"conv2d", "batchnorm", "linear", "vit", "all-leaf"}
    assert selected(get_target("conv2d").outputs, demo_vit) == ["patch_embed.proj"]
    linear = selected(get_target("linear").outputs, demo_vit)
    assert len(linear) == 4 * 4 + 1  # qkv, proj, fc1, fc2 per block + head
    vit = get_target("vit")
    assert vit.unfuse_attention
    outs = selected(vit.outputs, demo_vit)
    assert "blocks.0.attn.attn_drop" in outs and "blocks.0.mlp.act" in outs and "blocks.0.norm1" in outs
    assert "blocks.0.mlp.drop1" not in outs  # plain dropouts are not attention probabilities
    assert selected(vit.inputs, demo_vit) == [f"blocks.{i}.attn.proj" for i in range(4)]
    leaves = selected(get_target("all-leaf").outputs, demo_vit)
    assert not any(isinstance(dict(demo_vit.named_modules())[n], (nn.Dropout, nn.Identity)) for n in leaves)


def test_unknown_preset_is_named():
    with pytest.raises(ValueError, match="'vitt'"):
        get_target("vitt")
