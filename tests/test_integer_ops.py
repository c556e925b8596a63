"""Integer operators (quantize/integer): hand-computed codes, the float operators they stand for, and a demo ViT
with every nonlinear operator on integers, through calibration, bit-configs, resume-safe files and the CLI."""
import json
import math
import random

import pytest
import torch
from torch import nn

from quantsearch.deploy.bitconfig import BitConfig, BitConfigError, apply_bitconfig
from quantsearch.deploy.onnx_export import ExportError, export_onnx
from quantsearch.quantize.calib import calibrate
from quantsearch.quantize.calib.methods import CalibrationError
from quantsearch.quantize.calib.result import Calibration
from quantsearch.quantize.forms import log2_fake_quant
from quantsearch.quantize.integer import IntegerOpsError, find_operators
from quantsearch.quantize.integer.arithmetic import isqrt
from quantsearch.quantize.integer.gelu import shift_gelu
from quantsearch.quantize.integer.layernorm import int_layernorm, ptf_alpha, ptf_codes
from quantsearch.quantize.integer.softmax import log_int_softmax, shift_exp, shiftmax
from quantsearch.quantize.quantized_model import QuantizedActivationsModel
from quantsearch.sources.models import create_demo_vit

T = torch.tensor


# -- arithmetic, worked out by hand ------------------------------------------------------------------------------
def test_isqrt_is_the_exact_floor_root():
    rng = random.Random(0)
    values = [0, 1, 2, 3, 4, 15, 16, 17, 2 ** 32 - 1, 2 ** 40 + 12345, 2 ** 50 + 7] + [rng.randrange(2 ** 45)
                                                                                       for _ in range(500)]
    assert isqrt(T(values)).tolist() == [math.isqrt(v) for v in values]


def test_shift_exp_by_hand():
    # scale 1/4: -1 is x0 = -4 codes; x = -4: -4 + floor(-2) - floor(-1/4) = -5, q = 1, r = -1,
    # codes = ((-1 + 8) << 3) >> 1 = 28 against 2^4 * 4 = 64 for e^0: 0.4375 for e^-1
    codes, unit = shift_exp(T([0, -4]), 0.25, n=4)
    assert codes.tolist() == [64, 28] and unit == 1 / 64


def test_shiftmax_by_hand():
    assert shiftmax(T([[0, -4]]), 0.25, out_bits=8, n=4).tolist() == [[89, 38]]  # 64*128 // 92, 28*128 // 92


def test_shift_gelu_by_hand():
    # scale 1/4, sigmoid scale 0.4255: x0 = -3; row max 4. x = 1.0: e^0 -> 48, e^-max -> 16, sigmoid 48*128//64 = 96
    codes, scale = shift_gelu(T([[4, 0, -4]]), 0.25, n=4)
    assert codes.tolist() == [[384, 0, -100]] and scale == 0.25 / 128


def test_int_layernorm_by_hand():
    # x = [100, 300]: mean 200, y = -+100, sum of squares 20000, isqrt 141, factor (2^31-1)//141 = 15230380,
    # guard 1: y * factor >> 2 = 380759500, unit sqrt(2) / 2^29
    codes, scale = int_layernorm(T([[100, 300]]), None, None)
    assert codes.tolist() == [[-380759500, 380759500]]
    assert torch.allclose(scale.double(), torch.full((2,), math.sqrt(2) / 2 ** 29, dtype=torch.float64))


def test_log_int_softmax_by_hand():
    # scale 1/8: b = 21, c = 178, x0 = -6. x = 0: z = 178 << 30; x = -8: q = 1, r = -2, z = -2 * 19 + 178 = 140,
    # 140 << 29. sum / exp = 496/356 -> 1, 496/140 -> 4: k = 0 and 2 (p = 1, 1/4)
    assert log_int_softmax(T([[0, -8]]), 0.125, bits=4).tolist() == [[0, 2]]


def test_residual_add_requantizes_each_input_then_saturates():
    from quantsearch.quantize.integer import ResidualGrid

    add = ResidualGrid("a", "ivit", 16)
    add.load_state({"amax": 32767.0})  # scale 1: codes are the values
    out = add(torch.tensor([1.4, 40000.0, -3.6]), torch.tensor([2.4, 5.0, -0.4]))
    assert out.tolist() == [3.0, 32767.0, -4.0]  # 1 + 2 (not round(3.8)), saturated, -4 + 0


# -- against the float operators ----------------------------------------------------------------------------------
def _codes(x, bits=16):
    scale = float(x.abs().max()) / (2 ** (bits - 1) - 1)
    return torch.round(x / scale).long(), scale


def test_shiftmax_and_log_int_softmax_follow_softmax():
    logits = torch.randn(4, 3, 17, 17, generator=torch.Generator().manual_seed(0)) * 3
    codes, scale = _codes(logits)
    exact = logits.double().softmax(-1)
    p = shiftmax(codes, scale, 16).double() / 2 ** 15
    assert (p - exact).abs().max() < 0.03  # I-ViT's 2^r ~ 1 + r/2 and log2(e) ~ 1.4375
    k = log_int_softmax(codes, scale, 4)
    ours = torch.where(k == 15, 0.0, torch.exp2(-k.double()))
    reference = log2_fake_quant(exact.float(), 1.0, 4).double()
    # FQ-ViT rounds log2(sum/exp) in the linear domain: one code off at most, and rarely
    assert ((ours - reference).abs() <= reference.clamp(min=2 ** -14)).all()
    assert (ours != reference).float().mean() < 0.15


def test_shift_gelu_follows_gelu():
    x = torch.randn(4, 17, 128, generator=torch.Generator().manual_seed(1)) * 3
    codes, scale = _codes(x)
    out, out_scale = shift_gelu(codes, scale)
    err = (out.double() * out_scale - nn.functional.gelu(x.double())).abs()
    assert err.max() < 0.1 and err.mean() < 0.02  # the 8-bit sigmoid of x * sigmoid(1.702 x)


def test_int_layernorm_follows_layernorm_and_ptf_keeps_narrow_channels():
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(8, 17, 64, generator=gen) * 4 + 1
    x[..., 3] *= 20  # one wide channel, as ViTs' residual streams have
    ln = nn.LayerNorm(64)
    with torch.no_grad():
        ln.weight.normal_(1, 0.3, generator=gen)
        ln.bias.normal_(0, 0.3, generator=gen)
    exact = ln(x).double()
    codes, scale = int_layernorm(_codes(x)[0], ln.weight, ln.bias)
    assert (codes.double() * scale.double() - exact).abs().max() < 5e-3  # 16-bit grid of the widest channel
    s, alpha = ptf_alpha(x.abs().amax(dim=(0, 1)), 8)
    assert alpha[3] == 3 and (alpha[[0, 1, 2, 4]] == 0).all()
    ptf = int_layernorm(ptf_codes(x, s, alpha, 8), ln.weight, ln.bias)
    plain = int_layernorm(_codes(x, 8)[0], ln.weight, ln.bias)
    err_ptf = (ptf[0].double() * ptf[1].double() - exact).abs().mean()
    err_plain = (plain[0].double() * plain[1].double() - exact).abs().mean()
    assert err_ptf < 0.5 * err_plain


# -- in a model ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def data(fashion):
    x, y = fashion.tensors
    return [x[i:i + 100] for i in range(0, 300, 100)], x[1000:1600], y[1000:1600]


def _integer_vit(data, spec="integer-only", **kwargs):
    q = QuantizedActivationsModel(create_demo_vit(), "vit", weight_quantizers=True, integer_ops=spec, **kwargs)
    calibration = calibrate(q, data[0], method="max")
    q.bit_widths = {n: 8 for n in q.quantizer_names}
    return q, calibration


def _accuracy(q, x, y):
    with torch.inference_mode():
        return (q(x).argmax(1) == y).float().mean().item()


def test_integer_only_vit_runs_on_integers_and_stays_close(data):
    float_ops, _ = _integer_vit(data, None)
    q, _ = _integer_vit(data)
    names = list(q.integer_ops)
    assert len(q.integer) == 4 + 4 + 9 + 12 and q.integer_only and not float_ops.integer_only
    assert all(op.calibrated and float(op.amax) > 0 for op in q.integer)  # every operator saw its input
    gelu, norm = q.model.blocks[0].mlp.act, q.model.blocks[0].norm1
    h = torch.randn(2, 17, 128)
    with torch.inference_mode():  # the modules run their integer operators, not their own forwards
        op, after = q.integer.operators["blocks.0.mlp.act"], q.quantizer("blocks.0.mlp.act")
        assert torch.equal(gelu(h), after(op(h)))  # the operator, then the quantizer on the module's output
        assert not torch.equal(gelu(h), nn.functional.gelu(h))
        assert not torch.equal(norm(h[..., :64]), nn.functional.layer_norm(h[..., :64], (64,), norm.weight, norm.bias))
    assert "forward" not in dict(gelu.named_children())
    assert {"blocks.0.attn.softmax", "blocks.0.mlp.act", "blocks.0.norm1", "norm", "blocks.3.residual2"} <= set(names)
    x, y = data[1], data[2]
    with torch.inference_mode():
        assert not torch.equal(q(x[:50]), float_ops(x[:50]))  # the operators compute
    assert abs(_accuracy(q, x, y) - _accuracy(float_ops, x, y)) < 0.02
    with q.quantization_disabled(), float_ops.quantization_disabled(), torch.inference_mode():
        assert torch.equal(q(x[:50]), float_ops(x[:50]))  # off: the float operators, exactly
    reference = create_demo_vit()
    restored = q.remove()
    with torch.inference_mode():
        assert torch.equal(restored(x[:50]), reference(x[:50]))


def test_bitconfig_and_calibration_file_round_trip(data, tmp_path):
    q, calibration = _integer_vit(data, "fqvit")
    x = data[1][:64]
    with torch.inference_mode():
        expected = q(x)
    config = BitConfig.from_model(q, {"name": "fashion-vit", "predicate": "vit", "quantize_input": True,
                                      "weight_quantizers": True})
    path = tmp_path / "point.json"
    path.write_text(config.to_json())
    assert json.loads(path.read_text())["integer"]["blocks.0.norm1"]["impl"] == "fqvit"
    again = apply_bitconfig(create_demo_vit(), path)
    with torch.inference_mode():
        assert torch.equal(again(x), expected)
    saved = Calibration.load(calibration.save(tmp_path / "calib.json"))
    other = QuantizedActivationsModel(create_demo_vit(), "vit", weight_quantizers=True, integer_ops="fqvit")
    saved.apply(other)
    other.bit_widths = {n: 8 for n in other.quantizer_names}
    with torch.inference_mode():
        assert torch.equal(other(x), expected)
    mismatch = QuantizedActivationsModel(create_demo_vit(), "vit", weight_quantizers=True, integer_ops="integer-only")
    with pytest.raises(CalibrationError, match="integer operator 'blocks.0.attn.softmax' as fqvit"):
        saved.check_fits(mismatch)
    payload = json.loads(path.read_text())
    payload["integer"]["blocks.0.attn.softmax"]["impl"] = "ivit"
    with pytest.raises(BitConfigError, match="'blocks.0.attn.softmax' is ivit in the bit-config but fqvit"):
        BitConfig.from_dict(payload).check_names(again)


def test_placement_errors_name_the_problem():
    import timm
    from torchvision.models.vision_transformer import VisionTransformer

    vit = create_demo_vit(pretrained=False)
    with pytest.raises(IntegerOpsError, match=r"integer-ops\['\*.mlp.act'\]: operator 'blocks.0.mlp.act' is a gelu"):
        QuantizedActivationsModel(vit, "vit", integer_ops={"*.mlp.act": "fqvit"})
    with pytest.raises(IntegerOpsError, match=r"integer-ops\['head\*'\] matches no operator"):
        QuantizedActivationsModel(vit, "vit", integer_ops={"head*": "ivit"})
    cnn = timm.create_model("resnet10t", num_classes=10, in_chans=1)
    with pytest.raises(IntegerOpsError, match="has no operator that quantsearch puts on integers"):
        QuantizedActivationsModel(cnn, "conv2d", integer_ops="integer-only")
    tv = VisionTransformer(image_size=28, patch_size=7, num_layers=1, num_heads=2, hidden_dim=16, mlp_dim=32)
    with pytest.raises(IntegerOpsError, match="softmax of 'encoder.layers.encoder_layer_0.self_attention'"):
        QuantizedActivationsModel(tv, "linear", integer_ops="integer-only")
    assert [k for k, _ in find_operators(vit).values()].count("softmax") == 4


class _Owner(nn.Module):
    """The operator with the LayerNorm whose parameters it reads, as the model that owns them exports them."""

    def __init__(self, op, ln):
        super().__init__()
        self.op, self.ln = op, ln

    def forward(self, x):
        return self.op(x)


FLOAT_NONLINEAR = {"Exp", "Erf", "Softmax", "Sqrt", "LayerNormalization", "Tanh", "Sigmoid", "Log", "Gelu"}


@pytest.mark.parametrize("kind", ["shiftmax", "log-int-softmax", "shiftgelu", "i-layernorm", "ptf-layernorm",
                                  "add"])
def test_each_operator_exports_to_standard_onnx_bit_exact(kind, tmp_path):
    onnxruntime = pytest.importorskip("onnxruntime")
    import onnx
    from quantsearch.quantize.integer import IntegerGELU, IntegerLayerNorm, IntegerSoftmax, ResidualGrid

    ln = nn.LayerNorm(32)
    op = {"shiftmax": lambda: IntegerSoftmax("s", "ivit"), "log-int-softmax": lambda: IntegerSoftmax("s", "fqvit",
                                                                                                     lambda: 4),
          "shiftgelu": lambda: IntegerGELU("g", "ivit", nn.GELU()), "i-layernorm": lambda: IntegerLayerNorm("n", "ivit", ln),
          "ptf-layernorm": lambda: IntegerLayerNorm("n", "fqvit", ln), "add": lambda: ResidualGrid("a", "ivit")}[kind]()
    op.load_state({"amax": 6.0, **({"channel_amax": [6.0] + [1.0] * 31} if kind == "ptf-layernorm" else {})})
    gen = torch.Generator().manual_seed(3)
    exported = _Owner(op, ln)
    with torch.no_grad():
        torch.onnx.export(exported, (torch.randn(2, 17, 32, generator=gen),), str(tmp_path / "op.onnx"), opset_version=17,
                          dynamo=False)
        graph = onnx.load(str(tmp_path / "op.onnx")).graph
        assert not {n.op_type for n in graph.node} & FLOAT_NONLINEAR  # the arithmetic is integer
        session = onnxruntime.InferenceSession(str(tmp_path / "op.onnx"), providers=["CPUExecutionProvider"])
        for _ in range(3):
            x = torch.randn(2, 17, 32, generator=gen) * 2
            (ours,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
            assert torch.equal(torch.from_numpy(ours), op(x))


def test_integer_only_model_exports_and_loads_in_a_default_session(data, tmp_path):
    pytest.importorskip("onnxruntime")
    from quantsearch.deploy.onnx_export import onnx_session

    q, _ = _integer_vit(data)
    export_onnx(q, tmp_path / "m.onnx", data[1][:2])
    session = onnx_session(tmp_path / "m.onnx")  # a default session: what a user gets
    x = data[1][:200]
    (logits,) = session.run(None, {"input": x.numpy()})
    with torch.inference_mode():
        agree = (torch.from_numpy(logits).argmax(1) == q(x).argmax(1)).float().mean()
    assert agree >= 0.99  # Q/DQ rounds half-way points in float32 as ONNX does (see onnx_export)


def test_cli_refuses_bad_integer_settings_in_one_line(tmp_path):
    import subprocess
    import sys

    for flags, message in ((["--integer-ops", "integer-everything"], "integer-ops: unknown preset"),
                           (["--integer-ops", "*.softmax=int"], "unknown implementation 'int'"),
                           (["--integer-add-bits", "32"], "integer-add-bits must be an integer from 8 to 16"),
                           (["--integer-ops", "integer-only", "--target", "onnxruntime-cpu"],
                            "integer-ops describes fake quantizers")):
        done = subprocess.run([sys.executable, "-m", "quantsearch.explore", *flags, "--out", str(tmp_path / "r")],
                              capture_output=True, text=True)
        assert done.returncode == 2 and message in done.stderr and "Traceback" not in done.stderr, done.stderr


def test_an_integer_only_run_killed_mid_search_resumes_to_the_same_front(tmp_path):
    import signal
    import subprocess
    import sys
    import time

    from test_resume import stored, table

    from quantsearch.cli.explore import main

    args = ["--integer-ops", "integer-only", "--search-space", "both", "--pop-size", "6", "--generations", "3",
            "--eval-samples", "300", "--holdout-samples", "200", "--batch-size", "100", "--calib-batches", "1",
            "--bits", "3:8", "--weight-bits", "3:8", "--seed", "4", "--no-progress"]
    plain, killed = tmp_path / "plain", tmp_path / "killed"
    assert main([*args, "--out", str(plain)]) == 0
    proc = subprocess.Popen([sys.executable, "-m", "quantsearch.explore", *args, "--out", str(killed)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while stored(killed) < 8 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert main(["--resume", str(killed), "--no-progress"]) == 0
    assert table(killed / "evaluations.csv") == table(plain / "evaluations.csv")
    assert table(killed / "pareto.csv") == table(plain / "pareto.csv")
    recorded = json.loads((killed / "pareto" / "point_000.json").read_text())["integer"]
    assert recorded == json.loads((plain / "pareto" / "point_000.json").read_text())["integer"]
    assert len(recorded) == 29
