"""Quantizer forms: the log2 grid by hand, through calibration, calibration files, bit-configs, explore, apply,
resume and export."""
import json

import pytest
import torch

from quantsearch.cli.apply import main as apply_main
from quantsearch.cli.explore import main as explore_main
from quantsearch.deploy.bitconfig import BitConfig, BitConfigError, apply_bitconfig
from quantsearch.quantize.calib import Calibration, CalibrationError, calibrate
from quantsearch.quantize.forms import (Log2TensorQuantizer, asymmetric_fake_quant, asymmetric_grid, fake_quantize,
                                        fit_asymmetric, fit_symmetric, grouped_fake_quant, log2_fake_quant,
                                        resolve_forms, uniform_fake_quant)
from quantsearch.quantize.quantized_model import QuantizedActivationsModel
from quantsearch.run.settings import ConfigError, ExploreConfig
from quantsearch.sources.models import create_demo_vit

ATTENTION = "*.attn_drop"
GELU = "*.mlp.act"


def test_log2_grid_by_hand():
    """3 bits: the powers 1, 1/2, ..., 1/64 (k = 0..6) and 0; rounding is to the nearest exponent."""
    x = torch.tensor([1.0, 0.75, 0.7, 0.5, 0.3, 0.02, 0.01, 0.0, -0.2, 1.5, 0.012])
    # -log2: 0, .415, .515, 1, 1.74, 5.64, 6.64, inf, nan->inf, -.58, 6.38
    expected = torch.tensor([1.0, 1.0, 0.5, 0.5, 0.25, 1 / 64, 0.0, 0.0, 0.0, 1.0, 1 / 64])
    assert torch.equal(log2_fake_quant(x.clone(), torch.tensor(1.0), 3), expected)
    # amax scales the grid; 2 bits keep 1, 1/2, 1/4 and 0
    assert torch.equal(log2_fake_quant(torch.tensor([2.0, 1.1, 0.45, 0.2]), torch.tensor(2.0), 2),
                       torch.tensor([2.0, 1.0, 0.5, 0.0]))
    assert torch.equal(fake_quantize("log2", x, torch.tensor(1.0), 3, True), expected)  # x is left as it was
    assert x[1] == 0.75


def test_forms_by_glob_and_refusals():
    names = ["input", "blocks.0.attn.attn_drop", "blocks.0.attn.qkv", "blocks.1.attn.attn_drop"]
    assert resolve_forms(names, {"blocks.1.*": "uniform", ATTENTION: "log2"}) == {
        "input": "uniform", "blocks.0.attn.attn_drop": "log2", "blocks.0.attn.qkv": "uniform",
        "blocks.1.attn.attn_drop": "uniform"}  # the first glob that matches wins
    with pytest.raises(ValueError, match="matches no activation quantizer"):
        resolve_forms(names, {"*.atn_drop": "log2"})
    with pytest.raises(ConfigError, match="unknown form 'log3'"):
        ExploreConfig(quant_forms={ATTENTION: "log3"}).validate()
    with pytest.raises(ConfigError, match="must map quantizer-name globs"):
        ExploreConfig(quant_forms=["log2"]).validate()


@pytest.fixture(scope="module")
def calibrated(fashion_splits_small):
    model = create_demo_vit()
    qmodel = QuantizedActivationsModel(model, "vit", weight_quantizers=True, forms={ATTENTION: "log2"})
    loader = torch.utils.data.DataLoader(fashion_splits_small.calibration, batch_size=100)
    qmodel.calibrate(loader, 2, method="mse", bits=(2, 8))
    return qmodel, loader


@pytest.fixture(scope="module")
def fashion_splits_small():
    from quantsearch.sources.data import load_fashion_mnist, split_dataset

    return split_dataset(load_fashion_mnist(), calibration=200, search=300, holdout=300, seed=0)


def test_log2_quantizers_calibrate_to_their_maximum_and_run_their_grid(calibrated):
    qmodel, loader = calibrated
    attention = [n for n, f in qmodel.forms.items() if f == "log2"]
    assert attention == [f"blocks.{i}.attn.attn_drop" for i in range(4)]
    assert all(isinstance(qmodel.quantizer(n), Log2TensorQuantizer) for n in attention)
    x = next(iter(loader))[0]
    seen = {}

    def keep(name):
        def hook(_module, args, out):
            seen[name] = (args[0].clone(), out.clone())
        return hook

    handles = [qmodel.quantizer(n).register_forward_hook(keep(n)) for n in attention]
    qmodel.bit_widths = {n: 4 for n in attention}
    try:
        with torch.no_grad():
            qmodel(x)
    finally:
        for h in handles:
            h.remove()
    for n in attention:
        inputs, out = seen[n]
        table = qmodel.amax_table[n]
        assert len(set(table.values())) == 1  # the same maximum at every width, whatever the method
        amax = table[4]
        assert 0.5 < amax <= 1.0 and qmodel.unsigned[n]  # softmax probabilities
        assert torch.equal(out, log2_fake_quant(inputs.clone(), torch.tensor(amax), 4))
        nonzero = out[out > 0] / amax
        assert torch.equal(nonzero, torch.exp2(torch.round(torch.log2(nonzero))))  # powers of two only
        assert float(nonzero.min()) >= 2.0 ** -14


def test_calibration_file_keeps_forms_and_refuses_another(calibrated, tmp_path, fashion_splits_small):
    from quantsearch.quantize.calib import calibrate

    qmodel, loader = calibrated
    calibration = calibrate(qmodel, loader, 2, "mse", bits=(2, 8))
    path = calibration.save(tmp_path / "cal.json")
    loaded = Calibration.load(path)
    assert loaded.forms == {n: qmodel.forms[n] for n in qmodel.activation_names}
    assert list(loaded.forms.values()).count("log2") == 4
    assert loaded.methods["blocks.0.attn.attn_drop"] == "max" and loaded.methods["blocks.0.attn.qkv"] == "mse"
    loaded.check_fits(qmodel)
    uniform = QuantizedActivationsModel(qmodel.model, "vit", weight_quantizers=True)
    try:
        with pytest.raises(CalibrationError, match="'blocks.0.attn.attn_drop' for the log2 form"):
            loaded.check_fits(uniform)
    finally:
        uniform.remove()


def test_log2_refuses_signed_data(fashion_splits_small):
    qmodel = QuantizedActivationsModel(create_demo_vit(), "vit", forms={"*.norm1": "log2"})
    loader = torch.utils.data.DataLoader(fashion_splits_small.calibration, batch_size=100)
    with pytest.raises(CalibrationError, match="'blocks.0.norm1' has the log2 form but saw negative values"):
        qmodel.calibrate(loader, 1, method="mse")


def test_bitconfig_round_trip_reproduces_log2_outputs(calibrated):
    qmodel, loader = calibrated
    x = next(iter(loader))[0]
    qmodel.bit_widths = {n: (3 if n.endswith("attn_drop") else 6) for n in qmodel.quantizer_names}
    config = BitConfig.from_model(qmodel, {"name": "fashion-vit", "predicate": "vit", "quantize_input": True,
                                           "weight_quantizers": True}, example=x[:2])
    payload = json.loads(config.to_json())
    assert payload["quantizers"]["blocks.2.attn.attn_drop"]["form"] == "log2"
    assert "form" not in payload["quantizers"]["blocks.2.attn.qkv"]
    with torch.no_grad():
        expected = qmodel(x)
    fresh = create_demo_vit()
    again = apply_bitconfig(fresh, payload, example=x[:2])
    with torch.no_grad():
        assert torch.equal(again(x), expected)
    wrong = QuantizedActivationsModel(create_demo_vit(), "vit", weight_quantizers=True)
    with pytest.raises(BitConfigError, match="'blocks.0.attn.attn_drop' has the log2 form in the bit-config but "
                                             "uniform in the model"):
        BitConfig.from_dict(payload).apply(wrong)


SMALL = ["--pop-size", "4", "--generations", "1", "--eval-samples", "300", "--holdout-samples", "300",
         "--calib-batches", "1", "--no-progress", "--log-level", "WARNING"]


def test_explore_apply_resume_and_export_with_log2(tmp_path, capsys):
    out = tmp_path / "run"
    assert explore_main([*SMALL, "--quant-form", f"{ATTENTION}=log2", "--out", str(out)]) == 0
    point = sorted((out / "pareto").glob("*.json"))[0]
    bitconfig = BitConfig.load(point)
    assert bitconfig.settings["quant_forms"] == {ATTENTION: "log2"}
    assert sum(f == "log2" for f in bitconfig.forms.values()) == 4
    capsys.readouterr()
    assert apply_main([str(point), "--check"]) == 0  # rebuilt with the recorded forms: identical
    assert capsys.readouterr().out.count("identical") >= 3
    from quantsearch.run.pipeline import resume_config

    assert resume_config(out).quant_forms == {ATTENTION: "log2"}
    assert apply_main([str(point), "--export", str(tmp_path / "p.onnx")]) == 2
    assert "has the log2 form (the log2 grid at" in capsys.readouterr().err
    assert explore_main(["--resume", str(out), "--quant-form", "*=log2"]) == 2
    assert explore_main([*SMALL, "--quant-form", "no-equals-sign", "--out", str(tmp_path / "r2")]) == 2
    assert "--quant-form takes GLOB=FORM" in capsys.readouterr().err


# -- the asymmetric form -----------------------------------------------------------------------------------------
def test_asymmetric_grid_by_hand():
    """[-1, 3] at 2 bits: s = 4/3, z = round(0.75) = 1, codes 0..3 = -4/3, 0, 4/3, 8/3; ties round to even."""
    scale, zero, top = asymmetric_grid(-1.0, 3.0, 2)
    assert (scale, zero, top) == (pytest.approx(4 / 3), 1.0, 3.0)
    x = torch.tensor([-2.0, -0.5, 0.2, 0.7, 2.0, 5.0, 0.0])
    # x / s = -1.5, -.375, .15, .525, 1.5, 3.75, 0 -> round -2, 0, 0, 1, 2, 4, 0 -> +1, clamp [0, 3], -1
    expected = torch.tensor([-1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 0.0]) * torch.tensor(scale)
    assert torch.equal(asymmetric_fake_quant(x, -1.0, 3.0, 2), expected)
    assert asymmetric_grid(0.5, 2.0, 8)[1] == 0.0  # a range is widened to hold 0: zero point 0
    values = torch.cat([torch.full((900,), -0.1), torch.linspace(0, 6, 100)])  # GELU-like: a lopsided range
    low, high = fit_asymmetric(values, 4)
    err = lambda q: float(((q - values) ** 2).sum())  # noqa: E731
    assert err(asymmetric_fake_quant(values, low, high, 4)) <= err(asymmetric_fake_quant(values, -0.1, 6.0, 4))
    assert err(asymmetric_fake_quant(values, low, high, 4)) < err(fake_quantize("uniform", values, 6.0, 4, False))


def calibrated_demo(splits, forms):
    """The demo ViT with ``forms``, weight quantizers, and mse calibration on two batches of 100: (qmodel, loader,
    calibration)."""
    qmodel = QuantizedActivationsModel(create_demo_vit(), "vit", weight_quantizers=True, forms=forms)
    loader = torch.utils.data.DataLoader(splits.calibration, batch_size=100)
    return qmodel, loader, calibrate(qmodel, loader, 2, "mse", bits=(2, 8))


@pytest.fixture(scope="module")
def asymmetric(fashion_splits_small):
    return calibrated_demo(fashion_splits_small, {GELU: "asymmetric"})


def test_asymmetric_calibration_fits_each_width_and_round_trips(asymmetric, tmp_path):
    qmodel, loader, calibration = asymmetric
    name = "blocks.1.mlp.act"
    q = calibration.quantizers[name]
    assert q.form == "asymmetric" and set(q.low) == set(q.amax) == set(range(2, 9))
    assert all(q.min <= q.low[b] <= 0 < q.amax[b] <= q.absmax for b in q.low)  # GELU's min is about -0.17
    assert q.low[8] < q.low[3] or q.amax[8] > q.amax[3]  # wider grids clip less
    qmodel.bit_widths = {n: (3 if n == name else 8) for n in qmodel.quantizer_names}
    assert qmodel.lows[name] == q.low[3] and float(qmodel.quantizer(name).amax) == pytest.approx(q.amax[3])
    path = calibration.save(tmp_path / "calibration.json")
    again = Calibration.load(path)
    assert again.low_table == calibration.low_table and again.forms == calibration.forms
    payload = json.loads(path.read_text())
    del payload["quantizers"][name]["low"]
    with pytest.raises(CalibrationError, match="asymmetric form needs a low end per width"):
        Calibration.from_dict(payload)


def test_asymmetric_bitconfig_round_trip_and_onnx_export(asymmetric, tmp_path):
    pytest.importorskip("onnxruntime")
    from quantsearch.deploy.onnx_export import export_onnx, onnx_session

    qmodel, loader, _ = asymmetric
    x = next(iter(loader))[0][:16]
    qmodel.bit_widths = {n: (4 if n.endswith("mlp.act") else 8) for n in qmodel.quantizer_names}
    config = BitConfig.from_model(qmodel, {"name": "fashion-vit", "predicate": "vit", "quantize_input": True,
                                           "weight_quantizers": True}, example=x[:2])
    payload = json.loads(config.to_json())
    assert payload["quantizers"]["blocks.0.mlp.act"]["form"] == "asymmetric"
    assert payload["quantizers"]["blocks.0.mlp.act"]["low"] == qmodel.lows["blocks.0.mlp.act"]
    with torch.no_grad():
        expected = qmodel(x)
    again = apply_bitconfig(create_demo_vit(), payload, example=x[:2])
    with torch.no_grad():
        assert torch.equal(again(x), expected)
    del payload["quantizers"]["blocks.0.mlp.act"]["low"]
    with pytest.raises(BitConfigError, match="asymmetric form needs a low end"):
        BitConfig.from_dict(payload).apply(again)
    written = export_onnx(qmodel, tmp_path / "asym.onnx", x[:2])
    session = onnx_session(written["path"], "reference")
    out = torch.from_numpy(session.run(None, {"input": x.numpy()})[0])
    assert (out.argmax(1) == expected.argmax(1)).float().mean() >= 0.9
    assert float((out - expected).abs().max()) < 0.5


def test_log2_narrow_is_log2_at_four_bits_and_below_and_uniform_above(fashion_splits_small, tmp_path):
    """log2-narrow: the log grid (amax = the calibration maximum) at <= 4 bits, the unsigned uniform grid with the
    method's amax above; export refuses it only where it is on the log grid."""
    from quantsearch.deploy.export import ExportError
    from quantsearch.deploy.onnx_export import export_onnx
    from quantsearch.quantize.forms import NarrowLog2TensorQuantizer

    x = torch.tensor([1.0, 0.7, 0.3, 0.02])
    assert torch.equal(fake_quantize("log2-narrow", x, torch.tensor(1.0), 3, True),
                       log2_fake_quant(x, torch.tensor(1.0), 3))
    # 5 bits, unsigned uniform: 31 levels of 1/31
    assert torch.equal(fake_quantize("log2-narrow", x, torch.tensor(1.0), 5, True),
                       fake_quantize("uniform", x, torch.tensor(1.0), 5, True))
    qmodel = QuantizedActivationsModel(create_demo_vit(), "vit", weight_quantizers=True,
                                       forms={ATTENTION: "log2-narrow"})
    loader = torch.utils.data.DataLoader(fashion_splits_small.calibration, batch_size=100)
    calibration = calibrate(qmodel, loader, 2, "percentile", bits=(2, 8), percentile=99.0)
    c = calibration.quantizers["blocks.0.attn.attn_drop"]
    assert c.form == "log2-narrow" and c.unsigned
    assert all(c.amax[b] == c.absmax for b in (2, 3, 4)) and all(c.amax[b] < c.absmax for b in (5, 6, 7, 8))
    assert isinstance(qmodel.quantizer("blocks.0.attn.attn_drop"), NarrowLog2TensorQuantizer)
    sample = next(iter(loader))[0][:4]
    qmodel.bit_widths = {n: 6 for n in qmodel.quantizer_names}
    export_onnx(qmodel, tmp_path / "six.onnx", sample[:2])  # uniform at 6 bits: exportable
    qmodel.bit_widths = {n: (4 if n.endswith("attn_drop") else 6) for n in qmodel.quantizer_names}
    with pytest.raises(ExportError, match="log2-narrow form \\(the log2 grid at 4 bits\\)"):
        export_onnx(qmodel, tmp_path / "four.onnx", sample[:2])


# -- the per-head form -------------------------------------------------------------------------------------------
QKV, PROJ_IN = "*.attn.qkv", "*.attn.proj:input"


def test_per_head_grid_and_fit_by_hand():
    """Two groups of two features: each rounds on its own grid (2 bits signed: codes -1, 0, 1)."""
    x = torch.tensor([[0.4, -1.0, 3.0, 10.0]])
    out = grouped_fake_quant(x, torch.tensor([1.0, 10.0]), 2, False)
    assert torch.equal(out, torch.tensor([[0.0, -1.0, 0.0, 10.0]]))
    assert torch.equal(fake_quantize("per-head", x, [1.0, 10.0], 2, False), out)
    with pytest.raises(ValueError, match="does not split into 3 groups"):
        grouped_fake_quant(x, torch.ones(3), 4, False)
    # bit for bit the uniform grid of each group (its in-place steps are the same float32 operations)
    y, amax = torch.randn(5, 7, 48) * 3, torch.rand(6) + 0.2
    for bits, unsigned in ((3, False), (8, True)):
        expected = uniform_fake_quant(y.reshape(5, 7, 6, 8), amax.reshape(6, 1), bits, unsigned).reshape(y.shape)
        assert torch.equal(grouped_fake_quant(y, amax, bits, unsigned), expected)
    # the fit: a group of many small values and one outlier clips the outlier at 3 bits; 0.5 is exact on its grid
    values = torch.cat([torch.linspace(-0.5, 0.5, 999), torch.tensor([8.0])])
    amax = fit_symmetric(torch.stack([values, values * 0 + 0.5]), 3, False)
    assert amax[0] < 8.0 and amax[1] == pytest.approx(0.5)
    err = lambda a: float(((uniform_fake_quant(values, a, 3, False) - values) ** 2).sum())  # noqa: E731
    assert err(amax[0]) <= min(err(8.0), err(4.0), err(1.0))


def test_per_head_groups_come_from_the_attention(fashion_splits_small):
    model = create_demo_vit()
    qmodel = QuantizedActivationsModel(model, "vit", weight_quantizers=True, forms={QKV: "per-head",
                                                                                    PROJ_IN: "per-head"})
    attn = model.blocks[0].attn
    q, p = qmodel.quantizer("blocks.0.attn.qkv"), qmodel.quantizer("blocks.0.attn.proj:input")
    assert (q.groups, q.width) == (3 * attn.num_heads, attn.qkv.out_features)
    assert (p.groups, p.width) == (attn.num_heads, attn.proj.in_features)
    with pytest.raises(ValueError, match="no module around it has num_heads"):
        QuantizedActivationsModel(create_demo_vit(), "vit", forms={"head": "per-head"})
    with pytest.raises(ValueError, match="LayerNorm is not a Linear layer"):
        QuantizedActivationsModel(create_demo_vit(), "vit", forms={"*.norm1": "per-head"})


@pytest.fixture(scope="module")
def per_head(fashion_splits_small):
    return calibrated_demo(fashion_splits_small, {QKV: "per-head", PROJ_IN: "per-head"})


def test_per_head_calibration_fits_each_head_and_round_trips(per_head, tmp_path):
    qmodel, loader, calibration = per_head
    name = "blocks.0.attn.qkv"
    c = calibration.quantizers[name]
    groups = qmodel.quantizer(name).groups
    assert c.form == "per-head" and all(len(c.amax[b]) == groups for b in range(2, 9))
    assert all(0 < a <= c.absmax for b in c.amax for a in c.amax[b])
    assert max(c.amax[8]) / min(c.amax[8]) > 1.2  # the heads' ranges differ: why one range each pays
    qmodel.bit_widths = {n: (3 if n == name else 8) for n in qmodel.quantizer_names}
    assert qmodel.amax[name] == pytest.approx(c.amax[3])
    # the forward is the grouped grid with those ranges
    seen = {}
    handle = qmodel.quantizer(name).register_forward_hook(lambda m, a, o: seen.update(x=a[0], y=o))
    with torch.no_grad():
        qmodel(next(iter(loader))[0][:4])
    handle.remove()
    assert torch.equal(seen["y"], grouped_fake_quant(seen["x"], torch.tensor(c.amax[3]), 3, c.unsigned))
    path = calibration.save(tmp_path / "calibration.json")
    assert Calibration.load(path).amax_table == calibration.amax_table
    payload = json.loads(path.read_text())
    payload["quantizers"][name]["amax"]["3"] = 1.0
    with pytest.raises(CalibrationError, match="list of amax per width exactly when its form is per-head"):
        Calibration.from_dict(payload)
    with pytest.raises(ValueError, match="needs 12 positive finite values"):
        qmodel.amax = {name: [1.0, 2.0]}


def test_per_head_bitconfig_round_trip_and_onnx_export(per_head, tmp_path):
    pytest.importorskip("onnxruntime")
    from quantsearch.deploy.onnx_export import export_onnx, onnx_session

    qmodel, loader, _ = per_head
    x = next(iter(loader))[0][:16]
    qmodel.bit_widths = {n: (4 if "attn.qkv" in n or "proj:input" in n else 8) for n in qmodel.quantizer_names}
    config = BitConfig.from_model(qmodel, {"name": "fashion-vit", "predicate": "vit", "quantize_input": True,
                                           "weight_quantizers": True}, example=x[:2])
    payload = json.loads(config.to_json())
    assert payload["quantizers"]["blocks.0.attn.qkv"]["form"] == "per-head"
    assert len(payload["quantizers"]["blocks.0.attn.qkv"]["amax"]) == 12
    with torch.no_grad():
        expected = qmodel(x)
    again = apply_bitconfig(create_demo_vit(), payload, example=x[:2])
    with torch.no_grad():
        assert torch.equal(again(x), expected)
    written = export_onnx(qmodel, tmp_path / "heads.onnx", x[:2])
    session = onnx_session(written["path"], "reference")
    out = torch.from_numpy(session.run(None, {"input": x.numpy()})[0])
    assert (out.argmax(1) == expected.argmax(1)).float().mean() >= 0.9
    assert float((out - expected).abs().max()) < 0.5


# -- the per-channel form (RepQ-ViT's fold) ----------------------------------------------------------------------
class _NormThenLinear(torch.nn.Module):
    """x -> LayerNorm -> Linear (optionally + the LayerNorm output: a reader the fold cannot move into)."""

    def __init__(self, residual=False):
        super().__init__()
        self.norm, self.fc, self.residual = torch.nn.LayerNorm(4), torch.nn.Linear(4, 4), residual

    def forward(self, x):
        y = self.norm(x)
        return self.fc(y) + (y if self.residual else 0)


def test_fold_by_hand_keeps_the_function_and_equalises_the_channels():
    from quantsearch.quantize.fold import ChannelFold, fold_into

    torch.manual_seed(0)
    model = _NormThenLinear()
    with torch.no_grad():
        model.norm.weight.copy_(torch.tensor([1.0, 4.0, 0.5, 2.0]))
        model.norm.bias.copy_(torch.tensor([0.0, 3.0, -1.0, 0.0]))
    x = torch.randn(64, 4)
    expected, before = model(x), model.norm(x)
    fold = ChannelFold((0.5, 2.0, 0.25, 1.0), (0.0, 3.0, -1.0, 0.0), ("fc",))
    w = model.fc.weight.detach().clone()
    fold_into(model.norm, [model.fc], fold)
    # y' = (y - m) / r per channel; W' = W r per column; b' = b + W m
    assert torch.allclose(model.norm(x), (before - torch.tensor(fold.shift)) / torch.tensor(fold.scale), atol=1e-5)
    assert torch.allclose(model.fc.weight, w * torch.tensor(fold.scale))
    assert torch.allclose(model(x), expected, atol=1e-5)


def test_fit_folds_through_calibration_and_refuses_a_residual_reader():
    torch.manual_seed(0)
    model = _NormThenLinear()
    with torch.no_grad():
        model.norm.weight.copy_(torch.tensor([0.1, 8.0, 1.0, 0.5]))
    original = {k: v.clone() for k, v in model.state_dict().items()}
    qmodel = QuantizedActivationsModel(model, lambda n, m: isinstance(m, torch.nn.LayerNorm), quantize_input=False,
                                       weight_quantizers=True, forms={"norm": "per-channel"})
    batches = [torch.randn(32, 4) for _ in range(2)]
    calibration = calibrate(qmodel, batches, bits=(2, 8))
    fold = calibration.quantizers["norm"].fold
    assert fold.into == ("fc",) and max(fold.scale) / min(fold.scale) > 20  # channel 1 is 80x channel 0
    with qmodel.quantization_disabled(), torch.no_grad():
        folded = qmodel.model.norm(torch.cat(batches))
        assert torch.allclose(qmodel(batches[0]), _reference(original)(batches[0]), atol=1e-4)
    half = (folded.amax(0) - folded.amin(0)) / 2
    assert torch.allclose(half, half.mean().expand(4), rtol=1e-3)  # every channel now spans the same range
    assert qmodel.amax["fc:weight"] == pytest.approx(qmodel.model.fc.weight.abs().amax(1).tolist())
    with qmodel.unfolded():
        assert all(torch.equal(qmodel.model.state_dict()[k], v) for k, v in original.items())
    qmodel.remove()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in original.items())
    bad = QuantizedActivationsModel(_NormThenLinear(residual=True), lambda n, m: isinstance(m, torch.nn.LayerNorm),
                                    quantize_input=False, forms={"norm": "per-channel"})
    with pytest.raises(CalibrationError, match="also feeds something other than the Linear layers"):
        calibrate(bad, batches)
    with pytest.raises(ValueError, match="Linear has no per-channel affine"):
        QuantizedActivationsModel(_NormThenLinear(), "linear", quantize_input=False, forms={"fc": "per-channel"})


def _reference(state):
    model = _NormThenLinear()
    model.load_state_dict(state)
    return model


@pytest.fixture(scope="module")
def per_channel(fashion_splits_small):
    return calibrated_demo(fashion_splits_small, {"*norm*": "per-channel"})


def test_per_channel_calibration_file_and_bitconfig_round_trip_and_export(per_channel, tmp_path):
    pytest.importorskip("onnxruntime")
    from quantsearch.deploy.onnx_export import export_onnx, onnx_session

    qmodel, loader, calibration = per_channel
    assert calibration.folds["blocks.0.norm1"].into == ("blocks.0.attn.qkv",)
    assert calibration.folds["norm"].into == ("head",)  # the class token reaches the head as a view
    path = calibration.save(tmp_path / "calibration.json")
    fresh = QuantizedActivationsModel(create_demo_vit(), "vit", weight_quantizers=True,
                                      forms={"*norm*": "per-channel"})
    again = Calibration.load(path)
    again.check_fits(fresh)  # fingerprints are of the model's own weights, folded or not
    again.apply(fresh)
    x = next(iter(loader))[0][:16]
    qmodel.bit_widths = fresh.bit_widths = {n: (4 if "norm" in n else 8) for n in qmodel.quantizer_names}
    with torch.no_grad():
        expected = qmodel(x)
        assert torch.equal(fresh(x), expected)
    config = BitConfig.from_model(qmodel, {"name": "fashion-vit", "predicate": "vit", "quantize_input": True,
                                           "weight_quantizers": True}, example=x[:2])
    payload = json.loads(config.to_json())
    assert payload["quantizers"]["blocks.0.norm1"]["fold"]["into"] == ["blocks.0.attn.qkv"]
    applied = apply_bitconfig(create_demo_vit(), payload, example=x[:2])
    with torch.no_grad():
        assert torch.equal(applied(x), expected)
    del payload["quantizers"]["blocks.0.norm1"]["fold"]
    with pytest.raises(BitConfigError, match="per-channel form needs a fold"):
        BitConfig.from_dict(payload).apply(applied)
    written = export_onnx(qmodel, tmp_path / "folded.onnx", x[:2])
    out = torch.from_numpy(onnx_session(written["path"], "reference").run(None, {"input": x.numpy()})[0])
    assert (out.argmax(1) == expected.argmax(1)).float().mean() >= 0.9
    assert float((out - expected).abs().max()) < 0.5


def test_per_head_and_per_channel_on_a_timm_vit_of_other_shapes():
    """Nothing is tuned to the demo: a timm ViT (3 heads of 64, 12 blocks, 192 channels) gets 9 ranges per qkv
    output and 3 per attention output, and every LayerNorm folds into the Linear after it (the last one into the
    head, through the class-token view) without changing the FP32 output."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, num_classes=10)
    model.eval()
    x = torch.randn(8, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
    qmodel = QuantizedActivationsModel(model, "vit", weight_quantizers=True,
                                       forms={QKV: "per-head", PROJ_IN: "per-head", "*norm*": "per-channel"})
    assert qmodel.quantizer("blocks.11.attn.qkv").groups == 9
    assert qmodel.quantizer("blocks.11.attn.proj:input").groups == 3
    calibration = calibrate(qmodel, [x[:4], x[4:]], bits=(4, 8))
    assert {n: f.into for n, f in calibration.folds.items()} == {
        **{f"blocks.{i}.norm1": (f"blocks.{i}.attn.qkv",) for i in range(12)},
        **{f"blocks.{i}.norm2": (f"blocks.{i}.mlp.fc1",) for i in range(12)}, "norm": ("head",)}
    with torch.no_grad(), qmodel.quantization_disabled():
        assert torch.allclose(qmodel(x), expected, atol=1e-4 * float(expected.abs().max()))
    qmodel.bit_widths = [8] * len(qmodel)
    with torch.no_grad():
        assert (qmodel(x).argmax(1) == expected.argmax(1)).float().mean() >= 0.75
