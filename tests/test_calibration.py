"""Calibration methods against hand computations, signedness, the per-bit amax table, calibration files."""
import bisect
import json
import math
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from conftest import fake_quant_by_hand
from quantsearch.deploy.bitconfig import BitConfig, apply_bitconfig
from quantsearch.quantize.calib import (Calibration, CalibrationError, calibrate, data_fingerprint, entropy_amax,
                                     mse_amax, percentile_amax)
from quantsearch.quantize.predicates import by_name, by_type
from quantsearch.quantize.quantized_model import QuantizedActivationsModel

with warnings.catch_warnings():
    warnings.simplefilter("ignore", FutureWarning)
    from pytorch_quantization.calib import histogram as reference


@pytest.fixture(scope="module")
def outliers():
    """|x| of a unit Gaussian with 0.08 % planted outliers at 6-10 sigma, as a 512-bin histogram (small enough for
    the brute-force loops below)."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal(50_001)  # no percentile below falls exactly on a count
    x[rng.choice(len(x), 40, replace=False)] = rng.uniform(6, 10, 40) * rng.choice([-1, 1], 40)
    counts, edges = np.histogram(np.abs(x), bins=512, range=(0, np.abs(x).max()))
    return x, counts, edges


# -- the histogram methods against hand computations ----------------------------------------------------------------
def percentile_by_hand(counts, edges, percentile):
    total, running = counts.sum(), 0
    for i, n in enumerate(counts):
        running += n
        if running / total >= percentile / 100:
            return edges[i]


def entropy_by_hand(counts, edges, num_bits, unsigned, start_bin=128):
    """TensorRT's KL calibration written out: fold the tail into the last kept bin, spread each level's mass evenly
    over its non-empty bins, KL(P || Q), the last minimum. Bin j of the cut at i belongs to level k when
    space[k] <= j < space[k+1], space = linspace(0, i, levels + 1)."""
    bins = counts.astype(np.int64).copy()
    bins[0] = bins[1]
    levels = 2 ** (num_bits - 1 + int(unsigned))
    best, best_i = math.inf, None
    for i in range(start_bin, len(bins) + 1):
        space = list(np.linspace(0, i, levels + 1))
        level = [bisect.bisect_right(space, j) - 1 for j in range(i)]
        mass, size = [0.0] * levels, [0] * levels
        for j in range(i):
            if bins[j]:
                mass[level[j]] += bins[j]
                size[level[j]] += 1
        p = [float(bins[j]) for j in range(i)]
        p[-1] += float(bins[i:].sum())
        q = [mass[level[j]] / size[level[j]] if bins[j] else 0.0 for j in range(i)]
        sp, sq = sum(p), sum(q)
        kl = 0.0
        for pj, qj in zip(p, q):
            if pj > 0:
                kl = math.inf if qj == 0 else kl + pj / sp * math.log((pj / sp) / (qj / sq))
        if kl <= best + 1e-12:  # the last minimum
            best, best_i = min(best, kl), i
    return edges[best_i]


def mse_by_hand(counts, edges, num_bits, unsigned, start_bin=128):
    centers = (edges[1:] + edges[:-1]) / 2
    bound = 2 ** (num_bits - 1 + int(unsigned)) - 1
    errors = []
    for amax in centers[start_bin:]:
        scale = bound / amax
        q = np.clip(np.round(centers * scale), 0 if unsigned else -bound, bound) / scale
        errors.append(float(np.sum(counts * (q - centers) ** 2)))
    return centers[start_bin + int(np.argmin(errors))], errors


@pytest.mark.parametrize("percentile", [99.0, 99.9, 99.99])
def test_percentile_amax_by_hand(outliers, percentile):
    _, counts, edges = outliers
    assert percentile_amax(counts, edges, percentile) == pytest.approx(percentile_by_hand(counts, edges, percentile))
    # and the reference (pytorch-quantization) agrees
    assert percentile_amax(counts, edges, percentile) == pytest.approx(
        float(reference._compute_amax_percentile(counts, edges, percentile)))


@pytest.mark.parametrize("num_bits,unsigned", [(10, False), (8, True), (8, False), (4, False), (4, True), (2, False)])
def test_entropy_amax_by_hand(outliers, num_bits, unsigned):
    _, counts, edges = outliers
    got = entropy_amax(counts, edges, num_bits, unsigned)
    assert got == pytest.approx(entropy_by_hand(counts, edges, num_bits, unsigned))
    assert got == pytest.approx(float(reference._compute_amax_entropy(counts.copy(), edges, num_bits, unsigned)))
    if num_bits <= 4:
        assert got < 6  # every outlier (6-10 sigma) is clipped


@pytest.mark.parametrize("num_bits,unsigned", [(8, False), (4, False), (4, True), (3, False)])
def test_mse_amax_by_hand(outliers, num_bits, unsigned, monkeypatch):
    _, counts, edges = outliers
    got = mse_amax(counts, edges, num_bits, unsigned)
    expected, errors = mse_by_hand(counts, edges, num_bits, unsigned)
    assert got == pytest.approx(expected, rel=1e-6)
    # the reference runs on CUDA only; on the CPU it computes the same thing
    monkeypatch.setattr(torch.Tensor, "cuda", lambda self, *a, **k: self)
    ref = reference._compute_amax_mse(counts.astype(np.int32), edges.astype(np.float32), num_bits, unsigned)
    assert got == pytest.approx(float(ref), rel=1e-6)


def test_low_bit_widths_clip_more(outliers):
    """MSE trades clipping error against rounding error: fewer levels, a smaller range."""
    _, counts, edges = outliers
    by_bits = [mse_amax(counts, edges, b, False) for b in (3, 4, 6, 8)]
    assert by_bits == sorted(by_bits) and by_bits[0] < by_bits[-1]
    assert by_bits[0] < 3 and by_bits[-1] > 6  # 3 bits clip into the Gaussian's bulk; 8 bits keep outliers


# -- calibrate(): one pass, every method -----------------------------------------------------------------------------
class Identity(nn.Module):
    def forward(self, x):
        return x


def test_calibrate_max_and_moving_max_by_hand():
    torch.manual_seed(0)
    batches = [torch.randn(4000) for _ in range(4)]
    batches[1][:3] = torch.tensor([30.0, -28.0, 35.0])  # outliers in the second batch only
    batch_max = [float(b.abs().max()) for b in batches]
    ema = batch_max[0]
    for m in batch_max[1:]:
        ema = 0.9 * ema + 0.1 * m
    for method, expected in (("max", max(batch_max)), ("moving-max", ema)):
        qmodel = QuantizedActivationsModel(Identity(), by_name("nothing"))
        result = calibrate(qmodel, batches, method=method, bits=(3, 8), momentum=0.9)
        assert result.amax_table["input"] == {b: pytest.approx(expected, rel=1e-6) for b in range(3, 9)}
        assert result.quantizers["input"].unsigned is False
    assert ema < 10 < max(batch_max)  # the moving average discounts the one batch with outliers


def test_calibrate_histogram_methods_by_hand(outliers):
    """One quantizer on the model input: hooks, histogram (|x| in 512 bins on [0, max]) and table, by hand."""
    x = torch.tensor(outliers[0], dtype=torch.float32)
    counts = torch.histc(x.abs(), bins=512, min=0, max=float(x.abs().max())).int().numpy()
    edges = torch.linspace(0, float(x.abs().max()), 513).numpy()
    expected = {"percentile": {b: percentile_by_hand(counts, edges, 99.9) for b in (3, 8)},
                "entropy": {b: entropy_by_hand(counts, edges, b, False) for b in (3, 8)},
                "mse": {b: mse_by_hand(counts, edges, b, False)[0] for b in (3, 8)}}
    for method, table in expected.items():
        qmodel = QuantizedActivationsModel(Identity(), by_name("nothing"))
        result = calibrate(qmodel, [x], method=method, bits=(3, 8), percentile=99.9, num_bins=512)
        got = result.amax_table["input"]
        assert sorted(got) == [3, 4, 5, 6, 7, 8]
        assert {b: got[b] for b in table} == {b: pytest.approx(v, rel=1e-6) for b, v in table.items()}, method
    assert expected["mse"][3] < expected["mse"][8] < float(x.abs().max())
    assert expected["entropy"][3] < expected["entropy"][8]


# -- signedness ------------------------------------------------------------------------------------------------------
class Branches(nn.Module):
    """relu (>= 0, with exact zeros), softmax (> 0), shifted (>= 0 except one value of -1e-6), linear (signed)."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(6, 6)
        self.relu = nn.ReLU()
        self.softmax = nn.Softmax(dim=-1)
        self.shifted = Identity()

    def forward(self, x):
        h = self.linear(x)
        s = x - x.min()
        s.view(-1)[0] = -1e-6
        return self.relu(h) + self.softmax(h) + self.shifted(s)


def test_unsigned_range_chosen_exactly_for_non_negative_data():
    torch.manual_seed(0)
    qmodel = QuantizedActivationsModel(Branches().eval(), by_type(nn.Linear, nn.ReLU, nn.Softmax) | by_name("shifted"))
    calibration = calibrate(qmodel, [torch.randn(32, 6) for _ in range(2)], method="max")
    expected = {"input": False, "linear": False, "relu": True, "softmax": True, "shifted": False}
    assert calibration.unsigned == expected
    assert qmodel.unsigned == expected
    no_detection = QuantizedActivationsModel(Branches().eval(), by_type(nn.ReLU, nn.Softmax))
    assert not any(calibrate(no_detection, [torch.randn(8, 6)], detect_unsigned=False).unsigned.values())


def test_unsigned_quantizer_uses_the_unsigned_grid_and_clamps_negatives():
    net = nn.Sequential(nn.Linear(3, 4), nn.ReLU()).eval()
    qmodel = QuantizedActivationsModel(net, by_name("0"), quantize_input=False)
    with torch.no_grad():  # non-negative weights and inputs: the Linear output is never negative in calibration
        net[0].weight.abs_()
        net[0].bias.abs_()
    calibration = calibrate(qmodel, [torch.rand(16, 3)], method="max")
    assert calibration.unsigned == {"0": True}
    amax = qmodel.amax["0"]
    seen = {}
    net[1].register_forward_pre_hook(lambda m, a: seen.__setitem__("x", a[0].clone()))
    for bits in (2, 4):
        qmodel.bit_widths = [bits]
        x = torch.rand(16, 3)
        with torch.no_grad():
            qmodel(x)
            raw = net[0](x)
        scale = (2 ** bits - 1) / amax  # unsigned: 2^b - 1 steps over [0, amax]
        torch.testing.assert_close(seen["x"], torch.clamp(torch.round(raw * scale), 0, 2 ** bits - 1) / scale)
        assert len(torch.unique(seen["x"])) <= 2 ** bits
    # a negative value never seen in calibration: clamped to 0 (pytorch-quantization alone would raise)
    with torch.no_grad():
        qmodel(-torch.rand(4, 3) * 10)
    assert seen["x"].min() == 0
    # with quantization off the tensor passes untouched, negatives included
    with qmodel.quantization_disabled(), torch.no_grad():
        qmodel(-torch.ones(1, 3) * 10)
    assert seen["x"].min() < 0


# -- the per-bit amax table --------------------------------------------------------------------------------------------
def test_amax_table_follows_bit_widths(convnet):
    torch.manual_seed(0)
    data = [torch.randn(16, 1, 8, 8) for _ in range(2)]
    data[0][0, 0, 0, 0] = 25.0  # an outlier: the low widths clip it
    qmodel = QuantizedActivationsModel(convnet, "conv2d")
    calibration = calibrate(qmodel, data, method="mse", bits=(3, 8))
    table = qmodel.amax_table
    assert table == calibration.amax_table and set(table) == {"input", "conv1", "conv2"}
    assert table["input"][3] < table["input"][8] / 2  # genuinely per bit-width
    raw = {}
    convnet.conv1.register_forward_pre_hook(lambda m, a: raw.__setitem__("x", a[0].clone()))
    for bits in (3, 5, 8):
        qmodel.bit_widths = [bits] * 3
        assert qmodel.amax == {n: pytest.approx(t[bits]) for n, t in table.items()}
        with torch.no_grad():
            qmodel(data[0])
        torch.testing.assert_close(raw["x"], fake_quant_by_hand(data[0], table["input"][bits], bits), rtol=0,
                                   atol=1e-6)
    qmodel.bit_widths = {"conv2": 4}  # one quantizer changes, the others keep their widths' amax
    assert qmodel.amax["conv2"] == pytest.approx(table["conv2"][4])
    assert qmodel.amax["conv1"] == pytest.approx(table["conv1"][8])
    qmodel.bit_widths = [2, 12, 8]  # outside the table: the nearest width's amax
    assert qmodel.amax["input"] == pytest.approx(table["input"][3])
    assert qmodel.amax["conv1"] == pytest.approx(table["conv1"][8])


def test_bitconfig_carries_amax_and_signedness(tmp_path):
    torch.manual_seed(0)
    net = Branches().eval()
    qmodel = QuantizedActivationsModel(net, by_type(nn.ReLU, nn.Softmax, nn.Linear))
    calibrate(qmodel, [torch.randn(32, 6)], method="entropy", bits=(3, 6))
    qmodel.bit_widths = [3, 6, 4, 5]
    config = BitConfig.from_model(qmodel, {"name": "branches", "predicate": "custom", "quantize_input": True})
    assert config.unsigned == {"input": False, "linear": False, "relu": True, "softmax": True}
    path = tmp_path / "point.json"
    path.write_text(config.to_json())
    loaded = BitConfig.load(path)
    same_net = Branches().eval()
    same_net.load_state_dict(net.state_dict())
    fresh = QuantizedActivationsModel(same_net, by_type(nn.ReLU, nn.Softmax, nn.Linear))
    loaded.apply(fresh)
    assert fresh.unsigned == qmodel.unsigned and fresh.bits_dict() == qmodel.bits_dict()
    assert fresh.amax == pytest.approx(qmodel.amax)
    x = torch.randn(8, 6)
    with torch.no_grad():
        assert torch.equal(fresh(x), qmodel(x))


# -- calibration files ----------------------------------------------------------------------------------------------
def test_calibration_file_round_trip_and_fingerprints(convnet, tmp_path):
    torch.manual_seed(0)
    data = [torch.randn(8, 1, 8, 8) for _ in range(3)]
    qmodel = QuantizedActivationsModel(convnet, "conv2d")
    calibration = calibrate(qmodel, data, 2, method="entropy", bits=(2, 8), overrides={"conv*": "max"})
    assert calibration.methods == {"input": "entropy", "conv1": "max", "conv2": "max"}
    path = calibration.save(tmp_path / "calibration.json")
    loaded = Calibration.load(path)
    assert loaded.amax_table == calibration.amax_table and loaded.unsigned == calibration.unsigned
    assert loaded.fingerprint == calibration.fingerprint
    assert calibration.fingerprint["data"] == data_fingerprint(data, 2)
    assert data_fingerprint([torch.cat(data[:2])]) == calibration.fingerprint["data"]  # batching does not matter

    other = QuantizedActivationsModel(type(convnet)().eval(), "conv2d")  # same seed-0 weights
    loaded.check_fits(other, data_fingerprint(data, 2), bits=(3, 8))
    loaded.apply(other)
    assert other.amax == qmodel.amax and other.amax_table == qmodel.amax_table
    with pytest.raises(CalibrationError, match="other calibration data"):
        loaded.check_fits(other, data_fingerprint(data, 3))
    with pytest.raises(CalibrationError, match="holds amax for bits 2:8, the run searches 2:10"):
        loaded.check_fits(other, bits=(2, 10))
    with torch.no_grad():
        other.model.conv2.weight[0, 0, 0, 0] += 1e-3
    with pytest.raises(CalibrationError, match="other model weights"):
        loaded.check_fits(other)
    linear_only = QuantizedActivationsModel(type(convnet)().eval(), "linear")
    with pytest.raises(CalibrationError, match="#1 is 'conv1' in the file but 'fc'"):
        loaded.check_fits(linear_only)
    broken = json.loads(path.read_text())
    broken["quantizers"]["conv1"]["amax"]["4"] = -1.0
    (tmp_path / "broken.json").write_text(json.dumps(broken))
    with pytest.raises(CalibrationError, match="quantizers/conv1/amax/4"):
        Calibration.load(tmp_path / "broken.json")


def test_overrides_and_methods_are_checked(convnet):
    qmodel = QuantizedActivationsModel(convnet, "conv2d")
    data = [torch.randn(4, 1, 8, 8)]
    with pytest.raises(CalibrationError, match="matches no quantizer"):
        calibrate(qmodel, data, overrides={"*.attn_drop": "max"})
    with pytest.raises(CalibrationError, match="unknown key 'methd'"):
        calibrate(qmodel, data, overrides={"conv1": {"methd": "max"}})
    with pytest.raises(CalibrationError, match="unknown calibration method 'kl'"):
        calibrate(qmodel, data, method="kl")
    with pytest.raises(CalibrationError, match="momentum"):
        calibrate(qmodel, data, method="moving-max", momentum=1.5)


# -- the command line ------------------------------------------------------------------------------------------------
def test_calibrate_cli_then_explore_reuses_it_and_refuses_a_mismatch(tmp_path, capsys):
    from quantsearch.cli.calibrate import main as calibrate_main
    from quantsearch.cli.explore import main as explore_main
    from quantsearch.sources.models import create_demo_vit

    common = ["--calib-batches", "1", "--batch-size", "200", "--eval-samples", "200", "--holdout-samples", "100",
              "--bits", "4:8"]
    path = tmp_path / "calibration.json"
    assert calibrate_main([*common, "--calib-method", "entropy", "--output", str(path), "--seed", "1"]) == 0
    calibration = Calibration.load(path)
    assert set(calibration.methods.values()) == {"entropy"} and calibration.bits == (4, 8)
    assert [n for n, u in calibration.unsigned.items() if u] == [f"blocks.{i}.attn.attn_drop" for i in range(4)]

    out = tmp_path / "run"
    assert explore_main([*common, "--calibration", str(path), "--seed", "1", "--pop-size", "4", "--generations",
                         "1", "--max-accuracy-drop", "0.3", "--out", str(out), "--no-progress"]) == 0
    assert json.loads((out / "calibration.json").read_text()) == json.loads(path.read_text())
    point = sorted((out / "pareto").glob("*.json"))[0]
    config = BitConfig.load(point)
    assert sum(config.unsigned.values()) == 4
    activations = {n: b for n, b in config.bits.items() if not n.endswith(":weight")}
    assert len(activations) == 40 and set(activations) == set(calibration.quantizers)
    assert {n: config.amax[n] for n in activations} == {
        n: pytest.approx(calibration.amax_table[n][b]) for n, b in activations.items()}
    assert apply_bitconfig(create_demo_vit(), point).unsigned == config.unsigned
    capsys.readouterr()

    # another seed draws other calibration images; other weights come from a checkpoint
    assert explore_main([*common, "--calibration", str(path), "--seed", "2", "--out", str(tmp_path / "r2")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: calibration file") and "other calibration data" in err and "\n" not in err
    weights = create_demo_vit().state_dict()
    weights["head.bias"] = weights["head.bias"] + 0.01
    torch.save(weights, tmp_path / "other.pt")
    assert explore_main([*common, "--calibration", str(path), "--seed", "1", "--checkpoint",
                         str(tmp_path / "other.pt"), "--out", str(tmp_path / "r3")]) == 2
    assert "other model weights" in capsys.readouterr().err
    assert explore_main([*common, "--calib-method", "kl", "--out", str(tmp_path / "r4")]) == 2
    assert "unknown calibration method 'kl'" in capsys.readouterr().err
