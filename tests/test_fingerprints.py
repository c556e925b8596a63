"""The one fingerprint implementation: model, tensors, values, files and streamed data batches."""
import hashlib
import re

import torch

from conftest import SmallConvNet
from quantsearch.fingerprints import (DataDigest, file_sha256, fingerprint_model, fingerprint_tensors,
                                      fingerprint_values)
from quantsearch.quantize.calib import calibrate, data_fingerprint
from quantsearch.quantize.quantized_model import QuantizedActivationsModel, make_quantizer

SHA256 = re.compile(r"^[0-9a-f]{64}$")


def test_every_digest_is_a_full_sha256(tmp_path):
    path = tmp_path / "blob.bin"
    path.write_bytes(b"quantsearch" * 1000)
    digests = [fingerprint_model(SmallConvNet()), fingerprint_tensors([torch.ones(3)]),
               fingerprint_values({"a": 1}), file_sha256(path), DataDigest().hexdigest()]
    assert all(SHA256.match(d) for d in digests)
    assert file_sha256(path) == hashlib.sha256(path.read_bytes()).hexdigest()


def test_quantized_model_hashes_like_the_plain_model():
    plain = fingerprint_model(SmallConvNet().eval())
    qmodel = QuantizedActivationsModel(SmallConvNet().eval(), "conv2d", weight_quantizers=True)
    calibration = calibrate(qmodel, [torch.randn(4, 1, 8, 8)], 1, "max")
    assert fingerprint_model(qmodel.model) == plain
    assert calibration.fingerprint["weights"] == plain
    with torch.no_grad():
        qmodel.model.fc.bias[0] += 1e-3
    assert fingerprint_model(qmodel.model) != plain


def test_tensor_quantizer_submodules_are_left_out():
    model = SmallConvNet().eval()
    plain = fingerprint_model(model)
    quantizer = make_quantizer(4)
    quantizer.amax = 3.0  # a buffer in the state dict: calibration, not weights
    model.conv1.add_module("_input_quantizer", quantizer)
    assert any(k.endswith("_input_quantizer._amax") for k in model.state_dict())
    assert fingerprint_model(model) == plain
    assert fingerprint_model(make_quantizer(4)) == fingerprint_model(torch.nn.Module())


def test_model_digest_sees_names_dtypes_and_values():
    model = SmallConvNet()
    plain = fingerprint_model(model)
    assert fingerprint_model(SmallConvNet()) == plain  # same seed, same weights
    assert fingerprint_model(SmallConvNet().double()) != plain
    renamed = torch.nn.Sequential(*SmallConvNet().children())
    assert fingerprint_model(renamed) != plain


def test_tensor_and_value_digests():
    x = torch.arange(6, dtype=torch.float32)
    assert fingerprint_tensors([x]) == fingerprint_tensors([x.clone()])
    assert fingerprint_tensors([x]) != fingerprint_tensors([x.reshape(2, 3)])  # shape counts
    assert fingerprint_tensors([x]) != fingerprint_tensors([x.double()])  # dtype counts
    assert fingerprint_tensors([]) == hashlib.sha256().hexdigest()
    assert fingerprint_values({"a": 1, "b": [2, 3]}) == fingerprint_values({"b": [2, 3], "a": 1})
    assert fingerprint_values({"a": 1}) != fingerprint_values({"a": 2})


def test_data_digest_is_independent_of_batching():
    torch.manual_seed(0)
    data = torch.randn(12, 1, 8, 8)
    by_four, whole = DataDigest(), DataDigest()
    for batch in data.split(4):
        by_four.update(batch)
    whole.update(data)
    assert by_four.hexdigest() == whole.hexdigest() and by_four.samples == whole.samples == 12
    assert data_fingerprint([(b, torch.zeros(len(b))) for b in data.split(5)]) == whole.hexdigest()
    assert data_fingerprint(data.split(4), 2) == data_fingerprint([data[:8]])
    assert data_fingerprint([data.reshape(12, 8, 8)]) != whole.hexdigest()  # same bytes, other sample shape
    assert data_fingerprint([data.double()]) == whole.hexdigest()  # inputs are hashed as float32
