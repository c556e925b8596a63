"""``apply --check`` reproduces every kind of run exactly: the bit-config rebuilds model, images and metric.

Each run is small and real: the demo with a label-free metric and per-quantizer calibration overrides, KL with
channels-last, a timm model by name with a checkpoint on an ``imagefolder:`` of PNG files with a callable metric,
a ``package.module:callable`` model and dataset, and a run evaluated on 2 Ray workers. Old bit-configs still load.
"""
import json
import re
import sys

import numpy as np

import pytest
import torch
import yaml

from quantsearch.cli.apply import main as apply_main
from quantsearch.cli.explore import main as explore_main

from conftest import write_fashion_pngs

SMALL = ["--bits", "4:8", "--pop-size", "4", "--generations", "1", "--no-progress", "--log-level", "WARNING"]
DEMO = [*SMALL, "--eval-samples", "200", "--holdout-samples", "200", "--calib-batches", "1", "--batch-size", "100"]

USER_MODULE = '''
import torch
from torch import nn
from torch.utils.data import TensorDataset


class ConvNet(nn.Module):
    def __init__(self, num_classes=10):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.conv2(x)).mean((2, 3))
        return self.fc(x)


def convnet(num_classes=10):
    torch.manual_seed(1)
    return ConvNet(num_classes)


def blobs(count=300, transform=None):
    """Two classes of 1x12x12 images: bright centre or bright border, with noise."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(count, 1, 12, 12, generator=g) * 0.3
    y = torch.arange(count) % 2
    x[y == 0, :, 4:8, 4:8] += 1.5
    x[y == 1, :, :2, :] += 1.5
    return TensorDataset(x, y)


def top1_fn(outputs, labels):
    return float((outputs.argmax(1) == labels).float().mean())
'''


@pytest.fixture(scope="module")
def user_module(tmp_path_factory):
    folder = tmp_path_factory.mktemp("user")
    (folder / "qs_user.py").write_text(USER_MODULE)
    sys.path.insert(0, str(folder))
    yield folder
    sys.path.remove(str(folder))
    sys.modules.pop("qs_user", None)


def explore(out, *args, config: dict | None = None) -> None:
    extra = []
    if config is not None:
        path = out.parent / f"{out.name}.yaml"
        path.write_text(yaml.safe_dump(config))
        extra = ["--config", str(path)]
    assert explore_main([*args, *extra, "--out", str(out)]) == 0


def check(bitconfig, *flags, capsys) -> str:
    """``apply BITCONFIG --check``: exit 0 and every accuracy and cost row says ``identical``."""
    capsys.readouterr()
    code = apply_main([str(bitconfig), "--check", *flags])
    out = capsys.readouterr().out
    assert code == 0, out
    rows = [line.split() for line in out.splitlines()]
    accuracy = [r for r in rows if r and r[0] in ("search", "holdout")]
    costs = [r for r in rows if r and r[0] in ("bits", "bops", "model-size", "activation-memory")]
    assert [r[0] for r in accuracy] == ["search", "holdout"], out
    assert all(r[-1] == "identical" for r in accuracy + costs) and costs, out
    return out


def points(run_dir):
    found = sorted((run_dir / "pareto").glob("point_*.json"))
    assert found, f"{run_dir} has no Pareto point"
    return found


@pytest.fixture(scope="module")
def agreement_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "agreement"
    explore(out, *DEMO, "--metric", "agreement", "--max-accuracy-drop", "0.02", "--cost", "bits,bops",
            config={"calib-method": "percentile", "calib-percentile": 99.9,
                    "calib-overrides": {"*.attn_drop": "max", "blocks.0.*": {"method": "mse"}}})
    return out


@pytest.fixture(scope="module")
def callable_run(tmp_path_factory, user_module):
    out = tmp_path_factory.mktemp("runs") / "callable"
    explore(out, *SMALL, "--model", "qs_user:convnet", "--dataset", "qs_user:blobs", "--predicate", "all-leaf",
            "--eval-samples", "100", "--holdout-samples", "100", "--calib-batches", "1", "--batch-size", "50",
            "--max-accuracy-drop", "0.5", "--channels-last", config={"dataset-kwargs": {"count": 300}})
    return out


def test_demo_agreement_with_calibration_overrides(agreement_run, tmp_path, capsys):
    point = points(agreement_run)[0]
    payload = json.loads(point.read_text())
    assert payload["metric"]["metric"] == "agreement" and payload["settings"]["calib_method"] == "percentile"
    text = check(point, capsys=capsys)
    assert "agreement %" in text
    # an old bit-config (schema 2: model and dataset sections only) still re-applies to the same accuracy
    old = {k: v for k, v in payload.items() if k not in ("settings", "metric")}
    old["schema_version"] = 2
    old["dataset"] = {k: payload["dataset"][k] for k in ("name", "seed", "calibration", "search", "holdout",
                                                         "batch_size")} | {"metric": "agreement"}
    old["model"] = {k: payload["model"][k] for k in ("name", "checkpoint", "predicate", "quantize_input",
                                                     "weight_quantizers", "input_shape")}
    (tmp_path / "old.json").write_text(json.dumps(old))
    check(tmp_path / "old.json", capsys=capsys)


def test_demo_kl_channels_last(tmp_path, capsys):
    out = tmp_path / "kl"
    explore(out, *DEMO, "--metric", "kl", "--max-accuracy-drop", "0.05", "--channels-last", "--calib-method", "max")
    payload = json.loads(points(out)[-1].read_text())
    assert payload["metric"]["kind"] == "ceiling" and payload["settings"]["channels_last"] is True
    for point in points(out):
        check(point, capsys=capsys)


def test_timm_model_with_checkpoint_on_png_imagefolder_and_callable_metric(tmp_path, capsys, user_module):
    import timm

    write_fashion_pngs(tmp_path / "pngs", 90, by_class=True)
    torch.manual_seed(3)
    checkpoint = tmp_path / "resnet10t.pt"
    torch.save(timm.create_model("resnet10t", num_classes=10).state_dict(), checkpoint)
    out = tmp_path / "timm"
    explore(out, *SMALL, "--model", "resnet10t", "--checkpoint", str(checkpoint),
            "--dataset", f"imagefolder:{tmp_path / 'pngs'}", "--metric", "qs_user:top1_fn", "--min-accuracy", "0.0",
            "--eval-samples", "30", "--holdout-samples", "30", "--calib-batches", "1", "--batch-size", "30",
            config={"model-kwargs": {"num_classes": 10}, "preprocessing": {"input_size": [3, 48, 48]}})
    point = points(out)[0]
    payload = json.loads(point.read_text())
    assert payload["model"]["checkpoint_sha256"] and payload["dataset"]["preprocessing"]["input_size"] == [3, 48, 48]
    check(point, capsys=capsys)
    # other checkpoint bytes: the recorded accuracy cannot be checked, in one line, exit 2
    torch.manual_seed(4)
    other = tmp_path / "other.pt"
    torch.save(timm.create_model("resnet10t", num_classes=10).state_dict(), other)
    assert apply_main([str(point), "--check", "--checkpoint", str(other)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "checkpoint file bytes differ" in err[0]


def test_callable_model_and_dataset(callable_run, capsys):
    for point in points(callable_run):
        check(point, capsys=capsys)


def test_run_on_two_ray_workers(tmp_path, capsys):
    pytest.importorskip("ray")
    out = tmp_path / "ray"
    explore(out, *DEMO, "--workers", "2")
    assert json.loads((out / "run.json").read_text())["parallel"]["workers"] == 2
    check(points(out)[0], capsys=capsys)


# -- ONNX export ---------------------------------------------------------------------------------------------------
def onnx_rows(text: str) -> dict[str, tuple[str, int, int]]:
    """apply's ONNX table: ``{runtime: (value, agreeing, images)}``."""
    rows = re.findall(r"ONNX Runtime, (reference|deployed) \(\w+\)\s+(\S+)\s+(\d+)/(\d+)", text)
    return {name: (value, int(agree), int(n)) for name, value, agree, n in rows}


def exported_weights(path) -> list:
    """The integer weight codes of an exported model: the constants that per-channel DequantizeLinear nodes read."""
    import onnx

    model = onnx.load(str(path))
    constants = {n.output[0]: n.attribute[0].t for n in model.graph.node if n.op_type == "Constant"}
    return [constants[n.input[0]] for n in model.graph.node
            if n.op_type == "DequantizeLinear" and any(a.name == "axis" for a in n.attribute)]


@pytest.mark.parametrize("kind", ["vit", "cnn"])
def test_onnx_export_runs_in_onnx_runtime_as_in_pytorch(kind, agreement_run, callable_run, tmp_path, capsys):
    import onnx

    run = agreement_run if kind == "vit" else callable_run
    point, target = points(run)[0], tmp_path / f"{kind}.onnx"
    capsys.readouterr()
    assert apply_main([str(point), "--check", "--export", str(target)]) == 0
    text = capsys.readouterr().out
    rows = onnx_rows(text)
    value, agreeing, images = rows["reference"]
    assert images == (200 if kind == "vit" else 100)
    assert agreeing >= images - images / 1000, text  # the Q/DQ graph as written: the same top-1 as PyTorch
    recorded = json.loads(point.read_text())["accuracy"]["holdout"]
    assert float(value) == pytest.approx(100 * recorded, abs=0.005 + 100 / images * (images - agreeing))
    model = onnx.load(str(target))
    ops = [n.op_type for n in model.graph.node]
    bitconfig = json.loads(point.read_text())["quantizers"]
    activations = [n for n in bitconfig if not n.endswith(":weight")]
    assert ops.count("QuantizeLinear") == len(activations)  # one Q/DQ pair per activation quantizer
    weights = exported_weights(target)
    assert len(weights) == len(bitconfig) - len(activations) and all(t.data_type == onnx.TensorProto.INT8
                                                                      for t in weights)
    # one byte per weight (the FP32 model has four), whatever the graph around them weighs
    assert all(len(t.raw_data) == np.prod(t.dims) for t in weights)
    assert re.search(r"size \d+ kB, FP32 ONNX \d+ kB", text) and "latency, batch 1" in text


def test_onnx_packs_4_bit_weights_as_int4(callable_run, tmp_path, capsys):
    import onnx

    payload = json.loads(points(callable_run)[0].read_text())
    for name, q in payload["quantizers"].items():
        if name.endswith(":weight"):
            q["num_bits"] = 4
    payload["accuracy"] = {}
    (tmp_path / "w4.json").write_text(json.dumps(payload))
    assert apply_main([str(tmp_path / "w4.json"), "--export", str(tmp_path / "w4.onnx")]) == 0
    text = capsys.readouterr().out
    _, agreeing, images = onnx_rows(text)["reference"]
    assert agreeing >= images - images / 1000, text
    model = onnx.load(str(tmp_path / "w4.onnx"))
    assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) == 21
    weights = exported_weights(tmp_path / "w4.onnx")
    assert weights and all(t.data_type == onnx.TensorProto.INT4 for t in weights)
    assert all(len(t.raw_data) == (np.prod(t.dims) + 1) // 2 for t in weights)  # two codes per byte


def test_onnx_export_refusals_name_the_quantizer_or_layer(agreement_run, tmp_path, capsys):
    from torch import nn

    from quantsearch.deploy.export import ExportError
    from quantsearch.deploy.onnx_export import export_onnx
    from quantsearch.quantize.quantized_model import QuantizedActivationsModel

    payload = json.loads(points(agreement_run)[0].read_text())
    payload["quantizers"]["blocks.1.mlp.act"]["num_bits"] = 12
    (tmp_path / "wide.json").write_text(json.dumps(payload))
    capsys.readouterr()
    assert apply_main([str(tmp_path / "wide.json"), "--export", str(tmp_path / "wide.onnx")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "'blocks.1.mlp.act' is at 12 bits" in err[0]
    assert not (tmp_path / "wide.onnx").exists()

    class Spectrum(nn.Module):
        def forward(self, x):
            return torch.fft.rfft(x).abs()

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.spectrum, self.fc = nn.Conv2d(1, 4, 3), Spectrum(), nn.Linear(4 * 26 * 14, 3)

        def forward(self, x):
            return self.fc(self.spectrum(self.conv(x)).flatten(1))

    qmodel = QuantizedActivationsModel(Model().eval(), "conv2d", weight_quantizers=True)
    x = torch.randn(2, 1, 28, 28)
    qmodel.calibrate([x], method="max")
    with pytest.raises(ExportError, match="cannot export layer 'model.spectrum'.*fft_rfft"):
        export_onnx(qmodel, tmp_path / "fft.onnx", x)
    assert not list(tmp_path.glob("*fft*"))


def test_exported_weight_codes_are_the_fake_quantizers_own(convnet):
    """The int8 codes times pytorch-quantization's scale give back exactly the fake-quantized weight, per channel
    (an all-zero channel included), at every width."""
    from quantsearch.deploy.onnx_export import weight_codes
    from quantsearch.quantize.quantized_model import QuantizedActivationsModel

    with torch.no_grad():
        convnet.conv2.weight[3].zero_()
    qmodel = QuantizedActivationsModel(convnet, "conv2d", weight_quantizers=True)
    for bits in (2, 4, 5, 8):
        qmodel.bit_widths = {"conv2:weight": bits}
        quantizer, weight = qmodel.quantizer("conv2:weight"), convnet.conv2.weight
        codes, scale = weight_codes(weight, quantizer.amax, bits)
        qmax = 2 ** (bits - 1) - 1
        assert codes.dtype == torch.int8 and int(codes.abs().max()) <= qmax and not codes[3].any()
        expected = quantizer(weight.detach())
        amax = quantizer.amax.reshape(-1, 1, 1, 1)
        rebuilt = torch.where(amax > 0, codes.float() / (torch.tensor(float(qmax)) / amax), torch.zeros(()))
        assert torch.equal(rebuilt, expected)
        assert torch.allclose(codes.float() * scale.reshape(-1, 1, 1, 1), expected, rtol=0, atol=1e-6)
