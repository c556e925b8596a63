"""A target run's deployment stage: the front as the runtime delivers it.

Every front point, every uniform format and ONNX Runtime's own uniform int8 (``quantize_dynamic``,
``quantize_static``) is exported as the runtime's graph, scored on the hold-out split by a default ORT session
itself (fed the deployment batch at a time), and timed end to end against the FP32 export, all interleaved in this
one process at the deployment batch size. Each point's predicted latency (what the search saw: the table's, or
for a configuration that mixes int8-static and fp32 Convs its whole-model time as a multiple of FP32's) stands
beside its measured one, and beside the prediction re-anchored on this loop's own measurements (the uniform ones
for the table, FP32 for a whole-model time), which takes out the machine's drift since the search and leaves the
prediction's own error; the integer kernels a default session runs after its optimisation are counted, so the
speed is seen to be real.
"""
from __future__ import annotations

import logging
import tempfile
from pathlib import Path

from ..deploy.onnx_export import integer_kernels, runtime_kernels
from ..deploy.targets.baselines import OnnxModel, ort_quantized
from ..deploy.targets.latency import measure_end_to_end, mixes_conv_layouts
from ..deploy.targets.onnxruntime import export_runtime_onnx
from .session import LATENCY_REPEATS, Session

__all__ = ["deploy_front"]

log = logging.getLogger("quantsearch")


def deploy_front(session: Session, front, baselines: dict, phase=lambda items, desc: items) -> dict:
    """Export, score in ORT and time every front point, each uniform baseline (``{name: Evaluation}``) and ORT's
    own int8 against FP32. Returns ``{"rows": {label: row}, "points": [label of each front point]}``; a row holds
    its ``bits`` (None for ORT's files), search and hold-out metric in ORT, predicted and measured milliseconds,
    the file's bytes and its integer kernels."""
    rmodel, config = session.qmodel, session.config
    example = session.example.cpu()
    search, holdout = session.evaluator("search"), session.evaluator("holdout")
    search.reject_below(None)  # every row is scored on all the images
    latency = session.costs("latency")[0]
    batch = example[:1].expand(config.deploy_batch, *example.shape[1:]).contiguous().numpy()
    evaluations = {"FP32": None, **{f"uniform {n}": e for n, e in baselines.items()},
                   **{f"point {i}": e for i, e in enumerate(front)}}
    configs = {label: None if e is None else e.bits for label, e in evaluations.items()}
    rows, saved = {}, rmodel.bit_widths
    with tempfile.TemporaryDirectory() as tmp:
        folder, paths = Path(tmp), {}
        try:
            for label, bits in phase(list(configs.items()), "deploy in ONNX Runtime"):
                rmodel.bit_widths = list(bits) if bits is not None else [hi for _, hi in
                                                                         rmodel.gene_ranges().values()]
                paths[label] = export_runtime_onnx(rmodel, folder / f"{len(paths)}.onnx", example)["path"]
                rmodel.evaluate_in = "onnxruntime"  # the runtime's own answer, not the simulation
                try:
                    scores = {"search": search(rmodel), "holdout": holdout(rmodel) if holdout else None}
                finally:
                    rmodel.evaluate_in = "auto"
                recorded = None if evaluations[label] is None else evaluations[label].costs.get("latency")
                rows[label] = {"bits": None if bits is None else list(bits), **scores, "predicted_ms": (
                    recorded if recorded is not None  # what the search saw (a mixed layout: timed whole then)
                    else latency(dict(zip(rmodel.quantizer_names, rmodel.bit_widths))))}
        finally:
            rmodel.bit_widths = saved
        ort = ort_quantized(paths["FP32"], folder, [x.cpu() for x in session.calibration_inputs()])
        for label, path in ort.items():
            model = OnnxModel(path, config.deploy_batch, config.threads)
            rows[label] = {"bits": None, "search": search(model), "holdout": holdout(model) if holdout else None,
                           "predicted_ms": None}
        paths.update(ort)
        log.info("timing %d ONNX files end to end, interleaved (batch %d)", len(paths), config.deploy_batch)
        seconds = measure_end_to_end(paths, batch, threads=config.threads, repeats=LATENCY_REPEATS)
        for label, path in paths.items():
            rows[label] |= {"measured_ms": 1e3 * seconds[label], "file_bytes": path.stat().st_size,
                            "integer_kernels": integer_kernels(runtime_kernels(path))}
    table = session.latency_table
    now = {"fp32": seconds["FP32"], **{f: seconds[f"uniform {f}"] for f in table.uniform if f != "fp32"}}
    anchored = table.reanchored(now)  # this loop's uniform times: what is left is the table's additivity error
    for row in rows.values():
        if row["bits"] is not None:
            formats = dict(zip(rmodel.quantizer_names, row["bits"]))
            whole = mixes_conv_layouts(rmodel, formats)  # timed whole as a multiple of FP32: scale by FP32 now
            row["prediction"] = "timed whole" if whole else "table"
            row["reanchored_ms"] = (row["predicted_ms"] * 1e3 * seconds["FP32"] / latency.fp32 if whole
                                    else 1e3 * anchored.predict(formats))
    if config.early_reject_mode != "off":
        search.reject_below(session.bound.limit)
    return {"rows": rows, "points": [f"point {i}" for i in range(len(front))],
            "deploy_batch": config.deploy_batch, "threads": config.threads, "repeats": LATENCY_REPEATS,
            "machine": session.latency_table.machine}
