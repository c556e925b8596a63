import gzip
import json
import struct

import numpy as np
import pytest
import torch

from quantsearch.deploy.bitconfig import BitConfig, BitConfigError, apply_bitconfig
from quantsearch.sources.data import DataError, read_idx, split_dataset
from quantsearch.search.problem import Evaluation
from quantsearch.quantize.quantized_model import QuantizedActivationsModel
from quantsearch.run.store import RunStore, StoreError


def test_read_idx_by_hand(tmp_path):
    values = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    path = tmp_path / "x-idx3-ubyte.gz"
    with gzip.open(path, "wb") as f:
        f.write(bytes([0, 0, 0x08, 3]) + struct.pack(">3I", 2, 3, 4) + values.tobytes())
    np.testing.assert_array_equal(read_idx(path), values)
    bad = tmp_path / "bad"
    bad.write_bytes(bytes([0, 0, 0x08, 1]) + struct.pack(">I", 10) + b"\x00" * 3)
    with pytest.raises(DataError, match="truncated"):
        read_idx(bad)


def test_shipped_fashion_mnist_and_disjoint_splits(fashion):
    x, y = fashion.tensors
    assert x.shape == (10000, 1, 28, 28) and y.shape == (10000,)
    assert torch.bincount(y).tolist() == [1000] * 10  # the test split is balanced
    s = split_dataset(fashion, 1000, 3000, seed=0)
    parts = [set(p.indices) for p in (s.calibration, s.search, s.holdout)]
    assert [len(p) for p in parts] == [1000, 3000, 6000]
    assert not (parts[0] & parts[1] or parts[0] & parts[2] or parts[1] & parts[2])
    assert split_dataset(fashion, 1000, 3000, seed=0).search.indices == s.search.indices
    with pytest.raises(DataError, match="too few"):
        split_dataset(fashion, 5000, 6000)


def test_store_records_reads_back_and_refuses_reuse(tmp_path):
    store = RunStore.create(tmp_path / "run", {"seed": 1})
    e = Evaluation((8, 4), 0.91, {"bits": 12.0}, 0.5, extra={"samples": 3000})
    store.record(e, generation=2)
    store.record(e, generation=3)  # a known configuration keeps its first record
    store.close()
    again = RunStore.open(tmp_path / "run")
    assert again.settings == {"seed": 1}
    assert again.evaluations() == [(e, 2)]
    assert again.cache() == {(8, 4): e}
    path = again.write_evaluations_csv(["a", "b"], 0.9)
    assert path.read_text().splitlines() == ["index,generation,accuracy,bits,feasible,status,samples,message,seconds,a,b",
                                             "0,2,0.910000,12,1,ok,3000,,0.500,8,4"]
    assert not list((tmp_path / "run").glob(".*.tmp"))
    with pytest.raises(StoreError, match="already holds a run"):
        RunStore.create(tmp_path / "run", {})
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "run.sqlite").write_bytes(b"not a database at all" * 100)
    with pytest.raises(StoreError, match="corrupted"):
        RunStore.open(tmp_path / "junk")


def test_bitconfig_round_trip_schema_and_mismatch(convnet, tmp_path):
    qmodel = QuantizedActivationsModel(convnet, "conv2d")
    qmodel.calibrate([torch.randn(4, 1, 8, 8)], 1)
    qmodel.bit_widths = [8, 5, 3]
    config = BitConfig.from_model(qmodel, {"name": "toy", "predicate": "conv2d", "quantize_input": True},
                                  accuracy={"search": 0.5}, costs={"bits": 16})
    path = tmp_path / "c.json"
    path.write_text(config.to_json())
    fresh = type(convnet)().eval()
    applied = apply_bitconfig(fresh, path)
    assert applied.bits_dict() == {"input": 8, "conv1": 5, "conv2": 3}
    assert applied.amax == qmodel.amax
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(applied(x), qmodel(x))

    payload = json.loads(path.read_text())
    payload["quantizers"]["conv1"]["num_bits"] = 40
    with pytest.raises(BitConfigError, match="quantizers/conv1/num_bits"):
        BitConfig.from_dict(payload)
    payload["quantizers"]["conv1"]["num_bits"] = 4
    payload["quantizers"] = {("conv_one" if k == "conv1" else k): v for k, v in payload["quantizers"].items()}
    with pytest.raises(BitConfigError, match="quantizer #1 is 'conv_one'.*'conv1'"):
        BitConfig.from_dict(payload).apply(QuantizedActivationsModel(type(convnet)().eval(), "conv2d"))
