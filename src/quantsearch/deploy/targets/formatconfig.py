"""The format config: one configuration of a deployment target (each Linear/Conv layer's runtime format, the ranges
its int8-static layers were calibrated to) as validated JSON that re-applies to its model in one line.

It is a target run's bit-config (``pareto/point_NNN.json``): it records the same model, dataset, metric and
settings sections, so ``apply`` rebuilds the run; the schema ships in the package
(``quantsearch/schemas/formatconfig.schema.json``) and every load validates against it.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping

from torch import nn

from ... import files
from .onnxruntime import FORMATS, RuntimeFormatModel

__all__ = ["FORMAT", "FormatConfig", "FormatConfigError", "apply_formatconfig", "is_formatconfig"]

FORMAT = "quantsearch-formats"
SCHEMA_VERSION = 1


class FormatConfigError(ValueError):
    """A format config that violates the schema or does not fit the model."""


def is_formatconfig(payload: Any) -> bool:
    """Whether a parsed JSON document says it is a format config (rather than a bit-config)."""
    return isinstance(payload, Mapping) and payload.get("format") == FORMAT


@dataclass(frozen=True)
class FormatConfig:
    """Each layer's format, the int8-static ranges, the target (name, deployment batch, threads) and what the
    configuration scored (accuracy per split, costs, predicted and measured latency)."""

    target: Mapping[str, Any]
    model: Mapping[str, Any]
    layers: Mapping[str, str]
    ranges: Mapping[str, list[float]] = field(default_factory=dict)
    dataset: Mapping[str, Any] = field(default_factory=dict)
    metric: Mapping[str, Any] = field(default_factory=dict)
    settings: Mapping[str, Any] = field(default_factory=dict)
    confidence: Mapping[str, Any] = field(default_factory=dict)
    accuracy: Mapping[str, float | None] = field(default_factory=dict)
    costs: Mapping[str, float] = field(default_factory=dict)
    costs_normalized: Mapping[str, float] = field(default_factory=dict)
    latency: Mapping[str, float | None] = field(default_factory=dict)
    base: Path | None = field(default=None, compare=False)

    @classmethod
    def from_model(cls, rmodel: RuntimeFormatModel, target: Mapping[str, Any], model: Mapping[str, Any],
                   **kwargs) -> "FormatConfig":
        """The current formats of ``rmodel``, with the ranges of the tensors its int8-static layers quantize."""
        static = "int8-static" in rmodel.formats.values()
        ranges = {t: [float(lo), float(hi)] for t, (lo, hi) in rmodel.ranges.items()} if static else {}
        return cls(target=dict(target), model=dict(model), layers=rmodel.formats, ranges=ranges, **kwargs)

    @property
    def bits(self) -> dict[str, int]:
        """Each layer's gene (its format's index in :data:`FORMATS`)."""
        return {n: FORMATS.index(f) for n, f in self.layers.items()}

    def to_dict(self) -> dict:
        optional = {k: dict(v) for k, v in (("dataset", self.dataset), ("metric", self.metric),
                                             ("settings", self.settings), ("confidence", self.confidence),
                                             ("latency", self.latency)) if v}
        return {"format": FORMAT, "schema_version": SCHEMA_VERSION, "target": dict(self.target),
                "model": dict(self.model), **optional, "layers": dict(self.layers), "ranges": dict(self.ranges),
                "accuracy": dict(self.accuracy), "costs": dict(self.costs),
                "costs_normalized": dict(self.costs_normalized)}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"

    @classmethod
    def from_dict(cls, payload: Any, source: str = "format config") -> "FormatConfig":
        problem = files.schema_problem(payload, "formatconfig")
        if problem:
            raise FormatConfigError(f"{source} violates the format-config schema {problem}")
        keys = ("dataset", "metric", "settings", "confidence", "ranges", "accuracy", "costs", "costs_normalized",
                "latency")
        return cls(target=payload["target"], model=payload["model"], layers=payload["layers"],
                   **{k: payload[k] for k in keys if k in payload})

    @classmethod
    def load(cls, path: str | Path) -> "FormatConfig":
        config = cls.from_dict(files.read_json(path, "format config", FormatConfigError), source=str(path))
        return replace(config, base=Path(path).resolve().parent)

    def apply(self, rmodel: RuntimeFormatModel) -> None:
        """Set each layer's format and the int8-static ranges on ``rmodel``; the layers must be the model's, in
        order, and each format one its layer can take (the first mismatch is named)."""
        names = rmodel.quantizer_names
        for i, (ours, theirs) in enumerate(zip(self.layers, names)):
            if ours != theirs:
                raise FormatConfigError(f"format config does not fit the model: layer #{i} is {ours!r} in the "
                                        f"format config but {theirs!r} in the model")
        if len(self.layers) != len(names):
            extra = (list(self.layers)[len(names):] or names[len(self.layers):])[0]
            raise FormatConfigError(f"format config does not fit the model: {len(self.layers)} layers in the format "
                                    f"config, {len(names)} in the model (first unmatched: {extra!r})")
        try:
            rmodel.bit_widths = self.bits
        except ValueError as exc:
            raise FormatConfigError(f"format config does not fit the model: {exc}") from None
        if self.ranges:
            rmodel.ranges = {t: (float(lo), float(hi)) for t, (lo, hi) in self.ranges.items()}


def apply_formatconfig(model: nn.Module, config: "FormatConfig | Mapping | str | Path") -> RuntimeFormatModel:
    """``model`` in the formats a format config names: one line from a JSON file to the model ONNX Runtime runs
    (evaluate it, or write ORT's graph with :func:`~quantsearch.deploy.targets.onnxruntime.export_runtime_onnx`)."""
    if isinstance(config, Mapping):
        config = FormatConfig.from_dict(config)
    elif not isinstance(config, FormatConfig):
        config = FormatConfig.load(config)
    rmodel = RuntimeFormatModel(model, batch_size=int(config.target["deploy_batch"]),
                                threads=config.target.get("threads"))
    config.apply(rmodel)
    return rmodel
