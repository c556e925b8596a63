"""The onnxruntime-cpu target: each format simulated as ONNX Runtime computes it, the runtime's own graph, and the
latency table (measured, cached per machine, additive, refused on another machine)."""
import json

import numpy as np
import pytest
import torch
from torch import nn

from quantsearch.deploy.targets.onnxruntime import (FORMATS, RuntimeFormatModel, dynamic_uint8, export_runtime_onnx,
                                                    int4_block_codes, int8_channel_codes)

ort = pytest.importorskip("onnxruntime")


class TokenMLP(nn.Module):
    """Linear layers on 3-d tokens (exported as MatMul + Add) and a 2-d head (exported as Gemm), K not a
    multiple of 32 in the first layer."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Linear(40, 64)
        self.fc1, self.fc2 = nn.Linear(64, 96), nn.Linear(96, 64)
        self.head = nn.Linear(64, 5)

    def forward(self, x):
        x = self.embed(x)
        x = x + self.fc2(torch.relu(self.fc1(x)))
        return self.head(x.mean(1))


def test_dynamic_uint8_by_hand():
    """[-1, 0, 0.5, 2]: range [-1, 2], scale 3/255, zero point 85; 0.5/scale = 42.5 rounds to even (42)."""
    x = torch.tensor([[-1.0, 0.0, 0.5, 2.0]])
    q, s = dynamic_uint8(x, 1)
    assert q.tolist() == [[-85.0, 0.0, 42.0, 170.0]] and float(s) == pytest.approx(3 / 255)
    # one grid per deployment batch: the second sample's range [0, 4] is its own at batch 1, shared at batch 2
    x = torch.tensor([[-1.0, 0.0, 0.5, 2.0], [0.0, 1.0, 3.0, 4.0]])
    q1, s1 = dynamic_uint8(x, 1)
    assert q1[1].tolist() == [0.0, 64.0, 191.0, 255.0] and float(s1[1]) == pytest.approx(4 / 255)
    q2, s2 = dynamic_uint8(x, 2)
    assert torch.equal(s2[0], s2[1]) and float(s2[0]) == pytest.approx(5 / 255)  # range [-1, 4]
    assert q2[1].tolist() == [0.0, 51.0, 153.0, 204.0]


def test_weight_codes_by_hand():
    w = torch.tensor([[0.5, -1.27, 0.0], [0.0, 0.0, 0.0]])
    codes, scale = int8_channel_codes(w)
    assert codes.tolist() == [[50.0, -127.0, 0.0], [0.0, 0.0, 0.0]] and scale.tolist() == pytest.approx([0.01, 1.0])
    w = torch.zeros(1, 34)
    w[0, 0], w[0, 5], w[0, 33] = 0.7, -0.32, 3.5  # block 0: max 0.7, scale 0.1; block 1 (2 values, padded): 0.5
    codes, scale = int4_block_codes(w, block=32)
    assert codes.shape == (1, 2, 32) and scale[0].tolist() == pytest.approx([0.1, 0.5])
    assert codes[0, 0, 0] == 7 and codes[0, 0, 5] == -3 and codes[0, 1, 1] == 7  # -0.32/0.1 = -3.2 -> -3
    assert int(codes.abs().sum()) == 17


@pytest.mark.parametrize("fmt", [FORMATS.index(f) for f in ("fp32", "int8-dynamic", "int4-weight")])
def test_each_format_runs_in_onnx_runtime_as_simulated(fmt, tmp_path):
    """The simulation at deployment batch 4 against a default ORT session fed 4 samples at a time: equal up to
    float32 summation order (the int8 format's integer products are exact in float32 at these sizes). int8-static
    is evaluated by ORT itself (tests/test_runtime_static.py)."""
    rmodel = RuntimeFormatModel(TokenMLP().eval(), batch_size=4)
    rmodel.bit_widths = [fmt] * len(rmodel)
    x = torch.randn(8, 7, 40) * torch.linspace(0.5, 3, 8)[:, None, None]  # per-sample ranges differ
    with torch.no_grad():
        expected = rmodel(x).numpy()
    written = export_runtime_onnx(rmodel, tmp_path / "m.onnx", x[:2])
    assert written["formats"][FORMATS[fmt]] == 4
    session = ort.InferenceSession(str(tmp_path / "m.onnx"))
    out = np.concatenate([session.run(None, {"input": x[i:i + 4].numpy()})[0] for i in (0, 4)])
    assert np.abs(out - expected).max() <= 1e-5 * np.abs(expected).max(), FORMATS[fmt]
    from quantsearch.deploy.onnx_export import INTEGER_KERNELS, runtime_kernels

    kernels = runtime_kernels(tmp_path / "m.onnx")  # what the default session runs after its optimisations
    integer = sum(v for k, v in kernels.items() if k in INTEGER_KERNELS)
    assert integer == (0 if FORMATS[fmt] == "fp32" else 4), kernels
    if FORMATS[fmt] == "int4-weight":
        assert kernels["MatMulNBits"] == 4
    if FORMATS[fmt] == "int8-dynamic":  # each bias inside its kernel: only the residual Add is left
        assert kernels["DynamicQuantizeMatMul"] == 4 and kernels.get("Add", 0) == 1, kernels
    if FORMATS[fmt] == "int8-dynamic":  # simulated at another batch size, the grid differs from ORT's
        rmodel.batch_size = 8
        with torch.no_grad():
            assert np.abs(rmodel(x).numpy() - out).max() > 1e-4 * np.abs(expected).max()
    if FORMATS[fmt] != "fp32":
        with rmodel.fp32(), torch.no_grad():
            assert np.abs(rmodel(x).numpy() - expected).max() > 1e-4 * np.abs(expected).max()
        assert rmodel.bit_widths == [fmt] * 4  # the formats come back after the block


def test_formats_are_genes_and_refusals_name_the_layer():
    rmodel = RuntimeFormatModel(TokenMLP())
    assert rmodel.quantizer_names == ["embed", "fc1", "fc2", "head"]
    assert rmodel.gene_ranges() == dict.fromkeys(rmodel.quantizer_names, (0, 3))
    int4 = FORMATS.index("int4-weight")
    rmodel.bit_widths = {"fc1": int4}
    assert FORMATS[3] == "fp32" and int4 == 0  # least precise first, as bits run
    assert rmodel.bits_dict() == {"embed": 3, "fc1": int4, "fc2": 3, "head": 3}
    assert rmodel.formats["fc1"] == "int4-weight"
    with pytest.raises(ValueError, match="layer 'fc2': format index 4 is not one of 0..3"):
        rmodel.bit_widths = {"fc2": 4}
    with pytest.raises(KeyError, match="no Linear or Conv layer named 'fc9'"):
        rmodel.bit_widths = {"fc9": 1}
    with pytest.raises(ValueError, match="has no nn.Linear, nn.Conv1d or nn.Conv2d"):
        RuntimeFormatModel(nn.Sequential(nn.Conv3d(1, 2, 3)))


def test_a_search_runs_on_the_formats_with_latency_as_its_cost():
    """The plain problem over formats: the latency cost adds each layer's entry for its format."""
    from pymoo.algorithms.moo.nsga2 import NSGA2
    from pymoo.optimize import minimize

    from quantsearch.search.costs import Latency
    from quantsearch.search.problem import LayerwiseQuantizationProblem

    rmodel = RuntimeFormatModel(TokenMLP().eval(), batch_size=2)
    x = torch.randn(16, 7, 40)
    with torch.no_grad():
        reference = rmodel(x).argmax(1)

    def agreement(model):
        with torch.no_grad():
            return float((model(x).argmax(1) == reference).float().mean())

    dyn, int4 = FORMATS.index("int8-dynamic"), FORMATS.index("int4-weight")
    layers = {"embed": [2.5, 2.0, 1.8, 3.0], "fc1": [4.0, 3.0, 2.5, 5.0], "fc2": [4.0, 3.0, 2.5, 5.0],
              "head": [0.9, 1.5, 1.2, 1.0]}  # seconds by gene: int4-weight, int8-dynamic, int8-static, fp32
    cost = Latency({n: dict(enumerate(v)) for n, v in layers.items()}, fixed=10.0, top=3)
    assert cost.fp32 == 24.0 and cost({"embed": dyn, "fc1": dyn, "fc2": int4, "head": int4}) == 10 + 2 + 3 + 4 + 0.9
    # the PyTorch-simulated formats only (int8-static runs ORT per configuration, tests/test_runtime_static.py)
    problem = LayerwiseQuantizationProblem(rmodel, agreement, 0.5, bits=dict.fromkeys(layers, (int4, dyn)),
                                           costs=[cost])
    result = minimize(problem, NSGA2(pop_size=6), ("n_gen", 2), seed=0)
    assert result.F is not None and len(problem.cache) >= 6
    assert all(e.costs["latency"] == cost(dict(zip(rmodel.quantizer_names, e.bits)))
               for e in problem.cache.values())


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    from quantsearch.deploy.targets.latency import measure_latency

    cache = tmp_path_factory.mktemp("cache") / "latency.json"
    rmodel = RuntimeFormatModel(TokenMLP().eval(), batch_size=2)
    x = torch.randn(2, 7, 40)
    return rmodel, x, cache, measure_latency(rmodel, x, threads=1, repeats=3, cache=cache)


def test_latency_table_is_additive_and_its_fp32_point_is_the_measured_model(measured):
    rmodel, _, _, table = measured
    assert set(table.layers) == set(rmodel.quantizer_names)
    assert all(set(v) == set(FORMATS) and min(v.values()) > 0 for v in table.layers.values())
    fp32 = dict.fromkeys(rmodel.quantizer_names, 3)
    assert table.predict(fp32) == pytest.approx(table.fp32_measured)
    config = {"embed": 1, "fc1": 0, "fc2": 2, "head": 3}
    delta = sum(table.layers[n][FORMATS[i]] - table.layers[n]["fp32"] for n, i in config.items())
    assert table.predict(config) == pytest.approx(table.predict(fp32) + delta)
    assert table.cost()(config) == pytest.approx(1e3 * table.predict(config))  # the cost is in ms
    # entries are set inside the model: every uniform configuration predicts its whole-model measurement
    assert set(table.uniform) == {"fp32", "int8-dynamic", "int4-weight"}  # not calibrated: no int8-static
    for fmt in ("int8-dynamic", "int4-weight"):
        uniform = {n: FORMATS.index(fmt) for n in rmodel.quantizer_names}
        assert table.predict(uniform) == pytest.approx(table.uniform[fmt])
    assert table.measured_ops == 4 * len(FORMATS)  # four distinct layer shapes, each in every format


def test_latency_cache_is_keyed_by_machine_threads_and_shape(measured):
    from quantsearch.deploy.targets.latency import machine, measure_latency

    rmodel, x, cache, table = measured
    again = measure_latency(rmodel, x, threads=1, repeats=3, cache=cache)
    # every one-layer timing from the cache (the fp32 entries are those; the others also hold this run's
    # whole-model measurements)
    assert again.measured_ops == 0 and {n: v["fp32"] for n, v in again.layers.items()} == {
        n: v["fp32"] for n, v in table.layers.items()}
    stored = json.loads(cache.read_text())["machines"]
    key = f"{machine(1)['cpu']}|threads=1|onnxruntime={ort.__version__}"
    assert list(stored) == [key] and "int4-weight|2x7x64|96" in stored[key]
    other = measure_latency(rmodel, x, threads=2, repeats=3, cache=cache)
    assert other.measured_ops == table.measured_ops  # another thread count is another machine
    assert len(json.loads(cache.read_text())["machines"]) == 2


def test_a_latency_table_from_another_machine_is_refused_in_one_line(measured, tmp_path):
    from quantsearch.deploy.targets.latency import LatencyError, LatencyTable

    rmodel, _, _, table = measured
    path = table.save(tmp_path / "table.json")
    loaded = LatencyTable.load(path)
    assert loaded.layers == table.layers and loaded.fixed == table.fixed
    loaded.check_fits(rmodel, threads=1)
    payload = json.loads(path.read_text())
    payload["machine"]["cpu"] = "Some Other CPU"
    path.write_text(json.dumps(payload))
    with pytest.raises(LatencyError, match="measured with cpu 'Some Other CPU', this machine has"):
        LatencyTable.load(path).check_fits(rmodel, threads=1)
    with pytest.raises(LatencyError, match="measured with threads 1, this machine has 2"):
        table.check_fits(rmodel, threads=2)
    payload["layers"]["fc1"] = {"int8": 1.0, "fp32": 2.0}
    path.write_text(json.dumps(payload))
    with pytest.raises(LatencyError, match="layers/fc1: 'int8' is not one of"):
        LatencyTable.load(path)
    del payload["layers"]["fc1"]["int8"]
    path.write_text(json.dumps(payload | {"machine": table.machine}))
    with pytest.raises(LatencyError, match="formats fp32 for layer 'fc1', the target int4-weight, int8-dynamic"):
        LatencyTable.load(path).check_fits(rmodel, threads=1)


def test_a_reanchored_table_takes_the_drift_out_and_keeps_the_additivity_error():
    """Hand-computed: FP32's change moves the fixed part, each format's layer deltas scale with its uniform saving."""
    from quantsearch.deploy.targets.latency import LatencyError, LatencyTable

    dyn, fp32 = FORMATS.index("int8-dynamic"), FORMATS.index("fp32")
    table = LatencyTable({"cpu": "x", "threads": 1, "onnxruntime": "1"}, 1,
                         {"a": {"fp32": 1.0, "int8-dynamic": 0.5}, "b": {"fp32": 2.0, "int8-dynamic": 1.0}}, 1.0,
                         4.0, uniform={"fp32": 4.0, "int8-dynamic": 2.5})
    assert table.predict({"a": dyn, "b": dyn}) == pytest.approx(2.5)  # anchored: uniform is exact
    now = table.reanchored({"fp32": 5.0, "int8-dynamic": 4.0})  # slower machine, and dynamic saves 1.0, not 1.5
    assert now.predict({}) == pytest.approx(5.0) and now.predict({"a": dyn, "b": dyn}) == pytest.approx(4.0)
    # a mixed point: fixed 1 + 1 = 2, a's delta -0.5 x (1.0 / 1.5), b at fp32
    assert now.predict({"a": dyn, "b": fp32}) == pytest.approx(2.0 + 1.0 - 0.5 * 2 / 3 + 2.0)
    same = table.reanchored(dict(table.uniform))
    assert same.layers == table.layers and same.fixed == table.fixed
    with pytest.raises(LatencyError, match="int8-dynamic missing"):
        table.reanchored({"fp32": 5.0})
