"""Refinement after the search: bias correction and AdaRound by hand, and ``apply --refine`` end to end."""
import json

import pytest
import torch

from quantsearch.cli.apply import main as apply_main
from quantsearch.cli.explore import main as explore_main
from quantsearch.deploy.bitconfig import BitConfig
from quantsearch.quantize.quantized_model import QuantizedActivationsModel
from quantsearch.quantize.refine import refine
from quantsearch.quantize.refine.adaround import round_layer


def _one_layer(bits=2, inputs=8):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(inputs, 4))
    qmodel = QuantizedActivationsModel(model, lambda n, m: False, quantize_input=False, weight_quantizers=True,
                                       num_bits=bits)
    return model, qmodel


def test_bias_correction_by_hand():
    """One Linear, 2-bit weights, inputs all ones: the quantized output is off by (Wq - W) @ 1 on every sample,
    so the corrected bias is b - (Wq - W) @ 1 and the mean error becomes 0."""
    model, qmodel = _one_layer()
    w, b = model[0].weight.detach().clone(), model[0].bias.detach().clone()
    wq = qmodel.quantizer("0:weight")(w)
    changed = refine(qmodel, [torch.ones(16, 8)], "bias-correction")
    assert list(changed) == ["0.bias"]
    assert torch.allclose(changed["0.bias"], b - (wq - w).sum(1), atol=1e-6)
    with torch.no_grad():
        assert torch.allclose(qmodel(torch.ones(3, 8)), (w @ torch.ones(8) + b).expand(3, 4), atol=1e-5)
    qmodel.remove()
    assert torch.equal(model[0].bias, b) and torch.equal(model[0].weight, w)


def test_adaround_rounds_on_the_grid_and_beats_nearest():
    """AdaRound keeps the quantizer's grid (each weight moves to its floor or its ceiling) and its output error on
    the data is at most round-to-nearest's; the weight quantizer reproduces the refined weight exactly.

    The 32 inputs move together, so a layer output's error is about the sum of its row's rounding errors: rounding
    each weight to nearest leaves that sum to chance, AdaRound picks roundings whose errors cancel."""
    model, qmodel = _one_layer(bits=3, inputs=32)
    x = torch.randn(512, 1) * torch.ones(32) + 0.05 * torch.randn(512, 32)
    w = model[0].weight.detach().clone()
    q = qmodel.quantizer("0:weight")
    scale = 3.0 / q.amax.reshape(-1, 1)
    with qmodel.quantization_disabled(), torch.no_grad():
        target = model[0](x)  # FP32 (the layer's own forward would run its weight quantizer's hooks)
    refined, report = round_layer(model[0], w, q.amax, 3, [x], [target], iterations=300)
    codes = refined * scale
    assert torch.allclose(codes, codes.round(), atol=1e-4) and float(codes.abs().max()) <= 3 + 1e-4
    assert bool(((codes.round() - torch.floor(w * scale)).abs() <= 1).all())  # floor or ceiling
    assert report["after"] <= report["before"]
    assert report["after"] < 0.5 * report["before"]  # on this layer it pays clearly
    assert torch.equal(q(refined), refined)  # the refined weight is a fixed point of its quantizer
    changed = refine(qmodel, [x], "adaround", iterations=300)
    assert list(changed) == ["0.weight"]
    assert torch.equal(qmodel.refined["0.weight"], changed["0.weight"])
    with qmodel.unfolded():
        assert torch.equal(model[0].weight, w)  # the model's own weight, for fingerprints
    assert torch.equal(model[0].weight, changed["0.weight"])


def test_apply_refine_writes_a_bitconfig_that_reapplies_identically(tmp_path, capsys):
    """explore with per-channel and per-head forms, resume, then apply --refine: the refined bit-config re-applies
    to identical accuracies; tampered weights or a path outside its folder are refused in one line."""
    out = tmp_path / "run"
    assert explore_main(["--pop-size", "4", "--generations", "1", "--eval-samples", "200", "--holdout-samples",
                         "200", "--calib-batches", "1", "--batch-size", "100", "--no-progress", "--log-level",
                         "WARNING", "--quant-form", "*norm*=per-channel", "--quant-form", "*.attn.qkv=per-head",
                         "--out", str(out)]) == 0
    from quantsearch.run.pipeline import resume_config

    assert resume_config(out).quant_forms == {"*norm*": "per-channel", "*.attn.qkv": "per-head"}
    assert explore_main(["--resume", str(out), "--no-progress"]) == 0  # the same folds and heads again
    point = sorted((out / "pareto").glob("point_*.json"))[0]
    capsys.readouterr()
    assert apply_main([str(point), "--refine", "bias-correction"]) == 0
    text = capsys.readouterr().out
    assert "refined" in text and "bias-correction" in text
    refined = point.with_name(point.stem + ".bias-correction.json")
    config = BitConfig.load(refined)
    assert config.refined["method"] == "bias-correction" and config.refined["file"] == refined.stem + ".pt"
    assert all(k.endswith(".bias") for k in config.refined["parameters"])
    assert set(config.accuracy) == {"search", "holdout"}
    assert apply_main([str(refined), "--check"]) == 0  # folds, refined biases and amax come back exactly
    assert capsys.readouterr().out.count("identical") >= 3
    assert apply_main([str(point), "--refine", "adaround,bias-corection"]) == 2
    assert "unknown refinement 'bias-corection'" in capsys.readouterr().err
    weights = refined.with_suffix(".pt")
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 1
    weights.write_bytes(bytes(data))
    assert apply_main([str(refined)]) == 2
    assert "not the ones the bit-config recorded" in capsys.readouterr().err
    payload = json.loads(refined.read_text())
    payload["refined"]["file"] = "../elsewhere.pt"
    (tmp_path / "bad.json").write_text(json.dumps(payload))
    assert apply_main([str(tmp_path / "bad.json")]) == 2
    assert "violates the bit-config schema" in capsys.readouterr().err


def test_adaround_and_bias_correction_on_a_convolution():
    """The same on a Conv2d (a CNN's layers): codes on the grid, at most nearest's error on the held-back images,
    and bias correction removes the mean error per output channel (axis 1)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(16, 4, 3))
    qmodel = QuantizedActivationsModel(model, lambda n, m: False, quantize_input=False, weight_quantizers=True,
                                       num_bits=3)
    x = torch.randn(64, 1, 6, 6) * torch.ones(1, 16, 1, 1) + 0.05 * torch.randn(64, 16, 6, 6)
    q = qmodel.quantizer("0:weight")
    with qmodel.quantization_disabled(), torch.no_grad():
        target = model(x)
    weight, report = round_layer(model[0], model[0].weight.detach(), q.amax, 3, [x], [target], iterations=200)
    codes = weight * (3.0 / q.amax.reshape(-1, 1, 1, 1))
    assert torch.allclose(codes, codes.round(), atol=1e-4) and report["after"] < 0.5 * report["before"]
    changed = refine(qmodel, [x], "bias-correction")
    with torch.no_grad():
        error = (qmodel(x) - target).mean(dim=(0, 2, 3))
    assert list(changed) == ["0.bias"] and float(error.abs().max()) < 1e-5


def test_refinements_chain_in_order():
    """``adaround,bias-correction``: the rounding is learned first, then the biases absorb the mean error left."""
    model, qmodel = _one_layer(bits=3, inputs=32)
    x = torch.randn(256, 1) * torch.ones(32) + 0.05 * torch.randn(256, 32)
    changed = refine(qmodel, [x], "adaround,bias-correction", iterations=100)
    assert sorted(changed) == ["0.bias", "0.weight"] and sorted(qmodel.refined) == ["0.bias", "0.weight"]
    with qmodel.unrefined(), qmodel.quantization_disabled(), torch.no_grad():
        fp32 = model(x)  # the model's own layer: the reference both steps learn against
    with torch.no_grad():
        assert float((qmodel(x) - fp32).mean(0).abs().max()) < 1e-5  # bias correction ran last, on AdaRound's
    assert sorted(qmodel.refined) == ["0.bias", "0.weight"]  # the context put the refinements back
    with pytest.raises(ValueError, match="unknown refinement 'adaroud'"):
        refine(qmodel, [x], "adaroud")
