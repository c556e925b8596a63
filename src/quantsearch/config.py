"""The run configuration: one dataclass, filled from defaults, a YAML file and command-line flags, validated once.

Validation happens before any model is loaded or data read, and every problem is one line naming it
(:class:`ConfigError`), so a mistyped flag costs a second, not a search.
"""
from __future__ import annotations

import difflib
from dataclasses import asdict, dataclass, fields
from datetime import datetime
from pathlib import Path
from typing import Any, Mapping

__all__ = ["ConfigError", "ExploreConfig", "parse_bits", "load_yaml", "SEARCH_SPACES"]

SEARCH_SPACES = ("activations", "weights", "both")


class ConfigError(ValueError):
    """A setting that cannot work; the message names it."""


@dataclass
class ExploreConfig:
    """Every setting of an exploration run (YAML keys use the same names, with ``-`` or ``_``)."""

    model: str = "fashion-vit"
    checkpoint: str | None = None
    dataset: str = "fashion-mnist"
    predicate: str = "auto"
    quantize_input: bool = True
    bits: str = "2:8"
    min_accuracy: float | None = None
    max_accuracy_drop: float = 0.01
    cost: str = "bits"
    search_space: str = "activations"
    weight_bits: str = "2:8"
    pop_size: int = 20
    generations: int = 10
    calib_batches: int = 4
    calib_method: str = "mse"
    calib_percentile: float = 99.99
    calib_momentum: float = 0.95
    calib_overrides: dict | None = None
    calibration: str | None = None
    eval_samples: int = 3000
    holdout_samples: int | None = None
    batch_size: int = 250
    seed: int = 0
    device: str = "cpu"
    compile: bool = False
    out: str | None = None
    overwrite: bool = False

    @classmethod
    def keys(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any], source: str = "config") -> "ExploreConfig":
        known = cls.keys()
        clean = {}
        for key, value in values.items():
            name = str(key).replace("-", "_")
            if name not in known:
                close = difflib.get_close_matches(name, known, n=1)
                hint = f" (did you mean {close[0].replace('_', '-')!r}?)" if close else ""
                raise ConfigError(f"{source}: unknown key {key!r}{hint}")
            clean[name] = value
        return cls(**clean)

    def merged(self, overrides: Mapping[str, Any]) -> "ExploreConfig":
        values = asdict(self)
        values.update({k: v for k, v in overrides.items() if v is not None})
        return ExploreConfig(**values)

    @property
    def bit_range(self) -> tuple[int, int]:
        return parse_bits(self.bits)

    @property
    def weight_bit_range(self) -> tuple[int, int]:
        return parse_bits(self.weight_bits, "weight-bits")

    @property
    def calibration_samples(self) -> int:
        return self.calib_batches * self.batch_size

    def resolved_out(self) -> Path:
        if self.out:
            return Path(self.out)
        return Path("runs") / datetime.now().strftime("%Y%m%d-%H%M%S")

    def validate(self) -> "ExploreConfig":
        """Check every setting that can be checked without loading anything; raise ConfigError on the first."""
        parse_bits(self.bits)
        parse_bits(self.weight_bits, "weight-bits")
        if self.search_space not in SEARCH_SPACES:
            raise ConfigError(f"unknown search-space {self.search_space!r}; choose from {', '.join(SEARCH_SPACES)}")
        for name in ("pop_size", "generations", "calib_batches", "eval_samples", "batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"{name.replace('_', '-')} must be a positive integer, got {value!r}")
        if self.holdout_samples is not None and (not isinstance(self.holdout_samples, int)
                                                 or self.holdout_samples < 0):
            raise ConfigError(f"holdout-samples must be a non-negative integer, got {self.holdout_samples!r}")
        if self.min_accuracy is not None and not 0.0 <= float(self.min_accuracy) <= 1.0:
            raise ConfigError(f"min-accuracy must lie in [0, 1] (a fraction, not a percentage), "
                              f"got {self.min_accuracy}")
        if not 0.0 <= float(self.max_accuracy_drop) <= 1.0:
            raise ConfigError(f"max-accuracy-drop must lie in [0, 1], got {self.max_accuracy_drop}")
        if self.checkpoint is not None and not Path(self.checkpoint).is_file():
            raise ConfigError(f"checkpoint {self.checkpoint} does not exist")
        kind, _, arg = self.dataset.partition(":")
        if kind not in ("fashion-mnist", "imagefolder"):
            raise ConfigError(f"unknown dataset {self.dataset!r}: use fashion-mnist, fashion-mnist:DIR "
                              "or imagefolder:PATH")
        if arg and not Path(arg).is_dir():
            raise ConfigError(f"dataset path {arg} is not a directory")
        from .predicates import PRESETS

        if self.predicate != "auto" and self.predicate not in PRESETS:
            raise ConfigError(f"unknown predicate {self.predicate!r}; choose from auto, {', '.join(PRESETS)}")
        from .costs import parse_cost_names

        try:
            parse_cost_names(self.cost)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        from .calibration import CalibrationError, MethodSpec, override_spec

        try:
            default = MethodSpec(self.calib_method, self.calib_percentile, self.calib_momentum).validated()
            if self.calib_overrides is not None and not isinstance(self.calib_overrides, dict):
                raise ConfigError(f"calib-overrides must map quantizer-name globs to methods, "
                                  f"got {type(self.calib_overrides).__name__}")
            for glob, value in (self.calib_overrides or {}).items():  # the globs are matched on the model
                override_spec(str(glob), value, default)
        except CalibrationError as exc:
            raise ConfigError(str(exc)) from None
        if self.calibration is not None and not Path(self.calibration).is_file():
            raise ConfigError(f"calibration file {self.calibration} does not exist")
        if self.device != "cpu" and not self.device.startswith("cuda"):
            raise ConfigError(f"device must be cpu, cuda or cuda:N, got {self.device!r}")
        return self


def parse_bits(text: str, option: str = "bits") -> tuple[int, int]:
    """``"2:8"`` -> ``(2, 8)``; a single number means a fixed width."""
    from .quantized_model import MAX_BITS, MIN_BITS

    try:
        parts = [int(p) for p in str(text).split(":")]
    except ValueError:
        raise ConfigError(f"{option} must look like LO:HI (for example 2:8), got {text!r}") from None
    if len(parts) == 1:
        parts = parts * 2
    if len(parts) != 2:
        raise ConfigError(f"{option} must look like LO:HI (for example 2:8), got {text!r}")
    lo, hi = parts
    if lo > hi:
        raise ConfigError(f"{option} {text}: LO is greater than HI")
    if lo < MIN_BITS or hi > MAX_BITS:
        raise ConfigError(f"{option} {text}: each width must lie in {MIN_BITS}..{MAX_BITS}")
    return lo, hi


def load_yaml(path: str | Path) -> dict:
    """A YAML mapping read with ``yaml.safe_load``."""
    import yaml

    path = Path(path)
    try:
        values = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(f"config file {path} is not valid YAML{where}") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ConfigError(f"config file {path} must hold a mapping of settings, not {type(values).__name__}")
    return values
