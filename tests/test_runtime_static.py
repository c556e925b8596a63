"""The onnxruntime-cpu target's int8-static format: MinMax calibration by hand, the Conv nodes found behind batch-norm
folding and same-padding, the fused kernel really QLinearConv, the accuracy the search sees being ORT's own, the
latency cache keyed by conv attributes, and refusals in one line."""
import numpy as np
import pytest
import torch
from torch import nn

from quantsearch.deploy.export import ExportError
from quantsearch.deploy.targets.onnxruntime import FORMATS, RuntimeFormatModel, export_runtime_onnx
from quantsearch.deploy.targets.static import conv_nodes, spec_key, uint8_grid

ort = pytest.importorskip("onnxruntime")
STATIC = FORMATS.index("int8-static")


class SmallCNN(nn.Module):
    """Conv-BN-ReLU, a grouped conv, a 1x1 conv on the same input (a shared tensor), a residual Add, a Conv1d over
    the pooled rows, and a Linear head."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.c1, self.b1 = nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.c2, self.b2 = nn.Conv2d(16, 16, 3, padding=1, groups=4), nn.BatchNorm2d(16)
        self.c3 = nn.Conv2d(16, 16, 1, stride=1)
        self.row = nn.Conv1d(16, 8, 3, padding=1)
        self.head = nn.Linear(8, 5)
        for bn in (self.b1, self.b2):  # batch norm that folding visibly changes
            bn.running_mean.uniform_(-1, 1), bn.running_var.uniform_(0.5, 2), bn.weight.data.uniform_(0.5, 2)

    def forward(self, x):
        x = torch.relu(self.b1(self.c1(x)))
        x = torch.relu(self.b2(self.c2(x))) + self.c3(x)
        x = torch.relu(self.row(x.mean(3)))
        return self.head(x.mean(2))


def test_uint8_grid_and_calibration_by_hand():
    """A 1x1 conv y = 2x + 0.5 on x in [-1, 2]: x's grid [-1, 2] (scale 3/255, zero point 85), y's [-1.5, 4.5]
    (scale 6/255, zero point round(1.5 / (6/255)) = round(63.75) = 64); a range above 0 keeps 0 in it."""
    assert uint8_grid(-1, 2) == (pytest.approx(3 / 255), 85)
    assert uint8_grid(0.5, 4.5) == (pytest.approx(4.5 / 255), 0) and uint8_grid(0, 0) == (1.0, 0)
    conv = nn.Conv2d(1, 1, 1)
    conv.weight.data.fill_(2.0), conv.bias.data.fill_(0.5)
    rmodel = RuntimeFormatModel(nn.Sequential(conv, nn.Flatten()).eval())
    x = torch.tensor([-1.0, 0.0, 0.5, 2.0]).reshape(1, 1, 2, 2)
    ranges = rmodel.calibrate([x[:, :, :1], (x[:, :, 1:], None)])  # two batches, one as an (input, target) pair
    assert sorted(ranges.values()) == [(-1.5, 4.5), (-1.0, 2.0)]
    assert uint8_grid(-1.5, 4.5) == (pytest.approx(6 / 255), 64)


def test_static_is_qlinearconv_and_the_search_sees_what_onnx_runtime_gives(tmp_path):
    from quantsearch.deploy.onnx_export import runtime_kernels

    rmodel = RuntimeFormatModel(SmallCNN().eval(), batch_size=2, threads=1)
    assert rmodel.gene_ranges() == {"c1": (2, 3), "c2": (2, 3), "c3": (2, 3), "row": (2, 3), "head": (0, 3)}
    x = torch.randn(6, 3, 10, 10)
    rmodel.calibrate([x[:3], x[3:]])
    with torch.no_grad():
        fp32 = rmodel(x)
    rmodel.bit_widths = [STATIC] * len(rmodel)
    with torch.no_grad():
        seen = rmodel(x)  # evaluated by ONNX Runtime: the configuration's graph in a default session
    written = export_runtime_onnx(rmodel, tmp_path / "m.onnx", x[:1])
    assert written["formats"]["int8-static"] == 5
    session = ort.InferenceSession(str(tmp_path / "m.onnx"))
    out = np.concatenate([session.run(None, {"input": x[i:i + 2].numpy()})[0] for i in (0, 2, 4)])
    assert np.array_equal(out, seen.numpy())
    assert 0 < np.abs(out - fp32.numpy()).max() < 0.1 * np.abs(fp32.numpy()).max()  # quantized, not broken
    kernels = runtime_kernels(tmp_path / "m.onnx")
    assert kernels["QLinearConv"] == 4 and kernels["QGemm"] == 1 and "Conv" not in kernels, kernels
    rmodel.bit_widths = {"c3": FORMATS.index("fp32"), "head": FORMATS.index("int8-dynamic")}  # mixed: ORT still evaluates
    with torch.no_grad():
        mixed = rmodel(x)
    export_runtime_onnx(rmodel, tmp_path / "mixed.onnx", x[:1])
    session = ort.InferenceSession(str(tmp_path / "mixed.onnx"))
    out = np.concatenate([session.run(None, {"input": x[i:i + 2].numpy()})[0] for i in (0, 2, 4)])
    assert np.array_equal(out, mixed.numpy())  # fed the deployment batch at a time (the dynamic grid's batch)
    assert runtime_kernels(tmp_path / "mixed.onnx")["QLinearConv"] == 3


def test_convs_are_found_behind_same_padding_and_without_scopes():
    """timm's same-padding conv adds a Pad before the Conv; renamed nodes are found by their folded weights."""
    import onnx
    timm = pytest.importorskip("timm")

    model = nn.Sequential(timm.layers.create_conv2d(3, 8, 3, stride=2, padding="same"), nn.BatchNorm2d(8),
                          nn.ReLU(), timm.layers.create_conv2d(8, 8, 3, padding="same")).eval()
    model[1].running_var.uniform_(0.5, 2)
    rmodel = RuntimeFormatModel(model)
    graph = onnx.load_from_string(rmodel.fp32_onnx(torch.randn(1, 3, 15, 15))).graph
    assert any(n.op_type == "Pad" for n in graph.node)
    found = rmodel.layer_nodes(graph)
    assert set(found) == {"0", "3"}
    for node in graph.node:
        node.name = f"node{id(node)}"
    assert {k: v.input[1] for k, v in conv_nodes(graph, rmodel.layers).items()} == \
        {k: v.input[1] for k, v in found.items()}


def test_latency_cache_key_holds_conv_attributes(tmp_path):
    from quantsearch.deploy.targets.latency import conv_specs, measure_latency

    model = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=2, dilation=2),
                          nn.Conv2d(4, 4, 3, padding=1, groups=2), nn.Flatten()).eval()
    rmodel = RuntimeFormatModel(model, batch_size=2)
    x = torch.randn(2, 4, 8, 8)
    specs = conv_specs(rmodel, x)
    assert specs["0"]["input"] == [2, 4, 8, 8] and specs["0"]["act"] == ["Relu"] and specs["2"]["act"] is None
    keys = {spec_key(s, "int8-static") for s in specs.values()}
    assert len(keys) == 3 and any("dilations=2x2" in k for k in keys) and any("group=2" in k for k in keys)
    cache = tmp_path / "latency.json"
    table = measure_latency(rmodel, x, threads=1, repeats=2, cache=cache)
    assert table.measured_ops == 6 and all(set(v) == {"int8-static", "fp32"} and min(v.values()) > 0
                                           for v in table.layers.values())
    assert table.predict({"0": STATIC}) == pytest.approx(table.fixed + table.layers["0"]["int8-static"]
                                                         + table.layers["2"]["fp32"] + table.layers["3"]["fp32"])
    assert measure_latency(rmodel, x, threads=1, repeats=2, cache=cache).measured_ops == 0


def test_refusals_name_the_layer():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Conv3d(1, 1, 1), nn.Flatten(), nn.LazyLinear(2))
    rmodel = RuntimeFormatModel(nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten()))
    with pytest.raises(ValueError, match=r"layer '0': format index 1 is not one of 2..3 \(int8-static, fp32\)"):
        rmodel.bit_widths = {"0": 1}
    with pytest.raises(KeyError, match="no Linear or Conv layer named '1'"):  # a Conv3d is not a gene
        RuntimeFormatModel(model).bit_widths = {"1": STATIC}
    rmodel.bit_widths = {"0": STATIC}
    with pytest.raises(ExportError, match="layer '0' is int8-static but the model is not calibrated"):
        rmodel(torch.randn(1, 3, 5, 5))


def test_a_configuration_that_mixes_conv_layouts_is_timed_whole_once(tmp_path, monkeypatch):
    """Mixed int8-static and fp32 Convs: timed whole against FP32 (the ratio on the table's FP32 time), once per
    configuration, formats restored after; a uniform one, and what a model of the cost probes, is the table."""
    from quantsearch.deploy.targets import latency
    from quantsearch.search.problem import LayerwiseQuantizationProblem
    from quantsearch.search.surrogate import GeneCosts

    rmodel = RuntimeFormatModel(SmallCNN().eval(), batch_size=2)
    x = torch.randn(4, 3, 8, 8)
    rmodel.calibrate([x])
    table = latency.measure_latency(rmodel, x, threads=1, repeats=2, cache=tmp_path / "latency.json")
    cost = latency.WholeModelLatency(table, rmodel, x, threads=1, repeats=2)
    convs = ["c1", "c2", "c3", "row"]
    uniform = {n: STATIC if n in convs else 3 for n in rmodel.quantizer_names}
    mixed = dict(uniform, c2=3)
    assert not latency.mixes_conv_layouts(rmodel, uniform) and latency.mixes_conv_layouts(rmodel, mixed)
    assert cost(uniform) == pytest.approx(1e3 * table.predict(uniform)) and not cost.timed

    calls = []

    rounds = iter([(0.002, 0.003), (0.004, 0.004), (0.001, 0.002)])  # ratios 1.5, 1 and 2: the median is 1.5

    def timed(runs, repeats):  # one round timed by hand
        calls.append(sorted(runs))
        assert repeats == 1 and runs["whole"][1]["input"].shape == (2, 3, 8, 8)  # the deployment batch
        fp32, whole = next(rounds)
        return {"fp32": fp32, "whole": whole}

    monkeypatch.setattr(latency, "_time_interleaved", timed)
    cost.repeats, cost.seconds, before = 3, 0.0, rmodel.bit_widths
    assert cost(mixed) == pytest.approx(1.5 * cost.fp32) == pytest.approx(1.5e3 * table.fp32_measured)
    assert cost(mixed) == cost(dict(mixed)) and len(calls) == 3 and rmodel.bit_widths == before

    def agreement(model):
        return 1.0

    problem = LayerwiseQuantizationProblem(rmodel, agreement, 0.5, bits=rmodel.gene_ranges(), costs=[cost])
    probed = GeneCosts(problem)  # one conv static in an fp32 model mixes layouts: the unary terms, not a timing
    assert probed.exact and len(calls) == 3
