"""Calibration of the asymmetric and per-head forms: the method asked for is the one applied and recorded (mse or
max, against values computed here), any other is refused in one line, from the API, the settings and the CLIs."""
import pytest
import torch
from torch import nn

from quantsearch.quantize.calib import CalibrationError, TensorStatistics, calibrate
from quantsearch.quantize.calib import statistics as stats_module
from quantsearch.quantize.quantized_model import QuantizedActivationsModel
from quantsearch.run.settings import ConfigError, ExploreConfig


class _Attention(nn.Module):
    """Two heads of width 2: a fused qkv output of 12 features, 6 groups of 2."""

    num_heads, head_dim = 2, 2

    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(4, 12)

    def forward(self, x):
        return self.qkv(x)


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = _Attention()
        self.act = nn.GELU()

    def forward(self, x):
        return self.act(self.attn(x))


BATCHES = [torch.randn(64, 4, generator=torch.Generator().manual_seed(i)) * 3 for i in range(2)]


def _quantized(forms):
    """The quantized block, and its qkv and GELU outputs on every calibration batch, computed before any hook."""
    torch.manual_seed(0)
    block = _Block()
    with torch.no_grad():
        qkv = torch.cat([block.attn.qkv(x) for x in BATCHES])
    picks = lambda name, module: name in ("attn.qkv", "act")  # noqa: E731
    qmodel = QuantizedActivationsModel(block, picks, quantize_input=False, forms=forms)
    return qmodel, qkv, nn.functional.gelu(qkv)


def test_asymmetric_max_takes_the_whole_range_and_records_max():
    qmodel, _, gelu = _quantized({"act": "asymmetric"})
    c = calibrate(qmodel, BATCHES, method="max", bits=(2, 8)).quantizers["act"]
    assert c.method == "max" and c.form == "asymmetric"
    assert gelu.min() < 0  # GELU's negative dip: a real lower end
    assert all(c.low[b] == float(gelu.min()) and c.amax[b] == float(gelu.max()) for b in range(2, 9))
    assert qmodel.quantizer("act").low == float(gelu.min())


def test_asymmetric_mse_fits_each_width_and_records_mse():
    qmodel, _, gelu = _quantized({"act": "asymmetric"})
    c = calibrate(qmodel, BATCHES, method="mse", bits=(2, 8)).quantizers["act"]
    assert c.method == "mse"
    assert c.amax[2] < 0.9 * float(gelu.max())  # 2 bits clip the long positive tail
    assert c.amax[8] > c.amax[2]


def test_per_head_max_takes_each_groups_absmax_and_records_max():
    qmodel, qkv, _ = _quantized({"attn.qkv": "per-head"})
    expected = [float(v) for v in qkv.abs().reshape(-1, 6, 2).amax(dim=(0, 2))]  # 6 groups of 2 features
    c = calibrate(qmodel, BATCHES, method="max", bits=(2, 8)).quantizers["attn.qkv"]
    assert c.method == "max" and c.form == "per-head" and not c.unsigned
    assert all(c.amax[b] == expected for b in range(2, 9))
    assert qmodel.quantizer("attn.qkv")._amax.flatten().tolist() == expected


def test_per_head_mse_records_mse_and_clips_at_low_widths():
    qmodel, qkv, _ = _quantized({"attn.qkv": "per-head"})
    whole = qkv.abs().reshape(-1, 6, 2).amax(dim=(0, 2))
    c = calibrate(qmodel, BATCHES, method="mse", bits=(2, 8)).quantizers["attn.qkv"]
    assert c.method == "mse" and len(c.amax[2]) == 6
    assert all(a <= float(w) for a, w in zip(c.amax[2], whole)) and sum(c.amax[2]) < 0.9 * float(whole.sum())


@pytest.mark.parametrize("method", ["percentile", "entropy", "moving-max"])
@pytest.mark.parametrize("form, name", [("asymmetric", "act"), ("per-head", "attn.qkv")])
def test_other_methods_are_refused_for_these_forms_before_the_pass(method, form, name, monkeypatch):
    qmodel, _, _ = _quantized({name: form})
    monkeypatch.setattr(TensorStatistics, "collect", lambda *a: pytest.fail("the pass ran"))
    with pytest.raises(CalibrationError, match=f"quantizer '{name}' has the {form} form, .* not by calib-method "
                                               f"{method}: calibrate it with mse or max") as info:
        calibrate(qmodel, BATCHES, method=method)
    assert "\n" not in str(info.value)
    with pytest.raises(CalibrationError, match=f"not by calib-overrides\\['{name}'\\] {method}"):
        calibrate(qmodel, BATCHES, method="mse", overrides={name: method})


def test_an_override_makes_another_default_acceptable():
    qmodel, _, _ = _quantized({"act": "asymmetric", "attn.qkv": "per-head"})
    c = calibrate(qmodel, BATCHES, method="entropy", overrides={"act": "max", "attn.*": "mse"}, bits=(4, 8))
    assert c.methods == {"attn.qkv": "mse", "act": "max"}


def test_settings_refuse_a_form_no_given_method_can_calibrate():
    config = ExploreConfig(calib_method="entropy", quant_forms={"*.mlp.act": "asymmetric"})
    with pytest.raises(ConfigError, match="quant-forms\\['\\*.mlp.act'\\] has the asymmetric form, .* not by "
                                          "calib-method entropy: calibrate it with mse or max"):
        config.validate()
    with pytest.raises(ConfigError, match="not by calib-method entropy or calib-overrides\\['\\*.fc1'\\] percentile"):
        ExploreConfig(calib_method="entropy", quant_forms={"*.qkv": "per-head"},
                      calib_overrides={"*.fc1": "percentile"}).validate()
    # an override that can fit it may reach its quantizers: the model decides (calibrate checks each quantizer)
    ExploreConfig(calib_method="entropy", quant_forms={"*.mlp.act": "asymmetric"},
                  calib_overrides={"*.mlp.act": "mse"}).validate()
    ExploreConfig(calib_method="max", quant_forms={"*.mlp.act": "asymmetric", "*.qkv": "per-head"}).validate()
    ExploreConfig(calib_method="entropy", quant_forms={"*.attn_drop": "log2"}).validate()


@pytest.mark.parametrize("command", ["explore", "calibrate"])
def test_clis_refuse_in_one_line_with_status_2_before_loading_the_model(command, tmp_path, capsys, monkeypatch):
    import quantsearch.run.pipeline as pipeline
    import quantsearch.run.session as session

    monkeypatch.setattr(session, "build_session", lambda *a, **k: pytest.fail("the model was loaded"))
    monkeypatch.setattr(pipeline, "explore", lambda *a, **k: pytest.fail("the model was loaded"))
    if command == "explore":
        from quantsearch.cli.explore import main
        extra = ["--out", str(tmp_path / "run")]
    else:
        from quantsearch.cli.calibrate import main
        extra = ["--output", str(tmp_path / "c.json")]
    assert main(["--calib-method", "percentile", "--quant-form", "*.mlp.act=asymmetric", *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: quant-forms['*.mlp.act'] has the asymmetric form") and "\n" not in err
    assert "not by calib-method percentile" in err


def test_sampling_is_seeded_and_keeps_the_sample_size(monkeypatch):
    monkeypatch.setattr(stats_module, "SAMPLE_PER_BATCH", 100)
    x = torch.randn(10, 1000)
    first, second = TensorStatistics(sample=True), TensorStatistics(sample=True)
    for s in (first, second):
        s.collect(x)
        s.collect(x)
    assert torch.equal(first.sample(), second.sample()) and first.sample().shape == (200,)
    assert not torch.equal(first._samples[0], first._samples[1])  # each batch draws its own positions
    assert all(bool(torch.isin(s, x.flatten()).all()) for s in first._samples)
