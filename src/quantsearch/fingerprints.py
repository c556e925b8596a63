"""Fingerprints: sha256 digests (64 hex characters) that say whether two runs saw the same model, data and files.

The one implementation of every digest quantsearch records: a resumed run, a reused calibration file or a bit
config is only valid against the same weights and the same images, and the digests make that check cheap and
exact. A tensor is hashed as its dtype, shape and raw bytes; the model digest leaves out pytorch-quantization's
``TensorQuantizer`` submodules (their amax is calibration, not weights), and the data digest streams batches so
that the batch size does not change it.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Iterable, Mapping

import torch
from torch import nn

__all__ = ["fingerprint_model", "fingerprint_tensors", "fingerprint_values", "file_sha256", "DataDigest"]


def _tensor_bytes(tensor: torch.Tensor) -> bytes:
    t = tensor.detach().cpu().contiguous()
    return t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""


def _update(h, tensor: torch.Tensor, name: str = "") -> None:
    h.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
    h.update(_tensor_bytes(tensor))


def _is_tensor_quantizer(module: nn.Module) -> bool:
    """A pytorch-quantization ``TensorQuantizer`` (or subclass), told by class so that nothing is imported."""
    return any(c.__name__ == "TensorQuantizer" and c.__module__.startswith("pytorch_quantization")
               for c in type(module).__mro__)


def fingerprint_model(model: nn.Module) -> str:
    """Digest of the model's weights: every state-dict entry (name, dtype, shape, bytes), quantizers left out.

    Entries under a ``TensorQuantizer`` submodule are skipped, so a model hashes the same with or without
    fake quantizers inside it (and a ``QuantizedActivationsModel``'s inner model the same as the plain model).
    """
    quantizers = tuple(f"{name}." if name else "" for name, m in model.named_modules(remove_duplicate=False)
                       if _is_tensor_quantizer(m))
    h = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        if quantizers and name.startswith(quantizers):
            continue
        _update(h, tensor, name)
    return h.hexdigest()


def fingerprint_tensors(tensors: Iterable[torch.Tensor]) -> str:
    """Digest of a sequence of tensors (dtype, shape and bytes of each, in order), such as a split's batches."""
    h = hashlib.sha256()
    for tensor in tensors:
        _update(h, tensor)
    return h.hexdigest()


def fingerprint_values(values: Mapping | list) -> str:
    """Digest of JSON-serialisable values (amax tables, settings), keys sorted."""
    return hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()


def file_sha256(path: str | Path) -> str:
    """The sha256 of a file's bytes (a checkpoint), read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class DataDigest:
    """Streaming digest of data batches: the float32 bytes of the samples in order, their count and shapes.

    Batches are hashed as they come (``update`` once per batch, samples along dim 0), so splitting the same
    samples into other batch sizes gives the same digest.
    """

    def __init__(self):
        self._h = hashlib.sha256()
        self.samples = 0
        self.shapes: set[tuple] = set()

    def update(self, x: torch.Tensor) -> None:
        self._h.update(_tensor_bytes(x.float()))
        self.samples += len(x)
        self.shapes.add(tuple(x.shape[1:]))

    def hexdigest(self) -> str:
        h = self._h.copy()
        h.update(f"|{self.samples}|{sorted(self.shapes)}".encode())
        return h.hexdigest()
