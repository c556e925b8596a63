"""Refinement after the search: bias correction and AdaRound by hand, and ``apply --refine`` end to end."""
import json

import pytest
import torch

from quantsearch.cli.apply import main as apply_main
from quantsearch.cli.explore import main as explore_main
from quantsearch.deploy.bitconfig import BitConfig
from quantsearch.quantize.quantized_model import QuantizedActivationsModel
from quantsearch.quantize.refine import refine
from quantsearch.quantize.refine import layers
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


def _correlated_layer():
    """One Linear (32 inputs, 3-bit weights) whose 32 inputs move together, so that an output's error is about the
    sum of its row's rounding errors: rounding each weight to nearest leaves that sum to chance, AdaRound picks
    roundings whose errors cancel. Returns the model, its qmodel, inputs, FP32 outputs, the codes' scale per
    output channel (3 / amax) and the round-to-nearest weight, computed here."""
    model, qmodel = _one_layer(bits=3, inputs=32)
    x = torch.randn(512, 1) * torch.ones(32) + 0.05 * torch.randn(512, 32)
    w, b = model[0].weight.detach().clone(), model[0].bias.detach().clone()
    with torch.no_grad():
        target = x @ w.T + b
    scale = 3.0 / qmodel.quantizer("0:weight").amax.reshape(-1, 1)
    return model, qmodel, x, target, scale, torch.clamp(torch.round(w * scale), -3, 3) / scale


def _mse(x, weight, bias, target) -> float:
    return float(((x @ weight.T + bias - target) ** 2).mean())


def test_adaround_rounds_to_floor_or_ceiling_and_beats_nearest():
    """Every refined weight is its floor or its ceiling on the quantizer's grid, some differ from nearest, and the
    layer's output error on all the data, computed here, is under half round-to-nearest's; the weight quantizer
    reproduces the refined weight exactly, and refine() puts it in place over the model's own weight."""
    model, qmodel, x, target, scale, nearest = _correlated_layer()
    w, b, q = model[0].weight.detach().clone(), model[0].bias.detach(), qmodel.quantizer("0:weight")
    refined, report = round_layer(model[0], w, q.amax, 3, [x], [target], iterations=300)
    codes = refined * scale
    assert torch.allclose(codes, codes.round(), atol=1e-4) and float(codes.abs().max()) <= 3 + 1e-4
    up = codes.round() - torch.floor(w * scale)
    assert bool(((up == 0) | (up == 1)).all())  # floor or ceiling, nothing else
    assert bool((codes.round() != (nearest * scale).round()).any()) and "kept" not in report
    assert _mse(x, refined, b, target) < 0.5 * _mse(x, nearest, b, target)
    assert torch.equal(q(refined), refined)  # the refined weight is a fixed point of its quantizer
    changed = refine(qmodel, [x], "adaround", iterations=300)
    assert list(changed) == ["0.weight"]
    assert torch.equal(qmodel.refined["0.weight"], changed["0.weight"])
    with qmodel.unfolded():
        assert torch.equal(model[0].weight, w)  # the model's own weight, for fingerprints
    assert torch.equal(model[0].weight, changed["0.weight"])


def test_adaround_reports_the_errors_of_its_weights():
    """With one sample (an image of 512 token rows) nothing is held back, so the reported errors are those of
    nearest's and the returned weight on all the data, as computed here."""
    model, qmodel, x, target, _, nearest = _correlated_layer()
    w, b = model[0].weight.detach().clone(), model[0].bias.detach()
    amax = qmodel.quantizer("0:weight").amax
    refined, report = round_layer(model[0], w, amax, 3, [x[None]], [target[None]], iterations=300)
    assert report["before"] == pytest.approx(_mse(x, nearest, b, target), rel=1e-5)
    assert report["after"] == pytest.approx(_mse(x, refined, b, target), rel=1e-5)
    assert report["after"] < 0.5 * report["before"]


def test_adaround_falls_back_to_nearest_when_it_does_not_beat_it():
    """Five steps at learning rate 1 throw the rounding about: it loses to nearest, so nearest's weight comes back
    (as computed here), reported as such with its own error."""
    model, qmodel, x, target, _, nearest = _correlated_layer()
    w, b = model[0].weight.detach().clone(), model[0].bias.detach()
    weight, report = round_layer(model[0], w, qmodel.quantizer("0:weight").amax, 3, [x[None]], [target[None]],
                                 iterations=5, lr=1.0)
    assert report.get("kept") == "nearest" and torch.equal(weight, nearest)
    assert report["after"] == report["before"] == pytest.approx(_mse(x, nearest, b, target), rel=1e-5)


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


@pytest.mark.parametrize("budget", [1 << 30, 1])
def test_fp32_reference_is_taken_once_for_all_layers(monkeypatch, budget):
    """The FP32 reference of two Linear layers, with a refinement in place, is what the model's own weights give
    (computed here), taken in one pass over the batches (one ``unrefined`` block) or, past the byte budget, one
    pass per layer; each layer's data is handed out once."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 6), torch.nn.ReLU(), torch.nn.Linear(6, 4))
    qmodel = QuantizedActivationsModel(model, lambda n, m: False, quantize_input=False, weight_quantizers=True,
                                       num_bits=2)
    (w0, b0), (w2, b2) = [(m.weight.detach().clone(), m.bias.detach().clone()) for m in (model[0], model[2])]
    qmodel.add_refined({"0.weight": torch.zeros(6, 8), "2.bias": torch.ones(4)})
    batches = [torch.randn(5, 8), torch.randn(3, 8)]
    passes, blocks, unrefined = [], [], qmodel.unrefined
    model.register_forward_pre_hook(lambda _m, args: passes.append(len(args[0])))
    monkeypatch.setattr(qmodel, "unrefined", lambda: blocks.append(1) or unrefined())
    monkeypatch.setattr(layers, "BUDGET", budget)
    reference = layers.Reference(qmodel, ["0:weight", "2:weight"], batches)
    got = {name: reference.pop(name) for name in ("0:weight", "2:weight")}
    for x, (x0, y0), (x2, y2) in zip(batches, got["0:weight"], got["2:weight"]):
        hidden = x @ w0.T + b0
        assert torch.allclose(x0, x) and torch.allclose(y0, hidden, atol=1e-6)
        assert torch.allclose(x2, hidden.relu(), atol=1e-6)
        assert torch.allclose(y2, hidden.relu() @ w2.T + b2, atol=1e-6)
    layers_per_pass = 2 if budget > 1 else 1
    assert passes == [1] + [5, 3] * (2 // layers_per_pass)  # one sample sizes the data, then the passes
    assert len(blocks) == 2 // layers_per_pass
    with pytest.raises(KeyError, match="handed out already"):
        reference.pop("0:weight")
