"""The bit-config: one configuration (bits, amax, signedness per quantizer) as validated JSON that can be re-applied.

Activation quantizers carry one amax; weight quantizers (``<module>:weight``, present when ``model`` says
``"weight_quantizers": true``) carry a list, one amax per output channel, so re-applying reproduces the
quantized weights bit for bit.

The JSON Schema ships in the package (``quantsearch/schemas/bitconfig.schema.json``); every load validates against
it, and applying refuses a configuration whose quantizer names, or the per-sample shapes of the tensors those
quantizers see, do not match the model, naming the first mismatch.
"""
from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from .. import files

__all__ = ["BitConfig", "BitConfigError", "schema", "apply_bitconfig", "refined_weights"]

FORMAT = "quantsearch-bitconfig"
SCHEMA_VERSION = 3  # 3: the settings, metric and fingerprints that rebuild the run; 2: per-channel weights; 1, 2 load


class BitConfigError(ValueError):
    """A bit-config that violates the schema or does not fit the model."""


def refined_weights(changed: Mapping[str, torch.Tensor]) -> tuple[bytes, str]:
    """The file a refined bit-config names (a state dict of the changed tensors, on the CPU) and its sha256."""
    buffer = io.BytesIO()
    torch.save({k: v.detach().cpu().contiguous() for k, v in changed.items()}, buffer)
    return buffer.getvalue(), hashlib.sha256(buffer.getvalue()).hexdigest()


def schema() -> dict:
    """The bit-config's JSON Schema (``quantsearch/schemas/bitconfig.schema.json``)."""
    return files.schema("bitconfig")


@dataclass(frozen=True)
class BitConfig:
    """Bits, amax and signedness per quantizer, the model they belong to, and what they scored.

    ``settings`` holds every explore setting that rebuilding the model, images and metric needs (``apply``'s
    defaults), ``metric`` the bound the accuracies were held to; ``model`` and ``dataset`` also record digests of
    the checkpoint, the weights and the images, so that re-applying to other ones is noticed.
    """

    model: Mapping[str, Any]
    quantizers: Mapping[str, Mapping[str, Any]]
    dataset: Mapping[str, Any] = field(default_factory=dict)
    accuracy: Mapping[str, float | None] = field(default_factory=dict)
    costs: Mapping[str, float] = field(default_factory=dict)
    costs_normalized: Mapping[str, float] = field(default_factory=dict)
    metric: Mapping[str, Any] = field(default_factory=dict)
    settings: Mapping[str, Any] = field(default_factory=dict)
    confidence: Mapping[str, Any] = field(default_factory=dict)
    refined: Mapping[str, Any] = field(default_factory=dict)
    integer: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)  # integer operators: impl and range
    schema_version: int = SCHEMA_VERSION
    base: Path | None = field(default=None, compare=False)  # the folder of the file it was read from

    @property
    def bits(self) -> dict[str, int]:
        return {n: int(q["num_bits"]) for n, q in self.quantizers.items()}

    @property
    def amax(self) -> dict[str, float | list[float]]:
        return {n: ([float(v) for v in q["amax"]] if isinstance(q["amax"], list) else float(q["amax"]))
                for n, q in self.quantizers.items()}

    @property
    def shapes(self) -> dict[str, list[int]]:
        """Recorded per-sample tensor shape per quantizer (quantizers without one are left out)."""
        return {n: list(q["shape"]) for n, q in self.quantizers.items() if "shape" in q}

    @property
    def forms(self) -> dict[str, str]:
        """Each quantizer's form (absent in a bit-config means uniform)."""
        return {n: q.get("form", "uniform") for n, q in self.quantizers.items()}

    @property
    def lows(self) -> dict[str, float]:
        """The lower end of each asymmetric quantizer's range."""
        return {n: float(q["low"]) for n, q in self.quantizers.items() if "low" in q}

    @property
    def folds(self) -> dict:
        """Each per-channel quantizer's fold into its LayerNorm and the Linear layers after it."""
        from ..quantize.fold import ChannelFold

        return {n: ChannelFold.from_dict(q["fold"]) for n, q in self.quantizers.items() if "fold" in q}

    @property
    def unsigned(self) -> dict[str, bool]:
        """Whether each quantizer uses the unsigned range (absent in a bit-config means signed)."""
        return {n: bool(q.get("unsigned", False)) for n, q in self.quantizers.items()}

    @classmethod
    def from_model(cls, qmodel, model: Mapping[str, Any], example: torch.Tensor | None = None,
                   **kwargs) -> "BitConfig":
        """The current bits and amax of ``qmodel``; with an ``example`` batch, also the tensor shapes to check."""
        model = dict(model)
        shapes = {}
        if example is not None:
            shapes = qmodel.tensor_shapes(example)
            model["input_shape"] = [int(d) for d in example.shape[1:]]
        amax, unsigned, forms, lows, folds = qmodel.amax, qmodel.unsigned, qmodel.forms, qmodel.lows, qmodel.folds
        quantizers = {}
        for n, b in qmodel.bits_dict().items():
            quantizers[n] = {"num_bits": b, "amax": amax[n], "unsigned": unsigned[n]}
            if forms[n] != "uniform":
                quantizers[n]["form"] = forms[n]
            if n in lows:
                quantizers[n]["low"] = lows[n]
            if n in folds:
                quantizers[n]["fold"] = folds[n].to_dict()
            if n in shapes:
                quantizers[n]["shape"] = shapes[n]
        integer = {op.name: {"impl": op.impl, **op.state()} for op in qmodel.integer}
        if any(op.kind == "add" for op in qmodel.integer):
            model["integer_add_bits"] = qmodel.integer.add_bits
        return cls(model=model, quantizers=quantizers, integer=integer, **kwargs)

    def to_dict(self) -> dict:
        run = {k: dict(v) for k, v in (("metric", self.metric), ("settings", self.settings),
                                       ("confidence", self.confidence), ("refined", self.refined)) if v}
        return {"format": FORMAT, "schema_version": SCHEMA_VERSION, "model": dict(self.model),
                "dataset": dict(self.dataset), **run, "quantizers": {n: dict(q) for n, q in self.quantizers.items()},
                "accuracy": dict(self.accuracy), "costs": dict(self.costs),
                "costs_normalized": dict(self.costs_normalized),
                **({"integer": {n: dict(op) for n, op in self.integer.items()}} if self.integer else {})}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"

    @classmethod
    def from_dict(cls, payload: Any, source: str = "bit-config") -> "BitConfig":
        problem = files.schema_problem(payload, "bitconfig")
        if problem:
            raise BitConfigError(f"{source} violates the bit-config schema {problem}")
        return cls(model=payload["model"], quantizers=payload["quantizers"], dataset=payload.get("dataset", {}),
                   accuracy=payload.get("accuracy", {}), costs=payload.get("costs", {}),
                   costs_normalized=payload.get("costs_normalized", {}), metric=payload.get("metric", {}),
                   settings=payload.get("settings", {}), confidence=payload.get("confidence", {}),
                   refined=payload.get("refined", {}), integer=payload.get("integer", {}),
                   schema_version=payload["schema_version"])

    @classmethod
    def load(cls, path: str | Path) -> "BitConfig":
        config = cls.from_dict(files.read_json(path, "bit-config", BitConfigError), source=str(path))
        return replace(config, base=Path(path).resolve().parent)

    def refined_parameters(self) -> dict[str, torch.Tensor]:
        """The refined tensors this bit-config names (none without a refinement), read as data and checked."""
        if not self.refined:
            return {}
        path = (self.base or Path.cwd()) / self.refined["file"]
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise BitConfigError(f"bit-config's refined weights {path} cannot be read ({exc.strerror})") from None
        if hashlib.sha256(data).hexdigest() != self.refined["sha256"]:
            raise BitConfigError(f"refined weights {path} are not the ones the bit-config recorded (sha256 differs)")
        try:
            tensors = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except Exception as exc:  # not a tensor file: one line
            raise BitConfigError(f"refined weights {path} are not a state dict of tensors ({exc})") from None
        if not isinstance(tensors, dict) or sorted(tensors) != sorted(self.refined["parameters"]) or not all(
                isinstance(t, torch.Tensor) for t in tensors.values()):
            raise BitConfigError(f"refined weights {path} do not hold the parameters the bit-config names")
        return tensors

    def apply(self, qmodel, example: torch.Tensor | None = None) -> None:
        """Set bits, amax and signedness on ``qmodel``; quantizer names must match exactly, in order, and so must
        shapes.

        Shapes are checked with one forward pass of ``example`` (a batch), or of zeros of the recorded
        ``model.input_shape`` when no example is given; a bit-config that records no shapes skips the check.
        """
        self.check_names(qmodel)
        if self.shapes:
            self.check_shapes(qmodel, example)
        # bits first: with an amax table, setting bits sets amax, which this configuration then overrides; folds
        # before amax: a fold resets the max|w| of the weights it changes, which this configuration then overrides
        qmodel.bit_widths = self.bits
        try:
            qmodel.folds = self.folds
            qmodel.refined = {k: v.to(qmodel._device()) for k, v in self.refined_parameters().items()}
            qmodel.amax = self.amax
        except ValueError as exc:
            raise BitConfigError(f"bit-config does not fit the model: {exc}") from None
        qmodel.unsigned = self.unsigned
        qmodel.lows = self.lows
        try:
            qmodel.integer_state = self.integer
        except ValueError as exc:
            raise BitConfigError(f"bit-config does not fit the model: {exc}") from None

    def check_names(self, qmodel) -> None:
        names = qmodel.quantizer_names
        for i, (ours, theirs) in enumerate(zip(list(self.quantizers), names)):
            if ours != theirs:
                raise BitConfigError(f"bit-config does not fit the model: quantizer #{i} is {ours!r} in the "
                                     f"bit-config but {theirs!r} in the model")
        if len(self.quantizers) != len(names):
            extra = (list(self.quantizers)[len(names):] or names[len(self.quantizers):])[0]
            raise BitConfigError(f"bit-config does not fit the model: {len(self.quantizers)} quantizers in the "
                                 f"bit-config, {len(names)} in the model (first unmatched: {extra!r})")
        theirs = qmodel.forms
        other = next((n for n, form in self.forms.items() if theirs[n] != form), None)
        if other is not None:
            raise BitConfigError(f"bit-config does not fit the model: quantizer {other!r} has the "
                                 f"{self.forms[other]} form in the bit-config but {theirs[other]} in the model")
        odd = next((n for n, form in self.forms.items() if (form == "per-channel") != ("fold" in self.quantizers[n])),
                   None)
        if odd is not None:
            raise BitConfigError(f"bit-config quantizer {odd!r} of the {self.forms[odd]} form "
                                 f"{'needs' if self.forms[odd] == 'per-channel' else 'takes no'} a fold")
        theirs = {op.name: op.impl for op in qmodel.integer}
        other = next((n for n in sorted(set(theirs) | set(self.integer))
                      if theirs.get(n) != self.integer.get(n, {}).get("impl")), None)
        if other is not None:
            raise BitConfigError(f"bit-config does not fit the model: integer operator {other!r} is "
                                 f"{self.integer.get(other, {}).get('impl', 'float')} in the bit-config but "
                                 f"{theirs.get(other, 'float')} in the model")
        lows = self.lows
        odd = next((n for n, form in self.forms.items() if (form == "asymmetric") != (n in lows)), None)
        if odd is not None:
            raise BitConfigError(f"bit-config quantizer {odd!r} of the {self.forms[odd]} form "
                                 f"{'needs' if self.forms[odd] == 'asymmetric' else 'takes no'} a low end")

    def check_shapes(self, qmodel, example: torch.Tensor | None = None) -> None:
        if example is None:
            if "input_shape" not in self.model:
                return
            example = torch.zeros(1, *self.model["input_shape"])
        try:
            seen = qmodel.tensor_shapes(example)
        except Exception as exc:  # the model cannot even run on the recorded input: that is a mismatch too
            raise BitConfigError(f"bit-config does not fit the model: a forward pass on an input of shape "
                                 f"{list(example.shape)} fails: {str(exc).splitlines()[0]}") from None
        for i, (name, recorded) in enumerate(self.shapes.items()):
            actual = seen.get(name)
            if actual != recorded:
                what = "sees no tensor" if actual is None else f"sees shape {actual}"
                raise BitConfigError(f"bit-config does not fit the model: quantizer {name!r} {what} per sample "
                                     f"in the model but {recorded} in the bit-config")


def apply_bitconfig(model: nn.Module, config: "BitConfig | Mapping | str | Path",
                    example: torch.Tensor | None = None):
    """Wrap ``model`` as its bit-config says and apply it: one line from a JSON file to a quantized model (a
    target run's format config gives the model in its runtime formats, see :mod:`.targets.formatconfig`).

    ``config`` is a :class:`BitConfig`, a parsed bit-config dict, or the path of a JSON file; ``example`` (a
    batch) checks tensor shapes on real data instead of zeros of the recorded input shape. A refined bit-config's
    weights file is found beside the JSON file (in the working directory for a dict).
    """
    from ..quantize.quantized_model import QuantizedActivationsModel

    payload = files.read_json(config, "bit-config", BitConfigError) if isinstance(config, (str, Path)) else config
    if isinstance(payload, Mapping) and payload.get("format") == "quantsearch-formats":  # a target run's point
        from .targets.formatconfig import apply_formatconfig

        return apply_formatconfig(model, payload)
    if isinstance(config, Mapping):
        config = BitConfig.from_dict(config)
    elif not isinstance(config, BitConfig):
        config = BitConfig.load(config)
    from ..quantize.integer import IntegerOpsError

    try:
        qmodel = QuantizedActivationsModel(model, config.model["predicate"],
                                           quantize_input=config.model["quantize_input"],
                                           weight_quantizers=bool(config.model.get("weight_quantizers", False)),
                                           forms={n: f for n, f in config.forms.items() if f != "uniform"},
                                           integer_ops={n: op["impl"] for n, op in config.integer.items()} or None,
                                           integer_add_bits=int(config.model.get("integer_add_bits", 16)))
    except IntegerOpsError as exc:
        raise BitConfigError(f"bit-config does not fit the model: {exc}") from None
    config.apply(qmodel, example)
    return qmodel
