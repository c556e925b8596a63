"""Every ONNX export loads and runs in a default ``onnxruntime.InferenceSession(path)``: each quantizer form, int4
and int8 weights, opsets 17 and 21, a ViT and a CNN; and a file that would not load is never written.

The default session (every graph optimisation on, no pass turned off) is what a user runs. ONNX Runtime 1.32's
Q/DQ propagation broke on the int8 zero points of opset 21, so activations export with uint8 zero points: the
reference session must still give PyTorch's fake-quant outputs.
"""
import json
import re

import numpy as np
import pytest
import torch

from quantsearch.cli.apply import main as apply_main
from quantsearch.cli.explore import main as explore_main
from quantsearch.deploy.export import ExportError
from quantsearch.quantize.calib import calibrate
from quantsearch.quantize.quantized_model import QuantizedActivationsModel
from quantsearch.sources.models import create_demo_vit

from conftest import SmallConvNet

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

# every activation form with a Q/DQ form at once: asymmetric GELU, per-head qkv, per-channel LayerNorm folds;
# the rest uniform (signed, and unsigned after softmax)
VIT_FORMS = {"*.mlp.act": "asymmetric", "*.attn.qkv": "per-head", "*norm*": "per-channel"}


@pytest.fixture(scope="module")
def images():
    from quantsearch.sources.data import load_fashion_mnist, split_dataset

    splits = split_dataset(load_fashion_mnist(), calibration=200, search=100, holdout=100, seed=0)
    loader = torch.utils.data.DataLoader(splits.calibration, batch_size=100)
    return loader, next(iter(torch.utils.data.DataLoader(splits.search, batch_size=32)))[0]


def _calibrated(kind: str, loader) -> QuantizedActivationsModel:
    """A freshly built and calibrated model of ``kind``: nothing is shared between tests."""
    if kind == "vit":
        qmodel = QuantizedActivationsModel(create_demo_vit(), "vit", weight_quantizers=True, forms=VIT_FORMS)
    else:
        qmodel = QuantizedActivationsModel(SmallConvNet().eval(), "all-leaf", weight_quantizers=True)
    calibrate(qmodel, loader, 1, "mse", bits=(4, 8))
    return qmodel.eval()


def _default_session(path):
    """Exactly what a user writes: no options, no providers, no disabled passes."""
    return ort.InferenceSession(str(path))


@pytest.mark.parametrize("kind", ["vit", "cnn"])
def test_every_kind_of_export_loads_in_a_default_session(kind, images, tmp_path):
    from quantsearch.deploy.onnx_export import export_onnx, onnx_session

    loader, x = images
    qmodel = _calibrated(kind, loader)
    forms = set(qmodel.forms.values())
    assert forms == ({"uniform", "asymmetric", "per-head", "per-channel"} if kind == "vit" else {"uniform"})
    assert any(qmodel.unsigned.values()) and not all(qmodel.unsigned.values())  # both uint8 grids are exported
    for weight_bits, activation_bits, opset, packs in [(4, 8, None, True), (8, 8, None, False), (4, 4, 17, False),
                                                       (8, 6, 21, False), (3, 4, 21, True)]:
        qmodel.bit_widths = {n: weight_bits if n.endswith(":weight") else activation_bits
                             for n in qmodel.quantizer_names}
        with torch.no_grad():
            expected = qmodel(x).numpy()
        path = tmp_path / f"{kind}_w{weight_bits}a{activation_bits}_{opset}.onnx"
        written = export_onnx(qmodel, path, x[:2], opset=opset)
        assert written["opset"] == (21 if packs or opset == 21 else 17)
        assert (written["int4_weights"] == len(qmodel.weight_names)) == packs and (written["int4_weights"] > 0) == packs
        model = onnx.load(str(path))
        assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) == written["opset"]
        deployed = _default_session(path).run(None, {"input": x.numpy()})[0]
        reference = onnx_session(path, "reference").run(None, {"input": x.numpy()})[0]
        assert deployed.shape == expected.shape and np.isfinite(deployed).all()
        # the reference session runs the Q/DQ graph as written: PyTorch's outputs, except where a value lies
        # within one float32 rounding step of a half-way point and its code moves by one (a few outputs at most)
        moved = np.abs(reference - expected) > 1e-5 * float(np.abs(expected).max())
        assert moved.mean() <= 0.05, (path.name, moved.mean())
        assert (reference.argmax(1) == expected.argmax(1)).mean() >= 31 / 32, path.name
        # the default session fuses Q/DQ into integer kernels and rounds biases to int32: the same classes
        assert (deployed.argmax(1) == expected.argmax(1)).mean() >= 0.9, path.name


def test_every_activation_exports_on_uint8(images, tmp_path):
    """Signed grids ride on uint8 through zero point 128: no QuantizeLinear has an int8 zero point, and the
    grid is still the narrow signed one (the Clip's ends are -qmax*s and qmax*s)."""
    from onnx import numpy_helper

    from quantsearch.deploy.onnx_export import export_onnx

    loader, x = images
    qmodel = _calibrated("cnn", loader)
    qmodel.bit_widths = {n: 8 if n.endswith(":weight") else 5 for n in qmodel.quantizer_names}
    export_onnx(qmodel, tmp_path / "cnn.onnx", x[:2])
    model = onnx.load(str(tmp_path / "cnn.onnx"))
    constants = {n.output[0]: numpy_helper.to_array(n.attribute[0].t) for n in model.graph.node
                 if n.op_type == "Constant"}
    producers = {o: n for n in model.graph.node for o in n.output}
    quantize = [n for n in model.graph.node if n.op_type == "QuantizeLinear"]
    assert len(quantize) == len(qmodel.activation_names)
    for node in quantize:
        zero, scale = constants[node.input[2]], float(constants[node.input[1]])
        assert zero.dtype == np.uint8 and int(zero) in (0, 128)
        clip = producers[node.input[0]]
        assert clip.op_type == "Clip"
        low, high = float(constants[clip.input[1]]), float(constants[clip.input[2]])
        qmax = 31 if int(zero) == 0 else 15  # 5 bits: unsigned 0..31, signed -15..15
        assert high == pytest.approx(qmax * scale) and low == pytest.approx(0.0 if int(zero) == 0 else -qmax * scale)


def test_a_file_the_runtime_cannot_load_is_refused_and_never_written(tmp_path):
    from onnx import TensorProto, helper

    from quantsearch.deploy.onnx_export import onnx_session

    graph = helper.make_graph([helper.make_node("NoSuchKernel", ["x"], ["y"], domain="qs.test")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("qs.test", 1)])
    onnx.save(model, str(tmp_path / "bad.onnx"))
    with pytest.raises(ExportError, match=r"cannot load .*bad\.onnx in a default session: .*NoSuchKernel"):
        onnx_session(tmp_path / "bad.onnx")


@pytest.fixture(scope="module")
def both_run(tmp_path_factory):
    """A small W+A search (``--search-space both``: weights down to 2 bits) on the demo, as a new user runs it."""
    out = tmp_path_factory.mktemp("both") / "run"
    assert explore_main(["--out", str(out), "--search-space", "both", "--pop-size", "6", "--generations", "1",
                         "--eval-samples", "200", "--holdout-samples", "200", "--calib-batches", "1",
                         "--batch-size", "100", "--no-progress", "--log-level", "WARNING"]) == 0
    return out


def test_a_w_plus_a_point_with_int4_weights_loads_by_default_and_apply_checks_it(both_run, tmp_path, capsys):
    """The issue's case: a front point of a W+A search with 4-bit weights, exported by apply, loads in a default
    session; apply's "deployed" row is that session."""
    points = sorted((both_run / "pareto").glob("point_*.json"))
    low = [p for p in points if min(q["num_bits"] for n, q in json.loads(p.read_text())["quantizers"].items()
                                    if n.endswith(":weight")) <= 4]
    point = low[0] if low else points[0]
    if not low:  # a front without a 4-bit weight: lower one layer's weights so that int4 packing happens
        payload = json.loads(point.read_text())
        payload["quantizers"]["blocks.0.mlp.fc1:weight"]["num_bits"] = 4
        payload["accuracy"] = {}
        point = tmp_path / "w4.json"
        point.write_text(json.dumps(payload))
    capsys.readouterr()
    assert apply_main([str(point), "--check", "--export", str(tmp_path / "point.onnx")]) == 0
    text = capsys.readouterr().out
    assert "opset 21" in text and "ONNX Runtime, deployed (default)" in text
    # the kernels ORT really runs: the W+A point's Linear layers as integer matmuls
    assert re.search(r"a default session runs \d+ MatMulIntegerToFloat", text), text
    model = onnx.load(str(tmp_path / "point.onnx"))
    assert any(init.data_type == onnx.TensorProto.INT4 for n in model.graph.node if n.op_type == "Constant"
               for init in [n.attribute[0].t])
    out = _default_session(tmp_path / "point.onnx").run(None, {"input": np.zeros((2, 1, 28, 28), np.float32)})[0]
    assert out.shape == (2, 10)


def test_apply_refuses_in_one_line_an_export_the_default_session_cannot_load(both_run, tmp_path, capsys,
                                                                             monkeypatch):
    """A graph ONNX Runtime cannot load (here: one with an operator it lacks) fails apply with exit 2 and one
    line naming the file, and leaves no file behind."""
    from onnx import helper

    from quantsearch.deploy import onnx_export

    packer = onnx_export._pack_int4

    def pack_and_break(model):
        out = model.graph.output[0].name
        for node in model.graph.node:
            node.output[:] = [f"{o}_pre" if o == out else o for o in node.output]
        model.graph.node.append(helper.make_node("NoSuchKernel", [f"{out}_pre"], [out], domain="qs.test"))
        model.opset_import.append(helper.make_opsetid("qs.test", 1))
        return packer(model)

    monkeypatch.setattr(onnx_export, "_pack_int4", pack_and_break)
    point = sorted((both_run / "pareto").glob("point_*.json"))[0]
    capsys.readouterr()
    assert apply_main([str(point), "--check", "--export", str(tmp_path / "broken.onnx")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot load" in err[0] and "broken.onnx in a default session" in err[0], err
    assert not list(tmp_path.glob("*broken*"))
