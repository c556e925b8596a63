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

from ..quantize.limits import INTEGER_ADD_BITS, MAX_BITS, MIN_BITS, check_forms, check_integer_ops, check_refinement
from ..search.names import ALGORITHM_NAMES, SENSITIVITY_NAMES

__all__ = ["ConfigError", "ExploreConfig", "parse_bits", "parse_integer_ops", "load_yaml", "SEARCH_SPACES", "ALGORITHM_NAMES"]

SEARCH_SPACES = ("activations", "weights", "both")
# early rejection: off; floor (stop a candidate clearly below the floor); front (also race it against the cheaper
# points: stop it once it clearly cannot enter the front); auto: front for metrics that count hits per image
EARLY_REJECT_MODES = ("off", "floor", "front", "auto", False, True)


class ConfigError(ValueError):
    """A setting that cannot work; the message names it."""


PARALLEL_KEYS = ("workers", "ray_address")  # settings that change how fast a run goes, never its results


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
    cost: str | None = None  # comma-separated; None: bits, or latency with a target
    search_space: str = "activations"
    weight_bits: str = "2:8"
    pop_size: int = 20
    generations: int = 6  # with pop 20: 146 full evaluations in all; on the demo, about 64 s on 2 cores
    calib_batches: int = 4
    calib_method: str = "mse"
    calib_percentile: float = 99.99
    calib_momentum: float = 0.95
    calib_overrides: dict | None = None
    quant_forms: dict | None = None  # {quantizer-name glob: form of quantize.limits.FORMS}; first match wins
    integer_ops: str | dict | None = None  # a preset (integer-only, fqvit) or {operator-name glob: implementation}
    integer_add_bits: int = 16  # the residual adds' grids, with integer adds
    calibration: str | None = None
    eval_samples: int = 3000
    holdout_samples: int | None = None
    validation_samples: int = 0  # images that re-check the front's candidates before they are reported (0: none)
    validation_confidence: float = 0.8  # one-sided; paired with FP32 for max-accuracy-drop (see run/pipeline.py)
    batch_size: int = 250
    seed: int = 0
    device: str = "cpu"
    compile: bool = False
    out: str | None = None
    overwrite: bool = False
    # model, data and metric sources (see models.py, data.py, evaluation.py)
    checkpoint_key: str | None = None
    pretrained: bool | None = None  # published weights of a timm/torchvision name; None: yes unless --checkpoint
    model_kwargs: dict | None = None
    preprocessing: dict | None = None  # overrides of input_size, mean, std, interpolation, crop_pct, crop_mode
    class_index: str | None = None
    dataset_kwargs: dict | None = None
    metric: str = "top1"
    metric_kwargs: dict | None = None
    channels_last: bool = False
    amp: bool = False
    loader_workers: int | None = None  # data loader processes (None: one per core, up to 8, for image files)
    workers: int = 0  # evaluation actors on Ray (0: serial, no Ray)
    ray_address: str | None = None  # join an existing Ray cluster (auto: the one this node belongs to)
    # search algorithm, evaluation budget, early rejection (see search.py, budget.py, evaluation.py)
    algorithm: str = "guided"
    budget: float | None = None  # full evaluations, baselines included; None: baselines + pop x (gens + 1)
    early_reject: bool | str = "auto"  # off/false, floor/true, front (racing), auto (front where hits are counted)
    patience: int = 2  # stop nsga2/guided once this many checks in a row gain < min-gain of the HV (0: never)
    block_cache_mb: int = 1024  # block outputs reused across candidates that share their earlier widths (0: off)
    min_gain: float = 0.001  # relative hypervolume gain that counts as progress (see search/stopping.py)
    sensitivity: str | None = None  # measured or gradient (None: the algorithm's own, see search.SENSITIVITY_DEFAULTS)
    # the refined front: candidates near the floor refined after the search (see run/refined.py)
    refine: str | None = None  # a refinement of quantize.refine (brecq-lsq, ...); None: no refined front
    refine_budget: float = 100  # full evaluations of the search split that refining may take
    refine_iterations: int = 300  # learning iterations per layer or block
    refine_margin: float = 0.02  # how far below the floor (in the metric's units) a candidate may be
    # a deployment target: the genes become the formats a runtime runs per layer (see deploy/targets/)
    target: str | None = None  # onnxruntime-cpu; None: bit-widths for hardware that runs them (costs are proxies)
    deploy_batch: int = 1  # the batch size the target serves at: latency and dynamic grids depend on it
    threads: int | None = None  # the runtime's intra-op threads (None: its default); latency depends on it
    latency_table: str | None = None  # a latency table measured before on this machine (default: measured, cached)

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
    def cost_names(self) -> str:
        """``cost`` as given, or its default: ``bits``, or ``latency`` with a target."""
        return self.cost or ("latency" if self.target else "bits")

    @property
    def bit_range(self) -> tuple[int, int]:
        return parse_bits(self.bits)

    @property
    def weight_bit_range(self) -> tuple[int, int]:
        return parse_bits(self.weight_bits, "weight-bits")

    @property
    def early_reject_mode(self) -> str:
        """``off``, ``floor`` or ``front``: what ``early-reject`` (``auto``, ``true``, ``false`` too) comes to."""
        mode = {False: "off", True: "floor"}.get(self.early_reject, self.early_reject) \
            if isinstance(self.early_reject, bool) else self.early_reject
        if mode == "auto":
            return "front" if _is_fraction_metric(str(self.metric)) else "off"
        return mode

    @property
    def calibration_samples(self) -> int:
        return self.calib_batches * self.batch_size

    def resolved_out(self) -> Path:
        if self.out:
            return Path(self.out)
        return Path("runs") / datetime.now().strftime("%Y%m%d-%H%M%S")

    def validate(self) -> "ExploreConfig":
        """Check every setting that can be checked without loading anything; raise ConfigError on the first.

        Numbers, ranges, files and kinds come first and need no torch, so most mistakes are refused in a fraction
        of a second; names checked against a registry (predicate, cost, calibration method) come last."""
        parse_bits(self.bits)
        parse_bits(self.weight_bits, "weight-bits")
        if self.search_space not in SEARCH_SPACES:
            raise ConfigError(f"unknown search-space {self.search_space!r}; choose from {', '.join(SEARCH_SPACES)}")
        for name in ("pop_size", "generations", "calib_batches", "eval_samples", "batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"{name.replace('_', '-')} must be a positive integer, got {value!r}")
        self._validate_search()
        if not isinstance(self.validation_samples, int) or isinstance(self.validation_samples, bool) \
                or self.validation_samples < 0:
            raise ConfigError(f"validation-samples must be a non-negative integer, got {self.validation_samples!r}")
        if isinstance(self.validation_confidence, bool) or not isinstance(self.validation_confidence, (int, float)) \
                or not 0.5 <= self.validation_confidence < 1.0:
            raise ConfigError(f"validation-confidence must lie in [0.5, 1), got {self.validation_confidence!r}")
        if self.holdout_samples is not None and (not isinstance(self.holdout_samples, int)
                                                 or self.holdout_samples < 0):
            raise ConfigError(f"holdout-samples must be a non-negative integer, got {self.holdout_samples!r}")
        self._validate_sources()
        self._validate_target()
        fraction = _is_fraction_metric(self.metric)
        if self.min_accuracy is not None and not 0.0 <= float(self.min_accuracy) <= 1.0 and fraction:
            raise ConfigError(f"min-accuracy must lie in [0, 1] (a fraction, not a percentage), "
                              f"got {self.min_accuracy}")
        if self.min_accuracy is not None and self.metric == "kl" and float(self.min_accuracy) < 0:
            raise ConfigError(f"min-accuracy is the ceiling of metric kl and must be >= 0, got {self.min_accuracy}")
        if not 0.0 <= float(self.max_accuracy_drop) <= (1.0 if fraction else float("inf")):
            raise ConfigError(f"max-accuracy-drop must lie in [0, {1 if fraction else 'inf'}], "
                              f"got {self.max_accuracy_drop}")
        if self.checkpoint is not None and not Path(self.checkpoint).is_file():
            raise ConfigError(f"checkpoint {self.checkpoint} does not exist")
        kind, _, arg = self.dataset.partition(":")
        if kind not in DATASET_KINDS and not _is_callable_spec(self.dataset):
            raise ConfigError(f"unknown dataset {self.dataset!r}: use fashion-mnist[:DIR], imagefolder:PATH, "
                              "images:PATH or package.module:callable")
        if kind in DATASET_KINDS and arg and not Path(arg).is_dir():
            raise ConfigError(f"dataset path {arg} is not a directory")
        if self.calibration is not None and not Path(self.calibration).is_file():
            raise ConfigError(f"calibration file {self.calibration} does not exist")
        if self.device != "cpu" and not self.device.startswith("cuda"):
            raise ConfigError(f"device must be cpu, cuda or cuda:N, got {self.device!r}")
        try:
            check_forms(self.quant_forms)
            self.integer_ops = check_integer_ops(parse_integer_ops(self.integer_ops))
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        lo, hi = INTEGER_ADD_BITS
        if isinstance(self.integer_add_bits, bool) or not isinstance(self.integer_add_bits, int) \
                or not lo <= self.integer_add_bits <= hi:
            raise ConfigError(f"integer-add-bits must be an integer from {lo} to {hi}, got {self.integer_add_bits!r}")
        if self.calib_overrides is not None and not isinstance(self.calib_overrides, dict):
            raise ConfigError(f"calib-overrides must map quantizer-name globs to methods, "
                              f"got {type(self.calib_overrides).__name__}")
        self._validate_names()
        if self.device.startswith("cuda"):
            import torch

            try:
                index = torch.device(self.device).index or 0
            except RuntimeError:
                raise ConfigError(f"device must be cpu, cuda or cuda:N, got {self.device!r}") from None
            if not torch.cuda.is_available():
                raise ConfigError(f"device {self.device}: this torch build or machine has no CUDA device")
            if index >= torch.cuda.device_count():
                raise ConfigError(f"device {self.device}: only {torch.cuda.device_count()} CUDA device(s) here")
        return self

    def _validate_search(self) -> None:
        """The algorithm, its budget and stop, early rejection and the refined front (no torch)."""
        if self.algorithm not in ALGORITHM_NAMES:
            raise ConfigError(f"unknown algorithm {self.algorithm!r}; choose from {', '.join(ALGORITHM_NAMES)}")
        if self.budget is not None and (isinstance(self.budget, bool) or not isinstance(self.budget, (int, float))
                                        or not self.budget > 0):
            raise ConfigError(f"budget must be a positive number of full evaluations, got {self.budget!r}")
        _check_stop(self.patience, self.min_gain)
        if not isinstance(self.block_cache_mb, int) or isinstance(self.block_cache_mb, bool) \
                or self.block_cache_mb < 0:
            raise ConfigError(f"block-cache-mb must be a whole number of MiB >= 0 (0: off), got "
                              f"{self.block_cache_mb!r}")
        _check_refine(self)
        if self.sensitivity is not None and self.sensitivity not in SENSITIVITY_NAMES:
            raise ConfigError(f"unknown sensitivity {self.sensitivity!r}; choose from {', '.join(SENSITIVITY_NAMES)}")
        if self.early_reject not in EARLY_REJECT_MODES or isinstance(self.early_reject, (int, float)) \
                and not isinstance(self.early_reject, bool):
            raise ConfigError(f"early-reject must be one of off, floor, front, auto (or false/true), "
                              f"got {self.early_reject!r}")
        if self.early_reject_mode != "off" and not _is_fraction_metric(self.metric):
            raise ConfigError(f"early-reject needs a metric that counts hits per image (top-k, agreement), "
                              f"not {self.metric}")

    def _validate_names(self) -> None:
        """Predicate, cost, calibration and preprocessing settings, against the registries of the modules that
        implement them (which import torch: these checks come after every other one)."""
        from ..quantize.predicates import PRESETS

        if self.predicate != "auto" and self.predicate not in PRESETS:
            raise ConfigError(f"unknown predicate {self.predicate!r}; choose from auto, {', '.join(PRESETS)}")
        from ..search.costs import parse_cost_names

        try:
            parse_cost_names(self.cost_names, self.target)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        from ..quantize.calib import CalibrationError, MethodSpec, check_form_methods, override_spec

        try:
            default = MethodSpec(self.calib_method, self.calib_percentile, self.calib_momentum).validated()
            for glob, value in (self.calib_overrides or {}).items():  # the globs are matched on the model
                override_spec(str(glob), value, default)
            if self.calibration is None:  # a calibration file's methods are checked when it is made
                check_form_methods(self.quant_forms, default, self.calib_overrides)
        except CalibrationError as exc:
            raise ConfigError(str(exc)) from None
        if self.preprocessing is not None:
            from ..sources.data import DataError, check_preprocessing

            try:
                check_preprocessing(self.preprocessing)
            except DataError as exc:
                raise ConfigError(str(exc)) from None

    def _validate_target(self) -> None:
        """A deployment target's settings, and the ones that describe fake quantizers it does not use."""
        if self.target is None:
            for name in ("latency_table", "threads"):
                if getattr(self, name) is not None:
                    raise ConfigError(f"{name.replace('_', '-')} is a setting of a deployment target: give "
                                      "--target onnxruntime-cpu")
            return
        if self.target not in TARGETS:
            raise ConfigError(f"unknown target {self.target!r}; choose from {', '.join(TARGETS)}")
        for name in ("deploy_batch", "threads"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value <= 0):
                raise ConfigError(f"{name.replace('_', '-')} must be a positive integer, got {value!r}")
        for name in ("quant_forms", "calibration", "calib_overrides", "integer_ops"):
            if getattr(self, name):
                raise ConfigError(f"{name.replace('_', '-')} describes fake quantizers; target {self.target} runs "
                                  "the runtime's own formats: leave it out")
        if self.sensitivity == "gradient":
            raise ConfigError(f"sensitivity gradient differentiates through fake quantizers; target {self.target}'s "
                              "genes are runtime formats: use measured (the default with a target)")
        if self.workers:
            raise ConfigError(f"target {self.target} evaluates in one process (ONNX Runtime sessions): leave "
                              "--workers out")
        if self.latency_table is not None and not Path(self.latency_table).is_file():
            raise ConfigError(f"latency table {self.latency_table} does not exist")
        from importlib.util import find_spec

        if find_spec("onnxruntime") is None or find_spec("onnx") is None:
            raise ConfigError(f"target {self.target} needs ONNX Runtime: pip install 'quantsearch[onnx]'")

    def _validate_sources(self) -> None:
        """Model, data and metric settings: kinds, files and mappings, checked before any loading."""
        if not isinstance(self.metric, str):
            raise ConfigError(f"metric must be a name or package.module:callable, got {self.metric!r}")
        for name in ("model_kwargs", "preprocessing", "dataset_kwargs", "metric_kwargs"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, dict):
                raise ConfigError(f"{name.replace('_', '-')} must be a mapping, got {type(value).__name__}")
        for name in ("pretrained", "channels_last", "amp"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, bool):
                raise ConfigError(f"{name.replace('_', '-')} must be true or false, got {value!r}")
        if self.loader_workers is not None and (not isinstance(self.loader_workers, int)
                                                or isinstance(self.loader_workers, bool) or self.loader_workers < 0):
            raise ConfigError(f"loader-workers must be a non-negative integer, got {self.loader_workers!r}")
        if not isinstance(self.workers, int) or isinstance(self.workers, bool) or self.workers < 0:
            raise ConfigError(f"workers must be a non-negative integer (0: serial), got {self.workers!r}")
        if self.ray_address is not None and not self.workers:
            raise ConfigError("ray-address joins a Ray cluster for --workers N: give --workers too")
        if self.workers:
            from importlib.util import find_spec

            if find_spec("ray") is None:
                raise ConfigError(f"--workers {self.workers} evaluates on Ray, which is not installed: "
                                  "pip install 'quantsearch[ray]' (or leave --workers out for serial evaluation)")
        if self.class_index is not None and not Path(self.class_index).is_file():
            raise ConfigError(f"class index {self.class_index} does not exist")
        if not _is_fraction_metric(self.metric) and self.metric != "kl" and not _is_callable_spec(self.metric):
            raise ConfigError(f"unknown metric {self.metric!r}: use top1, top5, agreement, kl or "
                              "package.module:callable")


DATASET_KINDS = ("fashion-mnist", "imagefolder", "images")
TARGETS = ("onnxruntime-cpu",)


def _is_fraction_metric(metric: str) -> bool:
    """``agreement`` and ``topK``: fractions in [0, 1]."""
    return metric == "agreement" or (metric.startswith("top") and metric[3:].isdigit() and int(metric[3:]) > 0)


def _is_callable_spec(spec: str) -> bool:
    """``package.module:callable``."""
    module, colon, attr = str(spec).partition(":")
    return bool(colon) and all(p.isidentifier() for p in module.split(".")) and attr.isidentifier()


def parse_integer_ops(value):
    """``integer-ops`` as given: a preset name, ``GLOB=IMPL,GLOB=IMPL`` (a flag), or a mapping (YAML)."""
    if isinstance(value, str) and "=" in value:
        pairs = [p.strip() for p in value.split(",") if p.strip()]
        if not all("=" in p for p in pairs):
            raise ValueError(f"integer-ops {value!r}: give a preset or GLOB=IMPL pairs separated by commas")
        return {glob.strip(): impl.strip() for glob, impl in (p.split("=", 1) for p in pairs)}
    return value


def parse_bits(text: str, option: str = "bits") -> tuple[int, int]:
    """``"2:8"`` -> ``(2, 8)``; a single number means a fixed width."""
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


def _check_stop(patience, min_gain) -> None:
    """The convergence stop's settings (search/stopping.py)."""
    if not isinstance(patience, int) or isinstance(patience, bool) or patience < 0:
        raise ConfigError(f"patience must be a whole number of checks >= 0 (0: spend the whole budget), "
                          f"got {patience!r}")
    if isinstance(min_gain, bool) or not isinstance(min_gain, (int, float)) or not 0 <= min_gain < 1:
        raise ConfigError(f"min-gain must be a relative hypervolume gain in [0, 1), got {min_gain!r}")


def _check_refine(config: "ExploreConfig") -> None:
    """The refined front's settings (run/refined.py): a known refinement, a positive budget and iteration count, a
    margin >= 0; a target run's genes are runtime formats, which refinement does not touch."""
    if config.refine is None:
        return
    try:
        check_refinement(config.refine)
    except ValueError as exc:
        raise ConfigError(f"refine: {exc}") from None
    if config.target:
        raise ConfigError("refine adjusts fake-quantized weights; a target run's genes are the runtime's formats")
    number = (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool))
    if not number(config.refine_budget) or not config.refine_budget > 0:
        raise ConfigError(f"refine-budget must be a positive number of full evaluations, got {config.refine_budget!r}")
    if not number(config.refine_margin) or not config.refine_margin >= 0:
        raise ConfigError(f"refine-margin must be a number >= 0, got {config.refine_margin!r}")
    if not isinstance(config.refine_iterations, int) or isinstance(config.refine_iterations, bool) or \
            config.refine_iterations < 1:
        raise ConfigError(f"refine-iterations must be a positive integer, got {config.refine_iterations!r}")
