"""Quantizer forms: each grid by hand and against a reference written here in numpy from its formula, the fits
against hand-computed optima, through calibration, calibration files, bit-configs, explore, apply, resume and ONNX
export (the reference ONNX Runtime session compared quantizer by quantizer).

No test shares a mutable model: each builds a fresh demo ViT from one module-wide FP32 state dict and applies a
calibration that is computed once per set of forms and kept as JSON text (deterministic: seeded samples, the same
images), so no test depends on another having run before it."""
import json

import numpy as np
import pytest
import torch

from quantsearch.cli.apply import main as apply_main
from quantsearch.cli.explore import main as explore_main
from quantsearch.deploy.bitconfig import BitConfig, BitConfigError, apply_bitconfig
from quantsearch.quantize.calib import Calibration, CalibrationError, calibrate
from quantsearch.quantize.forms import (Log2TensorQuantizer, asymmetric_fake_quant, asymmetric_grid, fake_quantize,
                                        fit_asymmetric, fit_symmetric, grouped_fake_quant, log2_fake_quant,
                                        resolve_forms)
from quantsearch.quantize.quantized_model import QuantizedActivationsModel
from quantsearch.run.settings import ConfigError, ExploreConfig
from quantsearch.sources.models import create_demo_vit

ATTENTION = "*.attn_drop"
GELU = "*.mlp.act"


# -- references written from the formulas, in numpy (nothing from quantsearch.quantize.forms) ---------------------
def log2_reference(x, amax, bits):
    """FQ-ViT's log2 grid from its formula: ``k = round(-log2(x / amax))`` in float64; codes ``k = 0 .. 2^b - 2``
    give ``amax * 2^-k``, a deeper ``k`` (or ``x <= 0``) gives 0, ``x > amax`` (``k < 0``) gives amax.

    Returns ``(values, ambiguous)``: ``ambiguous`` marks inputs whose ``-log2(x / amax)`` lies within 1e-6 of a
    half-way point ``k + 1/2``, where the float32 log2 of the code under test may round the other way."""
    x = np.asarray(x, dtype=np.float64)
    amax = float(amax)
    with np.errstate(divide="ignore", invalid="ignore"):
        e = -np.log2(np.where(x > 0, x / amax, np.nan))
    k = np.maximum(np.floor(e + 0.5), 0.0)
    zero = np.isnan(e) | (k > 2 ** bits - 2)
    values = np.where(zero, 0.0, amax * np.exp2(-np.where(zero, 0.0, k))).astype(np.float32)
    ambiguous = ~np.isnan(e) & (np.abs(e - np.floor(e) - 0.5) < 1e-6)
    return values, ambiguous


def uniform_codes(x, amax, bits, unsigned):
    """The uniform grid from its formula, in float64, per group of the last axis when ``amax`` holds several
    values (each group's range repeated over its features): ``(codes, step, ambiguous)`` with ``codes =
    clip(rint(x / step), -qmax or 0, qmax)``, ``step = amax / qmax``, ``qmax = 2^(b-1+u) - 1``; ``ambiguous``
    marks inputs within 1e-5 of a half-way point, where float32 rounding in the code under test decides."""
    x = np.asarray(x, dtype=np.float64)
    amax = np.asarray(amax, dtype=np.float64).ravel()
    bound = 2.0 ** (bits - 1 + int(unsigned)) - 1
    step = np.repeat(amax / bound, x.shape[-1] // len(amax))
    t = x / step
    return np.clip(np.rint(t), 0.0 if unsigned else -bound, bound), step, np.abs(t - np.floor(t) - 0.5) < 1e-5


def assert_on_uniform_grid(out, x, amax, bits, unsigned, name="", ambiguous_at_most=1e-3):
    """``out`` (what a quantizer made of ``x``) is ``code * step`` to float32 precision, with the reference's
    code everywhere but at half-way points, and at most one code off there. (Bit for bit is not the claim:
    PyTorch's fake quantizer divides by ``qmax / amax`` where ONNX multiplies by ``amax / qmax``.)"""
    codes, step, ambiguous = uniform_codes(x, amax, bits, unsigned)
    out = np.asarray(out, dtype=np.float64)
    got = np.rint(out / step)
    assert np.allclose(out, got * step, rtol=1e-6, atol=0), name
    assert np.array_equal(got[~ambiguous], codes[~ambiguous]), name
    assert np.all(np.abs(got - codes)[ambiguous] <= 1) and ambiguous.mean() <= ambiguous_at_most, name


def asymmetric_reference(x, low, high, bits):
    """The asymmetric grid from its formula: ``s = float32((high - low) / (2^b - 1))``, ``z = round(-low / s)``,
    ``(clip(rint(x / s) + z, 0, 2^b - 1) - z) * s`` in float32."""
    top = np.float32(2 ** bits - 1)
    s = np.float32((high - low) / float(top))
    z = np.float32(min(max(np.rint(-low / float(s)), 0), float(top)))
    x = np.asarray(x, dtype=np.float32)
    return ((np.clip(np.rint(x / s) + z, np.float32(0), top) - z) * s).astype(np.float32)


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
    # the numpy reference agrees with the hand values, then with the code on values spread over 40 octaves
    assert np.array_equal(log2_reference(x.numpy(), 1.0, 3)[0], expected.numpy())
    generator = torch.Generator().manual_seed(0)
    amax = 0.8
    y = amax * torch.exp2(-40 * torch.rand(20000, generator=generator))
    y = torch.cat([y, torch.tensor([0.0, -1.0, 2.0, amax])])
    for bits in (2, 3, 4, 5):
        values, ambiguous = log2_reference(y.numpy(), amax, bits)
        out = log2_fake_quant(y, torch.tensor(amax), bits).numpy()
        assert ambiguous.sum() <= 2, bits  # within 1e-6 of a half-way exponent: the float32 log2 decides
        assert np.array_equal(out[~ambiguous], values[~ambiguous]), bits
        assert len(np.unique(out)) == 2 ** bits  # every code is reached: 2^b - 1 powers and 0


def test_log_sqrt2_grid_by_hand():
    """Base sqrt(2), 3 bits: the powers 2^(-k/2) for k = 0..6 (1 down to 1/8) and 0, the nearest exponent in the
    log domain; at 4 bits it reaches 2^-7 where log2 reaches 2^-14. -narrow is it at 4 bits, uniform at 5."""
    x = torch.tensor([1.0, 0.8, 0.3, 0.2, 0.13, 0.1, 0.0, -0.2, 1.5])
    # -2 log2: 0, .644, 3.47, 4.64, 5.89, 6.64, inf, nan->inf, -1.17 -> k = 0, 1, 3, 5, 6, zero, zero, zero, 0
    root = 2 ** -0.5
    expected = torch.tensor([1.0, root, root / 2, root / 4, 1 / 8, 0.0, 0.0, 0.0, 1.0])
    for form in ("log-sqrt2", "log-sqrt2-narrow"):
        torch.testing.assert_close(fake_quantize(form, x, torch.tensor(1.0), 3, True), expected, rtol=1e-6, atol=0)
    torch.testing.assert_close(log2_fake_quant(x.clone() * 4, torch.tensor(4.0), 3, steps=2), expected * 4,
                               rtol=1e-6, atol=0)  # amax scales the grid
    small = torch.tensor([0.008, 0.0055, 0.005])  # -2 log2: 13.93, 15.01 (> 14: zero), 15.29
    torch.testing.assert_close(fake_quantize("log-sqrt2", small, torch.tensor(1.0), 4, True),
                               torch.tensor([1 / 128, 0.0, 0.0]), rtol=1e-6, atol=0)
    assert torch.equal(fake_quantize("log2", small, torch.tensor(1.0), 4, True),
                       torch.tensor([1 / 128, 1 / 256, 1 / 256]))  # -log2: 6.97, 7.51, 7.64
    # 5 bits, -narrow is unsigned uniform: x * 31 = 31, 24.8, 9.3 -> 31, 25, 9
    assert torch.equal(fake_quantize("log-sqrt2-narrow", x[:3], torch.tensor(1.0), 5, True),
                       torch.tensor([31.0, 25.0, 9.0]) / 31.0)
    # every code is reached once the values spread over the grid: 2^b - 1 powers and 0
    y = torch.exp2(-12 * torch.rand(20000, generator=torch.Generator().manual_seed(0)))
    for bits in (2, 3, 4):
        assert len(torch.unique(log2_fake_quant(y, torch.tensor(1.0), bits, steps=2))) == 2 ** bits


@pytest.mark.parametrize("form", ["log2", "log-sqrt2"])
def test_a_pure_log_form_takes_the_calibration_maximum_at_every_width(form, fashion_splits_small, fp32_state):
    """Clipping the largest probabilities costs most on a log grid: whatever the method, amax is the maximum seen."""
    qmodel = QuantizedActivationsModel(fresh_vit(fp32_state), "vit", forms={ATTENTION: form})
    loader = torch.utils.data.DataLoader(fashion_splits_small.calibration, batch_size=100)
    c = calibrate(qmodel, loader, 1, "percentile", bits=(2, 8), percentile=99.0).quantizers["blocks.0.attn.attn_drop"]
    assert c.form == form and c.unsigned and c.method == "max"  # recorded as what it is
    assert all(c.amax[b] == c.absmax for b in range(2, 9))


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
def fashion_splits_small():
    from quantsearch.sources.data import load_fashion_mnist, split_dataset

    return split_dataset(load_fashion_mnist(), calibration=200, search=300, holdout=300, seed=0)


@pytest.fixture(scope="module")
def fp32_state():
    """The demo ViT's FP32 weights: the one source every test's fresh model copies (never a shared model)."""
    return {k: v.clone() for k, v in create_demo_vit().state_dict().items()}


def fresh_vit(state):
    model = create_demo_vit(pretrained=False)
    model.load_state_dict(state)
    return model.eval()


@pytest.fixture(scope="module")
def calibration_texts():
    """forms (as JSON) -> the calibration file's text of an mse calibration on two batches of 100 (bits 2..8):
    computed once per set of forms and kept as text, so no test can change what another test gets."""
    return {}


@pytest.fixture
def build(fashion_splits_small, fp32_state, calibration_texts):
    """``build(forms)``: a fresh demo ViT with ``forms`` and weight quantizers, calibrated: (qmodel, loader,
    calibration)."""
    loader = torch.utils.data.DataLoader(fashion_splits_small.calibration, batch_size=100)

    def make(forms):
        key = json.dumps(forms, sort_keys=True)
        if key not in calibration_texts:
            qmodel = QuantizedActivationsModel(fresh_vit(fp32_state), "vit", weight_quantizers=True, forms=forms)
            calibration_texts[key] = json.dumps(calibrate(qmodel, loader, 2, "mse", bits=(2, 8)).to_dict())
            qmodel.remove()
        qmodel = QuantizedActivationsModel(fresh_vit(fp32_state), "vit", weight_quantizers=True, forms=forms)
        calibration = Calibration.from_dict(json.loads(calibration_texts[key]))
        calibration.apply(qmodel)
        return qmodel, loader, calibration

    return make


def test_log2_quantizers_calibrate_to_their_maximum_and_run_their_grid(build, fp32_state):
    qmodel, loader, _ = build({ATTENTION: "log2"})
    attention = [n for n, f in qmodel.forms.items() if f == "log2"]
    assert attention == [f"blocks.{i}.attn.attn_drop" for i in range(4)]
    assert all(isinstance(qmodel.quantizer(n), Log2TensorQuantizer) for n in attention)
    # the maximum, measured here on a plain FP32 copy over the same two calibration batches
    plain, maxima = fresh_vit(fp32_state), {}
    for block in plain.blocks:
        block.attn.fused_attn = False  # attention probabilities pass through attn_drop
    for n in attention:
        plain.get_submodule(n).register_forward_hook(
            lambda m, a, out, n=n: maxima.update({n: max(maxima.get(n, 0.0), float(out.max()))}))
    with torch.no_grad():
        for x, _ in loader:
            plain(x)
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
        assert amax == pytest.approx(maxima[n], rel=1e-6) and qmodel.unsigned[n]  # softmax probabilities
        values, ambiguous = log2_reference(inputs.numpy(), amax, 4)
        assert ambiguous.mean() < 1e-4
        assert np.array_equal(out.numpy()[~ambiguous], values[~ambiguous])
        nonzero = out[out > 0] / amax
        assert float(nonzero.min()) >= 2.0 ** -14 and len(torch.unique(out)) > 8  # the 4-bit grid, well used


def test_calibration_file_keeps_forms_and_refuses_another(build, tmp_path, fp32_state):
    qmodel, loader, calibration = build({ATTENTION: "log2"})
    path = calibration.save(tmp_path / "cal.json")
    loaded = Calibration.load(path)
    assert loaded.forms == {n: qmodel.forms[n] for n in qmodel.activation_names}
    assert list(loaded.forms.values()).count("log2") == 4
    assert loaded.methods["blocks.0.attn.attn_drop"] == "max" and loaded.methods["blocks.0.attn.qkv"] == "mse"
    loaded.check_fits(qmodel)
    uniform = QuantizedActivationsModel(fresh_vit(fp32_state), "vit", weight_quantizers=True)
    with pytest.raises(CalibrationError, match="'blocks.0.attn.attn_drop' for the log2 form"):
        loaded.check_fits(uniform)


def test_log2_refuses_signed_data(fashion_splits_small):
    qmodel = QuantizedActivationsModel(create_demo_vit(), "vit", forms={"*.norm1": "log2"})
    loader = torch.utils.data.DataLoader(fashion_splits_small.calibration, batch_size=100)
    with pytest.raises(CalibrationError, match="'blocks.0.norm1' has the log2 form but saw negative values"):
        qmodel.calibrate(loader, 1, method="mse")



def test_bitconfig_round_trip_reproduces_log2_outputs(build):
    qmodel, loader, _ = build({ATTENTION: "log2"})
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
    # the numpy reference on random values and exact half-way points, at several widths and ranges
    generator = torch.Generator().manual_seed(0)
    for low, high, bits in ((-1.0, 3.0, 2), (-0.17, 6.3, 4), (-2.5, 0.4, 3), (-0.3, 9.0, 8)):
        s, z, _ = asymmetric_grid(low, high, bits)
        y = torch.cat([torch.randn(5000, generator=generator) * high,
                       (torch.arange(-4, 2 ** bits + 4) - z + 0.5) * s]).float()  # half-way points, both ends
        assert np.array_equal(asymmetric_fake_quant(y, low, high, bits).numpy(),
                              asymmetric_reference(y.numpy(), low, high, bits)), (low, high, bits)


def test_asymmetric_fit_finds_the_hand_computed_optimum():
    """2 bits (4 levels), candidates low = min * a, high = max * c with a, c = 1/16 .. 1.

    300 values of 1 and one of 8 (min 0): high = 8c = 3 makes s = 1, 1 exact and 8 clipped to 3: error 25. The
    next candidates: high 3.5 puts 1 on 7/6 and 8 on 3.5: 300/36 + 20.25 = 28.58; high 2.5: 1 on 5/6: 8.33 + 30.25
    = 38.58; high 8 rounds every 1 to 0: 300. So (0, 3).

    Clusters of 300 at -1, 1 and 2 with outliers -16 and 32 (candidates: low -1 .. -16, high 2, 4 .. 32): low -1
    and high 2 make s = 1, z = 1, levels -1, 0, 1, 2: every cluster exact, the outliers clipped: 15^2 + 30^2 =
    1125. Wider ranges move the clusters: (-2, 2): s 4/3, z 2, each cluster 1/3 or 2/3 off: 200 + 13.33^2 +
    30.67^2 = 1275.6; (-1, 4): s 5/3, z 1: 300 (4/9 + 4/9 + 1/9) + 14.33^2 + 28.67^2 = 1327.2; the full range
    (-16, 32): s 16, every cluster to 0: 1800. So (-1, 2), clipping both ends."""
    ones = torch.cat([torch.ones(300), torch.tensor([8.0])])
    assert fit_asymmetric(ones, 2) == (0.0, 3.0)
    clusters = torch.cat([torch.full((300,), v) for v in (-1.0, 1.0, 2.0)] + [torch.tensor([-16.0, 32.0])])
    assert fit_asymmetric(clusters, 2) == (-1.0, 2.0)
    # a lopsided GELU-like tensor: the fit is the least-error range of its candidates, found here in numpy
    values = torch.cat([torch.full((900,), -0.1), torch.linspace(0, 6, 100)])
    candidates = [(-0.1 * a / 16, 6.0 * c / 16) for a in range(1, 17) for c in range(1, 17)]
    v = values.numpy().astype(np.float64)
    errors = [float(((asymmetric_reference(values.numpy(), lo, hi, 4) - v) ** 2).sum()) for lo, hi in candidates]
    best = int(np.argmin(errors))
    assert sorted(errors)[1] > errors[best] * (1 + 1e-4)  # a winner that float sums cannot swap
    assert fit_asymmetric(values, 4) == pytest.approx(candidates[best], rel=1e-6)
    assert candidates[best][0] > -0.1 or candidates[best][1] < 6.0  # it clips: the full range is not the answer


def test_asymmetric_calibration_fits_each_width_and_round_trips(build, tmp_path):
    qmodel, loader, calibration = build({GELU: "asymmetric"})
    name = "blocks.1.mlp.act"
    q = calibration.quantizers[name]
    assert q.form == "asymmetric" and set(q.low) == set(q.amax) == set(range(2, 9))
    assert all(q.min <= q.low[b] <= 0 < q.amax[b] <= q.absmax for b in q.low)  # GELU's min is about -0.17
    assert -0.2 < q.min < -0.1
    assert q.low[8] < q.low[3] or q.amax[8] > q.amax[3]  # wider grids clip less
    qmodel.bit_widths = {n: (3 if n == name else 8) for n in qmodel.quantizer_names}
    assert qmodel.lows[name] == q.low[3] and float(qmodel.quantizer(name).amax) == pytest.approx(q.amax[3])
    # the module's forward is the grid of its range, as the numpy reference computes it
    seen = {}
    handle = qmodel.quantizer(name).register_forward_hook(lambda m, a, o: seen.update(x=a[0], y=o))
    with torch.no_grad():
        qmodel(next(iter(loader))[0][:8])
    handle.remove()
    assert np.array_equal(seen["y"].numpy(), asymmetric_reference(seen["x"].numpy(), q.low[3], q.amax[3], 3))
    path = calibration.save(tmp_path / "calibration.json")
    again = Calibration.load(path)
    assert again.low_table == calibration.low_table and again.forms == calibration.forms
    payload = json.loads(path.read_text())
    del payload["quantizers"][name]["low"]
    with pytest.raises(CalibrationError, match="asymmetric form needs a low end per width"):
        Calibration.from_dict(payload)


# -- ONNX, quantizer by quantizer ----------------------------------------------------------------------------------
def onnx_quantizer_steps(qmodel, path, x, folder):
    """Run the exported file in the reference ONNX Runtime session with every activation Q/DQ's input and output
    made graph outputs; pair them in graph order with the activation quantizers in the order PyTorch's forward
    calls them. Returns ``(logits, [(name, onnx input, onnx output)])``."""
    import onnx

    from quantsearch.deploy.onnx_export import onnx_session

    order = []
    handles = [qmodel.quantizer(n).register_forward_hook(lambda m, a, o, n=n: order.append(n))
               for n in qmodel.activation_names]
    with torch.no_grad():
        qmodel(x[:1])
    for h in handles:
        h.remove()
    model = onnx.load(str(path))
    producer = {o: n for n in model.graph.node for o in n.output}
    inputs = {i.name for i in model.graph.input}
    pairs = []
    for node in model.graph.node:
        q = producer.get(node.input[0]) if node.op_type == "DequantizeLinear" else None
        if q is None or q.op_type != "QuantizeLinear":
            continue  # weights: a DequantizeLinear of constant codes
        raw = q.input[0]
        while raw in producer and producer[raw].op_type in ("Clip", "Max", "Min"):  # the width's grid ends
            raw = producer[raw].input[0]
        pairs.append((raw, node.output[0]))
    assert len(pairs) == len(order), (len(pairs), len(order))
    wanted = [t for pair in pairs for t in pair if t not in inputs]
    del model.graph.output[1:]
    model.graph.output.extend(onnx.helper.make_tensor_value_info(t, onnx.TensorProto.FLOAT, None) for t in wanted)
    probe = folder / "probe.onnx"
    onnx.save(model, str(probe))
    results = onnx_session(probe, "reference").run(None, {"input": x.numpy()})
    values = dict(zip(wanted, results[1:]))
    values.update({i: x.numpy() for i in inputs})
    return torch.from_numpy(results[0]), [(n, torch.from_numpy(values[a]), torch.from_numpy(values[b]))
                                         for n, (a, b) in zip(order, pairs)]


def check_onnx_against_pytorch(qmodel, x, folder):
    """Each Q/DQ of the exported file, given ONNX's own input, against the PyTorch quantizer on that input:
    asymmetric ones bit for bit (both compute ``round(x / s)`` and ``(q - z) * s``); uniform and per-head ones on
    the reference grid, the same codes but at half-way points (see :func:`assert_on_uniform_grid`). The logits
    then agree in every argmax and to within 10 % of their largest magnitude (a 4-bit code moved at a half-way
    point moves everything after it by up to its step)."""
    from quantsearch.deploy.onnx_export import export_onnx

    with torch.no_grad():
        expected = qmodel(x)
    written = export_onnx(qmodel, folder / "model.onnx", x[:2])
    logits, steps = onnx_quantizer_steps(qmodel, written["path"], x, folder)
    for name, onnx_in, onnx_out in steps:
        quantizer = qmodel.quantizer(name)
        with torch.no_grad():
            ours = quantizer(onnx_in)
        if quantizer.form == "asymmetric":
            assert torch.equal(onnx_out, ours), name
            assert np.array_equal(onnx_out.numpy(), asymmetric_reference(onnx_in.numpy(), quantizer.low,
                                                                         float(quantizer.amax), quantizer.num_bits))
            continue
        amax = quantizer.amax.detach().double().numpy()
        for out in (onnx_out, ours):
            assert_on_uniform_grid(out.numpy(), onnx_in.numpy(), amax, quantizer.num_bits, quantizer.unsigned, name)
    assert torch.equal(logits.argmax(1), expected.argmax(1))
    assert float((logits - expected).abs().max()) < 0.1 * float(expected.abs().max())
    return steps


class _Proj(torch.nn.Module):
    """x -> proj, an identity Linear without bias (exact in float32): the model's output is the quantizer's output
    at proj's input. ``num_heads`` and ``head_dim`` give that input 2 heads of 3 features."""

    num_heads, head_dim = 2, 3

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(6, 6, bias=False)
        with torch.no_grad():
            self.proj.weight.copy_(torch.eye(6))

    def forward(self, x):
        return self.proj(x)


def test_asymmetric_onnx_is_bit_for_bit_the_fake_quantizer_half_way_points_included(tmp_path):
    """The README's promise, on a graph whose output is the quantizer's: the reference session's output equals
    PyTorch's, and the grid of the numpy reference, on random values and on every half-way point."""
    pytest.importorskip("onnxruntime")
    from quantsearch.deploy.onnx_export import export_onnx, onnx_session
    from quantsearch.quantize.predicates import Target, by_type, nothing

    generator = torch.Generator().manual_seed(0)
    qmodel = QuantizedActivationsModel(_Proj(), Target(nothing(), by_type(torch.nn.Linear)), quantize_input=False,
                                       forms={"proj:input": "asymmetric"})
    calibrate(qmodel, [torch.randn(64, 6, generator=generator) * 2 + 1.5], bits=(2, 8))
    for bits in (3, 8):
        qmodel.bit_widths = [bits]
        low, high = qmodel.lows["proj:input"], float(qmodel.quantizer("proj:input").amax)
        s, z, top = asymmetric_grid(low, high, bits)
        x = torch.cat([torch.randn(300, generator=generator) * 3 + 1,
                       (torch.arange(-3, top + 4) - z + 0.5) * s]).float()
        x = torch.cat([x, torch.zeros(-len(x) % 6)]).reshape(-1, 6)
        with torch.no_grad():
            expected = qmodel(x)
        assert np.array_equal(expected.numpy(), asymmetric_reference(x.numpy(), low, high, bits))
        written = export_onnx(qmodel, tmp_path / f"asym{bits}.onnx", x[:2])
        out = onnx_session(written["path"], "reference").run(None, {"input": x.numpy()})[0]
        assert np.array_equal(out, expected.numpy()), bits


def test_asymmetric_bitconfig_round_trip_and_onnx_export(build, tmp_path):
    pytest.importorskip("onnxruntime")
    qmodel, loader, _ = build({GELU: "asymmetric"})
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
    steps = check_onnx_against_pytorch(qmodel, x, tmp_path)
    assert sum(qmodel.quantizer(n).form == "asymmetric" for n, _, _ in steps) == 4


@pytest.mark.parametrize("form, base, three_bits", [
    ("log2-narrow", "log2", [1.0, 0.5, 0.25, 1 / 64]),  # -log2 = 0, .515, 1.74, 5.64
    ("log-sqrt2-narrow", "log-sqrt2", [1.0, 2 ** -0.5, 2 ** -1.5, 0.0])])  # -2 log2 = 0, 1.03, 3.47, 11.3 (> 6)
def test_narrow_log_forms_are_log_at_four_bits_and_below_and_uniform_above(form, base, three_bits,
                                                                           fashion_splits_small, fp32_state,
                                                                           tmp_path):
    """log2-narrow and log-sqrt2-narrow: the log grid (amax = the calibration maximum) at <= 4 bits, the unsigned
    uniform grid with the method's amax above; export refuses them only where they are on the log grid."""
    from quantsearch.deploy.export import ExportError
    from quantsearch.deploy.onnx_export import export_onnx
    from quantsearch.quantize.forms import QUANTIZER_CLASSES

    x = torch.tensor([1.0, 0.7, 0.3, 0.02])
    torch.testing.assert_close(fake_quantize(form, x, torch.tensor(1.0), 3, True), torch.tensor(three_bits),
                               rtol=1e-6, atol=0)
    # 5 bits, unsigned uniform: 31 levels of 1/31; x * 31 = 31, 21.7, 9.3, 0.62 -> 31, 22, 9, 1
    assert torch.equal(fake_quantize(form, x, torch.tensor(1.0), 5, True),
                       torch.tensor([31.0, 22.0, 9.0, 1.0]) / 31.0)
    qmodel = QuantizedActivationsModel(fresh_vit(fp32_state), "vit", weight_quantizers=True,
                                       forms={ATTENTION: form})
    loader = torch.utils.data.DataLoader(fashion_splits_small.calibration, batch_size=100)
    calibration = calibrate(qmodel, loader, 2, "percentile", bits=(2, 8), percentile=99.0)
    c = calibration.quantizers["blocks.0.attn.attn_drop"]
    assert c.form == form and c.unsigned
    assert all(c.amax[b] == c.absmax for b in (2, 3, 4)) and all(c.amax[b] < c.absmax for b in (5, 6, 7, 8))
    quantizer = qmodel.quantizer("blocks.0.attn.attn_drop")
    assert type(quantizer) is QUANTIZER_CLASSES[form]
    probabilities = torch.rand(2, 4, 50, 50, generator=torch.Generator().manual_seed(0)).softmax(-1)
    for bits in (2, 3, 4):  # the module rounds to its form's log grid
        qmodel.bit_widths = {"blocks.0.attn.attn_drop": bits}
        with torch.no_grad():
            assert torch.equal(quantizer(probabilities),
                               fake_quantize(form, probabilities, quantizer.amax, bits, True)), bits
    sample = next(iter(loader))[0][:4]
    qmodel.bit_widths = {n: 6 for n in qmodel.quantizer_names}
    export_onnx(qmodel, tmp_path / "six.onnx", sample[:2])  # uniform at 6 bits: exportable
    qmodel.bit_widths = {n: (4 if n.endswith("attn_drop") else 6) for n in qmodel.quantizer_names}
    with pytest.raises(ExportError, match=f"{form} form \\(the {base} grid at 4 bits\\)"):
        export_onnx(qmodel, tmp_path / "four.onnx", sample[:2])


# -- the per-head form -------------------------------------------------------------------------------------------
QKV, PROJ_IN = "*.attn.qkv", "*.attn.proj:input"


def test_per_head_grid_by_hand_and_against_the_reference():
    """Two groups of two features: each rounds on its own grid (2 bits signed: codes -1, 0, 1)."""
    x = torch.tensor([[0.4, -1.0, 3.0, 10.0]])
    out = grouped_fake_quant(x, torch.tensor([1.0, 10.0]), 2, False)
    assert torch.equal(out, torch.tensor([[0.0, -1.0, 0.0, 10.0]]))
    assert torch.equal(fake_quantize("per-head", x, [1.0, 10.0], 2, False), out)
    # 3 bits signed, amax 3 and 0.5 (steps 1 and 1/6): 0.4 -> 0, -1.0 -> -1; 3 * 6 = 18 clamps to 3 -> 0.5,
    # -0.3 * 6 = -1.8 -> -2 -> -1/3
    assert torch.equal(grouped_fake_quant(torch.tensor([0.4, -1.0, 3.0, -0.3]), [3.0, 0.5], 3, False),
                       torch.tensor([0.0, -1.0, 0.5, -2.0 / 6.0]))
    # 2 bits unsigned (codes 0..3), one group of amax 3: -1 clamps to 0, 1.5 ties to even (2), 7 clamps to 3
    assert torch.equal(grouped_fake_quant(torch.tensor([-1.0, 1.5, 0.5, 7.0]), [3.0], 2, True),
                       torch.tensor([0.0, 2.0, 0.0, 3.0]))
    with pytest.raises(ValueError, match="does not split into 3 groups"):
        grouped_fake_quant(x, torch.ones(3), 4, False)
    # each group on its own grid, as the numpy reference has it, on random values that clip in some groups only
    generator = torch.Generator().manual_seed(0)
    y, amax = torch.randn(5, 7, 48, generator=generator) * 3, torch.rand(6, generator=generator) * 4 + 0.2
    for bits, unsigned in ((2, False), (3, False), (4, True), (8, True)):
        assert_on_uniform_grid(grouped_fake_quant(y, amax, bits, unsigned).numpy(), y.numpy(), amax.numpy(), bits,
                               unsigned, (bits, unsigned))


def test_symmetric_fit_finds_the_hand_computed_optimum():
    """3 bits signed (levels amax * k/3, k = -3..3), candidates amax = absmax * k/32.

    Row 0: 300 values of 1 and one of 8 (absmax 8, candidates k/4). For amax in [3, 6) each 1 rounds to code 1,
    i.e. amax/3, and 8 clips to amax: error 300 (amax/3 - 1)^2 + (8 - amax)^2, least at amax = 3.146; among the
    candidates 3.25 gives 2.08 + 22.56 = 24.65 against 25 at 3.0 and 28.58 at 3.5; below 3 every candidate is
    worse (2.75: 2.08 + 27.56; 1.5, where 1 is exact: 42.25) and 8 costs 300. Row 1: every value 0.5: only
    amax 0.5 keeps it exact (a smaller one clips it). The rows are fitted each on its own."""
    row = torch.cat([torch.ones(300), torch.tensor([8.0])])
    amax = fit_symmetric(torch.stack([row, torch.full_like(row, 0.5)]), 3, False)
    assert amax == [3.25, 0.5]
    # unsigned at 2 bits (levels amax * k/3, k = 0..3): the same row, values >= 0: the same errors, the same 3.25
    assert fit_symmetric(row[None], 2, True) == [3.25]


def test_per_head_groups_come_from_the_attention(fp32_state):
    model = fresh_vit(fp32_state)
    qmodel = QuantizedActivationsModel(model, "vit", weight_quantizers=True, forms={QKV: "per-head",
                                                                                    PROJ_IN: "per-head"})
    attn = model.blocks[0].attn
    q, p = qmodel.quantizer("blocks.0.attn.qkv"), qmodel.quantizer("blocks.0.attn.proj:input")
    assert (q.groups, q.width) == (3 * attn.num_heads, attn.qkv.out_features) == (12, 192)
    assert (p.groups, p.width) == (attn.num_heads, attn.proj.in_features) == (4, 64)
    with pytest.raises(ValueError, match="no module around it has num_heads"):
        QuantizedActivationsModel(fresh_vit(fp32_state), "vit", forms={"head": "per-head"})
    with pytest.raises(ValueError, match="LayerNorm is not a Linear layer"):
        QuantizedActivationsModel(fresh_vit(fp32_state), "vit", forms={"*.norm1": "per-head"})


def test_per_head_calibration_fits_each_head_and_round_trips(build, tmp_path):
    qmodel, loader, calibration = build({QKV: "per-head", PROJ_IN: "per-head"})
    name = "blocks.0.attn.qkv"
    c = calibration.quantizers[name]
    groups = qmodel.quantizer(name).groups
    assert c.form == "per-head" and all(len(c.amax[b]) == groups for b in range(2, 9))
    assert all(0 < a <= c.absmax for b in c.amax for a in c.amax[b])
    assert max(c.amax[8]) / min(c.amax[8]) > 1.2  # the heads' ranges differ: why one range each pays
    qmodel.bit_widths = {n: (3 if n == name else 8) for n in qmodel.quantizer_names}
    assert qmodel.amax[name] == pytest.approx(c.amax[3])
    # the forward is each head's grid with its own range, as the numpy reference computes it
    seen = {}
    handle = qmodel.quantizer(name).register_forward_hook(lambda m, a, o: seen.update(x=a[0], y=o))
    with torch.no_grad():
        qmodel(next(iter(loader))[0][:4])
    handle.remove()
    assert_on_uniform_grid(seen["y"].numpy(), seen["x"].numpy(), c.amax[3], 3, c.unsigned)
    path = calibration.save(tmp_path / "calibration.json")
    assert Calibration.load(path).amax_table == calibration.amax_table
    payload = json.loads(path.read_text())
    payload["quantizers"][name]["amax"]["3"] = 1.0
    with pytest.raises(CalibrationError, match="list of amax per width exactly when its form is per-head"):
        Calibration.from_dict(payload)
    with pytest.raises(ValueError, match="needs 12 positive finite values"):
        qmodel.amax = {name: [1.0, 2.0]}


def test_per_head_onnx_is_the_fake_quantizer_up_to_half_way_points(tmp_path):
    """A graph whose output is the per-head quantizer's: ONNX and PyTorch both give each head's reference codes
    (to float32 precision: PyTorch divides a code by qmax / amax, ONNX multiplies it by amax / qmax), on random
    values, on every level, and at every half-way point (there at most one code apart)."""
    pytest.importorskip("onnxruntime")
    from quantsearch.deploy.onnx_export import export_onnx, onnx_session
    from quantsearch.quantize.predicates import Target, by_type, nothing

    generator = torch.Generator().manual_seed(0)
    qmodel = QuantizedActivationsModel(_Proj(), Target(nothing(), by_type(torch.nn.Linear)), quantize_input=False,
                                       forms={"proj:input": "per-head"})
    calibrate(qmodel, [torch.randn(64, 6, generator=generator) * torch.tensor([1.0] * 3 + [5.0] * 3)], bits=(2, 8))
    for bits in (3, 8):
        qmodel.bit_widths = [bits]
        amax = qmodel.quantizer("proj:input").amax.detach().float()
        step = (amax / (2 ** (bits - 1) - 1)).repeat_interleave(3)
        assert float(amax[1]) > 3 * float(amax[0])  # the heads' own ranges
        x = torch.randn(400, 6, generator=generator) * amax.repeat_interleave(3)
        codes = torch.arange(-2 ** (bits - 1) - 1, 2 ** (bits - 1) + 1)[:, None].float()
        x = torch.cat([x, codes * step, (codes + 0.5) * step])  # every level and every half-way point
        with torch.no_grad():
            expected = qmodel(x)
        written = export_onnx(qmodel, tmp_path / f"heads{bits}.onnx", x[:2])
        out = onnx_session(written["path"], "reference").run(None, {"input": x.numpy()})[0]
        for values in (expected.numpy(), out):
            assert_on_uniform_grid(values, x.numpy(), amax.numpy(), bits, False, bits, ambiguous_at_most=0.3)


def test_per_head_bitconfig_round_trip_and_onnx_export(build, tmp_path):
    pytest.importorskip("onnxruntime")
    qmodel, loader, _ = build({QKV: "per-head", PROJ_IN: "per-head"})
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
    steps = check_onnx_against_pytorch(qmodel, x, tmp_path)
    assert sum(qmodel.quantizer(n).form == "per-head" for n, _, _ in steps) == 8


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

def test_per_channel_calibration_file_and_bitconfig_round_trip_and_export(build, fp32_state, tmp_path):
    pytest.importorskip("onnxruntime")
    qmodel, loader, calibration = build({"*norm*": "per-channel"})
    assert calibration.folds["blocks.0.norm1"].into == ("blocks.0.attn.qkv",)
    assert calibration.folds["norm"].into == ("head",)  # the class token reaches the head as a view
    path = calibration.save(tmp_path / "calibration.json")
    fresh = QuantizedActivationsModel(fresh_vit(fp32_state), "vit", weight_quantizers=True,
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
    steps = check_onnx_against_pytorch(qmodel, x, tmp_path)  # the folded weights are in the file
    assert sum(qmodel.quantizer(n).form == "per-channel" for n, _, _ in steps) == 9


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
