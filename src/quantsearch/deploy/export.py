"""Export a quantized model for use elsewhere: its weights plus every quantizer's amax and bits, as data.

Two tensor formats, chosen by the file suffix, both plain data (no Python objects):

- ``.safetensors``: read with ``safetensors.torch.load_file``; the metadata is also stored in its header;
- ``.pt`` / ``.pth``: a flat ``{name: tensor}`` dict, read with ``torch.load(path, weights_only=True)``.

Tensor names: ``model.<state-dict key>`` for the model's own weights and buffers (``load_state_dict`` takes them
after the prefix is stripped), ``quantizers.<quantizer>.amax`` (float32) and ``quantizers.<quantizer>.num_bits``
(int32) for each activation quantizer. Beside the tensor file, ``<stem>.json`` holds the metadata: the bit-config
it came from and how the numbers are meant (per-tensor, symmetric, narrow range, scale = (2^(b-1)-1) / amax;
unsigned and log2 quantizers as the metadata says).
"""
from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import torch

from .bitconfig import BitConfig
from .errors import ExportError
from ..files import write_atomic

__all__ = ["ExportError", "EXPORT_FORMAT", "SUFFIXES", "export_quantized", "load_exported", "model_state",
           "metadata_path"]

EXPORT_FORMAT = "quantsearch-quantized-model"
EXPORT_VERSION = 1
SUFFIXES = (".safetensors", ".pt", ".pth")
MODEL_PREFIX = "model."
QUANTIZER_PREFIX = "quantizers."


def metadata_path(path: str | Path) -> Path:
    """The JSON written beside a tensor file: ``model.safetensors`` -> ``model.json``."""
    return Path(path).with_suffix(".json")


def _check_suffix(path: Path) -> None:
    if path.suffix not in SUFFIXES:
        raise ExportError(f"export path {path} must end in {', '.join(SUFFIXES)} (safetensors or a torch state "
                          f"dict of tensors)")


def export_quantized(qmodel, config: BitConfig, path: str | Path) -> tuple[Path, Path]:
    """Write ``qmodel``'s weights, amax and bits to ``path`` and the metadata beside it; returns both paths.

    ``config`` is the bit-config the model was set up from (it goes into the metadata, with the bits and amax
    replaced by the model's current ones, so the two files never disagree).
    """
    path = Path(path)
    _check_suffix(path)
    tensors: dict[str, torch.Tensor] = {}
    for key, value in qmodel.model.state_dict().items():
        tensors[MODEL_PREFIX + key] = value.detach().cpu().contiguous().clone()
    bits = qmodel.bits_dict()
    for name, amax in qmodel.amax.items():
        if amax is None:
            raise ExportError(f"quantizer {name!r} is not calibrated: nothing to export")
        tensors[f"{QUANTIZER_PREFIX}{name}.amax"] = torch.tensor(amax, dtype=torch.float32)
        tensors[f"{QUANTIZER_PREFIX}{name}.num_bits"] = torch.tensor(bits[name], dtype=torch.int32)

    current = {n: dict(q) | {"num_bits": bits[n], "amax": qmodel.amax[n]} for n, q in config.quantizers.items()}
    bitconfig = BitConfig.from_dict(config.to_dict() | {"quantizers": current}).to_dict()
    metadata = {
        "format": EXPORT_FORMAT,
        "version": EXPORT_VERSION,
        "tensors": {"file": path.name, "weights": MODEL_PREFIX + "<state-dict key>",
                    "amax": QUANTIZER_PREFIX + "<quantizer>.amax",
                    "num_bits": QUANTIZER_PREFIX + "<quantizer>.num_bits"},
        "quantization": {"what": "activations: the output of each named module, '<module>:input' the input of "
                                 "that module, 'input' the model input",
                         "granularity": "per-tensor", "symmetric": True, "narrow_range": True,
                         "scale": "(2**(num_bits-1) - 1) / amax",
                         "fake_quant": "clamp(round(x * scale), -(2**(num_bits-1) - 1), 2**(num_bits-1) - 1) / scale",
                         "unsigned": "bitconfig.quantizers[name].unsigned: scale = (2**num_bits - 1) / amax, "
                                     "clamp to [0, 2**num_bits - 1]",
                         "log2-narrow": "bitconfig.quantizers[name].form == 'log2-narrow': as log2 at num_bits <= 4, "
                                        "as unsigned above",
                         "log2": "bitconfig.quantizers[name].form == 'log2': k = round(-log2(x / amax)) clamped "
                                 "below at 0; amax * 2**-k, or 0 where k > 2**num_bits - 2 or x <= 0",
                         "log-sqrt2": "bitconfig.quantizers[name].form == 'log-sqrt2': k = round(-2 * log2(x / "
                                      "amax)) clamped below at 0; amax * 2**(-k / 2), or 0 where k > 2**num_bits - 2 "
                                      "or x <= 0",
                         "log-sqrt2-narrow": "bitconfig.quantizers[name].form == 'log-sqrt2-narrow': as log-sqrt2 "
                                             "at num_bits <= 4, as unsigned above",
                         "asymmetric": "bitconfig.quantizers[name].form == 'asymmetric': low = "
                                       "bitconfig.quantizers[name].low, high = amax; s = float32((high - low) / "
                                       "(2**num_bits - 1)), z = round(-low / s); (clamp(round(x / s) + z, 0, "
                                       "2**num_bits - 1) - z) * s",
                         "per-head": "bitconfig.quantizers[name].form == 'per-head': amax holds one value per "
                                     "equal group of the last dimension (a head's q, k or v); each group as above "
                                     "with its own amax",
                         "per-channel": "bitconfig.quantizers[name].form == 'per-channel': as the uniform form; "
                                        "the exported weights already hold its fold (bitconfig.quantizers[name]."
                                        "fold: LayerNorm gamma / scale, (beta - shift) / scale; each Linear in "
                                        "'into' W * scale per input column, b + W shift)"},
        "bitconfig": bitconfig,
    }
    text = json.dumps(metadata, indent=2) + "\n"
    if path.suffix == ".safetensors":
        from safetensors.torch import save

        data = save(tensors, metadata={"quantsearch": json.dumps(metadata)})
    else:
        buffer = io.BytesIO()
        torch.save(tensors, buffer)
        data = buffer.getvalue()
    write_atomic(path, data)
    meta = metadata_path(path)
    write_atomic(meta, text)
    return path, meta


def load_exported(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read an export back: ``(tensors, metadata)``, as plain data; the metadata's bit-config is validated."""
    path = Path(path)
    _check_suffix(path)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            tensors = load_file(path)
        else:
            tensors = torch.load(path, map_location="cpu", weights_only=True)
        metadata = json.loads(metadata_path(path).read_text())
    except Exception as exc:  # unreadable, truncated or not ours: one line naming the file
        raise ExportError(f"cannot read export {path}: {str(exc).splitlines()[0] if str(exc) else exc!r}") from None
    if not isinstance(metadata, dict) or metadata.get("format") != EXPORT_FORMAT:
        raise ExportError(f"{metadata_path(path)} is not quantsearch export metadata")
    BitConfig.from_dict(metadata.get("bitconfig"), source=str(metadata_path(path)))
    return tensors, metadata


def model_state(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The model's own state dict from an export's tensors (the ``model.`` prefix stripped)."""
    return {k[len(MODEL_PREFIX):]: v for k, v in tensors.items() if k.startswith(MODEL_PREFIX)}
