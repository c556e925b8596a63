"""The session: everything a run is made of, built from its settings in one place.

settings -> model (source, weights, checkpoint) and its preprocessing -> dataset and splits -> quantized model ->
calibration -> evaluators -> FP32 -> the bound. ``explore``, ``calibrate``, ``apply``, the Ray worker and the
notebook all call :func:`build_session`, so they cannot drift apart: a bit-config that records the settings
rebuilds exactly the model, images and metric its accuracy was measured with.
"""
from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import asdict, dataclass, field
from functools import cached_property
from typing import Sequence

import torch
from torch import nn

from ..fingerprints import file_sha256, fingerprint_model, fingerprint_tensors
from ..quantize.calib import Calibration, calibrate, data_fingerprint
from ..quantize.quantized_model import INPUT_QUANTIZER, QuantizedActivationsModel
from ..search.bound import Bound
from ..search.costs import CostModel, get_costs, parse_cost_names, profile_model
from ..search.evaluator import Evaluator, NumericalError
from ..sources.data import Preprocessing, Splits, data_loader, load_dataset, split_dataset
from ..sources.models import create_model, model_preprocessing
from .settings import ConfigError, ExploreConfig

__all__ = ["Session", "build_session", "resolve_predicate", "search_genes", "BASELINES", "calibration_bits"]

log = logging.getLogger("quantsearch")
# uniform (weight bits, activation bits) configurations, as in the ViT quantization literature's tables
BASELINES = {"W8A8": (8, 8), "W8A6": (8, 6), "W6A6": (6, 6), "W4A8": (4, 8), "W8A4": (8, 4), "W4A4": (4, 4)}
SPLITS = ("calibration", "search", "holdout")
LATENCY_REPEATS = 10  # interleaved rounds per latency measurement (median kept)


def resolve_predicate(predicate: str, model: nn.Module) -> str:
    """``auto``: ``vit`` for models with (timm) attention modules, else ``conv2d``."""
    if predicate != "auto":
        return predicate
    return "vit" if any(hasattr(m, "fused_attn") for m in model.modules()) else "conv2d"


def search_genes(qmodel: QuantizedActivationsModel, search_space: str) -> list[str]:
    """The quantizers searched: activations, weights or both (each kind in the model's order)."""
    return {"activations": qmodel.activation_names, "weights": qmodel.weight_names,
            "both": qmodel.activation_names + qmodel.weight_names}[search_space]


def calibration_bits(config: ExploreConfig) -> tuple[int, int]:
    """The activation widths to calibrate: the search range, widened to the uniform baselines' A4..A8."""
    lo, hi = config.bit_range
    return min(lo, min(a for _, a in BASELINES.values())), max(hi, max(a for _, a in BASELINES.values()))


@dataclass
class Session:
    """A run's model, data, quantized model, calibration and evaluators (built by :func:`build_session`)."""

    config: ExploreConfig
    model: nn.Module
    preprocessing: Preprocessing
    pretrained: bool
    splits: Splits
    predicate: str
    qmodel: QuantizedActivationsModel  # a target run: its RuntimeFormatModel (the genes are formats)
    device: torch.device
    calibration: Calibration | None = None
    fp32_seconds: dict[str, float] = field(default_factory=dict)
    _evaluators: dict[str, Evaluator | None] = field(default_factory=dict, repr=False)
    _fp32: dict[str, float] = field(default_factory=dict, repr=False)

    # -- calibration
    def calibration_inputs(self) -> list[torch.Tensor]:
        """The calibration split's model inputs, on the device (for refinement after the search)."""
        from ..quantize.calib import batch_inputs

        loader = data_loader(self.splits.calibration, self.config.batch_size, self.device,
                             self.config.loader_workers)
        return [batch_inputs(b).to(self.device) for b in loader][: self.config.calib_batches]

    def calibrate(self, calibration: Calibration | None = None, progress=None) -> Calibration:
        """Apply ``calibration`` (the driver's, a file's) after checking that it fits, or calibrate as the
        settings say; the result is also kept in ``self.calibration``. ``progress`` wraps the batches (a bar).
        A target calibrates the ranges of its int8-static tensors in the runtime itself."""
        config = self.config
        if config.target:
            from ..deploy.targets.onnxruntime import RuntimeCalibration

            self.calibration = RuntimeCalibration(self.qmodel.calibrate(self.calibration_inputs()))
            return self.calibration
        loader = data_loader(self.splits.calibration, config.batch_size, self.device, config.loader_workers)
        loader = progress(loader) if progress is not None and calibration is None and not config.calibration \
            else loader
        if calibration is None and config.calibration:
            calibration = Calibration.load(config.calibration)
            calibration.check_fits(self.qmodel, data_fingerprint(loader, config.calib_batches), config.bit_range,
                                   source=f"calibration file {config.calibration}")
        if calibration is not None:
            calibration.apply(self.qmodel)
        else:
            calibration = calibrate(self.qmodel, loader, config.calib_batches, config.calib_method,
                                    bits=calibration_bits(config), overrides=config.calib_overrides,
                                    percentile=config.calib_percentile, momentum=config.calib_momentum)
        self.calibration = calibration
        return calibration

    # -- evaluation
    def evaluator(self, split: str = "search") -> Evaluator | None:
        """The evaluator of ``split`` (search or holdout), built once; None for an empty split. Label-free
        metrics keep the FP32 outputs of its images, computed here."""
        if split not in self._evaluators:
            data = getattr(self.splits, split) or []
            config = self.config
            self._evaluators[split] = Evaluator(
                data, metric=config.metric, batch_size=config.batch_size, device=self.device, reference=self.qmodel,
                channels_last=config.channels_last, amp=config.amp, workers=config.loader_workers,
                metric_kwargs=config.metric_kwargs, compile=config.compile and split == "search",
            ) if len(data) else None
        return self._evaluators[split]

    def fp32(self, split: str = "search") -> float | None:
        """The metric of the FP32 model (quantization off) on ``split``; None for an empty split."""
        if split not in self._fp32:
            evaluate = self.evaluator(split)
            if evaluate is None:
                return None
            start = time.perf_counter()
            try:
                own = self.qmodel.unrefined() if getattr(self.qmodel, "refined", None) else contextlib.nullcontext()
                with own, self.qmodel.quantization_disabled():  # the model's own weights, not refined ones
                    self._fp32[split] = evaluate(self.qmodel)
            except NumericalError as exc:  # nothing to compare candidates with: bad input, not a failed candidate
                raise ValueError(f"the FP32 model (quantization off) {exc}") from None
            self.fp32_seconds[split] = time.perf_counter() - start
        return self._fp32[split]

    @cached_property
    def bound(self) -> Bound:
        """The settings' bound: ``min-accuracy`` as given, or ``max-accuracy-drop`` from FP32 on the search split
        (FP32 - drop as a floor; FP32 + drop as a ceiling for a lower-is-better metric such as KL)."""
        evaluate, fp32, config = self.evaluator("search"), self.fp32("search"), self.config
        if config.min_accuracy is not None:
            bound = Bound(float(config.min_accuracy), evaluate.higher_is_better, evaluate.name, evaluate.fraction)
        else:
            bound = Bound.relative_to(fp32, float(config.max_accuracy_drop), evaluate.higher_is_better,
                                      evaluate.name, evaluate.fraction)
        if not bound.holds(fp32):
            raise ValueError(f"min-accuracy {bound.limit:.4f} is {'above' if bound.higher_is_better else 'below'} "
                             f"the FP32 {bound.metric} on the search split ({fp32:.4f}): no configuration can "
                             "reach it")
        return bound

    # -- costs and genes
    @cached_property
    def example(self) -> torch.Tensor:
        """One input sample as a batch of one (shapes, cost profiles, exports)."""
        return self.splits.calibration[0][0].unsqueeze(0).to(self.device)

    @cached_property
    def _profile(self):
        return profile_model(self.qmodel, self.example)

    def costs(self, names: str | Sequence[str]) -> list[CostModel]:
        """Cost models by name (``bits``, ``bops``, ...), from one shape-recording pass shared by all; a target's
        (``latency``, ``size``) from its latency table and its formats."""
        if self.config.target:
            table = {"latency": lambda: self.latency_cost, "size": self.qmodel.size_cost}
            return [table[n]() for n in parse_cost_names(names, self.config.target)]
        return get_costs(names, self.qmodel, profile=self._profile)

    @cached_property
    def latency_table(self):
        """The target's latency table: the settings' file (checked against this machine, model and batch size),
        or measured here (each layer shape and format once per machine: cached)."""
        from ..deploy.targets.latency import LatencyTable, measure_latency

        config = self.config
        if config.latency_table:
            table = LatencyTable.load(config.latency_table)
            table.check_fits(self.qmodel, config.threads)
            return table
        log.info("measuring latency in ONNX Runtime (deployment batch %d, threads %s; cached per machine)",
                 config.deploy_batch, config.threads or "default")
        return measure_latency(self.qmodel, self.example.cpu(), threads=config.threads, repeats=LATENCY_REPEATS)

    @cached_property
    def latency_cost(self):
        """The ``latency`` cost: the table, with configurations that mix int8-static and fp32 Convs timed whole
        (:class:`~quantsearch.deploy.targets.latency.WholeModelLatency`; one instance, so each is timed once)."""
        from ..deploy.targets.latency import WholeModelLatency

        return WholeModelLatency(self.latency_table, self.qmodel, self.example.cpu(), self.config.threads)

    def use_latency_table(self, path) -> None:
        """Take the latency table in ``path`` (a resumed run's own), checked against this machine, model and batch
        size, so that the costs of new evaluations match those already stored."""
        from ..deploy.targets.latency import LatencyTable

        table = LatencyTable.load(path)
        table.check_fits(self.qmodel, self.config.threads)
        self.__dict__["latency_table"] = table

    @property
    def baselines(self) -> dict[str, dict[str, int]]:
        """The uniform configurations every search starts from, by name: :data:`BASELINES` (weight and activation
        widths), or a target's formats (each layer that takes the format in it, the rest fp32)."""
        names = self.qmodel.quantizer_names
        if self.config.target:
            from ..deploy.targets.onnxruntime import FORMATS, FP32

            ranges = self.bit_ranges
            return {fmt: {n: i if ranges[n][0] <= i else FP32 for n in names}
                    for i, fmt in enumerate(FORMATS) if i != FP32}
        weights = set(self.qmodel.weight_names)
        return {name: {n: (w if n in weights else a) for n in names} for name, (w, a) in BASELINES.items()}

    @property
    def genes(self) -> list[str]:
        if self.config.target:
            return self.qmodel.quantizer_names
        return search_genes(self.qmodel, self.config.search_space)

    @property
    def bit_ranges(self) -> dict[str, tuple[int, int]]:
        """Every quantizer's ``(lo, hi)``: ``--bits`` for activations, ``--weight-bits`` for weights (a target:
        each layer's formats)."""
        if self.config.target:
            return self.qmodel.gene_ranges()
        weights = set(self.qmodel.weight_names)
        a, w = self.config.bit_range, self.config.weight_bit_range
        return {n: (w if n in weights else a) for n in self.qmodel.quantizer_names}

    @property
    def resolved_settings(self) -> dict:
        """The settings as given, and what "auto" and the defaults resolved to in this session."""
        methods = sorted(set(self.calibration.methods.values())) if self.calibration is not None else []
        return asdict(self.config) | {"cost": self.config.cost_names,
                                      "predicate_resolved": self.predicate, "calibration_methods": methods,
                                      "preprocessing_resolved": self.preprocessing.to_dict(),
                                      "pretrained_resolved": self.pretrained}

    # -- identity
    @cached_property
    def fingerprints(self) -> dict[str, str | None]:
        """Digests of what results depend on: weights, checkpoint file, search and hold-out images (computed once;
        the weights and images do not change within a session)."""
        own = self.qmodel.unfolded() if hasattr(self.qmodel, "unfolded") else contextlib.nullcontext()
        with own:  # the model's own weights, not those a per-channel fold moved ranges into
            model = fingerprint_model(self.model)
        out: dict[str, str | None] = {"model": model,
                                      "checkpoint": file_sha256(self.config.checkpoint)
                                      if self.config.checkpoint else None}
        for split in ("search", "holdout"):
            evaluate = self.evaluator(split)
            out[split] = (fingerprint_tensors(t for batch in evaluate.batches for t in batch)
                          if evaluate is not None else None)
        return out


def build_session(config: ExploreConfig, *, calibrate: bool = True, calibration: Calibration | None = None,
                  weight_quantizers: bool = True) -> Session:
    """Load the model and data that ``config`` names, split them, place the quantizers and calibrate them.

    Args:
        calibrate: calibrate (or apply ``calibration`` / the settings' calibration file); False leaves the
            quantizers uncalibrated, for a caller that sets amax itself (``apply`` from a bit-config).
        calibration: a calibration to apply instead of calibrating (the Ray driver's, for its workers).
        weight_quantizers: per-channel weight quantizers (False only for bit-configs of schema 1).
    """
    config.validate()
    torch.manual_seed(config.seed)  # a model without published weights is initialised alike in every process
    device = torch.device(config.device)
    pretrained = config.pretrained if config.pretrained is not None else config.checkpoint is None
    model = create_model(config.model, checkpoint=config.checkpoint, pretrained=pretrained,
                         checkpoint_key=config.checkpoint_key, **(config.model_kwargs or {}))
    preprocessing = model_preprocessing(model, config.preprocessing)
    dataset = load_dataset(config.dataset, preprocessing, config.class_index, **(config.dataset_kwargs or {}))
    model = model.to(device, memory_format=torch.channels_last) if config.channels_last else model.to(device)
    splits = split_dataset(dataset, config.calibration_samples, config.eval_samples, config.holdout_samples,
                           seed=config.seed, validation=config.validation_samples)
    if config.target:  # the genes are the runtime's formats per layer, not fake quantizers
        from ..deploy.targets.onnxruntime import RuntimeFormatModel

        rmodel = RuntimeFormatModel(model, batch_size=config.deploy_batch, threads=config.threads)
        session = Session(config, model, preprocessing, pretrained, splits, config.target, rmodel, device)
        if calibrate:
            session.calibrate(calibration)
        return session
    predicate = resolve_predicate(config.predicate, model)
    try:
        qmodel = QuantizedActivationsModel(model, predicate, quantize_input=config.quantize_input,
                                           weight_quantizers=weight_quantizers, forms=config.quant_forms,
                                           integer_ops=config.integer_ops,
                                           integer_add_bits=config.integer_add_bits).to(device)
    except ValueError as exc:  # a quant-forms or integer-ops glob that matches nothing in this model
        raise ConfigError(str(exc)) from None
    if not [n for n in qmodel.activation_names if n != INPUT_QUANTIZER]:
        raise ValueError(f"predicate {predicate!r} selects no module of {config.model}")
    session = Session(config, model, preprocessing, pretrained, splits, predicate, qmodel, device)
    if calibrate:
        session.calibrate(calibration)
    return session
