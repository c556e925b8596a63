"""Fingerprints: short sha256 digests that say whether two runs saw the same model, calibration and data.

A resumed run, or a reused calibration file, is only valid against the same weights and the same images; the
digests make that check cheap and exact.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Iterable, Mapping

import torch
from torch import nn

__all__ = ["fingerprint_model", "fingerprint_tensors", "fingerprint_values", "file_sha256"]


def _update(h, tensor: torch.Tensor) -> None:
    t = tensor.detach().to("cpu").contiguous()
    h.update(str((t.dtype, tuple(t.shape))).encode())
    h.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")


def fingerprint_model(model: nn.Module) -> str:
    """Digest of every parameter and buffer (names, dtypes, shapes, bytes)."""
    h = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        h.update(name.encode())
        _update(h, tensor)
    return h.hexdigest()[:16]


def fingerprint_tensors(tensors: Iterable[torch.Tensor]) -> str:
    """Digest of a sequence of tensors, such as the batches of a data split."""
    h = hashlib.sha256()
    for tensor in tensors:
        _update(h, tensor)
    return h.hexdigest()[:16]


def fingerprint_values(values: Mapping | list) -> str:
    """Digest of JSON-serialisable values (amax tables, settings)."""
    return hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()[:16]


def file_sha256(path: str | Path) -> str:
    """The full sha256 of a file's bytes (a checkpoint), read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
