"""The bit-config: one configuration (bits, amax, signedness per quantizer) as validated JSON that can be re-applied.

The JSON Schema ships in the package (``quantsearch/schemas/bitconfig.schema.json``); every load validates against
it, and applying refuses a configuration whose quantizer names do not match the model, naming the first mismatch.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any, Mapping

from torch import nn

__all__ = ["BitConfig", "BitConfigError", "schema", "apply_bitconfig"]

FORMAT = "quantsearch-bitconfig"
SCHEMA_VERSION = 1


class BitConfigError(ValueError):
    """A bit-config that violates the schema or does not fit the model."""


@lru_cache(maxsize=1)
def schema() -> dict:
    return json.loads((resources.files("quantsearch") / "schemas" / "bitconfig.schema.json").read_text())


@dataclass(frozen=True)
class BitConfig:
    """Bits, amax and signedness per quantizer, the model they belong to, and what they scored."""

    model: Mapping[str, Any]
    quantizers: Mapping[str, Mapping[str, Any]]
    dataset: Mapping[str, Any] = field(default_factory=dict)
    accuracy: Mapping[str, float | None] = field(default_factory=dict)
    costs: Mapping[str, float] = field(default_factory=dict)
    costs_normalized: Mapping[str, float] = field(default_factory=dict)

    @property
    def bits(self) -> dict[str, int]:
        return {n: int(q["num_bits"]) for n, q in self.quantizers.items()}

    @property
    def amax(self) -> dict[str, float]:
        return {n: float(q["amax"]) for n, q in self.quantizers.items()}

    @property
    def unsigned(self) -> dict[str, bool]:
        """Whether each quantizer uses the unsigned range (absent in a bit-config means signed)."""
        return {n: bool(q.get("unsigned", False)) for n, q in self.quantizers.items()}

    @classmethod
    def from_model(cls, qmodel, model: Mapping[str, Any], **kwargs) -> "BitConfig":
        amax, unsigned = qmodel.amax, qmodel.unsigned
        quantizers = {n: {"num_bits": b, "amax": amax[n], "unsigned": unsigned[n]}
                      for n, b in qmodel.bits_dict().items()}
        return cls(model=dict(model), quantizers=quantizers, **kwargs)

    def to_dict(self) -> dict:
        return {"format": FORMAT, "schema_version": SCHEMA_VERSION, "model": dict(self.model),
                "dataset": dict(self.dataset), "quantizers": {n: dict(q) for n, q in self.quantizers.items()},
                "accuracy": dict(self.accuracy), "costs": dict(self.costs),
                "costs_normalized": dict(self.costs_normalized)}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"

    @classmethod
    def from_dict(cls, payload: Any, source: str = "bit-config") -> "BitConfig":
        import jsonschema

        try:
            jsonschema.validate(payload, schema())
        except jsonschema.ValidationError as exc:
            where = "/".join(str(p) for p in exc.absolute_path) or "(top level)"
            raise BitConfigError(f"{source} violates the bit-config schema at {where}: {exc.message}") from None
        return cls(model=payload["model"], quantizers=payload["quantizers"], dataset=payload.get("dataset", {}),
                   accuracy=payload.get("accuracy", {}), costs=payload.get("costs", {}),
                   costs_normalized=payload.get("costs_normalized", {}))

    @classmethod
    def load(cls, path: str | Path) -> "BitConfig":
        try:
            payload = json.loads(Path(path).read_text())
        except OSError as exc:
            raise BitConfigError(f"cannot read bit-config {path}: {exc.strerror}") from None
        except ValueError as exc:
            raise BitConfigError(f"bit-config {path} is not valid JSON: {exc}") from None
        return cls.from_dict(payload, source=str(path))

    def apply(self, qmodel) -> None:
        """Set bits, amax and signedness on ``qmodel``; the quantizer names must match exactly, in order."""
        names = qmodel.quantizer_names
        for i, (ours, theirs) in enumerate(zip(list(self.quantizers), names)):
            if ours != theirs:
                raise BitConfigError(f"bit-config does not fit the model: quantizer #{i} is {ours!r} in the "
                                     f"bit-config but {theirs!r} in the model")
        if len(self.quantizers) != len(names):
            extra = (list(self.quantizers)[len(names):] or names[len(self.quantizers):])[0]
            raise BitConfigError(f"bit-config does not fit the model: {len(self.quantizers)} quantizers in the "
                                 f"bit-config, {len(names)} in the model (first unmatched: {extra!r})")
        # bits first: with an amax table, setting bits sets amax, which this configuration then overrides
        qmodel.bit_widths = self.bits
        qmodel.amax = self.amax
        qmodel.unsigned = self.unsigned


def apply_bitconfig(model: nn.Module, config: "BitConfig | str | Path"):
    """Wrap ``model`` as its bit-config says and apply it: one line from a JSON file to a quantized model."""
    from .quantized_model import QuantizedActivationsModel

    config = config if isinstance(config, BitConfig) else BitConfig.load(config)
    qmodel = QuantizedActivationsModel(model, config.model["predicate"],
                                       quantize_input=config.model["quantize_input"])
    config.apply(qmodel)
    return qmodel
